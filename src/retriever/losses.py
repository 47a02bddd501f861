"""Retriever losses: how the retriever's scores learn from the reader's (paper [2]).

A registry `name → loss`; `train_retriever.py --retriever_loss NAME` picks one, and the
option's choices are this registry's names. Every loss has the same signature:

    loss(scores (B, N), gold (B, N), temperature_gold, temperature_score, negatives (B, M) | None) → scalar

scores: the retriever's ⟨e_q, e_p⟩/√d for each question's N passages; gold: the signal the
reader exported for them (`ctxs[j]["score"]` of dataset_wscores.json). An entry that is
−inf in either (a missing passage: fewer ctxs than N) never counts. negatives: scores of
extra passages with gold probability 0 (in-batch negatives), or None.

A new loss is one function here, registered with `@register("name")`, and its test.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Loss = Callable[..., torch.Tensor]
LOSSES: dict[str, Loss] = {}


def register(name: str) -> Callable[[Loss], Loss]:
    def add(fn: Loss) -> Loss:
        LOSSES[name] = fn
        return fn

    return add


def get_loss(name: str) -> Loss:
    if name not in LOSSES:
        raise ValueError(f"unknown retriever loss {name!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[name]


def _retriever_log_probs(scores, gold_scores, temperature_score, negative_scores):
    """(scores, gold in float32, valid (B, N), log softmax(scores/T) over the valid passages
    and the negatives, (B, N)): what every loss starts from."""
    scores, gold_scores = scores.float(), gold_scores.float().to(scores.device)
    valid = torch.isfinite(gold_scores) & torch.isfinite(scores)  # (B, N)
    student = torch.where(valid, scores / temperature_score, -math.inf)  # (B, N)
    if negative_scores is not None:
        student = torch.cat([student, negative_scores.float() / temperature_score], dim=-1)  # (B, N + M)
    return scores, gold_scores, valid, torch.log_softmax(student, dim=-1)[:, : scores.size(-1)]


@register("kl")
def kl_loss(
    scores: torch.Tensor,
    gold_scores: torch.Tensor,
    temperature_gold: float = 1.0,
    temperature_score: float = 1.0,
    negative_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(softmax(gold/T_gold) ‖ softmax(scores/T_score)) over each question's passages,
    averaged over questions (paper [2], eq. 3).

    Note the original averaged over all B·N entries (KLDivLoss's "mean"), i.e. its loss is
    this one divided by N. `negative_scores` join the student's softmax only, so the KL
    pushes them down (in-batch negatives, `--in_batch_negatives`; not in the papers).
    """
    scores, gold_scores, valid, log_q = _retriever_log_probs(scores, gold_scores, temperature_score, negative_scores)
    # Fill with −inf before the softmax, then 0 in the log-probabilities, so that
    # 0·log 0 never turns into NaN in the forward or the backward pass.
    log_p = torch.log_softmax(torch.where(valid, gold_scores / temperature_gold, -math.inf), dim=-1)
    log_p, log_q = log_p.masked_fill(~valid, 0.0), log_q.masked_fill(~valid, 0.0)
    kl = (log_p.exp() * valid * (log_p - log_q)).sum(dim=-1)  # (B,)
    return kl.mean()


@register("emdr")
def emdr_loss(
    scores: torch.Tensor,
    gold_scores: torch.Tensor,
    temperature_gold: float = 1.0,
    temperature_score: float = 1.0,
    negative_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """EMDR² (Sachan et al., 2021), sequence level: −log Σ_k softmax(s/T_score)_k · exp(g_k)
    with g = log p(y | q, passage k) (`--score_kind answer_logprob`), averaged over questions.

    The answer's likelihood marginalised over the retrieved passages, with the retriever
    as the prior. By logsumexp, so that exp(g) never underflows. T_gold does not apply
    (g is a log-probability). Atlas marginalises per token instead (its reader is trained
    jointly); here the reader is fixed and exported one sequence score per passage.
    `negative_scores` join the prior's softmax with likelihood 0.
    """
    scores, gold_scores, valid, log_prior = _retriever_log_probs(
        scores, gold_scores, temperature_score, negative_scores
    )
    joint = torch.where(valid, log_prior + gold_scores, -math.inf)  # log prior_k + log p(y | k)
    return -torch.logsumexp(joint, dim=-1).mean()
