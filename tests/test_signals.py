"""The reader's likelihood signals (Atlas): pdist, loop, answer_logprob, each against a
hand-written reference made of plain transformers calls (not the project's code path)."""

import math

import pytest
import torch
from transformers import T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from src.reader.model import FiDT5
from src.reader.scores import generate_with_scores
from src.toy.tiny_models import tiny_t5_config

VOCAB = 40


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    fid = FiDT5(tiny_t5_config(VOCAB, d_model=32, layers=2)).eval()
    plain = T5ForConditionalGeneration(fid.config).eval()
    plain.load_state_dict(fid.state_dict())
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


def answer_logprobs(plain, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(y_t | y_<t, states) for the real tokens of one answer, by plain T5."""
    y = labels[labels != -100][None]
    logits = plain(encoder_outputs=BaseModelOutput(last_hidden_state=states[None]), labels=y).logits[0]
    return torch.log_softmax(logits, -1).gather(-1, y[0][:, None])[:, 0]


def encode(plain, ids: torch.Tensor) -> torch.Tensor:
    """One passage's real tokens through plain T5's encoder: (len, d)."""
    return plain.encoder(input_ids=ids[None]).last_hidden_state[0]


def reference(plain, ids, labels, lengths, kind: str) -> list[list[float]]:
    out = []
    with torch.no_grad():
        for b in range(ids.shape[0]):
            real = [j for j in range(ids.shape[1]) if lengths[b, j] > 0]
            states = {j: encode(plain, ids[b, j, : lengths[b, j]]) for j in real}
            row = []
            for j in range(ids.shape[1]):
                if j not in real:
                    row.append(0.0)
                elif kind == "loop":
                    others = [states[k] for k in real if k != j]
                    if not others:  # nothing left to read: a masked copy of the passage, attended uniformly
                        row.append(None)
                        continue
                    row.append(-answer_logprobs(plain, torch.cat(others), labels[b]).mean().item())
                else:
                    logp = answer_logprobs(plain, states[j], labels[b])
                    row.append((logp.mean() if kind == "pdist" else logp.sum()).item())
            out.append(row)
    return out


@pytest.mark.parametrize("kind", ["pdist", "answer_logprob", "loop"])
def test_signal_equals_a_plain_transformers_reference(models, batch, kind):
    fid, plain = models
    ids, mask, labels, lengths = batch
    generated, scores = generate_with_scores(fid, ids, mask, score_kind=kind, labels=labels, max_length=5)
    want = reference(plain, ids, labels, lengths, kind)
    assert scores.shape == (2, 3) and scores.dtype == torch.float32
    for b in range(2):
        for j in range(3):
            if want[b][j] is not None:
                assert scores[b, j].item() == pytest.approx(want[b][j], abs=1e-5), (kind, b, j)
    assert scores[1, 2].item() == 0.0  # the missing passage
    # The answers are the reader's own, whatever the kind.
    assert torch.equal(generated, fid.generate(input_ids=ids, attention_mask=mask, max_length=5))


def test_loop_with_a_single_read_passage_is_finite(models):
    fid, _ = models
    ids = torch.randint(3, VOCAB, (1, 2, 5))
    mask = torch.zeros_like(ids)
    mask[0, 0] = 1  # one real passage, one missing
    _, scores = generate_with_scores(fid, ids * mask, mask, score_kind="loop", labels=torch.tensor([[4, 1]]))
    assert math.isfinite(scores[0, 0].item()) and scores[0, 1].item() == 0.0


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
