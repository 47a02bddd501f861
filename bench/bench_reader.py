"""Reader model benchmark: train step time and MFU, generation with/without score
capture, peak memory with/without --use_checkpoint. Prints measured numbers and ratios.

Random T5 (t5-small widths), 10 passages × 200 tokens. The CPU defaults (2+2 layers,
short runs) keep the whole run under about a minute on a small machine; on a GPU:

    python bench/bench_reader.py --device cuda --layers 6 --batch_size 4 --precision bf16

On CPU the generate comparison uses process CPU time (all threads), which other jobs on
a shared machine disturb much less than wall time; on GPU it uses synchronized wall time.

MFU = model FLOPs of a train step (forward + backward = 3 × forward, no recompute
counted) / step time / the peak of a large square matmul measured here, in the same
precision, on the same device.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.reader.model import FiDT5  # noqa: E402
from src.reader.scores import generate_with_scores


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--layers", type=int, default=None, help="encoder = decoder layers (default: 2 on CPU, 6 on GPU)")
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--d_ff", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32128)
    p.add_argument("--n_passages", type=int, default=10)
    p.add_argument("--text_maxlength", type=int, default=200)
    p.add_argument("--answer_length", type=int, default=10, help="target tokens in a train step")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="timed train steps after 1 warm-up (default: 1 CPU, 5 GPU)")
    p.add_argument(
        "--gen_max_length", type=int, default=None, help="generation length incl. start token (default: 10 CPU, 20 GPU)"
    )
    p.add_argument(
        "--gen_repeats", type=int, default=None, help="timed generate calls per variant (default: 5 CPU, 10 GPU)"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1, steadiest on a shared machine)")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "generate", "memory"])
    p.add_argument("--_memory_child", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(args):
    if args.precision == "fp32":
        return torch.autocast(args.device.split(":")[0], enabled=False)
    return torch.autocast(args.device.split(":")[0], dtype=DTYPES[args.precision])


def matmul_peak(args, n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of an n×n @ n×n matmul in the benchmark's precision (best of `repeats`)."""
    n = n or (8192 if args.device.startswith("cuda") else 2048)
    dtype = DTYPES[args.precision]
    if args.device == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    a = torch.randn(n, n, device=args.device, dtype=dtype)
    b = torch.randn(n, n, device=args.device, dtype=dtype)
    a @ b
    sync(args.device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(args.device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def build(args) -> FiDT5:
    config = transformers.T5Config(
        vocab_size=args.vocab,
        d_model=args.d_model,
        d_kv=args.d_model // args.heads,
        d_ff=args.d_ff,
        num_layers=args.layers,
        num_decoder_layers=args.layers,
        num_heads=args.heads,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    return FiDT5(config).to(args.device)


def batch(args):
    B, N, L, T = args.batch_size, args.n_passages, args.text_maxlength, args.answer_length
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (B, N, L), generator=g)
    mask = torch.ones(B, N, L, dtype=torch.long)
    mask[:, :, int(0.9 * L) :] = 0  # some padding, as real passages have
    labels = torch.randint(3, args.vocab, (B, T), generator=g)
    labels[:, -1] = 1
    return ids.to(args.device), mask.to(args.device), labels.to(args.device)


def forward_flops(args) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward pass."""
    B, N, L, T = args.batch_size, args.n_passages, args.text_maxlength, args.answer_length
    d, f, inner, V, n = args.d_model, args.d_ff, args.d_model, args.vocab, args.layers
    enc_tokens, dec_tokens = B * N * L, B * T
    encoder = n * (enc_tokens * (4 * d * inner + 2 * d * f) + B * N * 2 * L * L * inner)
    decoder = n * (
        dec_tokens * (4 * d * inner + 2 * d * inner + 2 * d * f)  # self-attn q,k,v,o; cross q,o; FFN
        + enc_tokens * 2 * d * inner  # cross-attention k, v over all passages
        + B * 2 * T * T * inner  # self-attention scores and mix
        + B * 2 * T * N * L * inner  # cross-attention scores and mix
    )
    return 2 * (encoder + decoder + dec_tokens * d * V)


def bench_train(model: FiDT5, args, peak: float) -> None:
    ids, mask, labels = batch(args)
    model.train()
    model.set_checkpoint(False)
    times = []
    for step in range(args.steps + 1):
        sync(args.device)
        t = time.perf_counter()
        with autocast(args):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync(args.device)
        if step > 0:  # first step warms up
            times.append(time.perf_counter() - t)
    step_time = statistics.median(times)
    flops = 3 * forward_flops(args)
    achieved = flops / step_time
    print(f"train step: {step_time * 1e3:.1f} ms (median of {len(times)}), {flops / 1e9:.1f} GFLOP/step")
    print(f"  achieved {achieved / 1e12:.3f} TFLOP/s; MFU = {achieved / peak:.1%} of the measured matmul peak")


def bench_generate(model: FiDT5, args) -> None:
    ids, mask, _ = batch(args)
    model.eval()
    model.generation_config.eos_token_id = None  # both variants generate exactly gen_max_length tokens
    kwargs = {"max_length": args.gen_max_length}
    clock = time.perf_counter if args.device.startswith("cuda") else time.process_time

    def plain():
        return model.generate(ids, mask, **kwargs)

    def scored():
        return generate_with_scores(model, ids, mask, **kwargs)[0]

    with autocast(args):
        assert torch.equal(plain(), scored()), "score capture changed the generated ids"
        times = {"plain": [], "scores": []}
        for _ in range(args.gen_repeats):  # interleaved, so drift hits both alike
            for name, fn in (("plain", plain), ("scores", scored)):
                sync(args.device)
                t = clock()
                fn()
                sync(args.device)
                times[name].append(clock() - t)
    p, s = statistics.median(times["plain"]), statistics.median(times["scores"])
    print(
        f"generate ({args.gen_max_length} tokens incl. start, greedy): {p * 1e3:.1f} ms plain, {s * 1e3:.1f} ms with scores"
    )
    print(
        f"  score capture overhead: {(s / p - 1):+.1%} (target ≤ 3%; median of {args.gen_repeats} interleaved runs, {clock.__name__})"
    )


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _one_step_peak(model: FiDT5, args, use_checkpoint: bool) -> int:
    """Bytes above the pre-step level at the peak of one forward+backward."""
    ids, mask, labels = batch(args)
    model.train()
    model.set_checkpoint(use_checkpoint)
    model.zero_grad(set_to_none=True)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    with autocast(args):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    sync(args.device)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    model.zero_grad(set_to_none=True)
    model.set_checkpoint(False)
    return peak


def bench_memory(model: FiDT5, args, argv: list[str]) -> None:
    results = {}
    for use in (False, True):
        if args.device.startswith("cuda"):
            results[use] = _one_step_peak(model, args, use)
        else:
            # A process's peak RSS only grows: measure each variant in a fresh process.
            child = [sys.executable, __file__, *argv, "--_memory_child", str(int(use))]
            out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
            results[use] = int(out.strip().splitlines()[-1])
    how = (
        "torch.cuda.max_memory_allocated growth"
        if args.device.startswith("cuda")
        else "peak RSS growth over the step, each in a fresh process (CPU; includes allocator slack)"
    )
    mib = {k: v / 2**20 for k, v in results.items()}
    print(f"peak memory of one forward+backward, {how}:")
    print(
        f"  without --use_checkpoint {mib[False]:.0f} MiB, with {mib[True]:.0f} MiB (ratio {mib[True] / mib[False]:.2f})"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    gpu = args.device.startswith("cuda")
    for name, on_gpu, on_cpu in (("layers", 6, 2), ("steps", 5, 1), ("gen_max_length", 20, 10), ("gen_repeats", 10, 5)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    if not gpu:
        torch.set_num_threads(args.threads or 1)
    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"device {args.device} ({device_name}), {args.precision}; T5 d_model {args.d_model}, d_ff {args.d_ff}, "
        f"heads {args.heads}, {args.layers}+{args.layers} layers, vocab {args.vocab}; batch {args.batch_size} × "
        f"{args.n_passages} passages × {args.text_maxlength} tokens, answers {args.answer_length} tokens"
    )
    if args.layers != 6:
        print("  (t5-small has 6+6 layers; pass --layers 6 for it)")
    model = build(args)
    if args._memory_child is not None:
        print(_one_step_peak(model, args, bool(args._memory_child)))
        return
    if "memory" not in args.skip:
        bench_memory(model, args, argv)
    if "train" not in args.skip:
        peak = matmul_peak(args)
        print(f"measured matmul peak: {peak / 1e12:.3f} TFLOP/s")
        bench_train(model, args, peak)
    if "generate" not in args.skip:
        bench_generate(model, args)


if __name__ == "__main__":
    main()
