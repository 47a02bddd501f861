"""Passage embedding throughput: length-sorted batches with dynamic padding vs the
original's fixed padding to --passage_maxlength (same vectors, checked).

    python bench/bench_corpus_embed.py                  # small BERT on CPU, < 60 s
    python bench/bench_corpus_embed.py --n 20000 --hidden 768 --layers 12 --device cuda

Two length profiles (in tokens, before truncation to --maxlength):
  mixed: uniform over [10, 190] (e.g. a corpus of paragraphs)
  dpr:   like psgs_w100.tsv with a WordPiece tokenizer: 100-word chunks of ~115-165
         tokens, plus 5% short end-of-article chunks
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from src.corpus.embeddings import embed_texts  # noqa: E402
from src.retriever.model import Retriever, RetrieverConfig  # noqa: E402
from src.toy.tiny_models import build_word_tokenizer, tiny_bert_config  # noqa: E402


def make_texts(n: int, profile: str, words: list[str], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        if profile == "mixed":
            length = rng.randint(10, 190)
        else:
            length = rng.randint(10, 100) if rng.random() < 0.05 else rng.randint(115, 165)
        texts.append(" ".join(rng.choices(words, k=length - 2)))  # [CLS] and [SEP] make up the rest
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="passages per profile")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs (interleaved)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--maxlength", type=int, default=200, help="--passage_maxlength")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: steadier timings on a shared machine; 0: torch default)",
    )
    parser.add_argument("--profiles", nargs="+", default=["mixed", "dpr"], choices=["mixed", "dpr"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    words = [f"w{i}" for i in range(2000)]
    tokenizer = build_word_tokenizer(words, "bert")
    encoder = tiny_bert_config(len(tokenizer), hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 64))
    torch.manual_seed(0)
    retriever = Retriever(RetrieverConfig(encoder=encoder, indexing_dimension=args.hidden)).eval().to(args.device)
    print(f"retriever: BERT hidden {args.hidden} x {args.layers} layers, batch {args.batch_size}, device {args.device}")

    def run(texts, **kw):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = embed_texts(
            retriever.embed_passages, tokenizer, texts, args.batch_size, args.maxlength, device=args.device, **kw
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return len(texts) / (time.perf_counter() - t0), out

    run(make_texts(2 * args.batch_size, "mixed", words))  # warm-up
    for profile in args.profiles:
        texts = make_texts(args.n, profile, words)
        rates = {"fixed": 0.0, "dynamic": 0.0, "sorted": 0.0}
        settings = {
            "fixed": {"sort_by_length": False, "pad_to_max_length": True},
            "dynamic": {"sort_by_length": False},
            "sorted": {"sort_by_length": True},
        }
        outputs = {}
        for _ in range(args.repeats):  # interleaved, best of: the machine may be shared
            for name, kw in settings.items():
                rate, outputs[name] = run(texts, **kw)
                rates[name] = max(rates[name], rate)
        fixed_rate, dynamic_rate, sorted_rate = rates["fixed"], rates["dynamic"], rates["sorted"]
        fixed, dynamic, ordered = outputs["fixed"], outputs["dynamic"], outputs["sorted"]
        same = np.abs(ordered - fixed).max()
        print(f"[{profile}] {args.n} passages")
        print(f"  fixed padding to {args.maxlength} (original): {fixed_rate:8.1f} passages/s")
        print(f"  dynamic padding, file order:        {dynamic_rate:8.1f} passages/s")
        print(f"  dynamic padding, sorted by length:  {sorted_rate:8.1f} passages/s")
        print(
            f"  speed-up sorted/fixed = {sorted_rate / fixed_rate:.2f}x (target >= 1.5x), "
            f"max |difference| of the vectors {same:.1e}"
        )
        assert np.allclose(ordered, fixed, atol=1e-4) and np.allclose(dynamic, fixed, atol=1e-4)


if __name__ == "__main__":
    main()
