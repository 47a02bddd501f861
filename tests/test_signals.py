"""Every score kind of the reader (src/reader/scores.py) against a hand-written reference: plain
transformers calls and the kind's formula written here, not the project's code path. The
cross-attention kinds of paper [2] (xattn, xattn_softmax, xattn_value_norm, xattn_all_tokens) on
answers that end early with EOS, at different steps, and passages whose value vectors differ in
norm; the likelihood signals of Atlas (pdist, loop, answer_logprob). A kind registered without a
reference in REFERENCES fails `test_every_registered_kind_has_a_reference`."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from src.reader.model import FiDT5
from src.reader.scores import SCORE_KINDS, generate_with_scores
from src.toy.tiny_models import tiny_t5_config

VOCAB = 40
EOS = 1
PAD = 0  # also the decoder start token
MAX_LENGTH = 7  # counts the decoder start token: at most 6 answer tokens


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    fid = FiDT5(tiny_t5_config(VOCAB, d_model=32, layers=2)).eval()
    plain = T5ForConditionalGeneration(fid.config).eval()
    plain.load_state_dict(fid.state_dict())
    plain.set_attn_implementation("eager")  # returns its cross-attention probabilities
    return fid, plain


@pytest.fixture(scope="module")
def batch():
    """2 questions × 3 passages × 7 tokens, passages of different lengths (padding), question
    1's third passage missing (all padding); answers of 3 and 2 tokens (+ padding −100)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 3, 7), generator=g)
    lengths = torch.tensor([[7, 4, 5], [3, 7, 0]])
    mask = (torch.arange(7)[None, None, :] < lengths[..., None]).long()
    ids = ids * mask  # pad id 0
    labels = torch.tensor([[5, 9, 1], [7, 1, -100]])
    return ids, mask, labels, lengths


# ---------------------------------------------------------------------------
# Plain transformers, one question at a time
# ---------------------------------------------------------------------------


class EndAt(LogitsProcessor):
    """Greedy decoding that emits EOS once question b's sequence holds ends[b] tokens (None:
    never), and never padding. The tiny random readers never choose EOS themselves: this makes
    answers end early, at different steps, so the steps after an EOS are padding in the batch.
    Left alone they answer with padding, the decoder start token: every step before EOS would
    read the same input and attend alike, and a rule that drops or adds one of those steps (the
    one that produced EOS, say) would give the same average."""

    def __init__(self, ends: list[int | None]):
        self.ends = ends

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, PAD] = -float("inf")
        for b, end in enumerate(self.ends):
            if end == input_ids.shape[1]:
                scores[b] = -float("inf")
                scores[b, EOS] = 0.0
        return scores


def encode(plain, ids: torch.Tensor) -> torch.Tensor:
    """One passage's real tokens through plain T5's encoder: (len, d)."""
    return plain.encoder(input_ids=ids[None]).last_hidden_state[0]


def answer_logprobs(plain, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(y_t | y_<t, states) for the real tokens of one answer, by plain T5."""
    y = labels[labels != -100][None]
    logits = plain(encoder_outputs=BaseModelOutput(last_hidden_state=states[None]), labels=y).logits[0]
    return torch.log_softmax(logits, -1).gather(-1, y[0][:, None])[:, 0]


@dataclass
class Question:
    passages: list[torch.Tensor | None]  # each passage's encoder states alone (len, d); None: missing
    labels: torch.Tensor  # the gold answer y (+ EOS, padding −100)
    answer: torch.Tensor  # plain T5's greedy answer: start token … up to and including its first EOS

    @property
    def states(self) -> torch.Tensor:  # (S, d): the passages' real tokens, concatenated in order
        return torch.cat([s for s in self.passages if s is not None])

    def per_passage(self, token_scores: torch.Tensor) -> list[float]:
        """(S,) scores → each passage's mean over its tokens (0.0 for a missing passage)."""
        out, start = [], 0
        for s in self.passages:
            if s is None:
                out.append(0.0)
                continue
            out.append(token_scores[start : start + len(s)].mean().item())
            start += len(s)
        return out


def questions(plain, ids, lengths, labels, ends) -> list[Question]:
    out = []
    with torch.no_grad():
        for b in range(ids.shape[0]):
            passages = [encode(plain, ids[b, j, :n]) if n else None for j, n in enumerate(lengths[b].tolist())]
            states = torch.cat([s for s in passages if s is not None])
            answer = plain.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=states[None]),
                attention_mask=torch.ones(1, len(states), dtype=torch.long),
                max_length=MAX_LENGTH,
                logits_processor=LogitsProcessorList([EndAt([ends[b]])]),
            )[0]
            eos = (answer == EOS).nonzero()
            out.append(Question(passages, labels[b], answer[: int(eos[0]) + 1] if len(eos) else answer))
    return out


def cross_attention(plain, states: torch.Tensor, decoder_input_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each decoder layer's cross-attention over `states` (S, d) at the T steps of
    `decoder_input_ids` (T,), by hand in float64 from the input of each cross-attention
    sublayer (the only thing taken from the run): RMS norm, q/k/v projections,
    logits q·kᵀ (T5: no 1/√d) (H, T, S), their softmax (H, T, S), value norms ‖v‖ (H, S)."""
    inputs = {}
    hooks = [
        block.layer[1].register_forward_hook(lambda m, a, kw, out, i=i: inputs.__setitem__(i, a[0]), with_kwargs=True)
        for i, block in enumerate(plain.decoder.block)
    ]
    with torch.no_grad():
        run = plain(
            encoder_outputs=BaseModelOutput(last_hidden_state=states[None]),
            decoder_input_ids=decoder_input_ids[None],
            output_attentions=True,
            use_cache=False,
        )
    for h in hooks:
        h.remove()
    H, dk = plain.config.num_heads, plain.config.d_kv
    layers = []
    for i, block in enumerate(plain.decoder.block):
        sub, attention = block.layer[1], block.layer[1].EncDecAttention
        x = inputs[i][0].double()  # (T, d)
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + sub.layer_norm.variance_epsilon)
        x = x * sub.layer_norm.weight.double()
        q = (x @ attention.q.weight.double().T).view(len(x), H, dk).transpose(0, 1)  # (H, T, dk)
        k = (states.double() @ attention.k.weight.double().T).view(len(states), H, dk).transpose(0, 1)
        v = (states.double() @ attention.v.weight.double().T).view(len(states), H, dk).transpose(0, 1)
        logits = q @ k.transpose(1, 2)  # (H, T, S)
        probs = logits.softmax(-1)
        # the reference's own check: these are the probabilities plain T5 attends with
        torch.testing.assert_close(probs.float(), run.cross_attentions[i][0], atol=1e-5, rtol=0)
        layers.append({"logits": logits, "probs": probs, "value_norms": v.norm(dim=-1)})
    return layers


# ---------------------------------------------------------------------------
# The references: one per registered kind
# ---------------------------------------------------------------------------


def first_token(term):
    """A cross-attention kind scored on the first decoded token: term(layer) (H, S) averaged
    over layers and heads, then over each passage's tokens."""

    def reference(plain, q: Question) -> list[float]:
        layers = cross_attention(plain, q.states, q.answer[:1])  # the decoder start token alone
        return q.per_passage(torch.stack([term(layer).mean(0) for layer in layers]).mean(0))

    return reference


def all_answer_tokens(plain, q: Question) -> list[float]:
    """xattn_all_tokens: the pre-softmax logits averaged over every step of the answer that
    produced a token or its first EOS (the T steps whose inputs are the answer without its last
    token), then over heads, layers and each passage's tokens."""
    steps = q.answer[:-1]  # inputs of the steps that produced answer[1:], EOS included
    layers = cross_attention(plain, q.states, steps)
    return q.per_passage(torch.stack([layer["logits"].mean(dim=(0, 1)) for layer in layers]).mean(0))


def likelihood(kind: str):
    def reference(plain, q: Question) -> list[float]:
        real = [j for j, s in enumerate(q.passages) if s is not None]
        row = []
        with torch.no_grad():
            for j, states in enumerate(q.passages):
                if states is None:
                    row.append(0.0)
                elif kind == "loop":
                    others = [q.passages[k] for k in real if k != j]
                    # nothing left to read: the reader without any passage (one key of zero state:
                    # k = v = 0, so the cross-attention adds nothing)
                    read = torch.cat(others) if others else torch.zeros(1, states.shape[-1])
                    row.append(-answer_logprobs(plain, read, q.labels).mean().item())
                else:
                    logp = answer_logprobs(plain, states, q.labels)
                    row.append((logp.mean() if kind == "pdist" else logp.sum()).item())
        return row

    return reference


REFERENCES = {
    "xattn": first_token(lambda layer: layer["logits"][:, 0]),
    "xattn_softmax": first_token(lambda layer: layer["probs"][:, 0]),
    "xattn_value_norm": first_token(lambda layer: layer["probs"][:, 0] * layer["value_norms"]),
    "xattn_all_tokens": all_answer_tokens,
    "pdist": likelihood("pdist"),
    "answer_logprob": likelihood("answer_logprob"),
    "loop": likelihood("loop"),
}


def test_every_registered_kind_has_a_reference():
    assert sorted(REFERENCES) == sorted(SCORE_KINDS)


ENDS = [2, None, 4]  # EOS after 1 answer token, never (6 tokens), after 3


@pytest.fixture(scope="module")
def ending():
    """3 questions × 4 passages × 9 tokens: lengths from 1 to 9, missing passages in the middle
    and at the end; gold answers of 3, 1 and 2 tokens + EOS."""
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([[9, 3, 6, 1], [5, 9, 0, 7], [2, 8, 4, 0]])
    mask = (torch.arange(9)[None, None, :] < lengths[..., None]).long()
    ids = torch.randint(3, VOCAB, (3, 4, 9), generator=g) * mask
    labels = torch.tensor([[5, 9, 12, EOS], [7, EOS, -100, -100], [20, 21, EOS, -100]])
    return ids, mask, labels, lengths


@pytest.mark.parametrize("kind", sorted(SCORE_KINDS))
def test_every_kind_equals_its_reference_on_answers_that_end_early(models, ending, kind):
    fid, plain = models
    ids, mask, labels, lengths = ending
    kwargs = {"max_length": MAX_LENGTH, "logits_processor": LogitsProcessorList([EndAt(ENDS)])}
    if SCORE_KINDS[kind].needs_target:
        kwargs["labels"] = labels
    generated, scores = generate_with_scores(fid, ids, mask, score_kind=kind, **kwargs)
    qs = questions(plain, ids, lengths, labels, ENDS)
    # The answers end early, each at its own step; after its EOS a row is padding.
    assert [len(q.answer) for q in qs] == [3, MAX_LENGTH, 5] and EOS not in qs[1].answer.tolist()
    assert generated.shape == (3, MAX_LENGTH)
    for b, q in enumerate(qs):
        assert generated[b, : len(q.answer)].tolist() == q.answer.tolist()
        assert (generated[b, len(q.answer) :] == fid.config.pad_token_id).all()
        assert PAD not in q.answer[1:].tolist()  # each step before EOS reads a real answer token
    want = torch.tensor([REFERENCES[kind](plain, q) for q in qs])
    assert scores.shape == (3, 4) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, want, atol=2e-5, rtol=0)
    assert (scores[lengths == 0] == 0).all()  # missing passages


def test_value_norms_differ_between_tokens(models, ending):
    """What makes xattn_value_norm differ from xattn_softmax (and from ‖v‖²) here: ‖v‖ varies
    over tokens and heads, far from 1."""
    _, plain = models
    ids, _, labels, lengths = ending
    q = questions(plain, ids, lengths, labels, ENDS)[0]
    norms = torch.cat([layer["value_norms"].flatten() for layer in cross_attention(plain, q.states, q.answer[:1])])
    assert norms.std() > 0.2 * norms.mean() and (norms - 1).abs().min() > 0.05


# ---------------------------------------------------------------------------
# The likelihood signals on a second batch, and loop's edge cases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pdist", "answer_logprob", "loop"])
def test_signal_equals_a_plain_transformers_reference(models, batch, kind):
    fid, plain = models
    ids, mask, labels, lengths = batch
    generated, scores = generate_with_scores(fid, ids, mask, score_kind=kind, labels=labels, max_length=5)
    qs = questions(plain, ids, lengths, labels, [None, None])
    want = torch.tensor([REFERENCES[kind](plain, q) for q in qs])
    assert scores.shape == (2, 3) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=0)
    assert scores[1, 2].item() == 0.0  # the missing passage
    # The answers are the reader's own, whatever the kind.
    assert torch.equal(generated, fid.generate(input_ids=ids, attention_mask=mask, max_length=5))


def test_loop_with_a_single_read_passage_is_the_reader_without_passages(models):
    """Leaving out the only passage read leaves nothing: the score is −mean_t log p(y_t | y_<t)
    of the reader reading no passage (its cross-attention adds nothing), the same whatever else
    is in the batch and with or without packing."""
    fid, plain = models
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 2, 6), generator=g)
    mask = torch.zeros_like(ids)
    mask[0, 0, :4] = 1  # question 0: one real passage of 4 tokens, one missing
    mask[1] = 1  # question 1: two full passages (a longer question in the batch)
    ids = ids * mask
    labels = torch.tensor([[4, 9, EOS], [5, EOS, -100]])
    with torch.no_grad():
        alone = -answer_logprobs(plain, torch.zeros(1, fid.config.d_model), labels[0]).mean().item()
    _, scores = generate_with_scores(fid, ids[:1], mask[:1], score_kind="loop", labels=labels[:1], max_length=3)
    assert scores[0, 0].item() == pytest.approx(alone, abs=1e-5) and scores[0, 1].item() == 0.0
    _, in_batch = generate_with_scores(fid, ids, mask, score_kind="loop", labels=labels, max_length=3)
    assert in_batch[0, 0].item() == pytest.approx(alone, abs=1e-5)
    fid.packing = False
    try:
        _, padded = generate_with_scores(fid, ids, mask, score_kind="loop", labels=labels, max_length=3)
    finally:
        fid.packing = True
    torch.testing.assert_close(padded, in_batch, atol=1e-5, rtol=0)


def test_loop_chunks_do_not_change_the_scores(models, batch):
    fid, _ = models
    ids, mask, labels, _ = batch
    _, whole = generate_with_scores(fid, ids, mask, score_kind="loop", labels=labels, max_length=3, loo_chunk=8)
    _, one_by_one = generate_with_scores(fid, ids, mask, score_kind="loop", labels=labels, max_length=3, loo_chunk=1)
    torch.testing.assert_close(whole, one_by_one, atol=1e-6, rtol=0)


def test_likelihood_kinds_need_labels(models, batch):
    fid, _ = models
    ids, mask, _, _ = batch
    with pytest.raises(ValueError, match="needs labels"):
        generate_with_scores(fid, ids, mask, score_kind="pdist")
