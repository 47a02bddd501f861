"""The one training loop, shared by the reader and the retriever (SPEC §8).

It knows nothing about readers or retrievers: a script hands it a `loss_fn(model,
batch) -> loss` and an `eval_fn(model) -> {metric: value}`. It owns steps, gradient
accumulation, clipping, the eval/save cadence, `best_dev`/`step-N`/`latest`,
tensorboard, the progress bar, DDP and resuming with the same data order.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from . import checkpoint, dist
from .util import autocast


class EpochSampler(Sampler[int]):
    """A fixed permutation per (seed, epoch), split across ranks, that can start mid-epoch.

    Every rank gets the same number of indices (the permutation is padded by wrapping
    around, as DistributedSampler does) so DDP ranks never wait on each other.
    """

    def __init__(self, n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.seed, self.epoch = n, seed, epoch
        self.rank, self.world_size, self.start = rank, world_size, start

    def rank_indices(self) -> list[int]:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()
        per_rank = math.ceil(self.n / self.world_size)
        perm += perm[: per_rank * self.world_size - self.n]
        return perm[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self.rank_indices()[self.start :])

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size) - self.start


def _is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    if best is None:
        return True
    return value > best if higher_is_better else value < best


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    dataset,
    collator: Callable,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None,
    opt,
    run_dir: str | Path,
    tokenizer,
    state: dict[str, Any],
    metric_name: str,
    higher_is_better: bool,
    logger,
) -> dict[str, Any]:
    """Train until `opt.total_steps` batches have been seen; returns the final state."""
    step: int = state.get("step", 0)
    best: float | None = state.get("best_metric")
    bs = opt.per_gpu_batch_size
    batches_per_epoch = math.ceil(math.ceil(len(dataset) / opt.world_size) / bs)
    if batches_per_epoch == 0:
        raise ValueError(f"{opt.train_data}: no training examples")

    base_model = model
    if opt.is_distributed:
        device_ids = [opt.device.index] if opt.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    use_scaler = opt.precision == "fp16" and opt.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    if use_scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])

    tb = None
    if opt.is_main:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(log_dir=str(run_dir))

    def save(name: str) -> None:
        state = {"step": step, "best_metric": best, "scaler": scaler.state_dict() if use_scaler else None}
        checkpoint.save(run_dir, name, base_model, tokenizer, optimizer, scheduler, opt, state)

    check_preemption = "SLURM_JOB_ID" in os.environ
    accumulation = max(1, opt.accumulation_steps)
    running_loss, running_count = 0.0, 0
    need_latest = pending_step_save = False
    t0 = time.time()
    model.train()
    bar = tqdm(total=opt.total_steps, initial=step, desc="train", disable=not opt.is_main, dynamic_ncols=True)
    logger.info(
        "training from step %d to %d: %d examples, %d batches per epoch per process, %d processes",
        step,
        opt.total_steps,
        len(dataset),
        batches_per_epoch,
        opt.world_size,
    )
    while step < opt.total_steps:
        epoch, offset = divmod(step, batches_per_epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sampler = EpochSampler(len(dataset), opt.seed, epoch, opt.rank, opt.world_size, start=offset * bs)
        loader = DataLoader(
            dataset,
            batch_size=bs,
            sampler=sampler,
            collate_fn=collator,
            num_workers=opt.num_workers,
            # Own generator: creating the iterator must not consume the global RNG
            # (dropout), or a resumed run would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(opt.seed + epoch),
        )
        for batch in loader:
            step += 1
            sync = step % accumulation == 0 or step == opt.total_steps
            no_sync = model.no_sync() if opt.is_distributed and not sync else contextlib.nullcontext()
            with no_sync:
                with autocast(opt):
                    loss = loss_fn(model, batch)
                scaler.scale(loss / accumulation).backward()
            if sync:
                scaler.unscale_(optimizer)
                if opt.clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running_loss += loss.item()
            running_count += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")

            if step % opt.eval_freq == 0 or step == opt.total_steps:
                train_loss, _ = dist.weighted_average(running_loss / max(1, running_count), running_count)
                running_loss, running_count = 0.0, 0
                lr = scheduler.get_last_lr()[0]
                metrics = eval_fn(base_model) if eval_fn is not None else {}
                model.train()
                message = f"step {step}/{opt.total_steps} | train loss {train_loss:.4f} | lr {lr:.2e}"
                message += "".join(f" | dev {k} {v:.4f}" for k, v in metrics.items())
                message += f" | {time.time() - t0:.1f}s"
                if metric_name in metrics and _is_better(metrics[metric_name], best, higher_is_better):
                    best = metrics[metric_name]
                    save("best_dev")
                    message += " | new best_dev"
                need_latest = True
                logger.info(message)
                if tb is not None:
                    tb.add_scalar("train/loss", train_loss, step)
                    tb.add_scalar("train/lr", lr, step)
                    for k, v in metrics.items():
                        tb.add_scalar(f"dev/{k}", v, step)
                    tb.flush()
                t0 = time.time()
            if step % opt.save_freq == 0:
                pending_step_save = True
            # Saves wait for the end of an accumulation cycle: the gradients accumulated so
            # far are not saved, so a resume from mid-cycle would differ from a straight run.
            if sync and pending_step_save:
                save(f"step-{step}")
                pending_step_save, need_latest = False, True
            if sync and need_latest:
                save("latest")
                need_latest = False
            if check_preemption and sync and dist.any_over_ranks(dist.PREEMPTED["flag"]):
                save("latest")
                if opt.is_main:
                    dist.requeue_slurm_job()
                logger.warning("preempted at step %d: saved latest, exiting", step)
                sys.exit(0)
            if step >= opt.total_steps:
                break
    bar.close()
    if tb is not None:
        tb.close()
    return {"step": step, "best_metric": best}
