"""Query-side training (Atlas's --query_side_retriever_training): the question side trains,
the passages are embedded by a frozen copy of the starting retriever, so the index built
before training stays valid: bit-identical passage embeddings, new question embeddings."""

from __future__ import annotations

import json
import random

import numpy as np
import torch
from transformers import AutoTokenizer

import generate_passage_embeddings
import train_retriever
from src.cli import close_loggers
from src.corpus.embeddings import read_shard
from src.retriever.model import Retriever
from src.toy.tiny_models import save_tiny_bert

WORDS = "red blue green yellow black white orange purple anna boris clara dmitri".split()


def run(module, argv) -> None:
    try:
        module.main([str(a) for a in argv])
    finally:
        close_loggers()


def wscores(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = rng.sample(WORDS, 2)
        ctxs = [{"id": f"{i}-{j}", "title": "t", "text": " ".join(rng.sample(WORDS, 4)), "score": 3 * rng.random()}
                for j in range(3)]  # fmt: skip
        out.append({"id": f"q{i}", "question": " ".join(q), "answers": [q[0]], "ctxs": ctxs})
    return out


def test_query_side_training_keeps_passage_embeddings_and_moves_questions(tmp_path):
    bert = save_tiny_bert(tmp_path / "bert", [" ".join(WORDS), "question: title: context:"], hidden=16)
    torch.manual_seed(0)
    Retriever.from_encoder(str(bert), indexing_dimension=8).save_pretrained(tmp_path / "start")
    AutoTokenizer.from_pretrained(bert).save_pretrained(tmp_path / "start")
    (tmp_path / "train.json").write_text(json.dumps(wscores(8, 0)))
    rng = random.Random(1)
    rows = [(str(i + 1), " ".join(rng.sample(WORDS, 5)), rng.choice(WORDS)) for i in range(9)]
    (tmp_path / "psgs.tsv").write_text("id\ttext\ttitle\n" + "".join(f"{i}\t{t}\t{n}\n" for i, t, n in rows))

    def train(name: str, *extra) -> Retriever:
        run(train_retriever, [
            "--train_data", tmp_path / "train.json", "--model_name_or_path", tmp_path / "start",
            "--checkpoint_dir", tmp_path / "runs", "--name", name, "--n_context", "3", "--per_gpu_batch_size", "4",
            "--total_steps", "3", "--lr", "1e-2", "--dropout", "0.1", "--device", "cpu", "--in_batch_negatives",
            *extra,
        ])  # fmt: skip
        return tmp_path / "runs" / name / "checkpoint" / "latest"

    def shard(model_dir, name: str) -> np.ndarray:
        run(generate_passage_embeddings, ["--model_path", model_dir, "--passages", tmp_path / "psgs.tsv",
                                          "--output_path", tmp_path / name / "wiki", "--device", "cpu"])  # fmt: skip
        return read_shard(tmp_path / name / "wiki_00.npz")[1]

    query_side = train("query_side", "--query_side_retriever_training", "--grad_cache_chunk_size", "2")
    both = train("both")
    before = shard(tmp_path / "start", "before")
    assert np.array_equal(shard(query_side, "query_side"), before)  # the index of the start stays valid
    assert not np.allclose(shard(both, "both"), before, atol=1e-4)  # training both sides moves them

    start, trained = Retriever.from_pretrained(tmp_path / "start").eval(), Retriever.from_pretrained(query_side).eval()
    assert trained.config.frozen_passage_side and trained.passage_side is not None
    tokenizer = AutoTokenizer.from_pretrained(query_side)
    enc = tokenizer(["question: anna red", "question: boris"], padding=True, return_tensors="pt")
    with torch.no_grad():
        moved = trained.embed_questions(enc["input_ids"], enc["attention_mask"])
        assert not torch.allclose(moved, start.embed_questions(enc["input_ids"], enc["attention_mask"]), atol=1e-4)
        # The frozen side is the starting retriever itself, weight for weight.
        frozen = {f"{k}": v for k, v in trained.passage_side.state_dict().items()}
        assert all(torch.equal(v, start.state_dict()[k]) for k, v in frozen.items())

    # A second round from the query-side retriever keeps the same frozen side.
    run(train_retriever, [
        "--train_data", tmp_path / "train.json", "--model_name_or_path", query_side, "--checkpoint_dir",
        tmp_path / "runs", "--name", "round2", "--n_context", "3", "--per_gpu_batch_size", "4", "--total_steps", "2",
        "--lr", "1e-2", "--device", "cpu", "--query_side_retriever_training",
    ])  # fmt: skip
    assert np.array_equal(shard(tmp_path / "runs" / "round2" / "checkpoint" / "latest", "round2"), before)
