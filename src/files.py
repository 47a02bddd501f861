"""Files that appear complete or not at all: write to a temporary name beside the target,
then rename over it (also for directories). A kill at any moment leaves the old version
or the new one, never a half-written file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temporary file beside `path`, then rename over it: readers see the old
    file or the complete new one, never a half-written file (also after kill -9)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


OLD_SUFFIX = ".old"  # a directory moved aside while its new version is renamed into place


@contextlib.contextmanager
def atomic_directory(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """A temporary directory beside `path` to fill; renamed to `path` when the block ends
    without error, removed otherwise.

    An existing `path` is an error unless `replace`: then it is moved to `path.old` first
    and removed last, so a kill at any moment leaves a complete `path` or a complete
    `path.old` (`complete_or_old` finds it, `clean_interrupted` tidies up).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists; choose a new directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():  # on disk before the rename makes them visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = path.with_name(path.name + OLD_SUFFIX)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def complete_or_old(path: str | Path) -> list[Path]:
    """Where a directory written by `atomic_directory(replace=True)` may be: itself, then its `.old` twin."""
    path = Path(path)
    return [path, path.with_name(path.name + OLD_SUFFIX)]


def clean_interrupted(directory: str | Path) -> list[Path]:
    """Finish what killed atomic writes left in `directory` (call it while no writer runs):
    `.name.*.tmp` files and directories go; `name.old` goes when `name` exists (killed while
    removing it) or becomes `name` again when it does not (killed between the two renames).
    Returns what was removed or restored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    touched = []
    for tmp in sorted(directory.glob(".*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        touched.append(tmp)
    for old in sorted(directory.glob("*" + OLD_SUFFIX)):
        final = old.with_name(old.name[: -len(OLD_SUFFIX)])
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
        touched.append(old)
    return touched


class ProcessFile:
    """A read-only file for `pread`, opened on first use in each process: a DataLoader
    worker (a fork) reopens it rather than share, or close, its parent's descriptor.
    Pickles as its path."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self._fd: int | None = None
        self._pid: int | None = None

    def pread(self, n: int, offset: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, n, offset)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_fd": None, "_pid": None}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
