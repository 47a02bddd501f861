"""PassageStore vs the original's dict of tuples: resident memory and lookup time.

    python bench/bench_corpus_store.py              # 1M synthetic passages (~600 MB file)
    python bench/bench_corpus_store.py --n 200000   # quicker
    python bench/bench_corpus_store.py --n 21015324 --short --sides store   # psgs_w100.tsv's row count

Each side runs in its own process so the memory figures do not mix; memory is the
growth of the resident set (RSS) after loading, over a process that imported the same
modules, and the peak (VmHWM) over that base. Passages are ~100 words, like DPR's
psgs_w100.tsv; --short writes ~16 bytes of text per row instead, so that 21M rows fit in
/tmp and the time goes to the per-row work of the index (what grows with the row count).
The store's side also reports its id arrays: `ids()` (a Python str per passage) against
`id_array()` (int64), what a shard of the whole corpus holds.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def write_corpus(path: Path, n: int, seed: int = 0, short: bool = False) -> None:
    if short:  # id, 16 bytes of text, a title: ~35 bytes a row
        with open(path, "w", encoding="utf-8", buffering=1 << 22) as f:
            f.write("id\ttext\ttitle\n")
            for start in range(1, n + 1, 100_000):
                f.write(
                    "".join(
                        f"{i}\tshort text {i % 99991:05d}\tTitle {i % 9973}\n"
                        for i in range(start, min(n + 1, start + 100_000))
                    )
                )
        return
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)] + ["the", "of", "and", "in", '"quoted"', "city", "river"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")  # DPR's writer: quotes fields with quotes
        writer.writerow(["id", "text", "title"])
        for i in range(1, n + 1):
            text = " ".join(rng.choices(words, k=100))
            writer.writerow([i, text, f"Title {i % 9973}"])


def child(kind: str, path: str, n_lookups: int) -> dict:
    """Load one way, then time random lookups; prints a JSON line."""
    from src.corpus.passages import PassageStore

    base = rss_bytes()
    t0 = time.perf_counter()
    extra = {}
    if kind == "store":
        store = PassageStore(path, show_progress=False)
        n = len(store)
        extra["kept_bytes"] = sum(
            a.nbytes
            for a in (store._starts, store._lengths, store._int_ids, store._str_ids, store._order)
            if a is not None
        )  # what the store holds per passage

        def lookup(key):
            return store[key]
    else:  # the original FiD's load_passages: a dict of (text, title) tuples for every row
        passages = {}
        with open(path, encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t")
            next(reader)
            for row in reader:
                passages[row[0]] = (row[1], row[2])
        n = len(passages)

        def lookup(key):
            return passages[key]

    load_s = time.perf_counter() - t0
    memory = rss_bytes() - base
    rng = random.Random(1)
    keys = [str(rng.randint(1, n)) for _ in range(n_lookups)]
    t0 = time.perf_counter()
    for key in keys:
        lookup(key)
    lookup_us = (time.perf_counter() - t0) / n_lookups * 1e6
    peak = peak_rss_bytes() - base
    if kind == "store":  # the ids of a shard of the whole corpus, as a list of str and as an array
        before = rss_bytes()
        as_list = store.ids()
        extra["ids_list_mb"] = (rss_bytes() - before) / 2**20
        del as_list
        extra["id_array_mb"] = store.id_array().nbytes / 2**20
    return {
        "kind": kind, "n": n, "memory_mb": memory / 2**20, "peak_mb": peak / 2**20, "load_s": load_s,
        "lookup_us": lookup_us, **extra,
    }  # fmt: skip


def run_child(kind: str, path: Path, n_lookups: int) -> dict:
    """One side in a fresh process (its own memory); the result as a dict."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--path", str(path), "--lookups", str(n_lookups)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic passages")
    parser.add_argument("--lookups", type=int, default=20_000, help="random lookups timed")
    parser.add_argument("--short", action="store_true", help="~16 bytes of text per row (for 21M rows)")
    parser.add_argument("--sides", default="store,dict", help="store, dict or both (the dict of 21M rows needs ~7 GB)")
    parser.add_argument("--child", choices=["store", "dict"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.lookups)))
        return

    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "psgs.tsv"
        t0 = time.perf_counter()
        write_corpus(path, args.n, short=args.short)
        print(f"corpus: {args.n:,} passages, {path.stat().st_size / 2**20:.0f} MB ({time.perf_counter() - t0:.1f}s)")
        results = {}
        if "store" in sides:
            results["first"] = run_child("store", path, args.lookups)  # builds and caches the offset index
            cache = path.with_name(path.name + ".idx.npz")
            results["store"] = run_child("store", path, args.lookups)  # reuses the cached index
            print(f"offset index cache: {cache.stat().st_size / 2**20:.0f} MB")
        if "dict" in sides:
            results["dict"] = run_child("dict", path, args.lookups)
    if "store" in results:
        first, store = results["first"], results["store"]
        print(
            f"PassageStore  first open (index build) {first['load_s']:6.1f}s, peak RSS +{first['peak_mb']:.0f} MB; "
            f"reopen {store['load_s']:5.2f}s, peak RSS +{store['peak_mb']:.0f} MB"
        )
        print(
            f"PassageStore keeps {store['kept_bytes'] / store['n']:.1f} bytes per passage "
            f"({store['kept_bytes'] / 2**20:.0f} MB); the ids of all {store['n']:,} passages as a list of str "
            f"(store.ids()): +{store['ids_list_mb']:.0f} MB, as int64 (store.id_array()): {store['id_array_mb']:.0f} MB"
        )
    for name in ("store", "dict"):
        if name in results:
            r = results[name]
            label = "PassageStore" if name == "store" else "dict of tuples"
            print(
                f"{label:>14}: RSS +{r['memory_mb']:8.1f} MB  load {r['load_s']:6.2f}s  lookup {r['lookup_us']:6.2f} us"
            )
    if "store" in results and "dict" in results:
        store, table = results["store"], results["dict"]
        print(
            f"memory ratio store/dict = {store['memory_mb'] / table['memory_mb']:.3f} (target <= 0.10); "
            f"lookup ratio store/dict = {store['lookup_us'] / table['lookup_us']:.1f}x slower "
            f"(a disk read + csv parse vs a dict hit)"
        )


if __name__ == "__main__":
    main()
