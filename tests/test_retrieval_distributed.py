"""passage_retrieval.py in chunks and under torchrun (src/corpus/search.py): the search of each
process's share merged into the global top k is exactly one process's (ids, scores, tie
order); chunk sizes give the same bytes; a bad input found late leaves the previous output
and log as they were; the top-k accuracy counted over chunks is top_k_accuracy's."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import passage_retrieval
from src.cli import close_loggers
from src.corpus.answer_hits import AnswerHits
from src.corpus.driver import index_directory
from src.corpus.embeddings import embed_texts, write_shard
from src.corpus.faiss_index import Indexer
from src.corpus.passages import PassageStore
from src.corpus.search import (
    Searchers,
    merge_top_k,
    retrieved_examples,
    search_share,
    share_of,
)
from src.data.datasets import format_question
from src.errors import DataError
from src.metrics import TopKAccuracy, question_hits, top_k_accuracy
from src.retriever.model import Retriever
from src.toy.tiny_models import save_tiny_bert

ROOT = Path(__file__).resolve().parent.parent
WORDS = "red blue green yellow black white anna boris clara dmitri paris rome oslo lima".split()
N_PASSAGES, N_QUESTIONS, DIM = 60, 20, 16
SHARD_ROWS = [(0, 25), (25, 40), (40, 60)]  # 3 files: ranks of 2 take files {0, 1} and {2}
DUPLICATES = [(5, 45), (20, 40), (21, 41), (22, 42)]  # equal vectors in different shards and ranks


# ---------------------------------------------------------------------------
# Search and merge, in this process
# ---------------------------------------------------------------------------


def flat_index(vectors: np.ndarray, first_id: int = 0) -> Indexer:
    indexer = Indexer(vectors.shape[1])
    indexer.index_data(np.arange(first_id, first_id + len(vectors)), vectors)
    return indexer


@pytest.fixture(scope="module")
def vectors():
    """3,000 passages (dim 64) with runs of equal vectors across the splits, and 2,100
    queries: enough (queries x dim >= 128,000) for FAISS to take its BLAS path."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 64), dtype=np.float32)
    x[1500:1530] = x[10]  # 31 equal vectors: more than EXACT_MARGIN, ties around the cut
    x[999:1003] = x[2999]  # across the 3-way split
    queries = rng.standard_normal((2100, 64), dtype=np.float32)
    queries[:50] = x[10] + 0.01 * queries[:50]  # their top k is mostly the tie group
    return x, queries


TOL = 1e-4  # float32 rounding of a 64-dim dot product of these vectors (|score| < 60) is below 1e-5


def reference(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent of src/corpus/search.py: every score a float64 numpy dot product, the top k
    by a plain sort on (score descending, row ascending), the documented tie rule. Returns
    (all scores (n, N) float64, top rows (n, k), near (n,) bool: queries whose top k + 1 holds two
    different scores closer than TOL, which float32 scoring cannot order)."""
    scores = queries.astype(np.float64) @ x.astype(np.float64).T  # (n, N)
    rows, near = [], []
    for s in scores:
        kth = -np.partition(-s, k)[k]  # the (k+1)-th best score: every candidate is at least that
        candidates = sorted(np.flatnonzero(s >= kth - TOL).tolist(), key=lambda r: (-s[r], r))
        rows.append(candidates[:k])
        top = s[candidates[: k + 1]]
        gaps = top[:-1] - top[1:]
        near.append(bool(((gaps > 0) & (gaps < TOL)).any()))
    return scores, np.array(rows), np.array(near)


@pytest.mark.parametrize("splits", [[3000], [1500, 3000], [1000, 1001, 3000]], ids=["1", "2", "3"])
def test_merged_shares_are_one_index_exactly(vectors, splits):
    x, queries = vectors
    k = 20
    bounds = [0, *splits]
    parts = [
        search_share(flat_index(x[a:b], a), queries, k, offset=a) for a, b in zip(bounds, bounds[1:])
    ]  # fmt: skip
    merged = merge_top_k(parts, k)
    one = search_share(flat_index(x), queries, k)
    np.testing.assert_array_equal(merged.rows, one.rows)  # same passages, same order as one process
    np.testing.assert_array_equal(merged.scores, one.scores)  # same float32 bits
    np.testing.assert_array_equal(merged.ids, merged.rows)  # each part's id map follows its offset
    scores, rows, near = reference(x, queries, k)
    assert near.sum() <= 20  # a few near ties among distinct vectors; all others are decided exactly
    np.testing.assert_array_equal(merged.rows[~near], rows[~near])
    # Every query: the scores are those of the passages named, best first (a near tie may come in
    # either order); equal scores by ascending row; nothing better left out.
    named = np.take_along_axis(scores, merged.rows, 1)
    np.testing.assert_allclose(merged.scores, named, rtol=0, atol=TOL)
    assert (named[:, :-1] > named[:, 1:] - TOL).all()
    tied = named[:, 1:] == named[:, :-1]
    assert (merged.rows[:, 1:][tied] > merged.rows[:, :-1][tied]).all()
    assert ((scores > named[:, -1:] + TOL).sum(1) == (named > named[:, -1:] + TOL).sum(1)).all()
    # the tie rule at work: the 31 equal vectors fill queries 0..49
    assert tied.sum() > 100 and not near[:50].any()


def test_query_chunks_and_fewer_passages_than_k(vectors):
    x, queries = vectors
    indexer = flat_index(x[:7])
    whole = search_share(indexer, queries, 10, offset=100)
    pieces = [search_share(indexer, queries[i : i + 333], 10, offset=100) for i in range(0, len(queries), 333)]
    for name in ("scores", "rows", "ids"):
        np.testing.assert_array_equal(getattr(whole, name), np.concatenate([getattr(p, name) for p in pieces]))
    assert (whole.rows[:, :7] >= 100).all() and (whole.rows[:, 7:] == -1).all()
    assert np.isneginf(whole.scores[:, 7:]).all()
    merged = merge_top_k([whole, search_share(flat_index(x[7:9]), queries, 10, offset=0)], 10)
    assert ((merged.rows >= 0).sum(1) == 9).all()  # 7 + 2 passages in all


def test_shares_partition_the_files_in_order():
    files = [f"wiki_{i:02d}.npz" for i in range(7)]
    for world in (1, 2, 3, 7):
        shares = [share_of(files, r, world) for r in range(world)]
        assert sum(shares, []) == files
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert share_of(files, 0, 3) == files[:3] and share_of(files, 2, 3) == files[5:]
    with pytest.raises(DataError, match="2 shard file.s. for 3 processes.*at most 2 processes"):
        share_of(files[:2], 0, 3)
    assert index_directory(["emb/wiki_00.npz"]) == Path("emb")
    assert index_directory(["emb/wiki_02.npz"], 1, 2) == Path("emb/index_rank1_of2")


def test_top_k_accuracy_counted_in_batches_is_top_k_accuracy():
    rng = random.Random(0)
    hits = [[rng.random() < 0.1 for _ in range(rng.choice([0, 3, 10, 100]))] for _ in range(500)]
    counter = TopKAccuracy()
    for start in range(0, len(hits), 37):
        counter.add(hits[start : start + 37])
    assert counter.accuracy() == top_k_accuracy(hits)  # to the last bit
    assert TopKAccuracy().accuracy() == top_k_accuracy([]) == []
    empty = TopKAccuracy()
    empty.add([[], []])
    assert empty.accuracy() == top_k_accuracy([[], []])


def test_answer_hits_with_a_pool_are_the_inline_ones():
    examples = [
        {"answers": [WORDS[i % 5]], "ctxs": [{"text": " ".join(WORDS[j : j + 3])} for j in range(8)]} for i in range(40)
    ] + [{"answers": [], "ctxs": [{"text": "red"}]}]
    labelled = []
    for workers in (1, 2):
        copy = json.loads(json.dumps(examples))
        with AnswerHits(workers) as hits:
            hits.label(copy[:25])
            hits.label(copy[25:])
        labelled.append((copy, hits.topk.accuracy(), hits.without_answers))
    assert labelled[0] == labelled[1]
    first = labelled[0][0]
    assert [c["hasanswer"] for c in first[3]["ctxs"]] == question_hits(
        examples[3]["answers"], [c["text"] for c in examples[3]["ctxs"]]
    )
    assert first[-1]["ctxs"][0]["hasanswer"] is False and labelled[0][2] == 1


def test_the_stream_lets_written_examples_go(tmp_path):
    """Memory does not grow with the questions: once handed on, an example (and its passage
    texts) is held neither by the stream nor by the list its reader yielded."""
    (tmp_path / "psgs.tsv").write_text("id\ttext\ttitle\n" + "".join(f"{i}\tred {i}\tt\n" for i in range(30)))
    store = PassageStore(tmp_path / "psgs.tsv", show_progress=False)
    indexer = Indexer(4)
    indexer.index_data(np.arange(30), np.random.default_rng(0).standard_normal((30, 4), dtype=np.float32))
    yielded = []

    def chunks():
        for start in range(0, 2000, 700):
            chunk = [{"question": "q", "answers": ["red"], "id": i} for i in range(start, min(start + 700, 2000))]
            yielded.append(chunk)
            yield chunk  # the reader's frame keeps `chunk` while suspended, as question_chunks does

    def embed(examples):
        return np.ones((len(examples), 4), dtype=np.float32)

    stats = {"embed": 0.0, "search": 0.0}
    with AnswerHits(1) as hits:
        stream = retrieved_examples(chunks(), embed, Searchers(indexer, 0, 5), store, "psgs.tsv", hits, stats)
        first = next(stream)
        assert len(first["ctxs"]) == 5 and yielded[0] == []  # the chunk's list was emptied
        assert sum(1 for _ in stream) == 1999
    assert [len(c) for c in yielded] == [0, 0, 0] and hits.topk.questions == 2000


# ---------------------------------------------------------------------------
# The script: chunks, one process against two, a late bad input
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    rng = random.Random(0)
    passages = [(str(i + 1), " ".join(rng.sample(WORDS, 4)), rng.choice(WORDS)) for i in range(N_PASSAGES)]
    (root / "psgs.tsv").write_text("id\ttext\ttitle\n" + "".join(f"{i}\t{t}\t{n}\n" for i, t, n in passages))
    questions = [
        {"question": " ".join(rng.sample(WORDS, 3)), "answers": [rng.choice(WORDS)]} for _ in range(N_QUESTIONS)
    ]
    questions[4]["answers"] = []  # left out of the accuracy
    questions[7]["ctxs"] = [{"title": "t", "text": "an old retrieval, replaced"}]
    (root / "questions.json").write_text(json.dumps(questions))
    bert = save_tiny_bert(root / "bert", [" ".join(WORDS), "question: title: context:"], hidden=16, layers=1, heads=2)
    torch.manual_seed(0)
    Retriever.from_encoder(str(bert), indexing_dimension=DIM).save_pretrained(root / "retriever")
    AutoTokenizer.from_pretrained(bert).save_pretrained(root / "retriever")
    vectors = np.random.default_rng(1).standard_normal((N_PASSAGES, DIM), dtype=np.float32)
    for a, b in DUPLICATES:
        vectors[b] = vectors[a] = 3 * vectors[a]  # long: in many questions' top 8
    for s, (a, b) in enumerate(SHARD_ROWS):
        write_shard(root / "emb" / f"wiki_{s:02d}.npz", [p[0] for p in passages[a:b]], vectors[a:b])
    return root


def args(root: Path, out: Path, *extra) -> list[str]:
    return [
        "--model_path", str(root / "retriever"), "--passages", str(root / "psgs.tsv"),
        "--data", str(root / "questions.json"), "--passages_embeddings", str(root / "emb" / "wiki_*"),
        "--output_path", str(out), "--n-docs", "8", "--question_maxlength", "12", "--device", "cpu",
        "--validation_workers", "1", *map(str, extra),
    ]  # fmt: skip


def run_in_process(argv: list[str]) -> None:
    try:
        passage_retrieval.main(argv)
    finally:
        close_loggers()


def torchrun(argv: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29500 + random.randint(0, 3000)), "passage_retrieval.py", *argv]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def accuracy_lines(log: Path) -> list[str]:
    return [re.sub(r"^\[.*?\] ", "", line) for line in log.read_text().splitlines() if "accuracy" in line]


def test_every_chunk_size_writes_the_same_bytes(world, tmp_path):
    """Batches of one question: the embeddings do not depend on the chunks either."""
    outputs = []
    for chunk in (1, 3, 1000):
        out = tmp_path / f"chunk{chunk}.json"
        run_in_process(args(world, out, "--question_chunk_size", chunk, "--per_gpu_batch_size", 1))
        outputs.append(out)
    assert outputs[0].read_bytes() == outputs[1].read_bytes() == outputs[2].read_bytes()
    assert accuracy_lines(Path(f"{outputs[0]}.log")) == accuracy_lines(Path(f"{outputs[2]}.log"))
    retrieved = json.loads(outputs[0].read_text())
    assert len(retrieved) == N_QUESTIONS and all(len(q["ctxs"]) == 8 for q in retrieved)
    assert list(retrieved[7]) == ["question", "answers", "ctxs", "id"]  # ctxs replaced in place
    assert "an old retrieval" not in outputs[0].read_text()
    log = Path(f"{outputs[0]}.log").read_text()
    assert "top-k accuracy for every k: 1:" in log and "(1 without answers are left out" in log


@pytest.fixture(scope="module")
def two_processes(world, tmp_path_factory):
    """One torchrun run with 2 gloo processes saving their indexes, and its output."""
    out = tmp_path_factory.mktemp("ddp") / "retrieved.jsonl"
    proc = torchrun(args(world, out, "--save_or_load_index"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow  # ~15 s: two fresh interpreters
def test_two_processes_write_what_one_writes(world, two_processes, tmp_path):
    out, proc = two_processes
    one = tmp_path / "one.jsonl"
    run_in_process(args(world, one))
    assert out.read_bytes() == one.read_bytes()
    assert accuracy_lines(Path(f"{out}.log")) == accuracy_lines(Path(f"{one}.log"))
    assert "2 processes index 40 + 20 passages (global rows from 0, 40) of 3 shard files" in proc.stdout
    assert proc.stdout.count("top-k accuracy:") == 1  # rank 0 alone logs and writes
    # the equal vectors really tie: same score, the earlier passage (corpus order) first
    retrieved = [json.loads(line) for line in out.read_text().splitlines()]
    ties = 0
    for q in retrieved:
        for a, b in zip(q["ctxs"], q["ctxs"][1:]):
            if a["score"] == b["score"]:
                ties += 1
                assert int(a["id"]) < int(b["id"])
    assert ties > 0
    saves = sorted(p.name for p in (world / "emb").iterdir() if p.is_dir())
    assert saves == ["index_rank0_of2", "index_rank1_of2"]
    assert Indexer.read_meta(world / "emb" / "index_rank1_of2")["ntotal"] == 20


@pytest.mark.slow
def test_two_processes_reload_their_saved_indexes(world, two_processes, tmp_path):
    out, _ = two_processes
    saved = {p: p.stat().st_mtime_ns for p in (world / "emb").glob("index_rank*/*")}
    again = tmp_path / "again.jsonl"
    proc = torchrun(args(world, again, "--save_or_load_index"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded flat index (40 vectors)" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in saved} == saved  # loaded, not rebuilt
    assert again.read_bytes() == out.read_bytes()
    # one process does not take the 2-process saves: it builds and saves its own beside the shards
    one = tmp_path / "one.jsonl"
    run_in_process(args(world, one, "--save_or_load_index"))
    assert Indexer.read_meta(world / "emb")["ntotal"] == N_PASSAGES
    assert one.read_bytes() == out.read_bytes()


@pytest.mark.slow  # ~40 s here: two fresh interpreters
def test_too_few_shards_for_the_ranks_end_every_rank_with_exit_2(world, tmp_path):
    """2 processes, 1 shard file: every rank stops with the one-line message and exit code 2
    (none is killed by torchrun while tearing down), before rank 0 loads the model; and only
    the flags the user gave are warned about (torchrun's LOCAL_RANK is no --local_rank)."""
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "wiki_00.npz").write_bytes((world / "emb" / "wiki_00.npz").read_bytes())
    argv = args(world, tmp_path / "out.json", "--seed", 5)
    argv[argv.index("--passages_embeddings") + 1] = str(tmp_path / "emb" / "wiki_*")
    proc = torchrun(argv)
    message = "--passages_embeddings: 1 shard file(s) for 2 processes"
    assert proc.returncode != 0 and proc.stderr.count(f"error: {message}") == 2, proc.stderr[-3000:]
    report = proc.stderr[proc.stderr.index("Failures:") :]  # torchrun's own summary of its workers
    assert report.count("exitcode  : 2 ") == 2 and "SIGTERM" not in report
    assert "ignores --seed" in proc.stdout and "--local_rank" not in proc.stdout
    assert "retriever from" not in proc.stdout  # stopped before loading the model
    assert not (tmp_path / "out.json").exists()


def late_bad_world(world: Path, tmp_path: Path) -> Path:
    """Passage i's vector is question i's direction, for the first 5 questions; the last one's
    passage has an id missing from the TSV: only the last chunk (of 1 question) meets it."""
    retriever = Retriever.from_pretrained(world / "retriever").eval()
    tokenizer = AutoTokenizer.from_pretrained(world / "retriever")
    questions = json.loads((world / "questions.json").read_text())[:5]
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    texts = [format_question(q["question"]) for q in questions]
    q = embed_texts(retriever.embed_questions, tokenizer, texts, batch_size=1, max_length=12)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    write_shard(tmp_path / "emb" / "wiki_00.npz", ["1", "2"], q[:2])
    write_shard(tmp_path / "emb" / "wiki_01.npz", ["3", "4", "999"], q[2:])
    (tmp_path / "psgs.tsv").write_bytes((world / "psgs.tsv").read_bytes())
    (tmp_path / "retriever").symlink_to(world / "retriever")
    return tmp_path


def bad_args(root: Path, out: Path) -> list[str]:
    return [*args(root, out, "--question_chunk_size", 1), "--n-docs", "1"]


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_bad_input_found_late_leaves_the_previous_output(world, tmp_path, nproc):
    root = late_bad_world(world, tmp_path)
    out = tmp_path / "out" / "retrieved.json"
    out.parent.mkdir()
    for path in (out, Path(f"{out}.log")):
        path.write_text(f"earlier {path.name}\n")
    if nproc == 1:
        with pytest.raises(DataError, match=r"passage id '999' of the embeddings is not in .*psgs.tsv"):
            run_in_process(bad_args(root, out))
    else:
        proc = torchrun(bad_args(root, out))
        assert proc.returncode != 0 and "passage id '999' of the embeddings is not in" in proc.stderr
        assert "rank 0 stopped: passage id '999'" in proc.stderr  # rank 1 was told, not left waiting
    assert out.read_text() == "earlier retrieved.json\n"
    assert Path(f"{out}.log").read_text() == "earlier retrieved.json.log\n"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    # the same file with the id in the TSV goes through (the error was the id, not the chunks)
    with open(root / "psgs.tsv", "a") as f:
        f.write("999\tthe missing passage\tmissing\n")
    run_in_process(bad_args(root, out))
    assert [q["ctxs"][0]["id"] for q in json.loads(out.read_text())] == ["1", "2", "3", "4", "999"]


def test_evaluate_only_streams_the_same_file_back(world, tmp_path):
    retrieved = tmp_path / "retrieved.json"
    run_in_process(args(world, retrieved))
    again = tmp_path / "again.json"
    run_in_process(
        ["--evaluate_only", "--data", str(retrieved), "--output_path", str(again), "--validation_workers", "1"]
    )
    assert again.read_bytes() == retrieved.read_bytes()
    assert accuracy_lines(Path(f"{again}.log")) == accuracy_lines(Path(f"{retrieved}.log"))
    cut = tmp_path / "cut.json"
    run_in_process(["--evaluate_only", "--data", str(retrieved), "--output_path", str(cut), "--maxload", "3"])
    assert json.loads(cut.read_text()) == json.loads(retrieved.read_text())[:3]
