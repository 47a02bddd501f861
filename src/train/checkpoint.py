"""Checkpoints: save, find the newest, resume (docs/distributed.md, resuming).

A checkpoint is a `save_pretrained` directory (model + tokenizer) plus
`training_state.pt` (optimizer, scheduler, step, best metric, RNG states of every
rank) and `options.json`. Everything is plain data: `torch.load(weights_only=True)`
reads it, and no argparse object is ever pickled.

Saves are atomic: the directory is written under a temporary name and renamed into
place; the previous version is moved aside first and removed last, so a kill at any
moment leaves a complete `name` or a complete `name.old` that `resolve` finds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src import distributed as dist
from src.errors import InputError, ModelPathError
from src.files import atomic_directory, clean_interrupted, complete_or_old
from src.train.strategy import Strategy

logger = logging.getLogger("fid")

STATE_FILE = "training_state.pt"


class ResumeMismatch(InputError):
    """The ranks disagree about the checkpoint to resume (their views of the run directory differ)."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoint"


def resolve(path: str | Path) -> Path | None:
    """A complete checkpoint directory at `path`, or its `.old` twin after an interrupted swap."""
    for candidate in complete_or_old(path):
        if (candidate / STATE_FILE).exists() or (candidate / "config.json").exists():
            return candidate
    return None


def latest(run_dir: str | Path) -> Path | None:
    """The run's `latest` checkpoint, if any."""
    return resolve(checkpoint_root(run_dir) / "latest")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            *np_state[2:],
        ),  # gloo cannot gather uint32
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_initialized():  # only a run that uses CUDA: `--device cpu` never touches it
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def _shared_directory(final: Path) -> Iterator[Path]:
    """files.atomic_directory for every rank: rank 0 creates the temporary directory and
    renames it into place once every rank has written its part."""
    if not dist.is_distributed():
        with atomic_directory(final, replace=True) as tmp:
            yield tmp
        return
    scope = atomic_directory(final, replace=True) if dist.is_main() else contextlib.nullcontext()
    with scope as tmp:
        tmp = Path(dist.broadcast_from_main(str(tmp) if tmp is not None else None))
        yield tmp
        dist.barrier()  # every rank's files are in before rank 0 renames


def save(
    run_dir: str | Path,
    name: str,
    strategy: Strategy,
    model,
    tokenizer,
    optimizer,
    scheduler,
    options: Mapping[str, Any],
    state: dict[str, Any],
) -> Path:
    """Save `checkpoint/<name>` atomically. Collective: every rank calls it (the strategy may
    gather or write shards; the RNG states of every rank are gathered); rank 0 writes the rest."""
    rngs = dist.gather_objects(rng_state())
    final = checkpoint_root(run_dir) / name
    with _shared_directory(final) as tmp:
        # `latest` is for resuming: a sharding strategy may keep it in shards only.
        model_state = strategy.save(tmp, model, optimizer, consolidated=name != "latest")
        if dist.is_main():
            payload = {
                "step": int(state["step"]),
                "best_metric": None if state.get("best_metric") is None else float(state["best_metric"]),
                "optimizer": None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": state.get("scaler"),  # fp16 GradScaler
                "rng": rngs,
                "options": dict(options),
                **model_state,
            }
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            torch.save(payload, tmp / STATE_FILE)
            with open(tmp / "options.json", "w") as f:
                json.dump(dict(options), f, indent=1, sort_keys=True)
    if dist.is_main():
        logger.info("saved checkpoint %s (step %d)", final, state["step"])
    return final


def clean_interrupted_saves(run_dir: str | Path) -> None:
    """Finish what a killed save left behind (call with the run directory's lock held): in
    the checkpoint directory and the run directory (files.clean_interrupted)."""
    for path in clean_interrupted(checkpoint_root(run_dir)) + clean_interrupted(run_dir):
        logger.info("tidied %s, left by an interrupted save", path)


def load_training_state(
    ckpt_dir: str | Path, optimizer=None, scheduler=None, strategy: Strategy | None = None, model=None
) -> dict[str, Any]:
    """Restore optimizer (through `strategy`), scheduler and this rank's RNG from a checkpoint;
    return step and best metric."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.exists():
        raise ModelPathError(f"{ckpt_dir}: no {STATE_FILE}, not a training checkpoint of this code")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or truncated file: torch and pickle errors of all kinds
        raise ModelPathError(f"{path}: cannot read the training state ({type(e).__name__}: {e})") from e
    if optimizer is not None and strategy is not None:
        strategy.load(Path(ckpt_dir), model, optimizer, payload)
    elif optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    rngs = payload.get("rng") or []
    rank = dist.get_rank()
    if rank < len(rngs):
        set_rng_state(rngs[rank])
    return {
        "step": payload["step"],
        "best_metric": payload["best_metric"],
        "scaler": payload.get("scaler"),
        "options": payload["options"],
    }


def saved_options(ckpt_dir: Path) -> dict[str, Any]:
    """The options.json a checkpoint was saved with."""
    path = ckpt_dir / "options.json"
    try:
        options = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not the JSON object of options a checkpoint is saved with ({e})") from None
    if not isinstance(options, dict):
        raise InputError(f"{path}: not the JSON object of options a checkpoint is saved with")
    return options


def start_point(
    run_dir: str | Path, model_path: str, model_name_or_path: str | None, default_model: str
) -> tuple[str, Path | None]:
    """(weights to load, checkpoint to resume or None) for a training run (docs/distributed.md, resuming).

    A run directory holding `latest` resumes it, unless `--model_path` names other weights
    than the run started from: then those win, with a fresh optimizer (and a warning, since
    the run's checkpoints will be overwritten). Rerunning the same command, e.g. after a
    SLURM requeue, therefore always resumes. A fresh run starts from `--model_path`, else
    `--model_name_or_path`, else `default_model`.

    Decided once, by rank 0, and followed by every rank: ranks on nodes whose views of a
    shared file system differ for a moment would otherwise resume at different steps and
    hang in mismatched collectives. A rank that cannot see rank 0's checkpoint stops, and
    so do all the others, with an error naming it.
    """
    decided = _decide_start(run_dir, model_path, model_name_or_path, default_model) if dist.is_main() else None
    weights, resume = dist.broadcast_from_main(decided)
    resume = None if resume is None else Path(resume)
    seen = dist.gather_objects(resume is None or resolve(resume) == resume)
    missing = [rank for rank, ok in enumerate(seen) if not ok]
    if missing:
        raise ResumeMismatch(
            f"rank 0 resumes from {resume}, but rank(s) {missing} cannot read it there: every rank must see the "
            "run directory (a shared file system, in sync); stopping all ranks"
        )
    return weights, resume


def agree_on_step(step: int, resume_dir: Path | None) -> None:
    """Every rank loaded the same step from `resume_dir`, or every rank stops with the mismatch."""
    steps = dist.gather_objects(int(step))
    if len(set(steps)) > 1:
        raise ResumeMismatch(
            f"the ranks read different steps from {resume_dir}: {dict(enumerate(steps))} (rank: step); the "
            "checkpoint changed while they read it, or their file systems differ; stopping all ranks"
        )


def _decide_start(
    run_dir: str | Path, model_path: str, model_name_or_path: str | None, default_model: str
) -> tuple[str, str | None]:
    resume = latest(run_dir)
    if resume is not None:
        started_from = saved_options(resume).get("model_path", "none")
        if model_path in ("none", started_from):
            return str(resume), str(resume)
        logger.warning(
            "%s holds a run started from %s; --model_path %s starts over from those weights and "
            "overwrites its checkpoints",
            run_dir,
            started_from,
            model_path,
        )
    if model_path != "none":
        return model_path, None
    return model_name_or_path or default_model, None
