"""Peak memory of the whole passage_retrieval.py: the chunked stream (this tree) against the
code before it, which built every output example with its passage texts in memory.

    git worktree add /tmp/fid_old <commit before the change>
    python bench/bench_retrieval_output.py --old /tmp/fid_old
    python bench/bench_retrieval_output.py --old /tmp/fid_old --sizes 1000 10000 50000 --passages 20000

A synthetic world: a tiny BERT retriever (src/toy/tiny_models.py), `--passages` passages of random
words with random embedding shards written directly, questions whose answers are corpus
words (so hasanswer and the accuracy do real work). For each size the two scripts run one
after the other (old, new; the order flips every size) with --n-docs 100 and one hasanswer
process; printed: peak RSS of each (/usr/bin/time), their ratio, wall times, and whether
the two outputs are the same bytes, and if not, how many questions differ and whether only
among passages of exactly equal score: the old code ordered them (and chose which make the
top k) as FAISS's heap does, the new one by corpus order.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from src.corpus.embeddings import write_shard  # noqa: E402
from src.retriever.model import Retriever  # noqa: E402
from src.toy.tiny_models import save_tiny_bert  # noqa: E402

WORDS = [f"w{i}" for i in range(400)]


def make_world(root: Path, n_passages: int, n_shards: int, dim: int, seed: int = 0) -> None:
    """psgs.tsv, a tiny retriever and `n_shards` embedding shards under `root`."""
    rng = random.Random(seed)
    with open(root / "psgs.tsv", "w") as f:
        f.write("id\ttext\ttitle\n")
        for i in range(n_passages):
            f.write(f"{i + 1}\t{' '.join(rng.choices(WORDS, k=12))}\t{rng.choice(WORDS)}\n")
    bert = save_tiny_bert(root / "bert", [" ".join(WORDS), "question: title: context:"], hidden=16, layers=1, heads=2)
    torch.manual_seed(seed)
    Retriever.from_encoder(str(bert), indexing_dimension=dim).save_pretrained(root / "retriever")
    AutoTokenizer.from_pretrained(bert).save_pretrained(root / "retriever")
    vectors = np.random.default_rng(seed).standard_normal((n_passages, dim), dtype=np.float32)
    bounds = np.linspace(0, n_passages, n_shards + 1).astype(int)
    for s in range(n_shards):
        ids = [str(i + 1) for i in range(bounds[s], bounds[s + 1])]
        write_shard(root / f"wiki_{s:02d}.npz", ids, vectors[bounds[s] : bounds[s + 1]])


def write_questions(path: Path, n: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {"id": f"q{i}", "question": " ".join(rng.choices(WORDS, k=6)), "answers": [rng.choice(WORDS)]}
                )
                + "\n"
            )


def run(code_dir: Path, root: Path, questions: Path, out: Path, n_docs: int) -> tuple[int, float]:
    """(peak RSS in KiB, wall seconds) of one passage_retrieval.py run from `code_dir`."""
    cmd = [
        "/usr/bin/time", "-f", "%M", sys.executable, "passage_retrieval.py", "--model_path", str(root / "retriever"),
        "--passages", str(root / "psgs.tsv"), "--passages_embeddings", str(root / "wiki_*"), "--data", str(questions),
        "--output_path", str(out), "--n-docs", str(n_docs), "--validation_workers", "1", "--device", "cpu",
        "--question_maxlength", "16",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code_dir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{code_dir}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return int(proc.stderr.strip().splitlines()[-1]), wall


def compare(old: Path, new: Path) -> str:
    """'same bytes', or how many questions differ and whether only among passages of exactly
    equal score: their order, and at the cut which of them make the top k."""
    if old.read_bytes() == new.read_bytes():
        return "same bytes"
    differ, ties_only = 0, True
    with open(old) as a, open(new) as b:
        for line_a, line_b in zip(a, b):
            if line_a == line_b:
                continue
            differ += 1
            qa, qb = json.loads(line_a), json.loads(line_b)
            ties_only &= {k: v for k, v in qa.items() if k != "ctxs"} == {k: v for k, v in qb.items() if k != "ctxs"}
            scores = [c["score"] for c in qa["ctxs"]]
            ties_only &= scores == [c["score"] for c in qb["ctxs"]]
            for score in set(scores) - {min(scores)}:  # the lowest score may be cut among equals
                same = [
                    sorted(json.dumps(c, sort_keys=True) for c in q["ctxs"] if c["score"] == score) for q in (qa, qb)
                ]
                ties_only &= same[0] == same[1]
    verdict = "only among equal scores (order, cut)" if ties_only else "NOT only among equal scores"
    return f"{differ} question(s) differ, {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the code before the chunked stream")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000], help="question counts")
    parser.add_argument("--passages", type=int, default=20000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--n_docs", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_retrieval_output_") as tmp:
        root = Path(tmp)
        make_world(root, args.passages, args.shards, args.dim)
        print(
            f"{args.passages:,} passages in {args.shards} shards, dim {args.dim}, {args.n_docs} passages per question"
        )
        print(f"{'questions':>10} {'old MiB':>9} {'new MiB':>9} {'new/old':>8} {'old s':>7} {'new s':>7}  outputs")
        for i, n in enumerate(args.sizes):
            questions = root / f"questions_{n}.jsonl"
            write_questions(questions, n)
            result = {}
            for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
                out = root / f"out_{side}_{n}.jsonl"
                result[side] = (*run(args.old if side == "old" else ROOT, root, questions, out, args.n_docs), out)
            (old_kib, old_s, old_out), (new_kib, new_s, new_out) = result["old"], result["new"]
            same = compare(old_out, new_out)
            print(
                f"{n:>10,} {old_kib / 1024:>9.0f} {new_kib / 1024:>9.0f} {new_kib / old_kib:>8.2f} "
                f"{old_s:>7.1f} {new_s:>7.1f}  {same}",
                flush=True,
            )
            old_out.unlink()
            new_out.unlink()


if __name__ == "__main__":
    main()
