"""MRR@k and recall@k against the answer-bearing passages, by hand, and streamed."""

from __future__ import annotations

import random

import pytest

from src.metrics import TopKAccuracy, mrr_at_k, recall_at_k, top_k_accuracy_at

HITS = [
    [False, True, False, True],  # first hit at rank 2; 2 answer-bearing passages
    [True, False, False, False],  # rank 1; 1
    [False, False, False, False],  # none: MRR 0, left out of recall
    [False, False, True],  # rank 3; a shorter list
]


def test_mrr_by_hand():
    mrr = mrr_at_k(HITS, (1, 2, 3, 10))
    assert mrr[1] == pytest.approx((0 + 1 + 0 + 0) / 4)
    assert mrr[2] == pytest.approx((1 / 2 + 1 + 0 + 0) / 4)
    assert mrr[3] == mrr[10] == pytest.approx((1 / 2 + 1 + 0 + 1 / 3) / 4)
    assert mrr_at_k([], (1,)) == {1: 0.0}


def test_recall_by_hand():
    recall, counted = recall_at_k(HITS, (1, 2, 3, 4))
    assert counted == 3  # question 3 has no answer-bearing passage: no recall
    assert recall[1] == pytest.approx((0 + 1 + 0) / 3)
    assert recall[2] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert recall[3] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert recall[4] == pytest.approx(1.0)  # every answer-bearing passage retrieved is within the list
    assert recall_at_k([[False]], (1,)) == ({1: 0.0}, 0)


def test_streamed_metrics_equal_the_pure_functions():
    rng = random.Random(0)
    hits = [[rng.random() < 0.15 for _ in range(rng.randint(0, 30))] for _ in range(200)]
    ks = (1, 5, 20, 100)
    stream = TopKAccuracy()
    for start in range(0, len(hits), 17):
        stream.add(hits[start : start + 17])
    assert stream.mrr(ks) == pytest.approx(mrr_at_k(hits, ks), abs=1e-12)
    recall, counted = recall_at_k(hits, ks)
    streamed, streamed_counted = stream.recall(ks)
    assert streamed == pytest.approx(recall, abs=1e-12) and streamed_counted == counted
    # MRR@k ≤ top-k accuracy, with equality at k = 1.
    accuracy = top_k_accuracy_at(hits, ks)
    assert stream.mrr((1,))[1] == pytest.approx(accuracy[1])
    assert all(stream.mrr(ks)[k] <= accuracy[k] + 1e-12 for k in ks)
