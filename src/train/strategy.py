"""Training strategies: how the one training loop spreads a model over the ranks.

A strategy owns what differs between data parallelism and sharding: wrapping the model
(before the optimizer is built, which sharding needs), skipping gradient synchronisation
inside an accumulation cycle, clipping by the global gradient norm, and writing and
reading the model and optimizer state of a checkpoint. The loop calls every method on
every rank, so a strategy whose state gather is a collective can plug in.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import torch

from src.distributed import Runtime
from src.errors import InputError


class Strategy(Protocol):
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loop trains (called once, before the optimizer is built)."""

    def unwrap(self, wrapped: torch.nn.Module) -> torch.nn.Module:
        """The module that evaluation and saving see."""

    def accumulating(self, wrapped: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Around forward + backward: no gradient synchronisation unless `sync` (the cycle's last batch)."""

    def clip_grad_norm(self, wrapped: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the norm of all gradients of the model (every shard counted)."""

    def grad_scaler(self, enabled: bool) -> torch.amp.GradScaler:
        """The fp16 loss scaler (enabled only for fp16 on CUDA)."""

    def evaluating(self, wrapped: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Around evaluation: whatever lets each rank run its own number of forward calls."""

    def save(
        self, directory: Path, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, consolidated: bool = True
    ) -> dict[str, Any]:
        """Write the model into `directory` (shared by the ranks); returns what rank 0 stores in
        the checkpoint's training state for `load` to read back. `consolidated`: also as a
        plain `save_pretrained` model (best_dev, step-N; `latest` may skip it)."""

    def load(self, directory: Path, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Restore the optimizer (the weights are loaded before `wrap`) from a checkpoint."""


class DataParallel:
    """DDP: every rank holds the whole model and optimizer state; gradients are averaged
    over the ranks at the end of each accumulation cycle. One process: the plain model."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.runtime.is_distributed:
            return model
        device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def unwrap(self, wrapped: torch.nn.Module) -> torch.nn.Module:
        return wrapped.module if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else wrapped

    def accumulating(self, wrapped: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        if sync or not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return wrapped.no_sync()

    def clip_grad_norm(self, wrapped: torch.nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(wrapped.parameters(), max_norm)

    def grad_scaler(self, enabled: bool) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cuda", enabled=enabled)

    def evaluating(self, wrapped: torch.nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def save(
        self, directory: Path, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, consolidated: bool = True
    ) -> dict[str, Any]:
        if not self.runtime.is_main:
            return {}
        self.unwrap(wrapped).save_pretrained(directory)
        return {"optimizer": optimizer.state_dict()}

    def load(self, directory: Path, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if state.get("sharded"):
            raise InputError(f"{directory}: saved with --fsdp (sharded); resume it with --fsdp")
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
