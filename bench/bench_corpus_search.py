"""Exact (flat) FAISS search vs numpy: matmul + argpartition + sort of the top k.

    python bench/bench_corpus_search.py                       # 100k passages, dim 768
    python bench/bench_corpus_search.py --n 1000000 --queries 4000

Both return the same top-k (checked); printed: queries per second and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from src.index import Indexer  # noqa: E402


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
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
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

    def best_time(fn):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    faiss_s, faiss_out = best_time(lambda: indexer.search_knn(queries, args.k, batch_size=args.batch_size))
    numpy_s, (np_ids, np_scores) = best_time(lambda: numpy_search(x, queries, args.k, args.batch_size))
    faiss_ids = np.stack([ids.astype(np.int64) for ids, _ in faiss_out])
    agree = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(faiss_ids, np_ids)])
    print(f"FAISS flat (Indexer.search_knn): {args.queries / faiss_s:9.1f} queries/s")
    print(f"numpy matmul + argpartition:     {args.queries / numpy_s:9.1f} queries/s")
    print(f"speed ratio FAISS/numpy = {numpy_s / faiss_s:.2f}x; top-{args.k} overlap {100 * agree:.2f}%")


if __name__ == "__main__":
    main()
