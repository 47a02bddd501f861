"""Sharded training (`--fsdp`): parameters, gradients and optimizer state split over the
ranks with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`; README "Sharded training").

DDP keeps on every rank the whole model, its gradients and Adam's two moments: 16 bytes
per parameter in fp32, 48 GB for a 3B reader before activations. Sharded, each of W ranks
keeps 1/W of them and gathers one transformer block's parameters at a time for its
forward and backward. The units: one per transformer block (the classes transformers
names in `_no_split_modules` that sit in a ModuleList: T5 blocks, BERT layers); the
embeddings, final norms and LM head stay in the root unit.

Every rank must run the same sequence of unit calls (each call is a collective): the
reader makes one encoder call per forward under `--fsdp` (model.max_buckets = 1), and
evaluation runs with every unit gathered (`evaluating`), so ranks may generate different
numbers of tokens and batches.

Checkpoints: model and optimizer shards with `torch.distributed.checkpoint` in
`<checkpoint>/sharded/` (each rank writes its own shards, nobody gathers the optimizer),
the config for the architecture; `best_dev` and `step-N` also get a consolidated
`save_pretrained` model (gathered once, written by rank 0) that every script loads as usual.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from src.distributed import Runtime
from src.errors import InputError
from src.modeling import SHARDED_DIR
from src.train.strategy import DataParallel


def sharding_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: ModuleList items of a class the model (or a submodule, e.g.
    a retriever's encoder) names in transformers' `_no_split_modules`."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [
        block
        for module in model.modules()
        if isinstance(module, torch.nn.ModuleList)
        for block in module
        if type(block).__name__ in names
    ]


@torch.no_grad()
def same_on_every_rank(model: torch.nn.Module, device: torch.device) -> None:
    """Rank 0's parameters and buffers everywhere, as DDP does when it wraps: each rank
    keeps only its shard of what it holds, so weights initialised at random (a new
    retriever's projection) must agree first. One tensor at a time through `device`
    (NCCL broadcasts CUDA tensors only)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        staged = tensor.detach().to(device)
        dist.broadcast(staged, src=0)
        tensor.copy_(staged)


def plain_class(module: torch.nn.Module) -> type:
    """The model's own class (fully_shard makes it a subclass of FSDPModule and it)."""
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


class FullySharded:
    """FSDP2 over every rank of the run (one process: still sharded over a group of one)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        units = sharding_units(model)
        if not units:
            raise ValueError(f"--fsdp: found no transformer blocks to shard in {type(model).__name__}")
        # fully_shard moves each unit to the mesh's device as it shards it: a model still
        # on the CPU never needs the whole of it on one GPU.
        same_on_every_rank(model, self.runtime.device)
        mesh = init_device_mesh(self.runtime.device.type, (self.runtime.world_size,))
        for block in units:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root: embeddings, norms, LM head
        return model

    def unwrap(self, wrapped: torch.nn.Module) -> torch.nn.Module:
        return wrapped  # FSDP2 shards in place: same module, DTensor parameters

    def accumulating(self, wrapped: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Inside an accumulation cycle the gradients stay unsharded and local (no
        reduce-scatter); the cycle's last backward reduce-scatters their sum."""
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def clip_grad_norm(self, wrapped: torch.nn.Module, max_norm: float) -> torch.Tensor:
        # On DTensor gradients the norm is over every shard (a sum of squares all-reduced).
        norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def grad_scaler(self, enabled: bool):
        """fp16 on CUDA: found-inf agreed over the ranks, so that all skip a step or none does."""
        return ShardedGradScaler("cuda", enabled=enabled)

    @contextlib.contextmanager
    def evaluating(self, wrapped: torch.nn.Module):
        """Every unit gathered for the whole evaluation, so that forward needs no collective
        and ranks may run different numbers of batches and decoding steps; resharded after."""
        # FSDP2 takes the first module to run forward as the root: evaluation may start in a
        # block (the reader encodes before generating), so set the real root up first (no
        # public call for this; a training forward would do it).
        wrapped._get_fsdp_state()._lazy_init()
        units = [m for m in wrapped.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_reshard_after_forward(True, recurse=False)
                unit.reshard()

    def save(
        self, directory: Path, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, consolidated: bool = True
    ) -> dict[str, Any]:
        """Collective: every rank writes its shards of model and optimizer; with `consolidated`
        the full model is gathered (to CPU, rank 0 only) and saved as a plain reader."""
        state = {"model": get_model_state_dict(wrapped)}
        if optimizer.state:  # before the first step there is none (and asking for it would make one)
            state["optimizer"] = get_optimizer_state_dict(wrapped, optimizer)
        dcp.save(state, checkpoint_id=str(directory / SHARDED_DIR))
        full = None
        if consolidated:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(wrapped, options=options)  # every rank joins; rank 0 gets it
        if not self.runtime.is_main:
            return {}
        if full is not None:
            # One entry per tensor, as save_pretrained of the plain model writes: tied names
            # (the embeddings T5 shares) come back from the gather as separate copies.
            names = {n for n, _ in wrapped.named_parameters()} | {n for n, _ in wrapped.named_buffers()}
            wrapped.save_pretrained(directory, state_dict={k: v for k, v in full.items() if k in names})
        wrapped.config.architectures = [plain_class(wrapped).__name__]
        wrapped.config.save_pretrained(directory)  # the architecture: a resume builds the model from it
        return {"sharded": SHARDED_DIR, "sharded_optimizer": "optimizer" in state}

    def load(self, directory: Path, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Model and optimizer from the shards (the model was built from the config only)."""
        if not state.get("sharded"):
            raise InputError(f"{directory}: saved without --fsdp; resume it without --fsdp (or start a new run)")
        both = {"model": get_model_state_dict(wrapped)}
        if state.get("sharded_optimizer"):
            both["optimizer"] = get_optimizer_state_dict(wrapped, optimizer)
        dcp.load(both, checkpoint_id=str(Path(directory) / state["sharded"]))
        set_model_state_dict(wrapped, both["model"])
        if "optimizer" in both:
            set_optimizer_state_dict(wrapped, optimizer, both["optimizer"])


def training_strategy(fsdp: bool, runtime: Runtime, logger) -> FullySharded | DataParallel:
    """--fsdp → FullySharded over the ranks; without it (or with one process: nothing to
    shard) DDP."""
    if fsdp and not runtime.is_distributed:
        logger.warning("--fsdp with one process: nothing to shard, training the whole model as without it")
    return FullySharded(runtime) if fsdp and runtime.is_distributed else DataParallel(runtime)
