"""What every script shares at its start and end: logging, seeding, the run directory
(lock, options files) and the wrapper that turns a bad input into one line and exit 2
(and lets a bug show its traceback)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src import distributed as dist
from src.distributed import Runtime
from src.errors import is_bad_input
from src.files import atomic_write
from src.options import Options, options_dict
from src.train import runlock

logger = logging.getLogger("fid")

SHARED = "it only matters to other scripts"


def init_logger(run_dir: str | Path | None = None, is_main: bool = True) -> logging.Logger:
    """Log to stdout and, on the main process, to `run_dir/run.log` (appending on resume)."""
    close_loggers(("fid",))
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", datefmt="%m/%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if run_dir is not None and is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(run_dir) / "run.log")
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def close_loggers(names: tuple[str, ...] = ("fid", "fid.topk")) -> None:
    """Close and drop the handlers of the scripts' loggers (their log files and streams):
    before a new run configures them, or after a script ran inside another process."""
    for name in names:
        log = logging.getLogger(name)
        for handler in log.handlers:
            handler.close()
        log.handlers.clear()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(
    opt, options: Options, lock: bool = False, ignored: tuple[str, ...] | Mapping[str, str] = ()
) -> tuple[Path, logging.Logger, Runtime]:
    """The start of every training/evaluation script: process group, seed (offset by rank so
    ranks draw different dropout), run directory `checkpoint_dir/name`, logger (run.log on
    rank 0), and the options saved as opt.log / options.json. Returns (run_dir, logger, runtime).

    With `lock` (training), global rank 0 first takes the run directory's lock, so a second
    run on the same directory stops before it touches anything (see runlock.py).
    `ignored`: flags the script accepts (shared option groups) but does not use; each one
    given a non-default value gets a warning (warn_ignored)."""
    run_dir = Path(opt.checkpoint_dir) / opt.name
    if lock and dist.launched_rank() == 0:
        runlock.acquire(run_dir)
    runtime = dist.init_distributed(
        opt.device, opt.local_rank, opt.main_port, opt.dist_timeout_minutes, tf32=not opt.no_tf32
    )
    set_seed(opt.seed + runtime.rank)
    log = init_logger(run_dir, runtime.is_main)
    warn_ignored(opt, options.given, ignored, log)
    if runtime.is_main:
        save_options(opt, options.defaults, run_dir)
    return run_dir, log, runtime


def warn_ignored(
    opt,
    given: Mapping[str, str],
    ignored: tuple[str, ...] | Mapping[str, str],
    log: logging.Logger = logger,
    reason: str = SHARED,
) -> None:
    """One warning for each flag of `ignored` (option dests) that the user set to something
    other than its default (`given`: Options.given). `ignored`: names, all for `reason`, or
    {name: reason}."""
    reasons = dict(ignored) if isinstance(ignored, Mapping) else dict.fromkeys(ignored, reason)
    script = Path(sys.argv[0]).name
    for name, why in reasons.items():
        if name in given:
            log.warning("%s ignores %s (set to %r): %s", script, given[name], vars(opt)[name], why)


def finish() -> None:
    """The end of every script: leave the process group and drop the run directory's lock."""
    dist.destroy()
    runlock.release()


def report_bad_input(error: BaseException) -> None:
    """One line on the terminal (stderr), and the same line in run.log when the run has one."""
    message = str(error)
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"error: {message}", file=sys.stderr, flush=True)


def cli(main) -> None:
    """Run a script's main. A bad input ends with one line naming what is wrong and exit code
    2, not a traceback: an InputError (a file, model path or option value the code checked),
    RunDirectoryBusy, or the OS refusing a path the user named (errors.USER_PATH_ERRORS).
    Anything else is a bug and shows its traceback; FID_DEBUG=1 shows it for bad inputs too.
    The run directory's lock is dropped however main ends."""
    try:
        main()
    except BaseException as e:
        if not is_bad_input(e) or os.environ.get("FID_DEBUG"):
            raise
        report_bad_input(e)
        sys.exit(2)
    finally:
        runlock.release()


def format_options(opt: argparse.Namespace, defaults: dict[str, Any]) -> str:
    lines = []
    for key, value in sorted(options_dict(opt).items()):
        mark = f"\t[default: {defaults[key]}]" if key in defaults and defaults[key] != value else ""
        lines.append(f"{key:>40}: {value}{mark}")
    return "\n".join(lines)


def save_options(opt: argparse.Namespace, defaults: dict[str, Any], run_dir: str | Path) -> None:
    """opt.log (readable, non-defaults marked) and options.json (plain data) in the run directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(run_dir / "opt.log") as f:
        f.write(format_options(opt, defaults) + "\n")
    with atomic_write(run_dir / "options.json") as f:
        json.dump(options_dict(opt), f, indent=1, sort_keys=True)
