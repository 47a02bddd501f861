"""Metrics as pure functions: reader EM (paper [1]), DPR hasanswer and top-k accuracy
(docs/corpus-at-scale.md), retriever ranking metrics (paper [2])."""

from __future__ import annotations

import re
import string
import unicodedata

import numpy as np
import regex

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


def mean_em(predictions: list[str], gold_answers: list[list[str] | None]) -> tuple[float | None, int]:
    """Mean `ems` over the (prediction, gold answers) pairs that have gold answers (None
    when none have), and how many pairs that is."""
    scores = [ems(prediction, gold) for prediction, gold in zip(predictions, gold_answers) if gold]
    if not scores:
        return None, 0
    return sum(scores) / len(scores), len(scores)


# ---------------------------------------------------------------------------
# Retrieval: DPR hasanswer, top-k accuracy
# ---------------------------------------------------------------------------

# DPR's simple tokenizer: a token is a run of letters, numbers and combining marks, or
# any single character that is neither a separator nor a control/format character.
_DPR_TOKEN = regex.compile(
    r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]", flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
)


def dpr_tokens(text: str) -> list[str]:
    """Lowercased DPR tokens of NFD-normalised text (accents become separate marks)."""
    return [t.lower() for t in _DPR_TOKEN.findall(unicodedata.normalize("NFD", text))]


def has_answer(answers: list[str], text: str) -> bool:
    """Whether some answer's token sequence occurs contiguously in the text (DPR convention).

    Token-level matching: "art" is not found in "party", "U.S." is found in "the U.S. army".
    An answer with no tokens (empty string) never matches (DPR's loop would match it everywhere).
    """
    tokens = dpr_tokens(text)
    for answer in answers:
        needle = dpr_tokens(answer)
        n = len(needle)
        if n == 0:
            continue
        first = needle[0]
        for i in range(len(tokens) - n + 1):
            if tokens[i] == first and tokens[i : i + n] == needle:
                return True
    return False


def top_k_accuracy(hits_per_question: list[list[bool]]) -> list[float]:
    """accuracy[k-1] = share of questions with an answer-bearing passage in their top k.

    One entry per k = 1..(longest ranking); a question with fewer passages counts its
    whole list for larger k; a question with no passages counts as a miss.
    """
    n_docs = max((len(h) for h in hits_per_question), default=0)
    if not hits_per_question or n_docs == 0:
        return [0.0] * n_docs
    found_at = [0] * (n_docs + 1)  # found_at[r]: questions whose first hit is at rank r (0-based)
    for hits in hits_per_question:
        first = next((r for r, hit in enumerate(hits) if hit), None)
        if first is not None:
            found_at[first] += 1
    accuracy, found = [], 0
    for r in range(n_docs):
        found += found_at[r]
        accuracy.append(found / len(hits_per_question))
    return accuracy


def top_k_accuracy_at(hits_per_question: list[list[bool]], ks) -> dict[int, float]:
    """`top_k_accuracy` at the given k's, {k: accuracy}; a k beyond the longest ranking
    counts whole lists, and no questions (or no passages at all) give 0.0."""
    accuracy = top_k_accuracy(hits_per_question)
    return {k: accuracy[min(k, len(accuracy)) - 1] if accuracy else 0.0 for k in ks}


def _hits_of(item: tuple[list[str], list[str]]) -> list[bool]:
    answers, texts = item
    return [has_answer(answers, text) for text in texts]


def retrieval_hits(answers: list[list[str]], ctx_texts: list[list[str]], workers: int = 1) -> list[list[bool]]:
    """has_answer for every (question, ctx), in order; `workers` > 1 spreads questions over processes."""
    items = list(zip(answers, ctx_texts))
    if workers <= 1 or len(items) < 2 * workers:
        return [_hits_of(item) for item in items]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_hits_of, items, chunksize=max(1, len(items) // (8 * workers))))


def question_hits(answers: list[str], texts: list[str]) -> list[bool]:
    """has_answer of each of one question's passage texts, in order (a picklable unit of work)."""
    return [has_answer(answers, text) for text in texts]


def mrr_at_k(hits_per_question: list[list[bool]], ks) -> dict[int, float]:
    """MRR@k: mean over questions of 1 / (rank of the first answer-bearing passage), 0 when
    none is in the top k (ranks from 1). No questions: 0.0."""
    out = {}
    for k in ks:
        total = 0.0
        for hits in hits_per_question:
            first = next((r for r, hit in enumerate(hits[:k]) if hit), None)
            total += 0.0 if first is None else 1.0 / (first + 1)
        out[k] = total / len(hits_per_question) if hits_per_question else 0.0
    return out


def recall_at_k(hits_per_question: list[list[bool]], ks) -> tuple[dict[int, float], int]:
    """(recall@k, questions counted): share of a question's answer-bearing passages (hasanswer,
    among all it retrieved) that are in its top k, averaged over the questions with at least
    one (for the others recall is undefined: they are left out, and counted apart)."""
    counted = [hits for hits in hits_per_question if any(hits)]
    if not counted:
        return dict.fromkeys(ks, 0.0), 0
    return {k: sum(sum(h[:k]) / sum(h) for h in counted) / len(counted) for k in ks}, len(counted)


class TopKAccuracy:
    """`top_k_accuracy`, `mrr_at_k` and `recall_at_k` of questions added a batch at a time (a
    stream of any length): keeps one first-hit rank per question, counted, and the running
    sums of recall per rank, never the hits or the texts."""

    def __init__(self) -> None:
        self.questions = 0
        self.longest = 0  # the longest ranking seen
        self.found_at: list[int] = []  # found_at[r]: questions whose first hit is at rank r (0-based)
        self.with_hits = 0  # questions with an answer-bearing passage: recall's denominator
        self.recall_gain: list[float] = []  # recall_gain[r]: Σ over questions of (hit at r) / its hits

    def add(self, hits_per_question: list[list[bool]]) -> None:
        for hits in hits_per_question:
            self.questions += 1
            self.longest = max(self.longest, len(hits))
            first = next((r for r, hit in enumerate(hits) if hit), None)
            if first is not None:
                self.found_at += [0] * (first + 1 - len(self.found_at))
                self.found_at[first] += 1
                self.with_hits += 1
                n_hits = sum(hits)
                self.recall_gain += [0.0] * (len(hits) - len(self.recall_gain))
                for r, hit in enumerate(hits):
                    if hit:
                        self.recall_gain[r] += 1.0 / n_hits

    def mrr(self, ks) -> dict[int, float]:
        """What mrr_at_k gives for every question added so far."""
        reciprocal = [n / (r + 1) for r, n in enumerate(self.found_at)]
        return {k: sum(reciprocal[:k]) / self.questions if self.questions else 0.0 for k in ks}

    def recall(self, ks) -> tuple[dict[int, float], int]:
        """What recall_at_k gives for every question added so far."""
        if not self.with_hits:
            return dict.fromkeys(ks, 0.0), 0
        return {k: sum(self.recall_gain[:k]) / self.with_hits for k in ks}, self.with_hits

    def accuracy(self) -> list[float]:
        """What top_k_accuracy gives for every question added so far, to the last bit."""
        if not self.questions or self.longest == 0:
            return [0.0] * self.longest
        accuracy, found = [], 0
        for r in range(self.longest):
            found += self.found_at[r] if r < len(self.found_at) else 0
            accuracy.append(found / self.questions)
        return accuracy


# ---------------------------------------------------------------------------
# Retriever ranking metrics (dev set of train_retriever.py)
# ---------------------------------------------------------------------------


def _as_numpy(x) -> np.ndarray:
    """A torch tensor (any device/dtype) or array-like → float64 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def count_inversions(order) -> int:
    """Number of pairs i < j with order[i] > order[j] (0 for a sorted sequence).

    O(N²) vectorised; N is a question's passage count (≤ a few hundred).
    """
    a = np.asarray(order)
    return int(np.triu(a[:, None] > a[None, :], k=1).sum())


def gold_ranks_of_predicted(pred_scores, gold_scores) -> np.ndarray:
    """For one question: the gold rank (0 = best gold score) of the 1st, 2nd, …
    passage in the predicted order (both orders by descending score, ties kept in
    position order). −inf entries in either (missing passages) are left out.

    A perfect retriever gives [0, 1, 2, …].
    """
    pred, gold = _as_numpy(pred_scores), _as_numpy(gold_scores)
    if pred.shape != gold.shape or pred.ndim != 1:
        raise ValueError(f"one question's scores must be two vectors of equal length, got {pred.shape}, {gold.shape}")
    keep = np.isfinite(pred) & np.isfinite(gold)
    pred, gold = pred[keep], gold[keep]
    gold_rank = np.empty(len(gold), dtype=np.int64)
    gold_rank[np.argsort(-gold, kind="stable")] = np.arange(len(gold))
    return gold_rank[np.argsort(-pred, kind="stable")]


def question_ranking_metrics(pred_scores, gold_scores, ks=(1, 2, 5)) -> dict[str, float]:
    """Ranking metrics of one question's N passages (paper [2], §4).

    - `inversions`: pairs of passages that the predicted order puts the other way
      round from the gold order.
    - `avg_top{k}`: share of the predicted top-k that is inside the gold top-k
      (1 = the same k passages, in any order).
    - `idx_top{k}`: how many passages, taken in predicted order, are needed to cover
      the whole gold top-k (k at best, N at worst).

    When k ≥ N every passage is in both top-k's: avg = 1, idx = N.
    """
    ranks = gold_ranks_of_predicted(pred_scores, gold_scores)  # (N,)
    if len(ranks) == 0:
        raise ValueError("a question without any scored passage has no ranking metrics")
    out = {"inversions": float(count_inversions(ranks))}
    for k in ks:
        in_gold_topk = ranks < k  # (N,) in predicted order
        out[f"avg_top{k}"] = float(in_gold_topk[:k].mean())
        out[f"idx_top{k}"] = float(np.flatnonzero(in_gold_topk).max() + 1)
    return out


def per_question_ranking_metrics(pred_scores, gold_scores, ks=(1, 2, 5)) -> dict[str, np.ndarray]:
    """`question_ranking_metrics` for every row of (B, N) score matrices → {name: (B,) array}."""
    pred, gold = _as_numpy(pred_scores), _as_numpy(gold_scores)
    if pred.shape != gold.shape or pred.ndim != 2:
        raise ValueError(f"expected two (B, N) score matrices of the same shape, got {pred.shape} and {gold.shape}")
    rows = [question_ranking_metrics(p, g, ks) for p, g in zip(pred, gold)]
    names = ["inversions"] + [f"{m}_top{k}" for m in ("avg", "idx") for k in ks]
    return {name: np.array([row[name] for row in rows]) for name in names}


def ranking_metrics(pred_scores, gold_scores, ks=(1, 2, 5)) -> dict[str, float]:
    """Means over the B questions of `question_ranking_metrics` for (B, N) predicted
    and gold scores (−inf marks a missing passage); keys `inversions`, `avg_top{k}`,
    `idx_top{k}`."""
    per_question = per_question_ranking_metrics(pred_scores, gold_scores, ks)
    return {name: float(values.mean()) for name, values in per_question.items()}
