"""Exact (flat) FAISS search vs numpy: matmul + argpartition + sort of the top k.

    python bench/bench_corpus_search.py                       # 100k passages, dim 768
    python bench/bench_corpus_search.py --n 1000000 --queries 4000

On a busy machine run it with OMP_WAIT_POLICY=PASSIVE: FAISS's OpenMP threads otherwise spin
while they wait and lose their cores (measured 7x slower at load 5 on 2 cores).

Both return the same top-k (checked); printed: queries per second, median (min-max) of
--repeats runs interleaved A/B, and the ratio of the medians. The other index kinds as
the corpus grows: bench/bench_corpus_scale.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from src.corpus.faiss_index import Indexer  # noqa: E402


def numpy_search(x: np.ndarray, queries: np.ndarray, k: int, batch_size: int):
    ids, scores = [], []
    for start in range(0, len(queries), batch_size):
        s = queries[start : start + batch_size] @ x.T  # (b, n)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]  # unordered top k
        top_scores = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-top_scores, axis=1)
        ids.append(np.take_along_axis(top, order, axis=1))
        scores.append(np.take_along_axis(top_scores, order, axis=1))
    return np.concatenate(ids), np.concatenate(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="indexed passages")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=256, help="queries per search call (both sides)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side, interleaved")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    indexer = Indexer(args.dim)
    t0 = time.perf_counter()
    for start in range(0, args.n, 50_000):
        indexer.index_data(np.arange(start, min(start + 50_000, args.n)), x[start : start + 50_000])
    print(
        f"{args.n:,} passages x {args.dim} dims, {args.queries} queries, k={args.k} (indexing {time.perf_counter() - t0:.1f}s)"
    )

    sides = {
        "faiss": lambda: indexer.search_knn(queries, args.k, batch_size=args.batch_size),
        "numpy": lambda: numpy_search(x, queries, args.k, args.batch_size),
    }
    times, outputs = {name: [] for name in sides}, {}
    for _ in range(args.repeats):  # interleaved: a busy machine slows both sides alike
        for name, fn in sides.items():
            t0 = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    faiss_ids = np.stack([ids.astype(np.int64) for ids, _ in outputs["faiss"]])
    agree = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(faiss_ids, outputs["numpy"][0])])
    rate = {name: args.queries / np.array(t) for name, t in times.items()}  # queries/s of each run
    for name, label in (("faiss", "FAISS flat (Indexer.search_knn)"), ("numpy", "numpy matmul + argpartition")):
        r = rate[name]
        print(f"{label:<32} {np.median(r):9.1f} queries/s (min {r.min():.1f}, max {r.max():.1f})")
    ratio = np.median(times["numpy"]) / np.median(times["faiss"])
    print(f"speed ratio FAISS/numpy = {ratio:.2f}x (medians); top-{args.k} overlap {100 * agree:.2f}%")


if __name__ == "__main__":
    main()
