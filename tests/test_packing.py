"""Packing (src/reader/packing.py) is exact: the length-bucketed encoder and the cross-attention
over real tokens only give the original padded path's states, losses, gradients,
answers and every kind of passage score, up to float rounding."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from src.data.datasets import ReaderCollator, ReaderDataset
from src.reader import packing
from src.reader.model import FiDT5
from src.reader.scores import SCORE_KINDS, generate_with_scores
from src.reader.task import ReaderConfig, count_passages, generate_answers, load_reader
from src.toy.tiny_models import save_tiny_t5, tiny_t5_config

VOCAB = 40
EOS = 1
TOL = dict(atol=1e-5, rtol=1e-5)


FLOOR = packing.MIN_BUCKET_TOKENS


@pytest.fixture(autouse=True)
def several_buckets(monkeypatch):
    """The tiny passages here hold far fewer tokens than a bucket's floor: without it they
    make several buckets, as real lengths do, so that exactness covers bucket boundaries."""
    monkeypatch.setattr(packing, "MIN_BUCKET_TOKENS", 0)


def tiny_fid(seed: int = 0, **config_kw) -> FiDT5:
    torch.manual_seed(seed)
    return FiDT5(tiny_t5_config(VOCAB, **config_kw)).eval()


def ragged(B: int = 3, N: int = 5, L: int = 13, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, L) passages of very different lengths, right padded: one at the full length L,
    one of a single token, and missing passages (no token) in the middle and at the end."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L + 1, (B, N), generator=g)
    lengths[0, 0], lengths[0, 1] = L, 1
    lengths[1, 2] = 0  # a missing passage between real ones
    lengths[2, 3:] = 0  # fewer ctxs than N
    mask = (torch.arange(L)[None, None, :] < lengths[..., None]).long()
    ids = torch.randint(3, VOCAB, (B, N, L), generator=g) * mask
    return ids, mask


def straddling(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 12, 32) passages whose lengths straddle the bucket alignment (ALIGN = 8): 15, 16 and
    17 share one bucket of 16 passages (15 ≥ 7/8 · 17) that must be 24 wide, not 16; 8 and 9
    share one 16 wide; full length 32; one and two tokens; missing passages."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([
        [17, 15, 16, 17, 15, 9, 8, 31, 32, 28, 1, 0],
        [15, 17, 24, 25, 23, 16, 16, 17, 2, 0, 0, 0],
        [16, 17, 15, 17, 15, 16, 0, 0, 0, 0, 0, 0],
    ])  # fmt: skip
    mask = (torch.arange(32)[None, None, :] < lengths[..., None]).long()
    ids = torch.randint(3, VOCAB, (3, 12, 32), generator=g) * mask
    return ids, mask


DATA = {"ragged": ragged, "straddling": straddling}
LABELS = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, -100], [10, EOS, -100, -100]])


def both_paths(model: FiDT5, fn):
    """fn() on the original padded path and on the packed one."""
    out = {}
    for packed in (False, True):
        model.packing = packed
        out[packed] = fn()
    model.packing = True
    return out[False], out[True]


def test_packed_layout_drops_the_padding():
    model = tiny_fid()
    ids, mask = ragged()
    encoded = model.encode(ids, mask)
    assert encoded.padded is None and encoded.real.shape[0] == int(mask.sum())  # real tokens only
    enc, layout = encoded.fused()
    totals = mask.sum((1, 2))
    S = enc.last_hidden_state.shape[1]  # the longest question, aligned to 16
    assert S == packing._round_up(int(totals.max())) < mask.shape[1] * mask.shape[2] and S % 16 == 0
    assert torch.equal(layout.mask.sum(1), totals)
    for b in range(3):  # passages in order, each one's tokens contiguous
        expected = torch.cat([torch.full((int(n),), j) for j, n in enumerate(mask[b].sum(-1))])
        assert torch.equal(layout.passage[b, : int(totals[b])], expected)
        assert (layout.passage[b, int(totals[b]) :] == 5).all()  # padding: N
    model.packing = False
    _, original = model.encode_passages(ids, mask)
    assert torch.equal(original.mask, mask.reshape(3, -1))


@pytest.mark.parametrize("data", sorted(DATA))
def test_encoder_states_equal_the_padded_path(data):
    model = tiny_fid()
    ids, mask = DATA[data]()
    padded, packed = both_paths(model, lambda: model.encode(ids, mask).alone())
    (p_states, p_mask), (q_states, q_mask) = padded, packed
    for row in range(p_states.shape[0]):
        n = int(p_mask[row].sum())
        assert int(q_mask[row].sum()) == n
        torch.testing.assert_close(q_states[row, :n], p_states[row, :n], atol=1e-6, rtol=1e-5)


def test_buckets_group_by_length_and_skip_missing_passages():
    lengths = torch.tensor([5, 0, 9, 9, 1, 3, 0, 7, 2, 4, 6, 8, 10, 40, 39, 36, 35])
    buckets = packing.bucket_passages(lengths, min_tokens=0)
    assert len(buckets) == packing.MAX_BUCKETS
    flat = torch.cat(buckets)
    assert sorted(flat.tolist()) == [i for i, n in enumerate(lengths.tolist()) if n > 0]
    assert lengths[flat].tolist() == sorted(lengths[flat].tolist(), reverse=True)  # longest first
    assert lengths[buckets[0]].tolist() == [40, 39, 36, 35]  # down to 7/8 of the longest
    for bucket in buckets[:-1]:
        assert lengths[bucket].min() >= (1 - packing.BUCKET_SLACK) * lengths[bucket].max()
    assert len(packing.bucket_passages(torch.full((30,), 250))) == 1  # nothing padded: one encoder call
    assert packing.bucket_passages(torch.zeros(4, dtype=torch.long)) == []


def test_each_bucket_is_as_wide_as_its_longest_passage():
    """The encoder calls of straddling lengths: each bucket padded to its longest passage rounded
    up to ALIGN (never narrower: that would cut passages), and the 15/16/17 bucket holds 16."""
    model = tiny_fid()
    ids, mask = straddling()
    calls = []
    hook = model.encoder.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["attention_mask"].clone()), with_kwargs=True
    )
    try:
        encoded = model.encode(ids, mask)
    finally:
        hook.remove()
    buckets = [(len(m), m.shape[1], sorted(set(m.sum(-1).tolist()), reverse=True)) for m in calls]
    assert buckets == [
        (3, 32, [32, 31, 28]),
        (3, 32, [25, 24, 23]),
        (16, 32, [17, 16, 15]),
        (2, 16, [9, 8]),
        (1, 16, [2]),
        (1, 16, [1]),
    ]
    assert encoded.real.shape[0] == int(mask.sum())  # every real token kept, none cut


def test_buckets_keep_a_floor_of_tokens_per_encoder_call():
    """10 DPR-like passages (~1650 tokens): one call, not 1–3 passages per call; 100 passages:
    every call holds at least MIN_BUCKET_TOKENS padded tokens, widths aligned to 16."""
    g = torch.Generator().manual_seed(0)
    for n, calls in ((10, 1), (100, None)):
        lengths = (165 + 40 * torch.randn(n, generator=g)).round().clamp(30, 245).long()
        buckets = packing.bucket_passages(lengths, min_tokens=FLOOR)
        assert sorted(torch.cat(buckets).tolist()) == list(range(n))
        if calls is not None:
            assert len(buckets) == calls
        for bucket in buckets:
            assert len(bucket) * packing._round_up(int(lengths[bucket].max())) >= FLOOR
        assert 1 < len(buckets) <= packing.MAX_BUCKETS or n == 10
    assert packing._round_up(165) == 176 and packing.ALIGN == 16


def test_full_length_passages_are_not_copied():
    model = tiny_fid()
    ids = torch.randint(3, VOCAB, (2, 2, 8))  # 16 tokens per question: aligned already
    mask = torch.ones_like(ids)
    encoded = model.encode(ids, mask)
    enc, layout = encoded.fused()
    assert enc.last_hidden_state.data_ptr() == encoded.real.data_ptr()  # a view of the encoder output
    assert layout.mask.all()


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_loss_logits_and_gradients_equal_the_padded_path(use_checkpoint, data):
    model = tiny_fid(seed=2).train()  # dropout 0 in the tiny config: the two paths draw masks differently
    model.set_checkpoint(use_checkpoint)
    ids, mask = DATA[data](seed=3)

    def step():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=LABELS)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), out.logits.detach(), grads

    (loss0, logits0, grads0), (loss1, logits1, grads1) = both_paths(model, step)
    torch.testing.assert_close(loss1, loss0, **TOL)
    torch.testing.assert_close(logits1, logits0, **TOL)
    assert grads0.keys() == grads1.keys() and len(grads0) == len(list(model.parameters()))
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("num_beams", [1, 3])
def test_answers_equal_the_padded_path(num_beams, data):
    model = tiny_fid(seed=4)
    ids, mask = DATA[data](seed=5)
    old, new = both_paths(model, lambda: model.generate(ids, mask, max_length=8, num_beams=num_beams))
    assert torch.equal(new, old)


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("kind", sorted(SCORE_KINDS))
def test_every_score_kind_equals_the_padded_path(kind, data):
    model = tiny_fid(seed=6)
    ids, mask = DATA[data](seed=7)
    labels = LABELS if SCORE_KINDS[kind].needs_target else None
    kwargs = {"max_length": 6, "labels": labels}
    if kind == "loop":
        kwargs["loo_chunk"] = 2  # chunks of left-out passages that straddle missing ones
    (gen0, scores0), (gen1, scores1) = both_paths(
        model, lambda: generate_with_scores(model, ids, mask, score_kind=kind, **kwargs)
    )
    assert torch.equal(gen1, gen0)
    assert scores1.shape == mask.shape[:2]
    torch.testing.assert_close(scores1, scores0, atol=1e-5, rtol=0)
    assert (scores1[mask.sum(-1) == 0] == 0).all()  # missing passages score 0


def test_bf16_autocast_runs_and_stays_close():
    model = tiny_fid(seed=8)
    ids, mask = ragged(seed=9)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return generate_with_scores(model, ids, mask, max_length=6)

    (gen0, scores0), (gen1, scores1) = both_paths(model, run)
    torch.testing.assert_close(scores1, scores0, atol=0.1, rtol=0.05)  # bf16 rounding differs by path


def test_masks_the_packed_path_cannot_take_fall_back_to_the_padded_path():
    model = tiny_fid(seed=10)
    ids, mask = ragged(seed=11)
    left = mask.flip(-1)  # left padding: real tokens not first
    assert not packing.packable(left)
    assert model.encode(ids.flip(-1), left).padded is not None
    empty = mask.clone()
    empty[1] = 0  # a question without any passage token
    assert not packing.packable(empty)
    assert model.encode(ids * empty, empty).padded is not None
    assert packing.packable(mask) and model.encode(ids, mask).padded is None


def test_layout_means_and_leave_one_out_masks():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    passage = torch.tensor([[0, 0, 1, 2, 2, 3], [1, 1, 3, 3, 3, 3]])  # N = 3; passage 0 of question 1 missing
    layout = packing.PassageLayout(mask, passage, 3)
    scores = torch.tensor([[1.0, 3.0, 5.0, 2.0, 4.0, 99.0], [6.0, 8.0, 99.0, 99.0, 99.0, 99.0]])
    torch.testing.assert_close(layout.passage_means(scores), torch.tensor([[2.0, 5.0, 3.0], [0.0, 7.0, 0.0]]))
    hidden = layout.without(torch.tensor([0, 2]))  # (B·2, S)
    assert hidden.tolist() == [[0, 0, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]


def test_legacy_bias_models_keep_the_padded_layout_and_the_parity(parity_dir):
    """Original checkpoints: the encoder is bucketed, the decoder keeps the N·L positions
    its bias sees; answers and scores match the original code either way."""
    expected = json.loads((parity_dir / "expected.json").read_text())
    examples = json.loads((parity_dir / "inputs.json").read_text())["examples"]
    ids = torch.tensor([e["input_ids"] for e in examples])
    mask = torch.tensor([e["attention_mask"] for e in examples])
    model = FiDT5.load(parity_dir / "fid_checkpoint").eval()
    assert model.has_legacy_xattn_bias
    encoded = model.encode(ids, mask)
    assert encoded.padded is None and not encoded.packed
    enc, layout = encoded.fused()
    assert enc.last_hidden_state.shape[1] == ids.shape[1] * ids.shape[2]
    (gen0, scores0), (gen1, scores1) = both_paths(model, lambda: generate_with_scores(model, ids, mask, max_length=20))
    assert torch.equal(gen1, gen0)
    padded = torch.zeros(len(gen1), 20, dtype=torch.long)
    padded[:, : gen1.shape[1]] = gen1
    assert padded.tolist() == expected["plain_path"]["generated_ids"]
    original = torch.tensor(expected["score_path"]["passage_scores"])
    torch.testing.assert_close(scores1, original, atol=5e-5, rtol=0)
    torch.testing.assert_close(scores1, scores0, atol=1e-5, rtol=0)


def test_no_packing_flag_and_throughput_in_the_logs(tmp_path, caplog):
    """--no_packing reaches the model; evaluation logs questions/s and the passages it read."""
    model_dir = save_tiny_t5(tmp_path / "t5", ["what color red blue anna likes question: title: context:"])
    config = ReaderConfig(per_gpu_batch_size=2, generation_max_length=4, eval_print_freq=0)
    model, tokenizer = load_reader(str(model_dir), None, "t5-small", packing=False)
    assert model.packing is False
    model, tokenizer = load_reader(str(model_dir), None, "t5-small")
    assert model.packing is True
    examples = [
        {
            "id": i,
            "question": "what color",
            "answers": ["red"],
            "ctxs": [{"title": "anna", "text": "anna likes red"}] * k,
        }
        for i, k in enumerate([3, 1, 2])
    ]
    dataset = ReaderDataset(examples, 3)
    collator = ReaderCollator(tokenizer, 16, 3)
    assert count_passages(collator([dataset[0], dataset[1]])) == 4
    with caplog.at_level(logging.INFO, logger="fid"):
        results = generate_answers(model, tokenizer, dataset, collator, config, desc="test")
    assert [r["index"] for r in results] == [0, 1, 2]
    assert "test: 3 questions, 6 passages in" in caplog.text and "questions/s" in caplog.text
