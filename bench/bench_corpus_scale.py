"""FAISS index kinds as the corpus grows: build time, search time, peak memory, index bytes
per passage and recall@k against flat, fitted per passage and projected to the 21,015,324
passages of psgs_w100.tsv on 1, 2, 4 and 8 ranks (docs/corpus-at-scale.md).

    python bench/bench_corpus_scale.py                     # 250k and 500k passages: ~15 min on 2 cores
    python bench/bench_corpus_scale.py --sizes 250000,500000,1000000,2000000 --results /tmp/scale.jsonl
    python bench/bench_corpus_scale.py --sizes 20000,40000 --queries 100 --kinds flat,sq8   # a smoke run

--results keeps every measured (kind, N) in a file and reuses those with the same settings,
so a long sweep can be resumed or extended (e.g. the 2M size later, on a quiet machine).

The vectors are synthetic: Gaussian, normalised to unit length (d=768), the queries too.
Random vectors have no structure for a quantizer to learn and their top-100 scores lie
close together, so they are the WORST case for the recall of the compressed kinds; real
embeddings cluster and recall better. Each (kind, N) runs in its own process, which makes
the vectors in chunks from a seed (never the whole matrix) and reports its own peak RSS
(VmHWM). Build = training + adding (making the vectors excluded); trained kinds learn
from the first --train_sample vectors (src/corpus/faiss_index.py). ivfpq uses n_lists = 4 sqrt(N)
(--lists_factor). Search is timed --search_repeats times: median (min-max).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from src.corpus.faiss_index import Indexer  # noqa: E402

WIKIPEDIA = 21_015_324  # passages in psgs_w100.tsv
RANKS = (1, 2, 4, 8)
CHUNK = 16_384  # vectors made (and handed to the index) at once: 48 MB, little beside the index
SETTINGS = ("dim", "queries", "k", "train_sample", "n_subquantizers", "n_probe", "lists_factor", "search_repeats")


def vectors(n: int, dim: int, seed: int, start: int = 0, end: int | None = None):
    """Unit vectors [start, end) of a seeded stream, chunk by chunk: (first row, (rows, dim) float32)."""
    end = n if end is None else end
    for chunk in range(start // CHUNK, (end + CHUNK - 1) // CHUNK):
        rng = np.random.default_rng([seed, chunk])
        x = rng.standard_normal((min(CHUNK, n - chunk * CHUNK), dim), dtype=np.float32)
        x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # no (rows, dim) temporary
        yield chunk * CHUNK, x


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def n_lists_for(n: float, factor: float) -> int:
    return max(1, round(factor * n**0.5))


def make_indexer(kind: str, n: int, args) -> Indexer:
    return Indexer(
        args.dim,
        n_subquantizers=args.n_subquantizers,
        n_bits=8,
        kind=kind,
        n_lists=n_lists_for(n, args.lists_factor),
        n_probe=args.n_probe,
        train_sample=min(args.train_sample, n),
    )


def child(kind: str, n: int, args) -> dict:
    """Build one index of n vectors, search it, measure it; the result as a dict."""
    base_rss = peak_rss_bytes()
    indexer = make_indexer(kind, n, args)
    build_s = 0.0
    for start, x in vectors(n, args.dim, seed=0):
        t0 = time.perf_counter()
        indexer.index_data(np.arange(start, start + len(x)), x)
        build_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    indexer.finish()  # a corpus smaller than the sample trains here
    build_s += time.perf_counter() - t0
    queries = np.concatenate([x for _, x in vectors(args.queries, args.dim, seed=1)])
    search_times = []
    for _ in range(args.search_repeats):
        t0 = time.perf_counter()
        results = indexer.search_knn(queries, args.k)
        search_times.append(time.perf_counter() - t0)
    found = np.stack([ids.astype(np.int64) for ids, _ in results])  # (queries, k)
    if kind == "flat":
        np.save(args.flat_ids, found)
        recall = 1.0
    else:
        exact = np.load(args.flat_ids)
        recall = float(np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(found, exact)]))
    size = [0]

    def count(chunk) -> int:
        size[0] += len(chunk)
        return len(chunk)

    faiss.write_index(indexer.index, faiss.PyCallbackIOWriter(count))  # the size of index.faiss, not kept
    return {
        "kind": kind,
        "n": n,
        "n_lists": n_lists_for(n, args.lists_factor) if kind in ("ivf", "ivfpq") else None,
        "trained_on": indexer.trained_on,
        "train_s": indexer.train_seconds,
        "build_s": build_s,
        "search_s": float(np.median(search_times)),
        "search_min_s": min(search_times),
        "search_max_s": max(search_times),
        "queries": args.queries,
        "peak_rss": peak_rss_bytes(),
        "base_rss": base_rss,
        "index_bytes": size[0],
        "recall": recall,
    }


def run_child(kind: str, n: int, args, flat_ids: Path) -> dict:
    argv = [sys.executable, __file__, "--child", kind, "--sizes", str(n), "--flat_ids", str(flat_ids)]
    for name in SETTINGS:
        argv += [f"--{name}", str(getattr(args, name))]
    # OpenMP threads that spin while they wait lose their core on a shared machine; FAISS's
    # many small parallel loops (pq training) then run 5x slower. Passive waiting avoids that.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit_linear(n: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares y = a + b N: (a, b); b is the cost per passage."""
    if len(n) < 2:
        return 0.0, float(y[0] / n[0])
    b, a = np.polyfit(n, y, 1)
    return float(a), float(b)


def fit_power(n: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares log y = log c + p log N: (c, p); p = 1 is linear, ivfpq's sqrt(N) lists give more."""
    if len(n) < 2:
        return float(y[0] / n[0]), 1.0
    p, log_c = np.polyfit(np.log(n), np.log(np.maximum(y, 1e-6)), 1)
    return float(np.exp(log_c)), float(p)


def merge_seconds(ranks: int, queries: int, k: int, repeats: int = 5) -> float:
    """Merging the ranks' top k of every query into one top k (the median of `repeats`)."""
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((queries, ranks * k), dtype=np.float32)  # the gathered (score, id) lists
    ids = rng.integers(0, WIKIPEDIA, (queries, ranks * k))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        np.take_along_axis(ids, np.take_along_axis(top, order, axis=1), axis=1)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def print_measured(rows: list[dict]) -> None:
    flat = {r["n"]: r for r in rows if r["kind"] == "flat"}
    print(
        f"\n{'kind':>7} {'N':>9} {'lists':>5} {'train s':>7} {'build s':>7} {'search s, median (min-max)':>27} "
        f"{'x flat':>6} {'peak RSS MB':>11} {'index B/psg':>11} {'recall@k':>8}"
    )
    for r in rows:
        spread = f"{r['search_s']:.2f} ({r['search_min_s']:.2f}-{r['search_max_s']:.2f})"
        print(
            f"{r['kind']:>7} {r['n']:>9,} {r['n_lists'] or '':>5} {r['train_s']:7.1f} {r['build_s']:7.1f} "
            f"{spread:>27} {flat[r['n']]['search_s'] / r['search_s']:6.1f} {r['peak_rss'] / 2**20:11.0f} "
            f"{r['index_bytes'] / r['n']:11.1f} {r['recall']:8.3f}"
        )
    print("x flat: flat's search time over this kind's, at the same N; recall@k: of flat's top k")


def fit_kind(mine: list[dict]) -> dict:
    n = np.array([r["n"] for r in mine], dtype=np.float64)
    add = np.array([r["build_s"] - r["train_s"] for r in mine])
    search = np.array([r["search_s"] for r in mine])
    index = np.array([r["index_bytes"] for r in mine], dtype=np.float64)
    return {
        "add_per_psg": fit_linear(n, add)[1],
        "add_p": fit_power(n, add)[1],
        "search_per_psg": fit_linear(n, search)[1] / mine[-1]["queries"],
        "search_p": fit_power(n, search)[1],
        "rss_per_psg": fit_linear(n, np.array([r["peak_rss"] for r in mine], dtype=np.float64))[1],
        "index": fit_linear(n, index),
        # Python, the training buffer, search scratch: the most any size needed beside its index
        "overhead": max(r["peak_rss"] - r["index_bytes"] for r in mine),
        "last": mine[-1],
    }


def scale_to(f: dict, n: float, args) -> dict:
    """Seconds and bytes at n passages, scaled from the largest measured size by each kind's cost
    model: training costs sample x centroids (only the IVF lists, factor sqrt(N), grow with N;
    the sample is min(--train_sample, N)); adding and an exhaustive search cost N (ivfpq's add
    assigns every vector to one of the lists: N x lists); ivfpq's search scans n_probe lists
    of N / lists vectors after ranking the lists: both grow as sqrt(N)."""
    last = f["last"]
    ratio = n / last["n"]
    lists = n_lists_for(n, args.lists_factor) / last["n_lists"] if last["n_lists"] else 1.0
    train = 0.0
    if last["train_s"]:
        train = last["train_s"] * min(args.train_sample, n) / last["trained_on"] * lists
    index_bytes = f["index"][0] + f["index"][1] * n
    return {
        "lists": n_lists_for(n, args.lists_factor) if last["n_lists"] else "",
        "train": train,
        "add": (last["build_s"] - last["train_s"]) * ratio * lists,
        "search": last["search_s"] * (ratio / lists if last["n_lists"] else ratio),
        "index": index_bytes,
        "rss": index_bytes + f["overhead"],
    }


def print_fits_and_projection(rows: list[dict], args) -> None:
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fits = {kind: fit_kind([r for r in rows if r["kind"] == kind]) for kind in kinds}
    print(
        "\nfitted per passage (least-squares slopes over the sizes; p: exponent of a fitted c N^p, 1 = linear, "
        "a check of the cost model below; noisy on a busy machine):"
    )
    print(
        f"{'kind':>7} {'add us/psg':>10} {'p':>5} {'search ms/query/1M psg':>22} {'p':>5} {'index B/psg':>11} "
        f"{'RSS B/psg':>9} {'overhead MB':>11}"
    )
    for kind, f in fits.items():
        print(
            f"{kind:>7} {1e6 * f['add_per_psg']:10.3f} {f['add_p']:5.2f} {1e9 * f['search_per_psg']:22.3f} "
            f"{f['search_p']:5.2f} {f['index'][1]:11.1f} {f['rss_per_psg']:9.0f} {f['overhead'] / 2**20:11.0f}"
        )
    merges = {w: merge_seconds(w, args.queries, args.k) for w in RANKS if w > 1}
    largest = max(r["n"] for r in rows)
    print(
        f"\nPROJECTION (not measured) to {WIKIPEDIA:,} passages, each of W ranks holding N/W of them and "
        f"searching all {args.queries} queries at once: per rank, times scaled from the largest measured "
        f"N={largest:,} by each kind's cost model (scale_to), memory = the fitted index bytes + the largest "
        "measured overhead; the search adds the merge of the W top-k lists (measured: "
        + ", ".join(f"W={w} {1000 * s:.1f} ms" for w, s in merges.items())
        + f"; gathering them moves W x {args.queries} x {args.k} x 12 bytes). Recall as measured at "
        f"N={largest:,}: it falls further with N for the compressed kinds."
    )
    print(
        f"{'kind':>7} {'W':>2} {'psg/rank':>10} {'lists':>5} {'index GB':>8} {'RSS GB':>7} {'train min':>9} "
        f"{'add min':>7} {'search s':>8} {'recall':>6}"
    )
    for kind, f in fits.items():
        for w in RANKS:
            n = WIKIPEDIA / w
            p = scale_to(f, n, args)
            print(
                f"{kind:>7} {w:>2} {n:10,.0f} {p['lists']:>5} {p['index'] / 2**30:8.1f} {p['rss'] / 2**30:7.1f} "
                f"{p['train'] / 60:9.1f} {p['add'] / 60:7.1f} {p['search'] + merges.get(w, 0.0):8.1f} "
                f"{f['last']['recall']:6.3f}"
            )


def load_results(path: str | None, args) -> dict:
    """{(kind, n): row} of earlier runs with the same settings."""
    if not path or not os.path.exists(path):
        return {}
    settings = {name: getattr(args, name) for name in SETTINGS}
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {(r["kind"], r["n"]): r for r in rows if r.get("settings") == settings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="250000,500000", help="corpus sizes N, comma-separated")
    parser.add_argument("--kinds", default="flat,sqfp16,sq8,pq,ivfpq", help="index kinds (flat always runs first)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--train_sample", type=int, default=262_144, help="--index_train_sample of the trained kinds")
    parser.add_argument("--n_subquantizers", type=int, default=64, help="pq and ivfpq codes (8 bits each)")
    parser.add_argument("--n_probe", type=int, default=32, help="ivfpq: lists searched per query")
    parser.add_argument("--lists_factor", type=float, default=4.0, help="ivfpq: n_lists = factor x sqrt(N)")
    parser.add_argument("--search_repeats", type=int, default=3, help="timed searches per index (median, min, max)")
    parser.add_argument("--results", help="JSON-lines file of measured rows: reused when the settings match")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--flat_ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        print(json.dumps(child(args.child, sizes[0], args)))
        return
    kinds = ["flat"] + [k for k in args.kinds.split(",") if k != "flat"]
    print(
        f"synthetic unit vectors, d={args.dim}, {args.queries} random unit queries, k={args.k}; pq and ivfpq: "
        f"{args.n_subquantizers} x 8-bit codes, ivfpq n_lists = {args.lists_factor:g} sqrt(N), n_probe "
        f"{args.n_probe}; trained on the first {args.train_sample:,} vectors; faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}; load average {os.getloadavg()[0]:.1f} at the start"
    )
    done = load_results(args.results, args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ids_dir = Path(args.results).parent if args.results else Path(tmp)
        for n in sizes:
            for kind in kinds:
                if (kind, n) not in done:
                    row = run_child(kind, n, args, ids_dir / f"scale_flat_ids_{n}_{args.queries}_{args.k}.npy")
                    done[(kind, n)] = row = {**row, "settings": {name: getattr(args, name) for name in SETTINGS}}
                    if args.results:
                        with open(args.results, "a") as f:
                            f.write(json.dumps(row) + "\n")
                r = done[(kind, n)]
                rows.append(r)
                print(
                    f"  {kind} N={n:,}: build {r['build_s']:.1f}s (train {r['train_s']:.1f}s), search "
                    f"{r['search_s']:.2f}s, peak RSS {r['peak_rss'] / 2**30:.2f} GB, recall {r['recall']:.3f}",
                    flush=True,
                )
    print(f"load average {os.getloadavg()[0]:.1f} at the end (2 cores shared: times are noisy above 2)")
    print_measured(rows)
    print_fits_and_projection(rows, args)
    print(
        "\nRandom unit vectors are the worst case for the recall of the compressed kinds (sq8, pq, ivfpq): "
        "nothing to learn, and near-equal top scores. Measure recall on your own embeddings before choosing."
    )


if __name__ == "__main__":
    main()
