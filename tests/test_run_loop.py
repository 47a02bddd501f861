"""The toy world, its BM25, the tiny starting models, and `run_loop.py --quick` end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from src import toy
from src.evaluation import has_answer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world():
    return toy.make_world(seed=0, n_entities=60, n_dev=30, n_test=30)


# ---------------------------------------------------------------------------
# Toy world
# ---------------------------------------------------------------------------


def test_world_is_deterministic(world):
    again = toy.make_world(seed=0, n_entities=60, n_dev=30, n_test=30)
    other = toy.make_world(seed=1, n_entities=60, n_dev=30, n_test=30)
    assert again.passages == world.passages and again.test == world.test and again.train == world.train
    assert other.passages != world.passages


def test_world_sizes_and_splits(world):
    n = 60 * len(toy.ATTRIBUTES)
    assert len(world.passages) == n
    assert (len(world.train), len(world.dev), len(world.test)) == (n - 60, 30, 30)
    ids = [q["id"] for q in world.train + world.dev + world.test]
    assert len(set(ids)) == n  # disjoint splits, one question per fact
    assert all(len(p["text"].split()) <= 28 for p in world.passages)
    assert {p["id"] for p in world.passages} == {str(i) for i in range(1, n + 1)}


def test_one_answer_bearing_passage_per_question(world):
    for q in world.train + world.dev + world.test:
        bearing = [p for p in world.passages if has_answer(q["answers"], p["text"])]
        assert len(bearing) == 1, q
        # ... and it is about the entity the question asks about
        assert bearing[0]["title"] in q["question"].split()
        assert q["target"] == q["answers"][0]


def test_look_alike_distractors_exist(world):
    by_title = Counter(p["title"] for p in world.passages)
    key_words = {"born", "trade", "pet", "dish", "instrument", "river"}
    for q in world.test:
        entity = next(w for w in q["question"].split() if w in by_title)
        assert by_title[entity] == len(toy.ATTRIBUTES)  # same entity, other attributes
        key = (set(q["question"].split()) & key_words).pop()
        same_key_other_entity = [p for p in world.passages if key in p["text"].split() and p["title"] != entity]
        assert len(same_key_other_entity) >= 59  # same attribute, every other entity


def test_bm25_ctxs_hold_both_kinds_of_distractors(world):
    questions = [dict(q) for q in world.test]
    toy.add_bm25_ctxs(questions, world.passages, 10)
    mixed = 0
    for q in questions:
        assert len(q["ctxs"]) == 10
        scores = [c["score"] for c in q["ctxs"]]
        assert scores == sorted(scores, reverse=True)
        entity = q["ctxs"][0]["title"]
        titles = {c["title"] for c in q["ctxs"]}
        mixed += entity in titles and len(titles) > 1
    assert mixed == len(questions)


def test_tokenizer_texts_do_not_read_question_files(world):
    vocab_text = " ".join(world.texts())
    # Test answers are in the corpus (they must be readable), but questions are templates only.
    assert all(q["question"] not in vocab_text for q in world.test)


# ---------------------------------------------------------------------------
# BM25
# ---------------------------------------------------------------------------


def test_bm25_ranks_exact_match_first():
    docs = ["the cat sat on the mat", "a dog ran in the park", "kestra vale is a town", "the town of brisk"]
    bm25 = toy.BM25(docs)
    for i, doc in enumerate(docs):
        idx, scores = bm25.topk(doc, 4)
        assert idx[0] == i
        assert list(scores) == sorted(scores, reverse=True)


def test_bm25_score_matches_hand_computation():
    docs = ["a b b", "b c", "c c c d"]
    k1, b = 1.2, 0.75
    bm25 = toy.BM25(docs, k1=k1, b=b)
    avgdl = (3 + 2 + 4) / 3

    def idf(df):
        return math.log(1 + (3 - df + 0.5) / (df + 0.5))

    def term(tf, dl, df):
        return idf(df) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))

    expected = [term(2, 3, 2), term(1, 2, 2) + term(1, 2, 2), term(3, 4, 2)]  # query "b c"
    np.testing.assert_allclose(bm25.scores("b c"), expected, rtol=1e-5)
    assert np.all(bm25.scores("zzz unknown") == 0)


def test_topk_accuracy(world):
    gold = {
        q["id"]: next(i for i, p in enumerate(world.passages) if has_answer(q["answers"], p["text"]))
        for q in world.test
    }

    def oracle(q):
        s = np.zeros(len(world.passages))
        s[gold[q["id"]]] = 1.0
        return s

    def anti(q):
        return -oracle(q)

    assert toy.topk_accuracy(world.test, world.passages, oracle) == {1: 1.0, 5: 1.0, 20: 1.0}
    assert toy.topk_accuracy(world.test, world.passages, anti) == {1: 0.0, 5: 0.0, 20: 0.0}
    bm25 = toy.BM25([p["title"] + " " + p["text"] for p in world.passages])
    acc = toy.topk_accuracy(world.test, world.passages, lambda q: bm25.scores(q["question"]))
    assert acc[1] <= acc[5] <= acc[20] and acc[20] >= 0.9


# ---------------------------------------------------------------------------
# Tiny starting models
# ---------------------------------------------------------------------------


def _reader_em(model_dir: Path, questions: list[dict], n_context: int = 10, length: int = 32) -> float:
    import torch
    from transformers import AutoTokenizer

    from src.datasets import format_passage, format_question
    from src.evaluation import ems
    from src.reader_model import FiDT5

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = FiDT5.load(model_dir).eval()
    texts = [
        f"{format_question(q['question'])} {format_passage(c['title'], c['text'], no_title=True)}"
        for q in questions
        for c in q["ctxs"][:n_context]
    ]
    enc = tokenizer(
        texts, add_special_tokens=False, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )
    shape = (len(questions), n_context, length)
    with torch.no_grad():
        out = model.generate(
            input_ids=enc.input_ids.view(shape), attention_mask=enc.attention_mask.view(shape), max_length=6
        )
    answers = tokenizer.batch_decode(out, skip_special_tokens=True)
    return sum(ems(a, q["answers"]) for a, q in zip(answers, questions)) / len(questions)


def test_word_matching_prior_reads_and_plain_init_does_not(world, tmp_path):
    import torch
    from transformers import T5ForConditionalGeneration

    from src.tiny import build_word_tokenizer, tiny_t5_config

    questions = [dict(q) for q in world.test]
    toy.add_bm25_ctxs(questions, world.passages, 10)
    wired = toy.build_reader(tmp_path / "wired", world)
    # Same architecture, T5's own random init: cannot answer unseen test facts.
    plain = tmp_path / "plain"
    tokenizer = build_word_tokenizer(world.texts(), "t5")
    config = tiny_t5_config(len(tokenizer), d_model=64, layers=2, heads=4, d_ff=128)
    config.d_kv = 64
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    assert _reader_em(wired, questions) >= 0.6
    assert _reader_em(plain, questions) == 0.0


def test_build_retriever_is_a_loadable_retriever(world, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from src.retriever_model import Retriever

    path = toy.build_retriever(tmp_path / "retriever", world, dim=16)
    retriever = Retriever.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["where was krinon born ?", "what pet does krinon keep ?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = retriever.embed_questions(batch.input_ids, batch.attention_mask)
    assert retriever.config.indexing_dimension == 16 and retriever.config.projection
    assert emb.shape == (2, 16) and torch.isfinite(emb).all()
    assert tokenizer.unk_token_id not in batch.input_ids[0].tolist()  # toy words are in the vocabulary


# ---------------------------------------------------------------------------
# The whole loop, shrunk
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_run_loop_quick(tmp_path):
    run_dir = tmp_path / "loop"
    proc = subprocess.run(
        [sys.executable, "run_loop.py", "--quick", "--output_dir", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(run_dir.resolve())

    # Every step's output exists ...
    for r in (1, 2):
        rd = run_dir / f"round{r}"
        assert (rd / "reader" / "checkpoint" / "best_dev" / "config.json").is_file()
        for split in ("train", "dev", "test"):
            assert (rd / f"score_{split}" / "dataset_wscores.json").is_file()
            assert (rd / f"score_{split}" / "final_output.txt").is_file()
            assert (rd / "retrieval" / "retrieved" / f"{split}.json").is_file()
        assert (rd / "retriever" / "checkpoint" / "best_dev" / "config.json").is_file()
        assert list((rd / "retrieval" / "embeddings").glob("passages_*"))
        for step in ("reader", "retriever"):
            assert list((rd / step).glob("events.out.tfevents.*")), f"no tensorboard log in {rd / step}"

    # ... and chains: round 2's reader reads round 1's retrieval and starts from round 1's reader.
    opts2 = json.loads((run_dir / "round2" / "reader" / "options.json").read_text())
    flat = json.dumps(opts2)
    assert str(run_dir.resolve() / "round1" / "retrieval" / "retrieved" / "train.top5.json") in flat
    assert str(run_dir.resolve() / "round1" / "reader" / "checkpoint" / "best_dev") in flat
    retr = json.loads((run_dir / "round1" / "retriever" / "options.json").read_text())
    assert str(run_dir.resolve() / "round1" / "score_train" / "dataset_wscores.json") in json.dumps(retr)
    retrieved = json.loads((run_dir / "round1" / "retrieval" / "retrieved" / "test.json").read_text())
    assert all(len(q["ctxs"]) == 20 and all("hasanswer" in c for c in q["ctxs"]) for q in retrieved)
    wscores = json.loads((run_dir / "round1" / "score_test" / "dataset_wscores.json").read_text())
    test = json.loads((run_dir / "data" / "test.json").read_text())
    assert [q["id"] for q in wscores] == [q["id"] for q in test]  # every example exactly once

    # Metrics in sane ranges for that size.
    rounds = json.loads((run_dir / "report.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    keys = ["reader_dev_em", "reader_test_em", "xattn_top1_hasanswer", "xattn_top1_chance"] + [
        f"{s}_top{k}" for s in ("first_stage", "retriever_init", "retriever") for k in (1, 5, 20)
    ]
    for r in rounds:
        for key in keys:
            assert 0.0 <= r[key] <= 1.0, (key, r[key])
        for s in ("first_stage", "retriever_init", "retriever"):
            assert r[f"{s}_top1"] <= r[f"{s}_top5"] <= r[f"{s}_top20"]
    first = rounds[0]
    assert first["first_stage_top20"] >= 0.9  # BM25 on the lexical toy corpus
    assert first["reader_test_em"] >= 0.3  # the reader reads (its prior + a few steps)
    assert first["xattn_top1_hasanswer"] >= 2 * first["xattn_top1_chance"]
    # Distillation (with in-batch negatives, the toy default) beats the random start over
    # the whole corpus, and round 2's reader still reads what the distilled retriever found.
    assert first["retriever_top20"] >= 2 * first["retriever_init_top20"] + 0.1
    assert rounds[1]["reader_test_em"] >= 0.25
    assert "--in_batch_negatives" in (run_dir / "commands.log").read_text()
    assert (run_dir / "report.md").read_text().count("round 2") >= 1
