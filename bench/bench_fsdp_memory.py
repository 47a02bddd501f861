"""Per-rank memory of DDP vs --fsdp (README "Sharded training"), measured on 2 CPU processes
(gloo), plus what follows for t5-base/large/xl/xxl readers on 8 GPUs.

Each strategy trains a random FiD reader of t5-large widths (d_model 1024, d_ff 4096, 16
heads, vocabulary 32128; fewer layers than t5-large's 24+24 by default so that two DDP
replicas fit a small machine) for a few steps, Adam, fp32, one tiny batch (so that the
states dominate). Per rank it reports:
- the training state it holds: parameters + gradients + Adam's two moments (bytes of the
  local tensors: the shards under --fsdp), and per parameter of the model;
- the process: RSS after the last step and its peak (ru_maxrss; the peak includes
  building the whole model on every rank before sharding, as the scripts do).
Strategies run interleaved (ddp, fsdp, ddp, fsdp, ... in fresh process groups); medians
with min/max over the repeats.

Then a table for 8 GPUs from the measured bytes per parameter (DDP's, and --fsdp's × W=2 / 8)
plus the unsharded working set of --fsdp (the root unit: embeddings and LM head, and two
blocks gathered at a time with prefetching) and an activation model (stated in the output).

    OMP_NUM_THREADS=1 python bench/bench_fsdp_memory.py --layers 4 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from src.distributed import Runtime  # noqa: E402
from src.reader.model import FiDT5  # noqa: E402
from src.toy.tiny_models import tiny_reader_config  # noqa: E402
from src.train.fsdp import FullySharded  # noqa: E402
from src.train.strategy import DataParallel  # noqa: E402

GiB = 2**30
# (parameters, d_model, d_ff, heads, layers per stack) of the released checkpoints; xl/xxl are
# T5 v1.1 / Flan-T5 (gated GELU, own output embedding), base/large the original T5.
SIZES = {
    "t5-base": (223e6, 768, 3072, 12, 12),
    "t5-large": (738e6, 1024, 4096, 16, 24),
    "flan-t5-xl": (2.85e9, 2048, 5120, 32, 24),
    "flan-t5-xxl": (11.3e9, 4096, 10240, 64, 24),
}
VOCAB = 32128


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="encoder and decoder layers (t5-large: 24)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each strategy, interleaved")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--passages", type=int, default=100, help="table: passages per question")
    p.add_argument("--text_maxlength", type=int, default=250, help="table: tokens per passage")
    return p.parse_args(argv)


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank: int, strategy_name: str, layers: int, steps: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    runtime = Runtime(rank=rank, world_size=2)
    config = tiny_reader_config("t5_v1_1", VOCAB, d_model=1024, layers=layers, heads=16, d_ff=4096, dropout_rate=0.0)
    torch.manual_seed(0)
    model = FiDT5(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.max_buckets = 1
    strategy = FullySharded(runtime) if strategy_name == "fsdp" else DataParallel(runtime)
    wrapped = strategy.wrap(model)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-5)
    ids = torch.randint(3, VOCAB, (1, 2, 16), generator=torch.Generator().manual_seed(rank))
    labels = torch.randint(3, VOCAB, (1, 4))
    for _ in range(steps):
        loss = wrapped(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        strategy.clip_grad_norm(wrapped, 1.0)
        optimizer.step()
    params = _local_bytes(p for p in wrapped.parameters())
    grads = _local_bytes(p.grad for p in wrapped.parameters())
    moments = _local_bytes(v for s in optimizer.state.values() for v in s.values() if v.dim() > 0)
    out[(strategy_name, rank)] = {
        "n_params": n_params,
        "params": params,
        "grads": grads,
        "optimizer": moments,
        "rss": _rss(),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {"ddp": [], "fsdp": []}
    for _ in range(args.repeats):
        for name in ("ddp", "fsdp"):
            with mp.Manager() as manager:
                out = manager.dict()
                mp.spawn(_worker, args=(name, args.layers, args.steps, free_port(), out), nprocs=2, join=True)
                runs[name].extend(dict(v) for v in out.values())  # every rank of every repeat
    return runs


def stat(values: list[float]) -> str:
    return f"{statistics.median(values):8.3f} [{min(values):.3f}-{max(values):.3f}]"


def report(runs: dict[str, list[dict]]) -> dict[str, float]:
    n = runs["ddp"][0]["n_params"]
    print(f"\nper rank, 2 gloo processes, {n / 1e6:.0f}M parameters (GiB: median [min-max] over ranks x repeats)")
    print(f"{'':34}{'DDP':>26}{'--fsdp':>26}{'ratio':>8}")
    per_param = {}
    for key, label in [
        ("params", "parameters"),
        ("grads", "gradients"),
        ("optimizer", "Adam moments"),
        ("state", "parameters + gradients + Adam"),
        ("rss", "process RSS after the steps"),
        ("peak_rss", "process peak RSS"),
    ]:
        values = {}
        for name in ("ddp", "fsdp"):
            rows = runs[name]
            values[name] = [(r["params"] + r["grads"] + r["optimizer"]) if key == "state" else r[key] for r in rows]
        ratio = statistics.median(values["ddp"]) / statistics.median(values["fsdp"])
        print(
            f"{label:34}{stat([v / GiB for v in values['ddp']]):>26}{stat([v / GiB for v in values['fsdp']]):>26}"
            f"{ratio:8.2f}"
        )
        if key == "state":
            per_param = {name: statistics.median(values[name]) / n for name in values}
    print(
        f"bytes per parameter (parameters + gradients + Adam): DDP {per_param['ddp']:.2f}, "
        f"--fsdp {per_param['fsdp']:.2f} (x W=2 = {2 * per_param['fsdp']:.2f})"
    )
    return per_param


def activation_gib(d_model: int, heads: int, layers: int, tokens: int, seq: int, checkpoint: bool) -> float:
    """The encoder's saved activations per question, bf16 (Korthikanti et al. 2022, 'Reducing
    activation recomputation in large transformer models': s·b·h·(34 + 5·a·s/h) bytes per
    layer; b·s = tokens). With --use_checkpoint: each block's input (2·tokens·h bytes) plus
    one block recomputed. The decoder's answers are short: its activations are ignored."""
    per_layer = tokens * d_model * (34 + 5 * heads * seq / d_model)
    if checkpoint:
        return (layers * 2 * tokens * d_model + per_layer) / GiB
    return layers * per_layer / GiB


def table(per_param: dict[str, float], args) -> None:
    world = 8
    sharded_per_param = per_param["fsdp"] * 2 / world  # 2 ranks measured, 8 GPUs
    tokens = args.passages * args.text_maxlength
    print(
        f"\n8 GPUs, Adam, fp32 weights with bf16 autocast, batch 1 question x {args.passages} passages x "
        f"{args.text_maxlength} tokens per GPU; GiB per GPU"
    )
    print(
        "state: DDP = measured bytes/param x params; --fsdp = measured x 2/8, plus the working set "
        "(root unit: input + output embeddings, 2 gathered blocks' fp32 parameters and gradients)"
    )
    print(
        f"{'model':12}{'params':>8}{'DDP state':>11}{'FSDP state':>12}{'act':>7}{'act ckpt':>10}"
        f"{'DDP':>7}{'DDP+ck':>8}{'FSDP':>7}{'FSDP+ck':>9}   fits 40 GB / 80 GB"
    )
    for name, (n, d, ff, heads, layers) in SIZES.items():
        ddp = n * per_param["ddp"] / GiB
        block = (4 * d * d + 3 * d * ff) if "flan" in name else (4 * d * d + 2 * d * ff)
        working = (2 * VOCAB * d + 2 * 2 * block) * 4 * 2 / GiB  # fp32 parameters + gradients
        fsdp = n * sharded_per_param / GiB + working
        act = activation_gib(d, heads, layers, tokens, args.text_maxlength, False)
        act_ck = activation_gib(d, heads, layers, tokens, args.text_maxlength, True)
        totals = [ddp + act, ddp + act_ck, fsdp + act, fsdp + act_ck]

        def fits(total: float) -> str:  # 2 GiB kept for the CUDA context, kernels and fragmentation
            return "40" if total <= 38 else "80" if total <= 78 else "-"

        verdict = " ".join(f"{label}:{fits(t)}" for label, t in zip(("DDP", "DDP+ck", "FSDP", "FSDP+ck"), totals))
        print(
            f"{name:12}{n / 1e9:7.2f}B{ddp:11.1f}{fsdp:12.1f}{act:7.1f}{act_ck:10.1f}"
            + "".join(f"{t:7.1f}" if i < 3 else f"{t:9.1f}" for i, t in enumerate(totals))
            + f"   {verdict}"
        )
    print("fits: the smallest GPU it fits on (40 or 80 GiB, 2 GiB kept free), '-' neither")


def main(argv=None) -> None:
    args = parse_args(argv)
    print(
        f"bench_fsdp_memory: t5-large widths, {args.layers}+{args.layers} layers, {args.steps} steps, "
        f"{args.repeats} repeats, torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    runs = measure(args)
    table(report(runs), args)


if __name__ == "__main__":
    main()
