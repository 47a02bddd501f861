"""Process groups and collective helpers (docs/distributed.md).

One init for a single process, `torchrun` (RANK / LOCAL_RANK / WORLD_SIZE) and SLURM
`srun` (SLURM_* variables). NCCL on GPU, gloo on CPU, so every distributed path runs
on a laptop with `torchrun --nproc_per_node 2`. This module knows nothing of models.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("fid")

# Set by SIGUSR1 (SLURM sends it near the time limit): the trainer saves and requeues.
PREEMPTED = {"flag": False}
# Set by SIGTERM (scancel, preemption, a cluster's eviction): the trainer saves `latest` at
# the next step boundary and exits with EXIT_INTERRUPTED.
INTERRUPTED = {"signal": None}
EXIT_INTERRUPTED = 128 + signal.SIGTERM  # 143: the shell's "terminated by SIGTERM"


def _slurm_env(main_port: int = -1) -> bool:
    """Fill torchrun-style variables from SLURM's when launched by `srun` (not under torchrun)."""
    if "SLURM_PROCID" not in os.environ or "RANK" in os.environ:
        return False
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if ntasks <= 1:
        return False
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ["WORLD_SIZE"] = str(ntasks)
    if "MASTER_ADDR" not in os.environ:
        nodes = subprocess.check_output(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]])
        os.environ["MASTER_ADDR"] = nodes.split()[0].decode()
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(main_port if main_port > 0 else 29500)
    return True


def _on_sigusr1(signum, frame) -> None:
    logger.warning("received SIGUSR1: saving and requeueing after the current step")
    PREEMPTED["flag"] = True


def _on_sigterm(signum, frame) -> None:
    if INTERRUPTED["signal"] is None:
        logger.warning("received %s: saving latest after the current step, then exiting", signal.Signals(signum).name)
    INTERRUPTED["signal"] = signum


def handle_sigterm() -> contextlib.AbstractContextManager:
    """While active, SIGTERM sets INTERRUPTED instead of killing the process (main thread only)."""

    @contextlib.contextmanager
    def scope():
        INTERRUPTED["signal"] = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    return scope()


def requeue_slurm_job() -> None:
    """Called by rank 0 after saving, when SIGUSR1 arrived."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        logger.warning("requeueing SLURM job %s", job)
        subprocess.run(["scontrol", "requeue", job], check=False)


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: what the process-group setup found (never written into the options)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None, local_rank: int = -1, main_port: int = -1) -> Runtime:
    """Join the process group of torchrun / srun (one process: none) and pick this rank's device:
    `device` ("cpu", "cuda", "cuda:1") if given, else cuda:LOCAL_RANK when CUDA is available."""
    from_slurm = _slurm_env(main_port)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", max(local_rank, 0)))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    if "SLURM_JOB_ID" in os.environ or from_slurm:
        signal.signal(signal.SIGUSR1, _on_sigusr1)
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=where)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values: list[float]) -> list[float]:
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def weighted_average(value: float, count: int) -> tuple[float, int]:
    """Average of per-rank averages weighted by their counts: (global mean, global count)."""
    total, n = sum_over_ranks([value * count, float(count)])
    return (total / n if n > 0 else 0.0), int(n)


def any_over_ranks(flag: bool) -> bool:
    return sum_over_ranks([float(flag)])[0] > 0


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """One entry per rank, on every rank (picklable objects; gloo and NCCL alike).
    `group`: a process group (object_group), else the default one."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def destroy() -> None:
    """Leave the process group (every rank, at the end of a script)."""
    if is_distributed():
        dist.destroy_process_group()


def gather_with_local_grad(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` concatenated along dim 0, in rank order; only this rank's part
    carries gradients (the others are copies). Ranks may hold different numbers of rows.
    One process: `t` itself."""
    if not is_distributed():
        return t
    device = _device()
    size = torch.tensor([t.shape[0]], device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.detach().to(device)
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    parts = [p[: int(s.item())].to(t.device) for p, s in zip(parts, sizes)]
    parts[get_rank()] = t
    return torch.cat(parts)


def object_group(timeout: datetime.timedelta = datetime.timedelta(hours=12)) -> Any:
    """A gloo group of every rank for collectives of CPU objects (numpy arrays, messages), or
    None in one process; every rank must call it, in the same order. gloo whatever the
    default backend: the objects live on the CPU (NCCL would copy them through a GPU). Its
    own timeout: ranks wait in it for each other's long steps (indexing millions of vectors);
    a rank that dies still ends the others at once under torchrun."""
    if not is_distributed():
        return None
    return dist.new_group(backend="gloo", timeout=timeout)


def broadcast_from_main(obj: Any, group: Any = None) -> Any:
    """Rank 0's `obj` on every rank (what the other ranks pass is not used)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def gather_to_main(obj: Any, group: Any = None) -> list[Any] | None:
    """Every rank's `obj` in rank order on rank 0, None on the others (one copy of each
    object travels, to rank 0 only: not all_gather's W copies)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out
