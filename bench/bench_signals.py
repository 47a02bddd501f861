"""Cost of exporting each reader signal (`test_reader.py --score_kind K`) relative to
`xattn`, on the same reader and inputs. Prints, per kind, the median time of one batch
(answers + scores) with its min and max over interleaved repeats, and the ratio of
medians to xattn.

Expected shape: pdist / answer_logprob ≈ the encoder pass plus N short teacher-forced
decoder passes (one per passage alone); loop ≈ N decoder passes over N−1 passages, so it
grows with N² cross-attention keys; xattn_all_tokens adds one teacher-forced pass.

    python bench/bench_signals.py                      # CPU, t5-small widths, 2+2 layers
    python bench/bench_signals.py --device cuda --layers 6 --n_passages 100 --precision bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.reader.model import FiDT5  # noqa: E402
from src.reader.scores import SCORE_KINDS, generate_with_scores  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--d_ff", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32128)
    p.add_argument("--n_passages", type=int, default=10)
    p.add_argument("--text_maxlength", type=int, default=100)
    p.add_argument("--answer_length", type=int, default=4, help="gold answer tokens, EOS included")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--gen_max_length", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per kind, interleaved")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kinds", nargs="*", default=list(SCORE_KINDS))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = transformers.T5Config(
        vocab_size=args.vocab, d_model=args.d_model, d_ff=args.d_ff, num_heads=args.heads, d_kv=args.d_model // args.heads,
        num_layers=args.layers, num_decoder_layers=args.layers, dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = FiDT5(config).to(device).eval()
    B, N, L = args.batch_size, args.n_passages, args.text_maxlength
    ids = torch.randint(3, args.vocab, (B, N, L), device=device)
    mask = torch.ones_like(ids)
    labels = torch.randint(3, args.vocab, (B, args.answer_length), device=device)
    labels[:, -1] = 1  # EOS
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def once(kind: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            generate_with_scores(model, ids, mask, score_kind=kind, labels=labels, max_length=args.gen_max_length)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for kind in args.kinds:  # warm-up
        once(kind)
    times = {kind: [] for kind in args.kinds}
    for _ in range(args.repeats):  # interleaved: a load spike hits every kind alike
        for kind in args.kinds:
            times[kind].append(once(kind))
    print(
        f"{args.device}, {args.precision}, {args.threads} thread(s); t5 d_model {args.d_model}, {args.layers}+{args.layers} "
        f"layers; {B} questions × {N} passages × {L} tokens; answer {args.answer_length} tokens; {args.repeats} repeats"
    )
    base = statistics.median(times.get("xattn", next(iter(times.values()))))
    print(f"{'kind':<18} {'median s':>9} {'min':>8} {'max':>8} {'× xattn':>8}")
    for kind, t in times.items():
        med = statistics.median(t)
        print(f"{kind:<18} {med:9.3f} {min(t):8.3f} {max(t):8.3f} {med / base:8.2f}")


if __name__ == "__main__":
    main()
