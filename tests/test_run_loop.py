"""The toy world, its BM25, the tiny starting models, the loop's steps (src/toy/runner.py) and
report (src/toy/report.py), and `run_loop.py --quick` end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import run_loop
from src.data.questions import load_questions, read_ctxs, write_questions
from src.metrics import has_answer, mean_em
from src.toy import report
from src.toy import runner as loop
from src.toy import world as toy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(toy_world):
    return toy_world.world


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

    from src.data.datasets import format_passage, format_question
    from src.reader.model import FiDT5

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = FiDT5.load(model_dir).eval()
    texts = [
        f"{format_question(q['question'])} {format_passage(c['title'], c['text'], no_title=True)}"
        for q in questions
        for c in read_ctxs(q, n_context)
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
    return mean_em(answers, [q["answers"] for q in questions])[0]


def test_word_matching_prior_reads_and_plain_init_does_not(world, tmp_path):
    import torch
    from transformers import T5ForConditionalGeneration

    from src.toy.tiny_models import build_word_tokenizer, tiny_t5_config

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

    from src.retriever.model import Retriever

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
# The loop's report: metrics and table (src/toy/report.py)
# ---------------------------------------------------------------------------


def test_reader_em_reads_final_output(tmp_path):
    (tmp_path / "final_output.txt").write_text("q1\tThe Krinon.\nq2\twrong\n7\tvale\n", encoding="utf-8")
    questions = [
        {"id": "q1", "question": "?", "answers": ["krinon"]},  # normalised match
        {"id": "q2", "question": "?", "answers": ["right"]},
        {"id": "q3", "question": "?", "answers": ["missing"]},  # no answer line: a miss
        {"id": 7, "question": "?", "answers": ["dale", "vale"]},  # integer id, second gold answer
        {"id": "q5", "question": "?"},  # no gold answers: left out
    ]
    assert report.reader_em(tmp_path, questions) == 0.5
    assert report.reader_em(tmp_path, [{"id": "q1", "question": "?"}]) == 0.0


def test_xattn_top1_counts_only_the_passages_read():
    def ctx(text, score):
        return {"text": text, "score": score}

    wscores = [
        # the top-scored passage read has the answer (the better-scored 3rd ctx was not read)
        {"answers": ["gold"], "ctxs": [ctx("the gold word", 0.9), ctx("nothing", 0.1), ctx("nothing", 5.0)]},
        # the top-scored passage read misses; the answer-bearing 3rd was not read
        {"answers": ["gold"], "ctxs": [ctx("nothing", 0.2), ctx("nothing", 0.3), ctx("gold", 9.0)]},
        # every passage read has the answer: chance is 1 here whatever the draw
        {"answers": ["gold"], "ctxs": [ctx("gold", 0.0), ctx("gold", 1.0), ctx("nothing", 2.0)]},
        {"answers": [], "ctxs": [ctx("gold", 1.0)]},  # no answers: left out
        {"answers": ["gold"], "ctxs": []},  # nothing read: left out
    ]
    top, chance = report.xattn_top1(wscores, n_context=2, seed=0)
    assert top == pytest.approx(2 / 3)
    rng = random.Random(0)  # the same seeded draw: one random read passage per counted question
    draws = [rng.randrange(2) for _ in range(3)]
    assert chance == pytest.approx(((draws[0] == 0) + 0 + 1) / 3)
    assert report.xattn_top1([], 2) == (0.0, 0.0)


def test_ctxs_topk_ranks_by_score_and_recomputes_hasanswer(tmp_path):
    path = tmp_path / "retrieved.json"
    ctxs = [{"text": f"passage {i}", "score": float(i), "hasanswer": True} for i in range(25)]  # stale hasanswer
    write_questions(
        path,
        [
            {"question": "a", "answers": ["passage 24"], "ctxs": ctxs},  # best score: rank 1
            {"question": "b", "answers": ["passage 20"], "ctxs": ctxs},  # rank 5
            {"question": "c", "answers": ["passage 5"], "ctxs": ctxs},  # rank 20
            {"question": "d", "answers": ["passage 0"], "ctxs": ctxs},  # rank 25: beyond top-20
            {"question": "e", "answers": ["nowhere"], "ctxs": ctxs[:3]},
            {"question": "f", "ctxs": ctxs},  # no answers: left out
        ],
    )
    assert report.ctxs_topk(load_questions(path, rank=True)) == {1: 0.2, 5: 0.4, 20: 0.6}
    assert report.ctxs_topk([], ks=(1, 5)) == {1: 0.0, 5: 0.0}


def _round(r: int, value: float) -> dict:
    topk = {1: value, 5: value, 20: value}
    return report.round_result(r, f"ctxs {r}", (value, value, value), (value, value), (topk, topk, topk))


def test_round_result_has_every_key_of_the_table():
    assert list(_round(1, 0.25)) == [
        "round",
        "reader_dev_em",
        "reader_test_em",
        "reader_init_test_em",
        "xattn_top1_hasanswer",
        "xattn_top1_chance",
        *[f"{s}_top{k}" for s in ("first_stage", "retriever_init", "retriever") for k in (1, 5, 20)],
        "reader_ctxs",
    ]


def test_table_layout():
    out = report.table([_round(1, 0.5), _round(2, 0.98765)], "BM25 (first stage)").splitlines()
    assert out[0] == "| | round 1 | round 2 |"
    assert out[1] == "|---|---|---|"
    assert out[2] == "| reader reads the passages of | ctxs 1 | ctxs 2 |"
    assert out[3] == "| reader EM, dev | 0.500 | 0.988 |"
    assert out[5] == "| &nbsp;&nbsp;↳ baseline: the starting reader, untrained | 0.500 | 0.988 |"
    assert out[8] == "| test top-1 over the whole corpus: distilled retriever | 0.500 | 0.988 |"
    assert out[10] == "| &nbsp;&nbsp;↳ reference: BM25 (first stage) | 0.500 | 0.988 |"
    assert len(out) == 2 + 6 + 3 * 3


def test_write_report(tmp_path):
    opt = loop_options(passages="p.tsv", test_data="test.json")
    rounds = [_round(1, 0.5)]
    md = report.write_report(tmp_path, opt, rounds, "BM25 (first stage)", {"step": 1.234}, wall=90.0)
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == md
    assert report.table(rounds, "BM25 (first stage)") in md and "Wall time 1.5 min" in md
    assert json.loads((tmp_path / "report.json").read_text()) == rounds
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["step_seconds"] == {"step": 1.2} and summary["options"]["seed"] == 3


# ---------------------------------------------------------------------------
# The loop's steps (src/toy/runner.py)
# ---------------------------------------------------------------------------


def loop_options(**overrides):
    return dataclasses.replace(run_loop.loop_config(["--seed", "3", "--output_dir", "unused"]), **overrides)


def test_loop_config_fills_what_depends_on_toy_or_real_data():
    quick = run_loop.loop_config(["--quick", "--output_dir", "x"])
    assert quick.toy and quick.no_title and quick.in_batch_negatives and quick.toy_entities == 80
    assert (quick.n_context, quick.retriever_n_context, quick.n_docs, quick.reader_steps) == (5, 5, 20, 40)
    data = ["--train_data", "t", "--eval_data", "d", "--test_data", "s", "--passages", "p"]
    real = run_loop.loop_config([*data, "--retriever_n_context", "500", "--n_docs", "3", "--output_dir", "x"])
    assert not real.toy and (real.reader_model, real.retriever_model) == ("t5-base", "bert-base-uncased")
    assert (real.n_context, real.retriever_n_context, real.n_docs, real.text_maxlength) == (100, 100, 100, 200)
    opt = run_loop.get_options(["--quick"])  # the flags stay as the user gave them
    assert opt.n_context is None and opt.output_dir is None and not hasattr(opt, "toy")
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.n_context = 3
    with pytest.raises(SystemExit):
        run_loop.get_options(["--train_data", "t"])  # all four data flags or none


def test_loop_precision_is_bf16_on_cuda_and_fp32_on_cpu(monkeypatch):
    def precision(*argv: str) -> str:
        return run_loop.loop_config([*argv, "--output_dir", "x"]).precision

    assert precision("--device", "cpu") == "fp32" and precision("--device", "cuda:1") == "bf16"
    assert precision("--device", "cpu", "--precision", "bf16") == "bf16"  # as given
    for visible, expected in ((True, "bf16"), (False, "fp32")):  # no --device: each script takes cuda if visible
        monkeypatch.setattr(torch.cuda, "is_available", lambda visible=visible: visible)
        assert precision() == expected and precision("--precision", "fp16") == "fp16"


def test_top_ctxs_keeps_the_passages_read(tmp_path):
    src = tmp_path / "in.json"
    write_questions(src, [{"question": "a", "ctxs": [{"text": str(i), "score": -i} for i in range(5)]}])
    dst = loop.top_ctxs(src, tmp_path / "out" / "in.top3.json", 3)
    assert dst == tmp_path / "out" / "in.top3.json"
    assert [c["text"] for c in load_questions(dst)[0]["ctxs"]] == ["0", "1", "2"]
    assert loop.top_ctxs(dst, tmp_path / "unused.json", 3) == dst  # already short enough: the file itself
    assert not (tmp_path / "unused.json").exists()


class _Recorder:
    """Stands in for loop.Runner: records (script, args) instead of running them."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.calls = run_dir, []

    def __call__(self, label, script, args, distributed=True):
        self.calls.append((script, args))

    def parallel(self, label, script, args_per_process):
        self.calls += [(script, args) for args in args_per_process]


@pytest.mark.parametrize("nproc", [1, 2])
def test_steps_pass_only_the_flags_each_script_reads(tmp_path, nproc):
    opt = loop_options(nproc=nproc)
    run = _Recorder(tmp_path)
    loop.train_reader(run, opt, "r/reader", "start", True, tmp_path / "t.json", tmp_path / "d.json")
    loop.test_reader(run, opt, "r/score", tmp_path / "m", tmp_path / "d.json")
    loop.train_retriever(run, opt, "r/retriever", "start", tmp_path / "t.json", tmp_path / "d.json")
    loop.embed_and_retrieve(run, opt, "r/retrieval", "m", tmp_path / "p.tsv", {"test": tmp_path / "x.json"})
    scripts = [script for script, _ in run.calls]
    corpus = ["generate_passage_embeddings.py"] * nproc + ["passage_retrieval.py"]
    assert scripts == ["train_reader.py", "test_reader.py", "train_retriever.py"] + corpus
    for script, args in run.calls:
        flags = {a for a in args if a.startswith("--")}
        if script in corpus:
            # No --precision either: the corpus scripts' default (fp32 on CPU, fp16 on GPU)
            # keeps the toy table the one measured before they honoured the flag.
            assert not flags & {"--name", "--checkpoint_dir", "--seed", "--precision"}, (script, args)
        elif script == "test_reader.py":  # nothing random in it
            assert "--seed" not in flags and args[args.index("--score_kind") + 1] == opt.score_kind
        else:
            assert args[args.index("--seed") + 1] == "3" and "--name" in flags and "--precision" in flags
    assert run.calls[2][1][run.calls[2][1].index("--retriever_loss") + 1] == opt.retriever_loss
    assert "--passage_maxlength" not in run.calls[-1][1]  # passage_retrieval.py embeds no passages
    shards = [args[args.index("--shard_id") + 1] for s, args in run.calls if "--shard_id" in args]
    assert shards == ([] if nproc == 1 else ["0", "1"])


def test_runner_command(tmp_path):
    runner = loop.Runner(loop_options(nproc=2, device="cpu"), tmp_path)
    cmd = runner.command("train_reader.py", ["--lr", "1"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5:] == [str(ROOT / "train_reader.py"), "--lr", "1", "--device", "cpu"]
    assert runner.command("passage_retrieval.py", [], distributed=False)[1:] == [
        str(ROOT / "passage_retrieval.py"),
        "--device",
        "cpu",
    ]


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
    for line in (run_dir / "commands.log").read_text().splitlines():  # the corpus scripts get only what they read
        if "generate_passage_embeddings.py" in line or "passage_retrieval.py" in line:
            assert not {"--name", "--checkpoint_dir", "--seed"} & set(line.split()), line
    assert (run_dir / "report.md").read_text().count("round 2") >= 1


def test_variants_report_puts_both_loops_side_by_side(tmp_path):
    ranking = ({1: 0.5, 5: 0.6, 20: 0.7}, {1: 0.1, 5: 0.2, 20: 0.3})
    topk = {1: 0.5, 5: 0.5, 20: 0.5}
    full = [report.round_result(r, "x", (0.5,) * 3, (0.5, 0.5), (topk,) * 3, ranking) for r in (1, 2)]
    qs = [report.round_result(r, "y", (0.25,) * 3, (0.5, 0.5), (topk,) * 3, ranking) for r in (1, 2)]
    timings = {"round1_retrieval_embed": 3.0, "round2_retrieval_embed": 4.0, "query_side_round1_reader": 9.0}
    md = report.write_variants_report(tmp_path, full, qs, "BM25", timings)
    lines = md.splitlines()
    assert lines[2] == "| | re-embedded, round 1 | re-embedded, round 2 | query-side, round 1 | query-side, round 2 |"
    assert "| reader EM, test | 0.500 | 0.500 | 0.250 | 0.250 |" in lines
    assert "| test MRR@5: distilled retriever | 0.600 | 0.600 | 0.600 | 0.600 |" in lines
    assert "re-embedded 7.0s, query-side 0.0s" in md
    assert json.loads((tmp_path / "report_query_side.json").read_text()) == qs
