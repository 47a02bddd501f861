"""Metrics as pure functions: reader EM (SPEC §7), DPR hasanswer and top-k accuracy
(SPEC §6), retriever ranking metrics (SPEC §5)."""

from __future__ import annotations

import re
import string
import unicodedata

# ---------------------------------------------------------------------------
# Reader: exact match with SQuAD normalization
# ---------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def ems(prediction: str, ground_truths: list[str]) -> bool:
    """EM against the best of the gold answers."""
    return any(exact_match(prediction, gt) for gt in ground_truths)


# ---------------------------------------------------------------------------
# Retrieval: DPR hasanswer, top-k accuracy
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Retriever ranking metrics (dev set of train_retriever.py)
# ---------------------------------------------------------------------------
