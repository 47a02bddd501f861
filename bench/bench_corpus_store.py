"""PassageStore vs the original's dict of tuples: resident memory and lookup time.

    python bench/bench_corpus_store.py              # 1M synthetic passages (~600 MB file)
    python bench/bench_corpus_store.py --n 200000   # quicker

Each side runs in its own process so the memory figures do not mix; memory is the
growth of the resident set (RSS) after loading, over a process that imported the same
modules. Passages are ~100 words, like DPR's psgs_w100.tsv.
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


def write_corpus(path: Path, n: int, seed: int = 0) -> None:
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
    from src.passages import PassageStore

    base = rss_bytes()
    t0 = time.perf_counter()
    if kind == "store":
        store = PassageStore(path, show_progress=False)
        n = len(store)

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
    return {"kind": kind, "n": n, "memory_mb": memory / 2**20, "load_s": load_s, "lookup_us": lookup_us}


def run_child(kind: str, path: Path, n_lookups: int) -> dict:
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
    parser.add_argument("--child", choices=["store", "dict"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.lookups)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "psgs.tsv"
        t0 = time.perf_counter()
        write_corpus(path, args.n)
        print(f"corpus: {args.n:,} passages, {path.stat().st_size / 2**20:.0f} MB ({time.perf_counter() - t0:.1f}s)")
        first = run_child("store", path, args.lookups)  # builds and caches the offset index
        store = run_child("store", path, args.lookups)  # reuses the cached index
        table = run_child("dict", path, args.lookups)
    print(f"PassageStore  first open (index build) {first['load_s']:6.1f}s, reopen {store['load_s']:5.2f}s")
    for r in (store, table):
        name = "PassageStore" if r["kind"] == "store" else "dict of tuples"
        print(f"{name:>14}: RSS +{r['memory_mb']:8.1f} MB  load {r['load_s']:6.2f}s  lookup {r['lookup_us']:6.2f} us")
    print(
        f"memory ratio store/dict = {store['memory_mb'] / table['memory_mb']:.3f} (target <= 0.10); "
        f"lookup ratio store/dict = {store['lookup_us'] / table['lookup_us']:.1f}x slower "
        f"(a disk read + csv parse vs a dict hit)"
    )


if __name__ == "__main__":
    main()
