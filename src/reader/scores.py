"""Passage scores: what the reader says about each passage it read (paper [2], §3).

A registry `name → score kind`; `test_reader.py --write_crossattention_scores
--score_kind NAME` picks one and the option's choices are this registry's names. Every
kind has the same signature:

    score(model, input_ids (B, N, L), attention_mask (B, N, L), **generate_kwargs)
        → (generated answers (B, T), scores (B, N) float32)

Kinds registered with `needs_target` score the gold answer y (the example's `target`,
else its first answer, + one EOS, as in training) and get `labels` (B, T), padding −100:
the likelihood signals of Atlas (Izacard et al., 2022), `pdist`, `loop` and
`answer_logprob`.

A passage without any real token (padding for a missing ctx) scores 0.0 and changes
neither the answers nor the other passages' scores. The cross-attention kinds read the
decoder's cross-attention through forward hooks on its q/k(/v) projections, so T5's
attention code runs unchanged and generation costs the same. `attach_scores` writes a
reader's scores into the ctxs it read: the file `train_retriever.py` learns from.

A new kind is one function here, registered with `@register("name", help)`, and its test.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

from src.data.questions import read_ctxs
from src.reader.legacy import legacy_xattn_bias

# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreKind:
    name: str
    help: str
    score: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    needs_target: bool = False  # scores the gold answer y: called with labels=(B, T)


SCORE_KINDS: dict[str, ScoreKind] = {}


def register(name: str, help: str, needs_target: bool = False) -> Callable:
    def add(fn: Callable) -> Callable:
        SCORE_KINDS[name] = ScoreKind(name, help, fn, needs_target)
        return fn

    return add


@torch.no_grad()
def generate_with_scores(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_kind: str = "xattn", **generate_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Answers (B, T) and one score per passage (B, N) of the kind `score_kind`; kinds that
    need a target take `labels` (B, T) among the keyword arguments."""
    if score_kind not in SCORE_KINDS:
        raise ValueError(f"unknown score_kind {score_kind!r}; expected one of {', '.join(SCORE_KINDS)}")
    kind = SCORE_KINDS[score_kind]
    if not kind.needs_target:
        generate_kwargs.pop("labels", None)
    elif generate_kwargs.get("labels") is None:
        raise ValueError(f"score_kind {score_kind} scores the gold answer: it needs labels (a target or answers)")
    return kind.score(model, input_ids, attention_mask, **generate_kwargs)


def attach_scores(example: dict[str, Any], scores: list[float], n_context: int) -> None:
    """Write the reader's score of each passage it read into that ctx's `score` (the ctxs
    `read_ctxs(example, n_context)` gives, in order: scores[j] belongs to ctx j). ctxs the
    reader did not read keep their old score as `retriever_score`, so that `score` is the
    reader's everywhere (train_retriever.py's gold)."""
    read = read_ctxs(example, n_context)
    if len(scores) != len(read):
        raise ValueError(f"example {example.get('id')}: {len(scores)} scores for {len(read)} ctxs read")
    for ctx, score in zip(read, scores):
        ctx["score"] = score
    for ctx in (example.get("ctxs") or [])[len(read) :]:
        if "score" in ctx:
            ctx["retriever_score"] = ctx.pop("score")


# ---------------------------------------------------------------------------
# Cross-attention kinds
# ---------------------------------------------------------------------------


def _logits(logits: torch.Tensor, mask: torch.Tensor, value_norms: torch.Tensor | None) -> torch.Tensor:
    return logits


def _probabilities(logits: torch.Tensor, mask: torch.Tensor, value_norms: torch.Tensor | None) -> torch.Tensor:
    """(Bk, H, T, S) logits → attention probabilities over the real tokens."""
    mask = mask.repeat_interleave(logits.shape[0] // mask.shape[0], dim=0)  # (Bk, S)
    logits = logits.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(logits.dtype).min)
    return logits.softmax(dim=-1)


def _value_weighted(logits: torch.Tensor, mask: torch.Tensor, value_norms: torch.Tensor) -> torch.Tensor:
    return _probabilities(logits, mask, None) * value_norms[:, :, None, :]  # value_norms (Bk, H, S)


class CrossAttentionCapture:
    """Forward hooks that turn the decoder's cross-attention at the first call of each
    layer into per-token scores (Bk, S), averaged over layers and heads.

    In T5Attention the q projection runs before k, and k before v, so the k hook has
    the query of its layer. With the cache on, k runs once per layer (the first step)
    and later steps touch nothing here; without it, later calls are ignored.
    `reduce(logits, mask, value_norms)` maps the pre-softmax scores q·kᵀ (+ the legacy
    bias) to what is averaged; `step_weights` (Bk, T) averages over T decoder positions
    (teacher forcing) instead of taking the first.
    """

    def __init__(self, model, mask: torch.Tensor, reduce=_logits, step_weights: torch.Tensor | None = None):
        self.model, self.mask, self.reduce, self.step_weights = model, mask, reduce, step_weights
        self.needs_values = reduce is _value_weighted
        self.layers = [block.layer[1].EncDecAttention for block in model.decoder.block]
        self.queries: dict[int, torch.Tensor] = {}
        self.logits: dict[int, torch.Tensor] = {}  # waiting for their layer's values
        self.done: set[int] = set()
        self.total: torch.Tensor | None = None
        self.handles: list = []

    def __enter__(self):
        for i, attention in enumerate(self.layers):
            self.handles.append(attention.q.register_forward_hook(functools.partial(self._on_query, i)))
            self.handles.append(attention.k.register_forward_hook(functools.partial(self._on_key, i)))
            if self.needs_values:
                self.handles.append(attention.v.register_forward_hook(functools.partial(self._on_value, i)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (Bk, S, H·dk) → (Bk, H, S, dk)
        heads = self.model.config.num_heads
        return x.float().reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    def _on_query(self, i: int, module, inputs, output) -> None:
        if i not in self.done and i not in self.queries:
            self.queries[i] = self._split_heads(output if self.step_weights is not None else output[:, :1])

    def _on_key(self, i: int, module, inputs, output) -> None:
        if i in self.done or i not in self.queries:
            return
        # float32 scores whatever the autocast around generation: under bf16 autocast
        # the matmul below would run (slowly, on CPU) and round in bf16.
        with torch.autocast(output.device.type, enabled=False):
            query = self.queries.pop(i)  # (Bk, H, T, dk)
            key = output.float().view(*output.shape[:2], self.model.config.num_heads, -1)  # (Bk, S, H, dk)
            logits = torch.einsum("bhtd,bshd->bhts", query, key)  # (Bk, H, T, S); T5: no 1/√dk
            if self.model.has_legacy_xattn_bias:
                table = self.layers[0].relative_attention_bias
                logits = logits + legacy_xattn_bias(table, logits.shape[2], logits.shape[3]).float()
            if self.needs_values:
                self.logits[i] = logits
            else:
                self._add(self.reduce(logits, self.mask, None))
                self.done.add(i)

    def _on_value(self, i: int, module, inputs, output) -> None:
        if i in self.done or i not in self.logits:
            return
        with torch.autocast(output.device.type, enabled=False):
            value_norms = output.float().view(*output.shape[:2], self.model.config.num_heads, -1).norm(dim=-1)
            self._add(self.reduce(self.logits.pop(i), self.mask, value_norms.transpose(1, 2)))  # (Bk, H, S)
            self.done.add(i)

    def _add(self, per_head: torch.Tensor) -> None:
        """(Bk, H, T, S) → mean over heads and (weighted) steps, summed over layers."""
        per_token = per_head.mean(dim=1)  # (Bk, T, S)
        if self.step_weights is None:
            per_token = per_token[:, 0]
        else:
            w = self.step_weights.to(per_token)
            per_token = (per_token * w[:, :, None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp(min=1.0)
        self.total = per_token if self.total is None else self.total + per_token

    def token_scores(self) -> torch.Tensor:
        """(Bk, S) scores averaged over the decoder layers."""
        if len(self.done) != len(self.layers):
            raise RuntimeError(f"cross-attention scores captured in {len(self.done)} of {len(self.layers)} layers")
        return self.total / len(self.layers)


def _first_token_scores(model, input_ids, attention_mask, reduce, **generate_kwargs):
    """Generate, scoring every passage by the cross-attention of the first decoded token."""
    encoder_outputs, layout = model.encode_passages(input_ids, attention_mask)  # (B, S, d), mask (B, S)
    with CrossAttentionCapture(model, layout.mask, reduce) as capture:
        generated = _generate(model, encoder_outputs, layout, **generate_kwargs)
    token_scores = capture.token_scores()  # (B·beams, S)
    beams = token_scores.shape[0] // input_ids.shape[0]  # beams of one question start identical
    return generated, layout.passage_means(token_scores[::beams])


@register("xattn", "pre-softmax q·kᵀ of the first decoded token, averaged over layers, heads and tokens")
def xattn(model, input_ids, attention_mask, **generate_kwargs):
    return _first_token_scores(model, input_ids, attention_mask, _logits, **generate_kwargs)


@register("xattn_softmax", "as xattn, with the attention probabilities")
def xattn_softmax(model, input_ids, attention_mask, **generate_kwargs):
    return _first_token_scores(model, input_ids, attention_mask, _probabilities, **generate_kwargs)


@register("xattn_value_norm", "attention probabilities × the norm of each head's value vector")
def xattn_value_norm(model, input_ids, attention_mask, **generate_kwargs):
    return _first_token_scores(model, input_ids, attention_mask, _value_weighted, **generate_kwargs)


@register("xattn_all_tokens", "pre-softmax scores averaged over every answer token (teacher-forced on the answer)")
def xattn_all_tokens(model, input_ids, attention_mask, **generate_kwargs):
    """Generate, then replay the answer (up to and including its first EOS) with teacher
    forcing and average the pre-softmax scores over its decoding steps."""
    encoder_outputs, layout = model.encode_passages(input_ids, attention_mask)
    generated = _generate(model, encoder_outputs, layout, **generate_kwargs)
    token_scores = _teacher_forced_token_scores(model, generated, encoder_outputs, layout.mask)
    return generated, layout.passage_means(token_scores)


def _teacher_forced_token_scores(
    model, generated: torch.Tensor, encoder_outputs: BaseModelOutput, mask: torch.Tensor
) -> torch.Tensor:
    """(B, S) pre-softmax scores averaged over the answer's decoding steps."""
    decoder_input_ids = generated[:, :-1] if generated.shape[1] > 1 else generated  # (B, T)
    targets = generated[:, 1:] if generated.shape[1] > 1 else generated
    is_eos = targets == model.config.eos_token_id
    # Steps that produced an answer token or the first EOS; after it only padding.
    weights = ((is_eos.long().cumsum(dim=1) - is_eos.long()) == 0).float()  # (B, T)
    with CrossAttentionCapture(model, mask, _logits, step_weights=weights) as capture:
        model(
            encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=decoder_input_ids, use_cache=False
        )
    return capture.token_scores()


# ---------------------------------------------------------------------------
# Likelihood kinds (Atlas): how well the reader predicts the gold answer y
# ---------------------------------------------------------------------------


def _token_logprobs(model, encoder_states, mask, labels) -> torch.Tensor:
    """Teacher-forced log p(y_t | y_<t, encoder states): (B', T), 0 at padding (labels −100)."""
    logits = model(
        encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states), attention_mask=mask, labels=labels
    ).logits.float()  # (B', T, V)
    valid = labels != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return logp * valid


def _alone_logprobs(model, input_ids, attention_mask, labels, **generate_kwargs):
    """Answers (B, T') and the (B, N, T) token log-probabilities of y given the question and
    each passage alone (one encoder pass serves both)."""
    B, N, L = input_ids.shape
    encoded = model.encode(input_ids, attention_mask)
    states, mask = encoded.alone()  # (B·N, W, d), (B·N, W): one passage per row
    per_passage_labels = labels.repeat_interleave(N, dim=0)  # (B·N, T)
    logp = _token_logprobs(model, states, mask, per_passage_labels).view(B, N, -1)
    encoder_outputs, layout = encoded.fused()
    return _generate(model, encoder_outputs, layout, **generate_kwargs), logp


def _generate(model, encoder_outputs, layout, **generate_kwargs) -> torch.Tensor:
    """The answers, from encoder states already computed ((B, S, d) with layout.mask (B, S))."""
    return model.generate(attention_mask=layout.mask, encoder_outputs=encoder_outputs, **generate_kwargs)


def _real(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """0.0 for passages without any real token (missing ctxs), as every kind."""
    return scores.masked_fill(~attention_mask.bool().any(-1), 0.0).float()


@register("pdist", "mean_t log p(y_t | y_<t, question + passage j alone): perplexity distillation", True)
def pdist(model, input_ids, attention_mask, labels, **generate_kwargs):
    n_tokens = (labels != -100).sum(-1).clamp(min=1)[:, None]  # (B, 1)
    generated, logp = _alone_logprobs(model, input_ids, attention_mask, labels, **generate_kwargs)
    return generated, _real(logp.sum(-1) / n_tokens, attention_mask)


@register("answer_logprob", "sum_t log p(y_t | y_<t, question + passage j alone), for --retriever_loss emdr", True)
def answer_logprob(model, input_ids, attention_mask, labels, **generate_kwargs):
    generated, logp = _alone_logprobs(model, input_ids, attention_mask, labels, **generate_kwargs)
    return generated, _real(logp.sum(-1), attention_mask)


@register("loop", "mean_t -log p(y_t | y_<t, all read passages but j): leave-one-out perplexity", True)
def loop(model, input_ids, attention_mask, labels, loo_chunk: int = 8, **generate_kwargs):
    """One encoder pass; then, `loo_chunk` left-out passages at a time, one teacher-forced
    decoder pass over the other passages (the left-out one is masked, not re-encoded).

    When j is the only passage read, nothing is left: the score is that of the reader reading
    no passage, −mean_t log p(y_t | y_<t) with a cross-attention that adds nothing (one key
    whose state is zero: k = v = 0), the same in any batch and layout. (All keys masked would
    attend uniformly to whatever positions the batch's layout holds.)"""
    B, N, L = input_ids.shape
    encoder_outputs, layout = model.encode_passages(input_ids, attention_mask)  # (B, S, d), mask (B, S)
    states = encoder_outputs.last_hidden_state
    S = states.shape[1]
    n_tokens = (labels != -100).sum(-1).clamp(min=1)  # (B,)
    scores = torch.zeros(B, N, device=input_ids.device)
    for start in range(0, N, loo_chunk):
        left_out = torch.arange(start, min(start + loo_chunk, N), device=input_ids.device)  # (c,)
        c = len(left_out)
        loo_mask = layout.without(left_out)  # (B·c, S)
        loo_states = states[:, None].expand(B, c, S, states.shape[-1]).reshape(B * c, S, -1)
        nothing = ~loo_mask.bool().any(-1)  # (B·c,) the left-out passage was the only one read
        if nothing.any():  # those rows read one key of zero state (masked_fill: `states` is left alone)
            loo_states = loo_states.masked_fill(nothing[:, None, None], 0.0)
            loo_mask[:, 0] |= nothing.to(loo_mask.dtype)
        logp = _token_logprobs(model, loo_states, loo_mask, labels.repeat_interleave(c, dim=0))  # (B·c, T)
        scores[:, start : start + c] = -(logp.sum(-1).view(B, c) / n_tokens[:, None])
    return _generate(model, encoder_outputs, layout, **generate_kwargs), _real(scores, attention_mask)
