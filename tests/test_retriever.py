"""Retriever model (paper [2]) and its ranking metrics, on a tiny BERT built locally."""

from __future__ import annotations

import argparse
import logging
import math
import random

import pytest
import torch
from transformers import AutoTokenizer

from src.configs import config_from
from src.data.datasets import RetrieverCollator, RetrieverDataset
from src.data.questions import rank_ctxs
from src.errors import ModelPathError
from src.metrics import (
    count_inversions,
    gold_ranks_of_predicted,
    per_question_ranking_metrics,
    question_ranking_metrics,
    ranking_metrics,
)
from src.retriever.losses import kl_loss
from src.retriever.model import Retriever, RetrieverConfig, is_saved_retriever
from src.retriever.task import EncoderChoice, load_retriever
from src.toy.tiny_models import save_tiny_bert

TEXTS = [
    "question: where do cats sleep",
    "title: cats context: cats sleep on the warm mat all day",
    "title: dogs context: dogs bark at the postman",
    "title: paris context: paris is the capital of france",
]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"), TEXTS, hidden=24)


@pytest.fixture(scope="module")
def tokenizer(bert_dir):
    return AutoTokenizer.from_pretrained(bert_dir)


def encode(tokenizer, texts, max_length=None):
    kw = {"padding": "max_length", "max_length": max_length} if max_length else {"padding": "longest"}
    b = tokenizer(texts, return_tensors="pt", truncation=True, **kw)
    return b["input_ids"], b["attention_mask"]


# ---------------------------------------------------------------------------
# Distillation loss
# ---------------------------------------------------------------------------


def test_kl_loss_equals_hand_computation():
    # Question 1: p = softmax(log[1,2,1]) = [1/4, 1/2, 1/4], q = softmax(log[1,1,2]) = [1/4, 1/4, 1/2]
    #   KL(p‖q) = 1/4·ln1 + 1/2·ln2 + 1/4·ln(1/2) = ln2 / 4.
    # Question 2: p = q (scores shifted by a constant) → 0. Mean over questions: ln2 / 8.
    gold = torch.log(torch.tensor([[1.0, 2.0, 1.0], [1.0, 2.0, 3.0]]))
    scores = torch.log(torch.tensor([[1.0, 1.0, 2.0], [1.0, 2.0, 3.0]])) + torch.tensor([[0.0], [5.0]])
    assert kl_loss(scores, gold).item() == pytest.approx(math.log(2) / 8, abs=1e-6)
    # Temperatures divide the logits: doubling both sides and both temperatures changes nothing.
    assert kl_loss(2 * scores, 2 * gold, 2.0, 2.0).item() == pytest.approx(math.log(2) / 8, abs=1e-6)
    # T_gold = 2 on gold 2·log[1,2,1] is the same p; a plain gold 2·log[...] is not.
    assert kl_loss(scores, 2 * gold).item() > math.log(2) / 8 + 1e-3


def test_kl_loss_ignores_missing_passages_and_has_finite_gradients():
    gold = torch.log(torch.tensor([[1.0, 2.0, 1.0]]))
    scores = torch.log(torch.tensor([[1.0, 1.0, 2.0]]))
    padded_gold = torch.cat([gold, torch.full((1, 2), -math.inf)], dim=1)  # two missing passages
    padded_scores = torch.cat([scores, torch.tensor([[7.0, -math.inf]])], dim=1).requires_grad_()
    loss = kl_loss(padded_scores, padded_gold)
    assert loss.item() == pytest.approx(math.log(2) / 4, abs=1e-6)
    loss.backward()
    assert torch.isfinite(padded_scores.grad).all()
    assert padded_scores.grad[0, 3:].abs().sum() == 0  # missing passages get no gradient


def test_kl_loss_with_in_batch_negatives_by_hand():
    # p = [1/2, 1/2] over the own passages; one negative with the same score joins the
    # student's softmax only: q = [1/3, 1/3] (+ 1/3 on the negative) → KL = ln(3/2).
    scores, gold = torch.zeros(1, 2), torch.zeros(1, 2)
    assert kl_loss(scores, gold).item() == pytest.approx(0.0, abs=1e-7)
    negatives = torch.zeros(1, 1)
    assert kl_loss(scores, gold, negative_scores=negatives).item() == pytest.approx(math.log(1.5), abs=1e-6)
    # −inf negatives take no part; a temperature divides the negatives' scores as well.
    minus_inf = torch.tensor([[-math.inf, -math.inf]])
    assert kl_loss(scores, gold, negative_scores=minus_inf).item() == pytest.approx(0.0, abs=1e-7)
    t = kl_loss(2 * scores, gold, 1.0, 2.0, negative_scores=2 * negatives)
    assert t.item() == pytest.approx(math.log(1.5), abs=1e-6)
    # The gradient pushes the negative down (a positive gradient on its score).
    negatives = torch.zeros(1, 1, requires_grad=True)
    kl_loss(scores, gold, negative_scores=negatives).backward()
    assert negatives.grad.item() == pytest.approx(1 / 3, abs=1e-6)


def scores_and_loss(retriever, q_ids, q_mask, p_ids, p_mask, gold, in_batch_negatives=False):
    """What a training step computes (src/retriever/task.py make_loss with --retriever_loss kl)."""
    scores, negatives = retriever(q_ids, q_mask, p_ids, p_mask, in_batch_negatives)
    return scores, kl_loss(scores, gold, negative_scores=negatives)


def test_in_batch_negatives_are_the_other_questions_passages_except_copies(bert_dir, tokenizer):
    torch.manual_seed(0)
    retriever = Retriever.from_encoder(bert_dir, indexing_dimension=8).eval()
    q_ids, q_mask = encode(tokenizer, ["question: where do cats sleep", "question: capital of france"])
    # Question 0 has passages (cats, dogs), question 1 (dogs, paris): "dogs" is in both lists.
    p_ids, p_mask = encode(tokenizer, [TEXTS[1], TEXTS[2], TEXTS[2], TEXTS[3]])
    p_ids, p_mask = p_ids.view(2, 2, -1), p_mask.view(2, 2, -1)
    gold = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        scores, plain = scores_and_loss(retriever, q_ids, q_mask, p_ids, p_mask, gold)
        scores_ib, loss = scores_and_loss(retriever, q_ids, q_mask, p_ids, p_mask, gold, in_batch_negatives=True)
        e_q = retriever.embed_questions(q_ids, q_mask)  # (2, 8)
        e_p = retriever.embed_passages(p_ids.view(4, -1), p_mask.view(4, -1))  # (4, 8)
    assert torch.equal(scores, scores_ib)  # the scores returned are each question's own
    all_scores = e_q @ e_p.T / math.sqrt(8)  # (2, 4): cats, dogs, dogs, paris
    # Question 0's only negative is paris (dogs is its own); question 1's is cats.
    neg = torch.tensor([[-math.inf, -math.inf, -math.inf, all_scores[0, 3]], [all_scores[1, 0]] + [-math.inf] * 3])
    assert loss.item() == pytest.approx(kl_loss(scores, gold, negative_scores=neg).item(), abs=1e-5)
    assert loss.item() > plain.item()  # a negative only ever adds probability mass to take away
    # The dev loss (no flag) is the papers' KL over own passages only.
    assert plain.item() == pytest.approx(kl_loss(scores, gold).item(), abs=1e-6)


def test_forward_scores_are_scaled_inner_products_and_loss_matches(bert_dir, tokenizer):
    torch.manual_seed(0)
    retriever = Retriever.from_encoder(bert_dir, indexing_dimension=8).eval()
    q_ids, q_mask = encode(tokenizer, ["question: where do cats sleep", "question: capital of france"])
    passages = [TEXTS[1], TEXTS[2], TEXTS[3]]
    p_ids, p_mask = encode(tokenizer, passages * 2)
    p_ids, p_mask = p_ids.view(2, 3, -1), p_mask.view(2, 3, -1)
    gold = torch.tensor([[3.0, 1.0, 0.0], [0.0, -1.0, 2.0]])
    with torch.no_grad():
        scores, loss = scores_and_loss(retriever, q_ids, q_mask, p_ids, p_mask, gold)
        e_q = retriever.embed_questions(q_ids, q_mask)  # (2, 8)
        e_p = retriever.embed_passages(p_ids.view(6, -1), p_mask.view(6, -1)).view(2, 3, 8)
    assert scores.shape == (2, 3) and e_q.shape == (2, 8)
    for b in range(2):
        for n in range(3):
            expected = float(e_q[b] @ e_p[b, n]) / math.sqrt(8)
            assert scores[b, n].item() == pytest.approx(expected, abs=1e-5)
    # Loss by hand: KL(softmax(gold) ‖ softmax(scores)) per question, then the mean.
    hand = 0.0
    for b in range(2):
        g = [math.exp(x) for x in gold[b].tolist()]
        s = [math.exp(x) for x in scores[b].tolist()]
        p = [x / sum(g) for x in g]
        q = [x / sum(s) for x in s]
        hand += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 2
    assert loss.item() == pytest.approx(hand, abs=1e-5)
    # Without in-batch negatives the model returns no negative scores.
    assert retriever(q_ids, q_mask, p_ids, p_mask)[1] is None


def test_missing_passage_gets_minus_inf_score(bert_dir, tokenizer):
    retriever = Retriever.from_encoder(bert_dir, indexing_dimension=8)
    q_ids, q_mask = encode(tokenizer, ["question: where do cats sleep"])
    p_ids, p_mask = encode(tokenizer, [TEXTS[1], TEXTS[2]])
    p_ids, p_mask = p_ids.view(1, 2, -1).clone(), p_mask.view(1, 2, -1).clone()
    p_ids[0, 1], p_mask[0, 1] = tokenizer.pad_token_id, 0  # what the collator gives a missing ctx
    scores, loss = scores_and_loss(retriever, q_ids, q_mask, p_ids, p_mask, torch.tensor([[1.0, -math.inf]]))
    assert torch.isfinite(scores[0, 0]) and scores[0, 1].item() == -math.inf
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # one real passage: both softmaxes are [1]
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in retriever.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------
# Embeddings: dimension, pooling, save/load
# ---------------------------------------------------------------------------


def test_indexing_dimension_means_what_it_says(bert_dir, tokenizer):
    retriever = Retriever.from_encoder(bert_dir, indexing_dimension=8)
    ids, mask = encode(tokenizer, TEXTS)
    assert retriever.embed_passages(ids, mask).shape == (4, 8)
    assert retriever.dim == retriever.config.indexing_dimension == 8


def test_no_projection_dimension_is_hidden_size(bert_dir, tokenizer):
    retriever = Retriever.from_encoder(bert_dir, indexing_dimension=768, projection=False)
    ids, mask = encode(tokenizer, TEXTS)
    assert retriever.embed_questions(ids, mask).shape == (4, 24)  # the tiny BERT's hidden size
    assert retriever.dim == 24
    assert not hasattr(retriever, "proj")


def test_masked_mean_pooling_ignores_padding(bert_dir, tokenizer):
    retriever = Retriever.from_encoder(bert_dir, indexing_dimension=8).eval()
    short = encode(tokenizer, TEXTS)
    long = encode(tokenizer, TEXTS, max_length=40)
    with torch.no_grad():
        a = retriever.embed_passages(*short)
        b = retriever.embed_passages(*long)
        # Without the mask the encoder sees the padding too: the vectors change.
        c = retriever.embed_text(*long, apply_mask=False, extract_cls=False)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(b, c, atol=1e-3)


def test_mean_and_cls_pooling_by_hand(bert_dir, tokenizer):
    retriever = Retriever.from_encoder(bert_dir, indexing_dimension=8).eval()
    ids, mask = encode(tokenizer, TEXTS)
    with torch.no_grad():
        states = retriever.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        projected = retriever.norm(retriever.proj(states))  # (B, L, 8)
        mean = retriever.embed_text(ids, mask, apply_mask=True, extract_cls=False)
        cls = retriever.embed_text(ids, mask, apply_mask=True, extract_cls=True)
    for b in range(len(TEXTS)):
        n = int(mask[b].sum())
        assert torch.allclose(mean[b], projected[b, :n].mean(0), atol=1e-5)
        assert torch.allclose(cls[b], projected[b, 0], atol=1e-5)


@pytest.mark.parametrize("projection", [True, False])
def test_save_load_round_trip_keeps_embeddings(bert_dir, tokenizer, tmp_path, projection):
    torch.manual_seed(1)
    retriever = Retriever.from_encoder(
        bert_dir, indexing_dimension=12, projection=projection, extract_cls=True, apply_question_mask=False
    ).eval()
    with torch.no_grad():  # move the projection away from its initial value
        for p in retriever.parameters():
            p.add_(0.01 * torch.randn_like(p))
    retriever.save_pretrained(tmp_path / "ret")
    tokenizer.save_pretrained(tmp_path / "ret")
    assert is_saved_retriever(tmp_path / "ret") and not is_saved_retriever(bert_dir)

    loaded = Retriever.from_pretrained(tmp_path / "ret").eval()
    assert isinstance(loaded.config, RetrieverConfig)
    assert loaded.config.extract_cls and not loaded.config.apply_question_mask and loaded.config.apply_passage_mask
    assert loaded.dim == (12 if projection else 24)
    ids, mask = encode(AutoTokenizer.from_pretrained(tmp_path / "ret"), TEXTS)
    with torch.no_grad():
        assert torch.equal(retriever.embed_passages(ids, mask), loaded.embed_passages(ids, mask))
        assert torch.equal(retriever.embed_questions(ids, mask), loaded.embed_questions(ids, mask))
    state, loaded_state = retriever.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)


def _opt(**kw):
    base = dict(
        model_path="none",
        model_name_or_path=None,
        tokenizer_name_or_path=None,
        indexing_dimension=768,
        no_projection=False,
        extract_cls=False,
        no_question_mask=False,
        no_passage_mask=False,
    )
    opt = argparse.Namespace(**{**base, **kw})
    given = {name for name, value in kw.items() if value != base[name]}
    return config_from(EncoderChoice, opt, given=given)


def test_load_from_options(bert_dir, tmp_path, caplog):
    fresh, tok = load_retriever(str(bert_dir), _opt(indexing_dimension=6, extract_cls=True))
    assert fresh.dim == 6 and fresh.config.extract_cls and len(tok) == len(AutoTokenizer.from_pretrained(bert_dir))
    fresh.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")

    # A saved retriever keeps its trained projection even when --indexing_dimension asks
    # for another size (the original's defect).
    with caplog.at_level(logging.WARNING, logger="fid"):
        loaded, _ = load_retriever(str(tmp_path / "saved"), _opt(indexing_dimension=256))
    assert loaded.dim == 6 and loaded.config.extract_cls
    assert torch.equal(loaded.proj.weight, fresh.proj.weight)
    assert "indexing_dimension=6" in caplog.text

    # A saved retriever given as --model_name_or_path loads as a retriever too.
    again, _ = load_retriever(str(tmp_path / "saved"), _opt())
    with pytest.raises(ModelPathError, match="not a saved retriever"):
        load_retriever(str(bert_dir), _opt(), trained=True)  # what the corpus scripts ask for
    assert again.dim == 6
    with pytest.raises(ModelPathError, match="saved retriever"):
        Retriever.from_encoder(str(tmp_path / "saved"))


# ---------------------------------------------------------------------------
# Ranking metrics on hand-made rankings
# ---------------------------------------------------------------------------


def test_count_inversions():
    assert count_inversions([0, 1, 2, 3]) == 0
    assert count_inversions([3, 1, 2]) == 2  # (3,1), (3,2)
    assert count_inversions([4, 3, 2, 1, 0]) == 10  # every pair
    assert count_inversions([1, 0, 3, 2, 4]) == 2
    assert count_inversions([]) == 0


def test_ranking_metrics_by_hand():
    gold = [4.0, 3.0, 2.0, 1.0, 0.0]  # gold order = file order
    # Predicted order: passages 1, 0, 3, 2, 4 → gold ranks [1, 0, 3, 2, 4].
    pred = [4.0, 5.0, 2.0, 3.0, 1.0]
    assert gold_ranks_of_predicted(pred, gold).tolist() == [1, 0, 3, 2, 4]
    m = question_ranking_metrics(pred, gold)
    assert m["inversions"] == 2
    assert m["avg_top1"] == 0.0  # predicted best is gold's second
    assert m["avg_top2"] == 1.0  # {1, 0} = gold top-2
    assert m["avg_top5"] == 1.0
    assert m["idx_top1"] == 2  # gold best comes second
    assert m["idx_top2"] == 2
    assert m["idx_top5"] == 5

    # Reversed: every pair inverted, gold top-1 found last.
    r = question_ranking_metrics([0.0, 1.0, 2.0, 3.0, 4.0], gold)
    assert r["inversions"] == 10
    assert (r["avg_top1"], r["avg_top2"], r["avg_top5"]) == (0.0, 0.0, 1.0)
    assert (r["idx_top1"], r["idx_top2"], r["idx_top5"]) == (5, 5, 5)

    # Perfect ranking.
    p = question_ranking_metrics(gold, gold)
    assert p["inversions"] == 0 and p["avg_top1"] == p["avg_top2"] == 1.0
    assert (p["idx_top1"], p["idx_top2"], p["idx_top5"]) == (1, 2, 5)


def test_ranking_metrics_with_unsorted_gold_and_missing_passages():
    # Gold ranks: passage 1 (10) → 0, passage 2 (5) → 1, passage 0 (0) → 2.
    # Predicted order 2, 1, 0 → gold ranks [1, 0, 2].
    gold = [0.0, 10.0, 5.0, -math.inf]
    pred = [1.0, 2.0, 3.0, -math.inf]
    m = question_ranking_metrics(pred, gold)
    assert m["inversions"] == 1
    assert (m["avg_top1"], m["avg_top2"]) == (0.0, 1.0)
    assert (m["idx_top1"], m["idx_top2"], m["idx_top5"]) == (2, 2, 3)  # k ≥ N: all 3 passages
    assert m["avg_top5"] == 1.0


def test_batch_metrics_are_means_over_questions():
    gold = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    pred = torch.tensor([[4.0, 5.0, 2.0, 3.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    per_q = per_question_ranking_metrics(pred, gold)
    assert per_q["inversions"].tolist() == [2, 10]
    m = ranking_metrics(pred, gold, ks=(1, 2))
    assert m == {"inversions": 6.0, "avg_top1": 0.0, "avg_top2": 0.5, "idx_top1": 3.5, "idx_top2": 3.5}
    with pytest.raises(ValueError, match="same shape"):
        ranking_metrics(pred[:, :3], gold)


# ---------------------------------------------------------------------------
# A short distillation run moves the ranking towards the gold scores
# ---------------------------------------------------------------------------


def _overlap_dataset(seed: int, n_questions: int, n_passages: int, vocab: list[str]) -> list[dict]:
    """Questions of 3 words, passages of 6; gold score = 2 × words in common (+ a tie breaker)."""
    rng = random.Random(seed)
    examples = []
    for i in range(n_questions):
        q = rng.sample(vocab, 3)
        ctxs = []
        for j in range(n_passages):
            words = rng.sample(q, rng.randint(0, 3)) + rng.sample(vocab, 4)
            words = words[:6]
            rng.shuffle(words)
            overlap = len(set(words) & set(q))
            ctxs.append({"title": "", "text": " ".join(words), "score": 2.0 * overlap - 0.01 * j})
        examples.append({"id": str(i), "question": " ".join(q), "ctxs": ctxs})
    for ex in examples:
        rank_ctxs(ex)  # as train_retriever.py loads them
    return examples


def _dev_metrics(retriever, batch) -> dict[str, float]:
    retriever.eval()
    _, q_ids, q_mask, p_ids, p_mask, gold = batch
    with torch.no_grad():
        scores, loss = scores_and_loss(retriever, q_ids, q_mask, p_ids, p_mask, gold)
    return {"loss": loss.item(), **ranking_metrics(scores, gold)}


def test_distillation_moves_ranking_towards_gold(tmp_path):
    vocab = [f"w{i}" for i in range(12)]
    bert = save_tiny_bert(tmp_path / "bert", vocab + ["question:", "context:"], hidden=16, layers=1, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(bert)
    collator = RetrieverCollator(tokenizer, n_context=5, question_maxlength=16, passage_maxlength=16)
    # One batch each: the whole training set is a single batch of 32 questions.
    train = collator([RetrieverDataset(_overlap_dataset(0, 32, 5, vocab), 5, no_title=True)[i] for i in range(32)])
    dev = collator([RetrieverDataset(_overlap_dataset(1, 32, 5, vocab), 5, no_title=True)[i] for i in range(32)])
    torch.manual_seed(0)
    retriever = Retriever.from_encoder(str(bert), indexing_dimension=16)
    train_before, dev_before = _dev_metrics(retriever, train), _dev_metrics(retriever, dev)

    optimizer = torch.optim.Adam(retriever.parameters(), lr=5e-3)
    retriever.train()
    for _ in range(100):
        _, q_ids, q_mask, p_ids, p_mask, gold = train
        _, loss = scores_and_loss(retriever, q_ids, q_mask, p_ids, p_mask, gold)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_after, dev_after = _dev_metrics(retriever, train), _dev_metrics(retriever, dev)

    # On the distilled questions the student follows the teacher closely
    # (5 passages in random order: 5 inversions on average, top-1 right 1 time in 5) ...
    assert train_after["loss"] < 0.25 * train_before["loss"]
    assert train_after["inversions"] < 0.5 * train_before["inversions"], (train_before, train_after)
    assert train_after["avg_top1"] > train_before["avg_top1"] + 0.3
    assert train_after["idx_top1"] < train_before["idx_top1"]
    # ... and on unseen questions of the same kind it ranks better than before (its
    # dev loss may rise: it grows overconfident on 32 questions).
    assert dev_after["inversions"] < 0.8 * dev_before["inversions"], (dev_before, dev_after)
