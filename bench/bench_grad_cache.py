"""GradCache benchmark (README "GradCache"): the peak memory of one retriever training step
(forward + backward, in-batch negatives, the KL loss) at a fixed batch with and without
`--grad_cache_chunk_size`, and the largest batch that fits in a memory budget.

Each measurement is one step in a fresh process (the step runs exactly what the trainer
runs: task.make_loss + backward, or task.make_grad_cache_backward). On CPU the step's peak
is the rise of the process's peak RSS (VmHWM) over its RSS just before the step; on CUDA
torch.cuda.max_memory_allocated over the memory allocated before it. The two variants
are interleaved, `--repeats` times; medians with min/max. Random BERT (hidden 128, 2
layers by default; BERT-base: --hidden 768 --layers 12 --heads 12 --intermediate 3072).

    OMP_NUM_THREADS=1 python bench/bench_grad_cache.py
    python bench/bench_grad_cache.py --device cuda --hidden 768 --layers 12 --heads 12 \\
        --intermediate 3072 --passages 100 --passage_length 200 --batch 8 --chunk 64 --budget_mb 20000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from src.data.datasets import RetrieverBatch  # noqa: E402
from src.retriever.model import Retriever, RetrieverConfig  # noqa: E402
from src.retriever.task import RetrieverTaskConfig, make_grad_cache_backward, make_loss  # noqa: E402
from src.toy.tiny_models import tiny_bert_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--passages", type=int, default=16, help="passages per question (N)")
    p.add_argument("--passage_length", type=int, default=64)
    p.add_argument("--question_length", type=int, default=24)
    p.add_argument("--batch", type=int, default=8, help="questions per step for the side-by-side peak")
    p.add_argument("--chunk", type=int, default=16, help="--grad_cache_chunk_size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget_mb", type=float, default=256.0, help="memory budget of one step, MB")
    p.add_argument("--max_batch", type=int, default=256, help="largest batch tried in the budget search")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one step: its batch size
    p.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one_step(args) -> dict:
    """Worker: one training step at batch `args.worker`; its peak memory (MB) and seconds."""
    torch.set_num_threads(1)
    device = torch.device(args.device)
    torch.manual_seed(0)
    encoder = tiny_bert_config(args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                               intermediate_size=args.intermediate, hidden_dropout_prob=0.1,
                               attention_probs_dropout_prob=0.1)  # fmt: skip
    model = Retriever(RetrieverConfig(encoder=encoder, indexing_dimension=args.hidden)).to(device).train()
    B, N = args.worker, args.passages
    g = torch.Generator().manual_seed(1)
    q = torch.randint(5, args.vocab, (B, args.question_length), generator=g)
    p = torch.randint(5, args.vocab, (B, N, args.passage_length), generator=g)
    gold = torch.randn(B, N, generator=g)
    batch = RetrieverBatch(torch.arange(B), q, torch.ones_like(q), p, torch.ones_like(p), gold)
    config = RetrieverTaskConfig(in_batch_negatives=True, grad_cache_chunk_size=args.chunk if args.cached else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_mb("VmRSS")
    start = time.perf_counter()
    if args.cached:
        make_grad_cache_backward(config, device)(model, batch, lambda x: x)
    else:
        make_loss(config, device)(model, batch).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = _rss_mb("VmHWM") - before
    return {"peak_mb": peak, "seconds": time.perf_counter() - start}


def measure(args, batch: int, cached: bool) -> dict:
    """One step in a fresh process (its own peak)."""
    argv = [sys.executable, __file__, "--worker", str(batch)] + (["--cached"] if cached else [])
    for name in ("device", "hidden", "layers", "heads", "intermediate", "vocab", "passages", "passage_length",
                 "question_length", "chunk"):  # fmt: skip
        argv += [f"--{name}", str(getattr(args, name))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def largest_batch(args, cached: bool) -> tuple[int, dict[int, float]]:
    """The largest batch (doubling from 1, up to --max_batch) whose step stays within the budget."""
    fits, peaks, batch = 0, {}, 1
    while batch <= args.max_batch:
        peaks[batch] = measure(args, batch, cached)["peak_mb"]
        if peaks[batch] > args.budget_mb:
            break
        fits, batch = batch, batch * 2
    return fits, peaks


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} (min {min(values):.1f}, max {max(values):.1f})"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(one_step(args)))
        return
    print(f"device {args.device}, BERT hidden {args.hidden} x {args.layers} layers, {args.passages} passages of "
          f"{args.passage_length} tokens per question, in-batch negatives, KL loss, chunk {args.chunk}")  # fmt: skip
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.repeats):  # interleaved
        for cached in (False, True):
            runs[cached].append(measure(args, args.batch, cached))
    plain = [r["peak_mb"] for r in runs[False]]
    cached = [r["peak_mb"] for r in runs[True]]
    print(f"\nbatch {args.batch} questions ({args.batch * args.passages} passages), peak step memory, MB:")
    print(f"  without GradCache: {summary(plain)}   step {summary([r['seconds'] for r in runs[False]])} s")
    print(f"  GradCache (chunk {args.chunk}): {summary(cached)}   step {summary([r['seconds'] for r in runs[True]])} s")
    print(f"  ratio without / with: {statistics.median(plain) / statistics.median(cached):.2f}x")
    print(f"\nlargest batch (questions, doubling up to {args.max_batch}) within {args.budget_mb:.0f} MB per step:")
    for flag in (False, True):
        fits, peaks = largest_batch(args, flag)
        name = f"GradCache (chunk {args.chunk})" if flag else "without GradCache"
        tried = ", ".join(f"{b}: {m:.0f}" for b, m in peaks.items())
        capped = " (the search's cap)" if fits == args.max_batch else ""
        print(f"  {name}: {fits}{capped}   [batch: peak MB {tried}]")


if __name__ == "__main__":
    main()
