"""The search stage of passage_retrieval.py in 2 processes (torchrun, gloo) against 1, on the
same shards: identical results (checked), wall time and peak memory per process.

    python bench/bench_retrieval_dist.py                          # 200k x 768 flat, 1,000 queries
    python bench/bench_retrieval_dist.py --n 1000000 --queries 4000 --threads 8

Synthetic shards (`--shards` files of random vectors) and precomputed question embeddings go
through src/corpus/search.py as the script runs them: each process indexes its share of the
files (build_index), rank 0 sends the queries, every process searches its share
(search_share) and rank 0 merges the top k (Searchers, merge_top_k). One process runs with
2 x --threads OpenMP threads, each of the two with --threads: the same cores. The runs
alternate (1, 2, 1, 2, ...); printed: median (min-max) of --repeats runs, the ratio of the
medians, and each process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from src import distributed as dist  # noqa: E402
from src.corpus.embeddings import write_shard  # noqa: E402
from src.corpus.faiss_index import IndexConfig  # noqa: E402
from src.corpus.search import Searchers, agree, build_index, embedding_files, share_of  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """One process of a run (plain python: W=1; under torchrun: rank r of W)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_distributed("cpu")
    group = dist.object_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    files = embedding_files(str(Path(args.dir) / "wiki_*"))
    queries = np.load(Path(args.dir) / "queries.npy")
    t0 = time.perf_counter()
    indexer = build_index(share_of(files, rank, world), queries.shape[1], IndexConfig(index_type="flat"), dist.logger)
    sizes = agree(lambda: len(indexer), group)
    t1 = time.perf_counter()
    searchers = Searchers(indexer, sum(sizes[:rank]), args.k, group)
    if rank == 0:
        top = searchers.search(queries)
        searchers.stop()
    else:
        searchers.serve()
    t2 = time.perf_counter()
    rss = dist.gather_to_main(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, group)
    if rank == 0:
        np.savez(args.out, rows=top.rows, scores=top.scores)
        print(json.dumps({"index_s": t1 - t0, "search_s": t2 - t1, "rss_mib": rss}), flush=True)
    dist.destroy()


def run(args: argparse.Namespace, nproc: int, out: Path) -> dict:
    threads = args.threads * 2 // nproc  # the same cores in all
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    script = [str(Path(__file__).resolve()), "--worker", "--dir", args.dir, "--out", str(out), "--k", str(args.k)]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + random.randint(0, 3000)), *script]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    return {**result, "wall_s": wall}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000, help="indexed passages")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per process of the 2-process run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="bench_retrieval_dist_") as tmp:
        args.dir = tmp
        rng = np.random.default_rng(0)
        bounds = np.linspace(0, args.n, args.shards + 1).astype(int)
        for s in range(args.shards):
            x = rng.standard_normal((bounds[s + 1] - bounds[s], args.dim), dtype=np.float32)
            write_shard(Path(tmp) / f"wiki_{s:02d}.npz", np.arange(bounds[s], bounds[s + 1]).astype(str), x)
        np.save(Path(tmp) / "queries.npy", rng.standard_normal((args.queries, args.dim), dtype=np.float32))
        print(f"{args.n:,} x {args.dim} flat in {args.shards} shards, {args.queries} queries, k={args.k}")
        results: dict[int, list[dict]] = {1: [], 2: []}
        outputs = {}
        for _ in range(args.repeats):
            for nproc in (1, 2):
                outputs[nproc] = Path(tmp) / f"top_{nproc}.npz"
                results[nproc].append(run(args, nproc, outputs[nproc]))
        one, two = (np.load(outputs[n]) for n in (1, 2))
        same = np.array_equal(one["rows"], two["rows"]) and np.array_equal(one["scores"], two["scores"])
        assert same, "2 processes disagree with 1"
        print(f"identical top-{args.k} (global rows and float32 scores) in 1 and 2 processes: {same}")
        print(f"{'':24} {'index s':>20} {'search s':>20} {'whole run s':>20}  peak RSS MiB per process")
        for nproc in (1, 2):
            rs = results[nproc]
            label = f"{nproc} process(es) x {args.threads * 2 // nproc} thr"
            rss = " + ".join(f"{max(r['rss_mib'][i] for r in rs):.0f}" for i in range(nproc))
            print(
                f"{label:24} {summary([r['index_s'] for r in rs]):>20} {summary([r['search_s'] for r in rs]):>20} "
                f"{summary([r['wall_s'] for r in rs]):>20}  {rss}"
            )
        med = {n: {key: statistics.median(r[key] for r in results[n]) for key in ("index_s", "search_s", "wall_s")}
               for n in (1, 2)}  # fmt: skip
        print(
            "ratio 2 processes / 1: "
            + ", ".join(f"{key[:-2]} {med[2][key] / med[1][key]:.2f}" for key in ("index_s", "search_s", "wall_s"))
        )


if __name__ == "__main__":
    main()
