"""Process groups and collective helpers (docs/distributed.md).

One init for a single process, `torchrun` (RANK / LOCAL_RANK / WORLD_SIZE) and the tasks
of an `srun` job step (SLURM_* variables); a plain `python` in a batch script is one
process. NCCL on GPU, gloo on CPU, so every distributed path runs on a laptop with
`torchrun --nproc_per_node 2`. Each rank takes GPU LOCAL_RANK mod the GPUs it sees. The
default group's collectives time out after `--dist_timeout_minutes`; waits on one rank's
long work go through a gloo group with a long timeout (`wait_group`). This module knows
nothing of models.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from src.errors import InputError

logger = logging.getLogger("fid")

# Set by SIGUSR1 (SLURM sends it near the time limit): the trainer saves and requeues.
PREEMPTED = {"flag": False}
# Set by SIGTERM (scancel, preemption, a cluster's eviction): the trainer saves `latest` at
# the next step boundary and exits with EXIT_INTERRUPTED.
INTERRUPTED = {"signal": None}
EXIT_INTERRUPTED = 128 + signal.SIGTERM  # 143: the shell's "terminated by SIGTERM"


# Timeouts (README "Distributed training and evaluation"). The default process group's
# collectives (DDP's all-reduces, the trainer's agreements) fail after
# `--dist_timeout_minutes`; waits on one rank's long work alone (rank 0 writing a
# checkpoint or dataset_wscores.json, a rank embedding one shard more than the others,
# indexing) go through `wait_group`, a gloo group whose timeout is WAIT_TIMEOUT.
DEFAULT_TIMEOUT_MINUTES = 60.0
WAIT_TIMEOUT = datetime.timedelta(hours=24)
# Base and span of the rendezvous port derived from SLURM_JOB_ID (two jobs whose rank 0
# share a node get different ports unless their ids differ by a multiple of the span).
PORT_BASE, PORT_SPAN = 15000, 20000
_GROUPS: dict[str, Any] = {}


class LaunchError(InputError):
    """A launch this code cannot run as asked (e.g. ranks missing their rendezvous)."""


def job_port(job_id: str | None, main_port: int = -1) -> int:
    """The rendezvous port: `--main_port` if given, else derived from the SLURM job id, else 29500."""
    if main_port > 0:
        return main_port
    if job_id and job_id.isdigit():
        return PORT_BASE + int(job_id) % PORT_SPAN
    return 29500


def _hostnames(nodelist: str) -> list[str]:
    try:
        out = subprocess.check_output(["scontrol", "show", "hostnames", nodelist])
    except (OSError, subprocess.CalledProcessError) as e:
        raise LaunchError(f"cannot expand SLURM's node list {nodelist!r} with scontrol ({e}); set MASTER_ADDR") from e
    return out.decode().split()


def slurm_ranks(environ: Mapping[str, str], main_port: int = -1, hostnames=_hostnames) -> dict[str, str] | None:
    """torchrun-style variables for a process that is one task of an `srun` job step, or None.

    Only `srun` starts a job step with tasks (it sets SLURM_STEP_NUM_TASKS and
    SLURM_STEP_ID); the batch script of `sbatch --ntasks=8` has SLURM_NTASKS=8 and
    SLURM_PROCID=0 too, but it is one process: trusting SLURM_NTASKS there would wait
    forever for 7 ranks that never start. Under torchrun (RANK set, also `srun torchrun`)
    torchrun's variables win."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return None
    step_tasks = environ.get("SLURM_STEP_NUM_TASKS")
    if step_tasks is None or environ.get("SLURM_STEP_ID") in (None, "batch", "4294967294"):
        ntasks = int(environ.get("SLURM_NTASKS", "1") or 1)
        if ntasks > 1:
            logger.warning(
                "SLURM allocation of %d tasks, but this process was not started by srun: running as ONE "
                'process. Start every task with `srun python %s ...` (README "Distributed training")',
                ntasks,
                Path(sys.argv[0]).name,
            )
        return None
    if int(step_tasks) <= 1:
        return None
    env = {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": step_tasks,
        "MASTER_PORT": environ.get("MASTER_PORT") or str(job_port(environ.get("SLURM_JOB_ID"), main_port)),
    }
    per_node = re.match(r"\d+", environ.get("SLURM_STEP_TASKS_PER_NODE", ""))  # "8(x2)": 8 on each of 2 nodes
    if per_node:
        env["LOCAL_WORLD_SIZE"] = per_node.group()
    if environ.get("MASTER_ADDR"):
        env["MASTER_ADDR"] = environ["MASTER_ADDR"]
    else:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
        env["MASTER_ADDR"] = hostnames(nodelist)[0]
    return env


def launched_world_size(environ: Mapping[str, str] | None = None) -> int:
    """How many processes the launcher started (torchrun or an `srun` step), without joining a group."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ:
        return int(environ.get("WORLD_SIZE", "1"))
    if "SLURM_PROCID" in environ and environ.get("SLURM_STEP_ID") not in (None, "batch", "4294967294"):
        return int(environ.get("SLURM_STEP_NUM_TASKS", "1"))
    return 1


def launched_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank as the launcher says (before joining a group); 0 alone."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ:
        return int(environ["RANK"])
    return int(environ.get("SLURM_PROCID", "0")) if launched_world_size(environ) > 1 else 0


def cuda_index(local_rank: int, device_count: int) -> int:
    """The visible GPU of a local rank: LOCAL_RANK mod the GPUs this process sees (one per
    task under `--gpus-per-task=1`, fewer GPUs than processes for a CPU-bound stage)."""
    return local_rank % device_count


def choose_device(device: str | None, local_rank: int, device_count: int) -> torch.device:
    """This rank's device: `--device` as given ("cpu", "cuda:1"), else for "cuda"/None the GPU
    `cuda_index(local_rank)` when there are GPUs, else the CPU."""
    if device is not None and device != "cuda":
        where = torch.device(device)
        if where.type == "cuda" and (where.index or 0) >= device_count:
            raise LaunchError(f"--device {device}: this process sees {device_count} GPU(s)")
        return where
    if device_count == 0:
        if device == "cuda":
            raise LaunchError("--device cuda, but this process sees no GPU")
        return torch.device("cpu")
    return torch.device("cuda", cuda_index(local_rank, device_count))


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


def init_distributed(
    device: str | None = None,
    local_rank: int = -1,
    main_port: int = -1,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
    tf32: bool = True,
    cpu_beyond_main: bool = False,
) -> Runtime:
    """Join the process group of torchrun / an srun step (one process: none) and pick this
    rank's device (`choose_device`). `timeout_minutes`: the default group's collective
    timeout; `tf32`: TF32 for float32 matmuls and convolutions on CUDA (same results up to
    TF32 rounding, several times faster). `cpu_beyond_main`: only rank 0 uses `device`, the
    others work on the CPU (FAISS search) and never touch CUDA; the group is then gloo."""
    slurm = slurm_ranks(os.environ, main_port)
    if slurm is not None:
        os.environ.update(slurm)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", max(local_rank, 0)))
    if device == "cpu" or (cpu_beyond_main and rank > 0):
        where = torch.device("cpu")
    else:
        where = choose_device(device, local_rank, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if where.type == "cuda":
        torch.cuda.set_device(where)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if world_size > 1 and not dist.is_initialized():
        shares_a_gpu = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) > max(torch.cuda.device_count(), 1)
        backend = "nccl" if where.type == "cuda" and not cpu_beyond_main and not shares_a_gpu else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        _GROUPS["wait"] = dist.new_group(backend="gloo", timeout=max(WAIT_TIMEOUT, timeout))
    if "SLURM_JOB_ID" in os.environ:
        signal.signal(signal.SIGUSR1, _on_sigusr1)
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=where)


def wait_group() -> Any:
    """The gloo group for waits on one rank's long work (timeout WAIT_TIMEOUT), or None."""
    if not is_distributed():
        return None
    if "wait" not in _GROUPS:  # a group joined elsewhere (tests): made on first use, by every rank
        _GROUPS["wait"] = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return _GROUPS["wait"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Every rank here before any goes on. On the gloo `wait_group`: ranks often wait in it
    for one rank's long work (a checkpoint write, a shard more), which NCCL's watchdog
    would end after the default group's timeout."""
    if is_distributed():
        dist.barrier(group=wait_group())


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
    """One entry per rank, on every rank (picklable objects). `group`: a process group
    (object_group), else `wait_group` (gloo: the objects stay on the CPU)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=group if group is not None else wait_group())
    return out


def destroy() -> None:
    """Leave the process group (every rank, at the end of a script)."""
    _GROUPS.clear()
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
    """Rank 0's `obj` on every rank (what the other ranks pass is not used). Default group:
    `wait_group` (objects live on the CPU; rank 0 may take long to decide)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group if group is not None else wait_group())
    return box[0]


def gather_to_main(obj: Any, group: Any = None) -> list[Any] | None:
    """Every rank's `obj` in rank order on rank 0, None on the others (one copy of each
    object travels, to rank 0 only: not all_gather's W copies)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out
