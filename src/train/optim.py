"""Optimizer and learning-rate schedule of the original FiD (docs/scripts.md)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from src.train.config import OptimConfig


def lr_lambda(opt: OptimConfig) -> Callable[[int], float]:
    """Multiplier of the lr at a given optimizer step.

    fixed: constant. linear: 0 → 1 over `warmup_steps`, then linear decay to 0 at
    `scheduler_steps` (default `total_steps`), or flat after warmup with `--fixed_lr`.
    """
    warmup = max(0, opt.warmup_steps)
    total = opt.scheduler_steps if opt.scheduler_steps is not None else opt.total_steps

    def linear(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if opt.fixed_lr:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return linear if opt.scheduler == "linear" else (lambda step: 1.0)


def set_optim(opt: OptimConfig, model: torch.nn.Module):
    """(optimizer, scheduler) from `--optim --lr --weight_decay --scheduler ...`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.optim == "adam":
        optimizer = torch.optim.Adam(params, lr=opt.lr)
    elif opt.optim == "adamw":
        optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {opt.optim!r} (adam or adamw)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opt))
    return optimizer, scheduler


def unused_flags(opt: OptimConfig) -> dict[str, str]:
    """{flag: why} of the optimisation flags that the chosen `--optim` / `--scheduler` do not
    read (cli.warn_ignored warns for those set on the command line)."""
    unused = {}
    if opt.optim != "adamw":
        unused["weight_decay"] = "only --optim adamw decays weights (adam has no weight decay, as in the original)"
    if opt.scheduler != "linear":
        for flag in ("warmup_steps", "scheduler_steps", "fixed_lr"):
            unused[flag] = "only --scheduler linear reads it (fixed: a constant lr)"
    elif opt.fixed_lr:
        unused["scheduler_steps"] = "with --fixed_lr the lr stays flat after warmup"
    return unused


def schedule_pitfalls(opt: OptimConfig, accumulation_steps: int = 1) -> list[str]:
    """Warnings for a linear schedule that trains, silently, with an lr the user did not mean:
    a warmup at least as long as the run never reaches --lr and never decays. The schedule
    counts optimizer steps, --total_steps counts batches (the original's convention)."""
    if opt.scheduler != "linear" or opt.warmup_steps <= 0:
        return []
    steps = opt.total_steps // max(1, accumulation_steps)  # optimizer steps of the whole run
    if opt.warmup_steps < steps:
        return []
    per = f" / --accumulation_steps {accumulation_steps}" if accumulation_steps > 1 else ""
    peak = lr_lambda(opt)(steps)
    return [
        f"--warmup_steps {opt.warmup_steps} is not below the {steps} optimizer steps of this run "
        f"(--total_steps {opt.total_steps}{per}): the lr rises to {peak:.3g} x --lr at the end and never decays; "
        f"lower --warmup_steps (the original trained 15000 steps with 1000)"
    ]
