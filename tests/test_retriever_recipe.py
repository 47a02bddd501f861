"""The retriever's text recipe is the model's: trained with one, embedded and searched with it
by the corpus scripts without repeating it; a contradicting flag stops; old retrievers load
with the paper's recipe."""

from __future__ import annotations

import json
import logging
import math
import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import generate_passage_embeddings
import passage_retrieval
import train_retriever
from src.cli import close_loggers
from src.corpus.embeddings import read_shard
from src.data.datasets import RetrieverCollator, RetrieverDataset
from src.data.questions import load_questions
from src.errors import InputError
from src.retriever.model import PAPER_PASSAGE_TEMPLATE, PAPER_QUESTION_TEMPLATE, Retriever
from src.retriever.task import EncoderChoice, load_retriever
from src.toy.tiny_models import save_tiny_bert

WORDS = "red blue green yellow black white orange purple anna boris clara dmitri".split()
# E5-style prefixes, no title, mean pooling, unit vectors, a temperature of 0.05.
RECIPE_FLAGS = [
    "--pooling", "mean", "--normalize", "--similarity_scale", "20",
    "--question_template", "query: {question}", "--passage_template", "passage: {text}",
    "--question_maxlength", "7", "--passage_maxlength", "9",
]  # fmt: skip


def wscores(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = rng.sample(WORDS, 2)
        ctxs = []
        for j in range(3):
            words = rng.sample(WORDS, 6)
            ctxs.append({"id": f"{i}-{j}", "title": words[0], "text": " ".join(words), "score": rng.random()})
        out.append({"id": f"q{i}", "question": " ".join(q), "answers": [q[0]], "ctxs": ctxs})
    return out


def run(module, argv) -> None:
    try:
        module.main([str(a) for a in argv])
    finally:
        close_loggers()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A retriever trained by train_retriever.py with a non-default recipe, and a corpus."""
    root = tmp_path_factory.mktemp("recipe")
    bert = save_tiny_bert(root / "bert", [" ".join(WORDS), "query: passage: question: title: context:"], hidden=16)
    (root / "train.json").write_text(json.dumps(wscores(8, 0)))
    run(train_retriever, [
        "--train_data", root / "train.json", "--model_name_or_path", bert, "--checkpoint_dir", root / "runs",
        "--name", "r", "--n_context", "3", "--indexing_dimension", "8", "--per_gpu_batch_size", "4",
        "--total_steps", "2", "--lr", "1e-2", "--dropout", "0", "--device", "cpu", *RECIPE_FLAGS,
    ])  # fmt: skip
    model_dir = root / "runs" / "r" / "checkpoint" / "latest"
    rng = random.Random(1)
    rows = [(str(i + 1), " ".join(rng.sample(WORDS, 8)), rng.choice(WORDS)) for i in range(10)]
    (root / "psgs.tsv").write_text("id\ttext\ttitle\n" + "".join(f"{i}\t{t}\t{n}\n" for i, t, n in rows))
    questions = [{"question": " ".join(rng.sample(WORDS, 9)), "answers": [rng.choice(WORDS)]} for _ in range(4)]
    (root / "questions.json").write_text(json.dumps(questions))
    return root, model_dir, rows, questions


def test_recipe_is_saved_and_the_corpus_scripts_follow_it(trained):
    root, model_dir, rows, questions = trained
    config = json.loads((model_dir / "config.json").read_text())
    assert config["pooling"] == "mean" and config["normalize"] is True and config["similarity_scale"] == 20.0
    assert config["question_template"] == "query: {question}" and config["passage_template"] == "passage: {text}"
    assert (config["question_maxlength"], config["passage_maxlength"], config["recipe_saved"]) == (7, 9, True)

    # No recipe flag on the corpus scripts.
    run(generate_passage_embeddings, [
        "--model_path", model_dir, "--passages", root / "psgs.tsv", "--output_path", root / "emb" / "wiki",
        "--device", "cpu", "--per_gpu_batch_size", "3",
    ])  # fmt: skip
    ids, shard = read_shard(root / "emb" / "wiki_00.npz")

    # The training-time embedding: the dataset + collator + model of train_retriever.py.
    retriever = Retriever.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = [{"question": "anna", "ctxs": [{"title": t, "text": x, "score": 0.0} for _, x, t in rows]}]
    item = RetrieverDataset(examples, len(rows), texts=retriever.text_recipe)[0]
    assert item["passages"][0] == f"passage: {rows[0][1]}" and item["question"] == "query: anna"
    batch = RetrieverCollator(tokenizer, len(rows), 7, 9)([item])
    assert batch.passage_mask.sum(-1).max() == 9  # 8 words + [CLS] [SEP] > 9 tokens: truncated at the model's 9
    with torch.no_grad():
        expected = retriever.embed_passages(batch.passage_ids[0], batch.passage_mask[0]).numpy()
    assert list(ids) == [r[0] for r in rows]
    np.testing.assert_allclose(shard, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(shard, axis=1), 1.0, atol=1e-5)  # --normalize

    run(passage_retrieval, [
        "--model_path", model_dir, "--passages", root / "psgs.tsv", "--data", root / "questions.json",
        "--passages_embeddings", root / "emb" / "wiki_*", "--output_path", root / "out.json", "--n-docs", "3",
        "--device", "cpu", "--validation_workers", "1",
    ])  # fmt: skip
    enc = tokenizer([f"query: {q['question']}" for q in questions], max_length=7, truncation=True, padding=True,
                    return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        e_q = retriever.embed_questions(enc["input_ids"], enc["attention_mask"]).numpy()  # (4, 8), 7 tokens
    log = (root / "out.json.log").read_text()
    assert "MRR@1 " in log and "recall@3 " in log  # beyond top-k accuracy
    for q, out in zip(e_q, load_questions(root / "out.json")):
        best = np.argsort(-(shard @ q), kind="stable")[:3]
        assert [c["id"] for c in out["ctxs"]] == [rows[i][0] for i in best]
        assert [c["score"] for c in out["ctxs"]] == pytest.approx((shard @ q)[best].tolist(), abs=1e-5)


def test_a_contradicting_flag_stops_and_the_original_flags_follow_the_model(trained, caplog):
    root, model_dir, _, _ = trained
    base = ["--model_path", model_dir, "--passages", root / "psgs.tsv", "--output_path", root / "x" / "wiki"]
    for flags, named in (
        (["--pooling", "cls"], ["--pooling 'cls'", "pooling 'mean'"]),
        (["--similarity_scale", "0.5"], ["0.5", "20.0"]),
        (["--passage_template", "title: {title} context: {text}"], ["title: {title} context: {text}", "passage: {text}"]),
    ):  # fmt: skip
        with pytest.raises(InputError) as err:
            run(generate_passage_embeddings, [*base, *flags])
        assert all(text in str(err.value) for text in named), str(err.value)
    assert not (root / "x").exists()
    with caplog.at_level(logging.WARNING, logger="fid"):
        run(generate_passage_embeddings, [*base, "--passage_maxlength", "50", "--extract_cls", "--device", "cpu"])
    assert "passage_maxlength=9: keeping it and ignoring --passage_maxlength (50)" in caplog.text
    assert "extract_cls=False: keeping it and ignoring --extract_cls (True)" in caplog.text
    reference = ["--model_path", model_dir, "--passages", root / "psgs.tsv", "--output_path", root / "plain" / "wiki"]
    run(generate_passage_embeddings, [*reference, "--device", "cpu"])  # the same model, no flags
    np.testing.assert_array_equal(
        read_shard(root / "x" / "wiki_00.npz")[1], read_shard(root / "plain" / "wiki_00.npz")[1]
    )


def test_old_retriever_loads_with_the_papers_recipe(tmp_path):
    bert = save_tiny_bert(tmp_path / "bert", [" ".join(WORDS)], hidden=16)
    torch.manual_seed(0)
    Retriever.from_encoder(str(bert), indexing_dimension=8, extract_cls=True).save_pretrained(tmp_path / "old")
    AutoTokenizer.from_pretrained(bert).save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    recipe = ("pooling", "normalize", "similarity_scale", "question_template", "passage_template",
              "question_maxlength", "passage_maxlength", "recipe_saved", "frozen_passage_side")  # fmt: skip
    config_file.write_text(json.dumps({k: v for k, v in config.items() if k not in recipe}))  # as saved before

    old = Retriever.from_pretrained(tmp_path / "old")
    c = old.config
    assert (c.pooling, c.normalize, c.recipe_saved) == ("cls", False, False)  # extract_cls: the original's cls
    assert (c.question_template, c.passage_template) == (PAPER_QUESTION_TEMPLATE, PAPER_PASSAGE_TEMPLATE)
    assert old.scale == pytest.approx(1 / math.sqrt(8))
    # The corpus scripts' --no_title and max lengths still apply to it, as they did.
    loaded, _ = load_retriever(str(tmp_path / "old"), EncoderChoice(no_title=True, passage_maxlength=24), trained=True)
    assert loaded.format_passage("T", "text") == "context: text" and loaded.config.passage_maxlength == 24
    assert loaded.format_question("q") == "question: q"


def test_recipe_by_hand_and_bad_templates(tmp_path):
    bert = save_tiny_bert(tmp_path / "bert", [" ".join(WORDS)], hidden=16)
    ids = torch.tensor([[2, 5, 6, 7, 3, 0], [2, 8, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    torch.manual_seed(0)
    plain = Retriever.from_encoder(str(bert), projection=False).eval()
    torch.manual_seed(0)
    cosine = Retriever.from_encoder(str(bert), projection=False, normalize=True, similarity_scale=20.0).eval()
    with torch.no_grad():
        e, u = plain.embed_questions(ids, mask), cosine.embed_questions(ids, mask)
        assert torch.allclose(u, e / e.norm(dim=-1, keepdim=True), atol=1e-6)
        p_ids, p_mask = ids[None].expand(2, 2, 6), mask[None].expand(2, 2, 6)
        scores, _ = cosine(ids, mask, p_ids, p_mask)
        assert torch.allclose(scores, 20.0 * u @ u.T, atol=1e-5)
        scores, _ = plain(ids, mask, p_ids, p_mask)
        assert torch.allclose(scores, e @ e.T / math.sqrt(16), atol=1e-5)
    for recipe, message in (
        ({"question_template": "query: {q}"}, "unknown field(s) {q}"),
        ({"question_template": "query:"}, "missing {question}"),
        ({"passage_template": "passage: {title}"}, "missing {text}"),
        ({"pooling": "max"}, "pooling 'max'"),
    ):
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Retriever.from_encoder(str(bert), **recipe)
    with pytest.raises(InputError, match="has a {title}"):
        EncoderChoice(no_title=True, passage_template="passage: {title} {text}").recipe()
    with pytest.raises(InputError, match="contradicts --pooling mean"):
        EncoderChoice(extract_cls=True, pooling="mean").recipe()


def test_roberta_like_encoder_without_token_types(tmp_path):
    """RoBERTa/XLM-R (one token type, positions after the padding index) load through AutoModel;
    no token_type_ids are passed, so each encoder uses its own type 0."""
    from transformers import AutoModel, RobertaConfig

    config = RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, type_vocab_size=1, max_position_embeddings=40, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / "roberta")
    retriever = Retriever.from_encoder(str(tmp_path / "roberta"), projection=False, pooling="cls").eval()
    plain = AutoModel.from_pretrained(tmp_path / "roberta").eval()
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        reference = plain(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        assert torch.allclose(retriever.embed_questions(ids, mask), reference[:, 0], atol=1e-6)
