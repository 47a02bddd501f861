"""How processes become ranks and find their devices (README "Distributed training"):
LOCAL_RANK beyond the visible GPUs, srun steps against a batch script's plain python,
ports derived from the job, timeouts that spare long single-rank work, and a resume point
decided once by rank 0 for every rank."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from src import distributed as dist
from src.train import checkpoint

ROOT = Path(__file__).resolve().parent.parent
BATCH = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "8"}
STEP = {**BATCH, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}  # fmt: skip


def test_local_rank_maps_onto_the_visible_gpus():
    assert dist.choose_device(None, 5, 8) == torch.device("cuda", 5)
    assert dist.choose_device(None, 5, 1) == torch.device("cuda", 0)  # --gpus-per-task=1
    assert dist.choose_device("cuda", 5, 2) == torch.device("cuda", 1)  # more processes than GPUs
    assert dist.choose_device(None, 5, 0) == torch.device("cpu")
    assert dist.choose_device("cuda:1", 0, 2) == torch.device("cuda", 1)
    with pytest.raises(dist.LaunchError, match="sees 1 GPU"):
        dist.choose_device("cuda:1", 0, 1)


def test_init_distributed_with_local_rank_beyond_the_device_count(monkeypatch):
    """LOCAL_RANK 5 on a node whose process sees 2 GPUs (mocked): cuda:1, never `invalid device ordinal`."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.init_distributed(None).device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert dist.init_distributed("cuda:0").device == torch.device("cuda", 0)
    # A CPU-only stage (FAISS search on ranks > 0) never touches CUDA.
    chosen.clear()
    monkeypatch.setenv("RANK", "3")
    assert dist.init_distributed(None, cpu_beyond_main=True).device == torch.device("cpu") and chosen == []
    assert dist.init_distributed("cpu").device == torch.device("cpu") and chosen == []


def test_srun_tasks_become_ranks_and_a_batch_script_is_one_process():
    assert dist.slurm_ranks(BATCH) is None  # sbatch --ntasks=8, plain python: one process
    assert dist.launched_world_size(BATCH) == 1 and dist.launched_rank(BATCH) == 0
    env = dist.slurm_ranks(STEP, hostnames=lambda nodes: ["node7", "node8"])
    assert env == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node7",
        "MASTER_PORT": "19242",
    }  # fmt: skip
    assert dist.launched_world_size(STEP) == 8 and dist.launched_rank(STEP) == 5
    # srun -n 2 inside an 8-task allocation: the step's 2 tasks, not the allocation's 8.
    assert dist.slurm_ranks({**STEP, "SLURM_STEP_NUM_TASKS": "2"}, hostnames=lambda n: ["a"])["WORLD_SIZE"] == "2"
    # torchrun (also `srun torchrun`): torchrun's variables win.
    torchrun = {**STEP, "RANK": "1", "WORLD_SIZE": "2"}
    assert dist.slurm_ranks(torchrun) is None and dist.launched_world_size(torchrun) == 2


def test_ports_derive_from_the_job():
    assert dist.job_port("4242") == 19242 and dist.job_port("4243") == 19243
    assert dist.job_port("4242", main_port=12345) == 12345 and dist.job_port(None) == 29500
    ports = {dist.job_port(str(job)) for job in range(1000, 1100)}
    assert len(ports) == 100 and all(1024 < p < 65536 for p in ports)


def test_plain_python_in_a_batch_script_runs_alone_and_never_hangs():
    """Before: RANK/WORLD_SIZE from SLURM_NTASKS=8 and a wait for 7 ranks that never start."""
    code = "from src.distributed import init_distributed as i; r = i('cpu'); print('world', r.world_size, r.rank)"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**env, **BATCH}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world 1 0" in proc.stdout
    assert "not started by srun: running as ONE process" in proc.stdout + proc.stderr


def _worker(rank: int, port: int, root: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    # A default-group timeout of ~2 s: the waits below on one rank's long work must not use it.
    dist.init_distributed("cpu", timeout_minutes=0.03)
    root = Path(root)
    if rank == 0:
        time.sleep(4)  # an extra embedding shard, a checkpoint or dataset_wscores.json being written
    dist.barrier()
    # Rank 0's run directory holds `latest`; rank 1's view is empty: both resume from rank 0's.
    out[f"start{rank}"] = checkpoint.start_point(root / f"view{rank}", "none", None, "t5-small")[1]
    # Rank 1 cannot read what rank 0 chose: every rank stops, naming the ranks.
    if rank == 1:
        checkpoint.resolve = lambda path: None
    try:
        checkpoint.start_point(root / "view0", "none", None, "t5-small")
    except checkpoint.ResumeMismatch as e:
        out[f"mismatch{rank}"] = str(e)
    try:
        checkpoint.agree_on_step(4 if rank == 0 else 2, root / "view0")
    except checkpoint.ResumeMismatch as e:
        out[f"steps{rank}"] = str(e)
    dist.destroy()


@pytest.mark.slow  # ~10 s: two spawned interpreters
def test_two_gloo_ranks_with_different_views_follow_rank_0(tmp_path):
    latest = tmp_path / "view0" / "checkpoint" / "latest"
    latest.mkdir(parents=True)
    (latest / checkpoint.STATE_FILE).write_bytes(b"")
    (latest / "options.json").write_text(json.dumps({"model_path": "none"}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, str(tmp_path), out), nprocs=2, join=True)
    assert out["start0"] == out["start1"] == latest
    for rank in (0, 1):
        assert "rank(s) [1] cannot read it" in out[f"mismatch{rank}"]
        assert "{0: 4, 1: 2}" in out[f"steps{rank}"]
