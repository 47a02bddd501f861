"""Packing benchmark (docs/speed.md): the length-bucketed encoder and the cross-attention
over real tokens only (default) against the original padded path (`--no_packing`),
measured side by side, interleaved, in one run. Prints ratios (old time / new time).

Length profiles of question + passage tokens, `--text_maxlength` L:
- dpr: ~N(165, 40) clipped to [30, 245], L = 250 (real DPR passages with question and title);
- toy: the toy world's passages (python run_loop.py), L = 32;
- full: every passage exactly L = 250 tokens (no padding: packing must not be slower).

Measured: a train step (forward + backward) and its saved activations (the tensors
autograd keeps for the backward pass: the memory that grows with passages × tokens),
generation with `xattn` scores, the score-export overhead of the packed path (scores vs
plain generate), and optionally `test_reader.py` end to end (`--e2e_questions`).
Random T5 with t5-small widths (2+2 layers on CPU by default). On CPU times are process
CPU time with 1 thread (steadiest on a shared machine); on CUDA synchronized wall time.
GPU, t5-base, 100 passages:

    python bench/bench_packing.py --device cuda --precision bf16 --layers 12 --d_model 768 \\
        --d_ff 3072 --heads 12 --passages 100 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_reader import autocast, build, matmul_peak, sync  # noqa: E402

from src.data.datasets import format_passage, format_question  # noqa: E402
from src.reader import packing  # noqa: E402
from src.reader.scores import generate_with_scores  # noqa: E402
from src.toy.tiny_models import save_tiny_t5  # noqa: E402
from src.toy.world import make_world  # noqa: E402

PROFILES = ("dpr", "toy", "full")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", help="comma list of fp32, bf16, fp16 (each measured in turn)")
    p.add_argument("--layers", type=int, default=None, help="encoder = decoder layers (default: 2 on CPU, 6 on GPU)")
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--d_ff", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32128)
    p.add_argument("--profiles", default=",".join(PROFILES), help=f"comma list of {', '.join(PROFILES)}")
    p.add_argument("--passages", default="20,100", help="comma list of passages per question")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--answer_length", type=int, default=10, help="target tokens of a train step")
    p.add_argument("--gen_max_length", type=int, default=10, help="generated tokens incl. the start token")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path, interleaved, after a warm-up")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "generate", "overhead"])
    p.add_argument("--e2e_questions", type=int, default=0, help="also time test_reader.py on this many questions")
    p.add_argument("--e2e_passages", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument(
        "--clock",
        choices=["auto", "cpu", "wall"],
        default="auto",
        help="CPU timing: process CPU time (steadiest on a shared machine, but it sums the threads) or wall "
        "time; auto: CPU time with 1 thread, wall time with more (what several threads buy is wall time)",
    )
    p.add_argument(
        "--min_bucket_tokens",
        type=int,
        default=None,
        help="packing's floor of padded tokens per encoder call (default: packing.MIN_BUCKET_TOKENS)",
    )
    return p.parse_args(argv)


def lengths_for(profile: str, B: int, N: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(B, N) token counts of question + passage, and the --text_maxlength L they are cut to."""
    g = torch.Generator().manual_seed(seed)
    if profile == "dpr":
        return (165 + 40 * torch.randn(B, N, generator=g)).round().clamp(30, 245).long(), 250
    if profile == "full":
        return torch.full((B, N), 250), 250
    return toy_lengths(B * N, seed).view(B, N), 32


def toy_lengths(n: int, seed: int) -> torch.Tensor:
    """Word counts (the toy tokenizer is word level) of toy questions paired with toy passages, cut at 32."""
    world = make_world(seed)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q, p = rng.choice(world.train), rng.choice(world.passages)
        text = f"{format_question(q['question'])} {format_passage(p['title'], p['text'])}"
        out.append(min(32, len(text.split())))
    return torch.tensor(out)


def make_batch(args, profile: str, N: int):
    lengths, L = lengths_for(profile, args.batch_size, N)
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(L)[None, None, :] < lengths[..., None]).long()
    ids = torch.randint(3, args.vocab, (args.batch_size, N, L), generator=g) * mask
    labels = torch.randint(3, args.vocab, (args.batch_size, args.answer_length), generator=g)
    labels[:, -1] = 1
    return ids.to(args.device), mask.to(args.device), labels.to(args.device), lengths


def timed(args, runs: dict, repeats: int) -> dict[str, list[float]]:
    """Each callable once to warm up, then `repeats` rounds, interleaved (order reversed
    every other round, so that neither path always runs first)."""
    wall = args.device.startswith("cuda") or args.clock == "wall" or (args.clock == "auto" and args.threads > 1)
    clock = time.perf_counter if wall else time.process_time
    times = {name: [] for name in runs}
    for r in range(repeats + 1):
        for name, fn in list(runs.items())[:: 1 if r % 2 else -1]:
            sync(args.device)
            t = clock()
            fn()
            sync(args.device)
            if r:
                times[name].append(clock() - t)
    return times


def with_packing(model, packed: bool, fn):
    def run():
        model.packing = packed
        try:
            return fn()
        finally:
            model.packing = True

    return run


def saved_bytes(model, fn) -> int:
    """Bytes of the tensors autograd saves for the backward pass of fn() (storage counted once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def useful_flops(args, lengths: torch.Tensor) -> float:
    """Matmul FLOPs of one forward pass over the real tokens only (2 per multiply-add)."""
    d, f, n, T, V = args.d_model, args.d_ff, args.layers, args.answer_length, args.vocab
    tokens, B = int(lengths.sum()), lengths.shape[0]
    encoder = n * (tokens * (4 * d * d + 2 * d * f) + 2 * int((lengths**2).sum()) * d)
    decoder = n * (B * T * (6 * d * d + 2 * d * f) + tokens * 2 * d * d + 2 * B * T * T * d + 2 * T * tokens * d)
    return 2 * (encoder + decoder + B * T * d * V)


def ratio_line(label: str, times: dict[str, list[float]], old: str = "padded", new: str = "packed") -> str:
    """'label: old x ms, new y ms, old/new = median (min–max over paired runs)'."""
    pairs = [a / b for a, b in zip(times[old], times[new])]
    o, n = statistics.median(times[old]), statistics.median(times[new])
    return (
        f"  {label}: {old} {o * 1e3:.0f} ms, {new} {n * 1e3:.0f} ms → ×{statistics.median(pairs):.2f} "
        f"(min {min(pairs):.2f}, max {max(pairs):.2f})"
    )


def bench_train(model, args, profile: str, N: int, peak: float) -> None:
    ids, mask, labels, lengths = make_batch(args, profile, N)
    model.train()

    def step():
        with autocast(args):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    def forward():
        with autocast(args):
            model(input_ids=ids, attention_mask=mask, labels=labels)

    times = timed(args, {"padded": with_packing(model, False, step), "packed": with_packing(model, True, step)},
                  args.repeats)  # fmt: skip
    print(ratio_line("train step", times))
    memory = {packed: saved_bytes(model, with_packing(model, packed, forward)) for packed in (False, True)}
    print(
        f"    saved activations: padded {memory[False] / 2**20:.0f} MiB, packed {memory[True] / 2**20:.0f} MiB "
        f"(×{memory[True] / memory[False]:.2f})"
    )
    if args.device.startswith("cuda"):
        achieved = 3 * useful_flops(args, lengths) / statistics.median(times["packed"])
        print(f"    packed: {achieved / 1e12:.1f} TFLOP/s on real tokens, MFU {achieved / peak:.1%}")


def bench_generate(model, args, profile: str, N: int) -> None:
    ids, mask, _, _ = make_batch(args, profile, N)
    model.eval()
    kwargs = {"max_length": args.gen_max_length}

    def scored():
        with autocast(args):
            return generate_with_scores(model, ids, mask, **kwargs)

    def plain():
        with autocast(args):
            return model.generate(ids, mask, **kwargs)

    (gen0, s0), (gen1, s1) = with_packing(model, False, scored)(), with_packing(model, True, scored)()
    same = torch.equal(gen0, gen1)
    diff = (s0 - s1).abs().max().item()
    runs = {"padded": with_packing(model, False, scored), "packed": with_packing(model, True, scored)}
    if "overhead" not in args.skip:
        runs["packed plain"] = with_packing(model, True, plain)
    times = timed(args, runs, args.repeats)
    print(ratio_line("generate + xattn scores", times) + f"; answers identical: {same}, max score diff {diff:.1e}")
    if "overhead" not in args.skip:
        pairs = [s / p for s, p in zip(times["packed"], times["packed plain"])]
        print(
            f"    score export overhead (packed, scores vs plain generate): {statistics.median(pairs) - 1:+.1%} "
            f"(min {min(pairs) - 1:+.1%}, max {max(pairs) - 1:+.1%}; target ≤ 3%)"
        )


def e2e_setup(args, root: Path) -> tuple[Path, Path]:
    """A random t5-small-width reader with a word tokenizer, and a question file whose
    passages have the dpr profile's lengths (one word = one token)."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(2000)]
    model_dir = save_tiny_t5(
        root / "reader", [" ".join(words), "question: title: context:"], d_model=args.d_model, layers=args.layers,
        heads=args.heads, d_ff=args.d_ff,
    )  # fmt: skip
    lengths, _ = lengths_for("dpr", args.e2e_questions, args.e2e_passages)
    examples = []
    for i in range(args.e2e_questions):
        question = " ".join(rng.choices(words, k=8))
        ctxs = []
        for j in range(args.e2e_passages):
            n_text = max(1, int(lengths[i, j]) - 8 - 4)  # question: Q title: T context: P
            ctxs.append({"title": rng.choice(words), "text": " ".join(rng.choices(words, k=n_text)), "score": -j})
        examples.append({"id": i, "question": question, "answers": [rng.choice(words)], "ctxs": ctxs})
    data = root / "questions.json"
    data.write_text(json.dumps(examples))
    return model_dir, data


def bench_e2e(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = e2e_setup(args, root)
        base = [
            sys.executable, str(ROOT / "test_reader.py"), "--model_path", str(model_dir), "--eval_data", str(data),
            "--n_context", str(args.e2e_passages), "--text_maxlength", "250", "--per_gpu_batch_size", "1",
            "--generation_max_length", str(args.gen_max_length), "--write_crossattention_scores", "--write_results",
            "--checkpoint_dir", str(root / "runs"), "--device", args.device,
            "--precision", args.precision.split(",")[0],
        ]  # fmt: skip
        env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.update({k: v for k, v in __import__("os").environ.items() if k not in env})
        times = {"padded": [], "packed": []}
        outputs = {}
        for r in range(args.repeats):
            for name, extra in (("padded", ["--no_packing"]), ("packed", []))[:: 1 if r % 2 else -1]:
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t = time.perf_counter()
                subprocess.run([*base, "--name", f"{name}{r}", *extra], check=True, capture_output=True, env=env)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                wall = time.perf_counter() - t
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                times[name].append(cpu if args.device == "cpu" else wall)
                outputs[name] = (root / "runs" / f"{name}{r}" / "final_output.txt").read_text()
        print(
            f"test_reader.py end to end: {args.e2e_questions} questions × {args.e2e_passages} passages (dpr profile), "
            f"with xattn scores, {'process CPU time' if args.device == 'cpu' else 'wall time'}"
        )
        print(ratio_line("whole script", times) + f"; answers identical: {outputs['padded'] == outputs['packed']}")


def main(argv=None) -> None:
    args = parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.layers = args.layers or (6 if gpu else 2)
    if not gpu:
        torch.set_num_threads(args.threads)
    if args.min_bucket_tokens is not None:
        packing.MIN_BUCKET_TOKENS = args.min_bucket_tokens
    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} thread(s)"
    print(
        f"device {args.device} ({name}); T5 d_model {args.d_model}, d_ff {args.d_ff}, heads {args.heads}, "
        f"{args.layers}+{args.layers} layers; batch {args.batch_size}; {args.repeats} interleaved runs per path; "
        "ratios = padded time / packed time, median (min, max) over the paired runs; "
        f"packing floor {packing.MIN_BUCKET_TOKENS} tokens per encoder call"
    )
    args.n_passages, args.text_maxlength = 1, 1  # for bench_reader.build
    model = build(args)
    precisions = args.precision.split(",")
    for precision in precisions:
        args.precision = precision
        peak = matmul_peak(args) if gpu and "train" not in args.skip else 0.0
        for profile in args.profiles.split(","):
            for N in (int(n) for n in args.passages.split(",")):
                lengths, L = lengths_for(profile, args.batch_size, N)
                print(
                    f"[{precision}] {profile}: {N} passages × L={L}, mean {lengths.float().mean():.0f} real tokens "
                    f"({lengths.sum() / (lengths.numel() * L):.0%} of the padded positions)"
                )
                if "train" not in args.skip:
                    bench_train(model, args, profile, N, peak)
                if "generate" not in args.skip:
                    bench_generate(model, args, profile, N)
    args.precision = ",".join(precisions)
    if args.e2e_questions:
        bench_e2e(args)


if __name__ == "__main__":
    main()
