"""One training run per run directory.

A second `train_reader.py` / `train_retriever.py` started on a directory that a live run
holds must refuse at once: two runs writing the same `checkpoint/latest` would silently
mix their states. The lock is an advisory `flock` on `run_dir/run.lock`, so the kernel
drops it when its process dies (SIGKILL included): a killed run never blocks its restart.
Only global rank 0 takes it. `flock` is not reliable on every network file system; there
the lock is best effort.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from src.errors import RunDirectoryBusy

LOCK_FILE = "run.lock"

_held: dict[Path, int] = {}  # run_dir → open file descriptor holding the lock


def acquire(run_dir: str | Path) -> None:
    """Lock `run_dir` for this process, or raise RunDirectoryBusy naming the holder."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(os.pread(fd, 4096, 0))
        os.close(fd)
        raise RunDirectoryBusy(
            f"{run_dir} is in use by another run ({holder}); wait for it to finish, stop it, or choose another "
            "--name / --checkpoint_dir"
        ) from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    info["command"] = " ".join(sys.argv)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[run_dir] = fd


def release(run_dir: str | Path | None = None) -> None:
    """Drop this process's lock on `run_dir` (all its locks when None)."""
    dirs = list(_held) if run_dir is None else [Path(run_dir).resolve()]
    for d in dirs:
        fd = _held.pop(d, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "process unknown"
    parts = [f"pid {info['pid']}" if "pid" in info else "pid unknown"]
    if "host" in info:
        parts.append(f"on {info['host']}")
    if "since" in info:
        parts.append(f"since {info['since']}")
    if "command" in info:
        parts.append(f"command: {info['command']}")
    return ", ".join(parts)
