"""Question files read on demand vs loaded whole: peak resident memory of train_reader.py
and test_reader.py, and the speed of the offset index.

    python bench/bench_question_files.py                       # 10k and 40k questions (~0.8 and ~3.3 GB)
    python bench/bench_question_files.py --sizes 2000 --repeats 1   # quick

Question files like DPR's: 100 ctxs per question, ~100-word texts, in write_questions'
layout (an indented JSON list), written to a temporary directory and deleted afterwards.
"old" runs the scripts of the last commit (a `git worktree` of HEAD, which loads every
question file whole, removed afterwards); "new" the working tree's (QuestionFile). The
model is a tiny T5 (src/toy/tiny_models.py), trained 2 steps / evaluated with 2 passages per question,
so what grows with the file is the question file's share. Peak RSS is the process's
maximum resident set (wait4's ru_maxrss); runs of old and new alternate, and each figure is
the median (min–max) over --repeats. Needs several GB of RAM for "old" at 40k questions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from src import question_index  # noqa: E402
from src.toy.tiny_models import save_tiny_t5  # noqa: E402

WORDS = [f"w{i}" for i in range(5000)] + ["the", "of", "and", "in", "city", "river"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_file(path: Path, n: int, n_ctxs: int, seed: int = 0) -> None:
    """write_questions' layout (json.dumps(ex, indent=1) per example), composed from a pool
    of pre-rendered texts: json's indenting encoder is pure Python, too slow for GBs."""
    rng = random.Random(seed)
    pool = [json.dumps(" ".join(rng.choices(WORDS, k=100))) for _ in range(4000)]
    ctx = '  {{\n   "id": "{id}",\n   "title": "Title {title}",\n   "text": {text},\n   "score": {score},\n   "hasanswer": false\n  }}'  # fmt: skip
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n):
            ctxs = ",\n".join(
                ctx.format(id=rng.randrange(21_000_000), title=j, text=rng.choice(pool), score=100.0 - j)
                for j in range(n_ctxs)
            )
            f.write(",\n" if i else "\n")
            f.write(f'{{\n "id": "q{i}",\n "question": "what is w{i % 5000} ?",\n "answers": [\n  "w{i % 97}"\n ],\n')
            f.write(f' "ctxs": [\n{ctxs}\n ]\n}}')
        f.write("\n]\n")


def check_layout(path: Path) -> None:
    """The composed file reads as write_questions would have written it (first example)."""
    qf = question_index.QuestionFile(path, maxload=1, show_progress=False, min_cache_bytes=1 << 62)
    with open(path, "rb") as f:
        f.seek(int(qf.starts[0]))
        raw = f.read(int(qf.ends[0] - qf.starts[0])).decode()
    assert raw.strip("\n") == json.dumps(qf[0], indent=1, ensure_ascii=False), "layout differs from write_questions'"


def peak_rss(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one command; its output goes to a log on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{output.decode()[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0  # ru_maxrss: KB on Linux


def commands(code: Path, data: Path, model: Path, runs: Path, tag: str) -> dict[str, list[str]]:
    common = ["--n_context", "2", "--text_maxlength", "16", "--device", "cpu", "--checkpoint_dir", str(runs)]
    return {
        "train_reader": [sys.executable, str(code / "train_reader.py"), "--train_data", str(data),
                         "--model_name_or_path", str(model), "--name", f"train_{tag}", "--total_steps", "2",
                         "--per_gpu_batch_size", "2", "--eval_freq", "1000", "--save_freq", "1000", *common],
        "test_reader": [sys.executable, str(code / "test_reader.py"), "--eval_data", str(data), "--model_path",
                        str(model), "--name", f"test_{tag}", "--per_gpu_batch_size", "512",
                        "--generation_max_length", "2", "--write_crossattention_scores", "--write_results", *common],
    }  # fmt: skip


def index_speed(path: Path) -> dict[str, float]:
    """Offsets alone, then offsets + the check of every example (a fresh index, no cache)."""
    size = path.stat().st_size
    bar = question_index.tqdm(disable=True)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=1 << 20) as f:
        starts, _ = question_index.list_offsets(f, size, bar)
    scan = time.perf_counter() - t0
    t0 = time.perf_counter()
    question_index.build_index(path, lines=False, show_progress=False)
    build = time.perf_counter() - t0
    return {"n": len(starts), "mb": size / 1e6, "scan_mb_s": size / 1e6 / scan, "build_mb_s": size / 1e6 / build}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.0f} ({min(values):.0f}–{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000], help="questions per file")
    parser.add_argument("--ctxs", type=int, default=100, help="ctxs per question")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the files go (deleted afterwards)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_questions_", dir=args.tmp))
    old = Path(tempfile.mkdtemp(prefix="fid_old_q_", dir=args.tmp))
    old.rmdir()
    subprocess.run(["git", "worktree", "add", "--detach", str(old), "HEAD"], cwd=ROOT, check=True, capture_output=True)
    try:
        model = save_tiny_t5(tmp / "t5", [" ".join(WORDS) + " question: title: context: what is ?"], d_model=16,
                             layers=1, heads=2)  # fmt: skip
        rows = []
        for n in args.sizes:
            data = tmp / f"q{n}.json"
            t0 = time.perf_counter()
            write_file(data, n, args.ctxs)
            check_layout(data)
            print(f"{data.name}: {n:,} questions x {args.ctxs} ctxs, {data.stat().st_size / 1e9:.2f} GB "
                  f"(written in {time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
            speed = index_speed(data)
            print(f"  index: offsets {speed['scan_mb_s']:.0f} MB/s; offsets + check of every example "
                  f"{speed['build_mb_s']:.0f} MB/s", flush=True)  # fmt: skip
            results: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for r in range(args.repeats):
                for side, code in (("old", old), ("new", ROOT)) if r % 2 == 0 else (("new", ROOT), ("old", old)):
                    for script, cmd in commands(code, data, model, tmp / "runs", f"{side}{n}_{r}").items():
                        if side == "new" and r == 0 and script == "train_reader":
                            data.with_name(data.name + ".idx.npz").unlink(missing_ok=True)  # first open: builds it
                        results.setdefault((script, side), []).append(peak_rss(cmd, code))
                        rss, wall = results[(script, side)][-1]
                        print(f"  {script:12s} {side}: peak RSS {rss:7.0f} MB, {wall:5.1f} s", flush=True)
                shutil.rmtree(tmp / "runs", ignore_errors=True)
            rows.append((n, speed, results))
            data.unlink()
            data.with_name(data.name + ".idx.npz").unlink(missing_ok=True)
        report(rows)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def report(rows) -> None:
    print("\npeak RSS per process, MB: median (min–max)")
    print(
        f"{'questions':>10} {'file GB':>8} | {'script':12} | {'old (load whole)':>20} | {'new (on demand)':>20} | new/old"
    )
    for n, speed, results in rows:
        for script in ("train_reader", "test_reader"):
            o = [rss for rss, _ in results[(script, "old")]]
            w = [rss for rss, _ in results[(script, "new")]]
            ratio = statistics.median(w) / statistics.median(o)
            print(f"{n:>10,} {speed['mb'] / 1e3:>8.2f} | {script:12} | {spread(o):>20} | {spread(w):>20} | {ratio:.2f}")
    if len(rows) > 1:
        (n0, _, r0), (n1, _, r1) = rows[0], rows[-1]
        for script in ("train_reader", "test_reader"):
            for side in ("old", "new"):
                grow = statistics.median(x for x, _ in r1[(script, side)]) - statistics.median(
                    x for x, _ in r0[(script, side)]
                )
                print(f"{script} {side}: +{grow:.0f} MB from {n0:,} to {n1:,} questions "
                      f"({grow * 1e6 / (n1 - n0) / 1e3:.1f} KB per question)")  # fmt: skip
    for n, speed, _ in rows:
        print(f"index of {n:,} questions ({speed['mb']:.0f} MB): offsets {speed['scan_mb_s']:.0f} MB/s "
              f"(5 GB: {5e3 / speed['scan_mb_s']:.0f} s), with the check of every example "
              f"{speed['build_mb_s']:.0f} MB/s (5 GB: {5e3 / speed['build_mb_s']:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
