"""Parity with the original FiD code (transformers 3.0.2) on its own checkpoint format:
tests/data/parity/ (see its README) holds the original's outputs on a tiny checkpoint."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import PreTrainedTokenizerFast, T5ForConditionalGeneration

from src.reader.convert import main
from src.reader.legacy import LEGACY_XATTN_BIAS_KEY
from src.reader.model import FiDT5
from src.reader.scores import generate_with_scores

MAX_LENGTH = 20  # the original's generate(max_length=20): start token included
SCORE_TOL = 5e-5
LOSS_TOL = 1e-4


@pytest.fixture(scope="module")
def expected(parity_dir):
    return json.loads((parity_dir / "expected.json").read_text())


@pytest.fixture(scope="module")
def batch(parity_dir):
    """inputs.json as tensors: ids/mask (6, 3, 24), labels (6, T) padded with -100, and the unpadded labels."""
    examples = json.loads((parity_dir / "inputs.json").read_text())["examples"]
    ids = torch.tensor([e["input_ids"] for e in examples])
    mask = torch.tensor([e["attention_mask"] for e in examples])
    labels = torch.tensor([e["labels"] for e in examples])
    return ids, mask, labels, [e["labels_unpadded"] for e in examples]


@pytest.fixture(scope="module")
def tokenizer(parity_dir):
    return PreTrainedTokenizerFast.from_pretrained(parity_dir / "tokenizer")


def load_original(parity_dir) -> FiDT5:
    return FiDT5.load(parity_dir / "fid_checkpoint").eval()


def padded(generated: torch.Tensor, length: int = MAX_LENGTH) -> list[list[int]]:
    """Generated ids padded with 0 to `length`, as the original's batch output was."""
    out = torch.zeros(generated.shape[0], length, dtype=torch.long)
    out[:, : generated.shape[1]] = generated
    return out.tolist()


def decode(tokenizer, generated: torch.Tensor) -> list[str]:
    return [tokenizer.decode(g, skip_special_tokens=True, clean_up_tokenization_spaces=True) for g in generated]


def losses(model, batch) -> tuple[float, list[float]]:
    """train() mode (dropout is 0 in this config), batch loss and each example alone."""
    ids, mask, labels, unpadded = batch
    model.train()
    with torch.no_grad():
        total = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        each = [
            model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], labels=torch.tensor([u])).loss.item()
            for i, u in enumerate(unpadded)
        ]
    model.eval()
    return total, each


def test_original_checkpoint_loads_with_the_legacy_bias(parity_dir, expected, caplog):
    with caplog.at_level(logging.INFO, logger="fid"):
        model = load_original(parity_dir)
    assert "original FiD checkpoint" in caplog.text and "bias ON" in caplog.text
    assert model.has_legacy_xattn_bias
    c = model.config
    assert (c.num_layers, c.num_decoder_layers, c.feed_forward_proj, c.tie_word_embeddings) == (2, 2, "relu", True)
    table = model.state_dict()[LEGACY_XATTN_BIAS_KEY]
    torch.testing.assert_close(table[0], torch.tensor(expected["legacy_xattn_bias"]["bucket0_per_head"]))


def test_plain_generation_equals_the_original(parity_dir, expected, batch, tokenizer):
    ids, mask, _, _ = batch
    generated = load_original(parity_dir).generate(ids, mask, max_length=MAX_LENGTH)
    assert generated.shape[1] <= MAX_LENGTH
    assert padded(generated) == expected["plain_path"]["generated_ids"]
    assert decode(tokenizer, generated) == expected["plain_path"]["answers"]


def test_legacy_bias_rows_follow_the_decoding_step_with_and_without_cache(parity_dir, batch):
    ids, mask, _, _ = batch
    model = load_original(parity_dir)
    cached = model.generate(ids, mask, max_length=MAX_LENGTH)
    uncached = model.generate(ids, mask, max_length=MAX_LENGTH, use_cache=False)
    assert torch.equal(cached, uncached)
    # teacher forcing over the generated answer gives the same greedy choices (row i at position i)
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=cached[:, :-1]).logits
    finished = (cached[:, :-1] == 1).long().cumsum(1) > 0  # after EOS only padding follows
    assert torch.equal(logits.argmax(-1)[~finished], cached[:, 1:][~finished])


def test_scores_equal_the_original(parity_dir, expected, batch, tokenizer):
    ids, mask, _, _ = batch
    generated, scores = generate_with_scores(load_original(parity_dir), ids, mask, max_length=MAX_LENGTH)
    torch.testing.assert_close(scores, torch.tensor(expected["score_path"]["passage_scores"]), atol=SCORE_TOL, rtol=0)
    # Our score capture does not change generation: the answers are plain_path's (the
    # original's score hook changed them, see the README; released numbers are plain_path).
    assert padded(generated) == expected["plain_path"]["generated_ids"]
    assert decode(tokenizer, generated) == expected["plain_path"]["answers"]


def test_teacher_forced_loss_equals_the_original(parity_dir, expected, batch):
    total, each = losses(load_original(parity_dir), batch)
    assert total == pytest.approx(expected["train_loss"]["batch"], abs=LOSS_TOL)
    assert each == pytest.approx(expected["train_loss"]["per_example"], abs=LOSS_TOL)


def test_zeroed_bias_is_the_whole_difference(parity_dir, expected, batch):
    model = load_original(parity_dir)
    with torch.no_grad():
        model.state_dict()[LEGACY_XATTN_BIAS_KEY].zero_()
    total, each = losses(model, batch)
    diagnostic = expected["diagnostic_zeroed_legacy_bias"]
    assert total == pytest.approx(diagnostic["batch"], abs=LOSS_TOL)
    assert each == pytest.approx(diagnostic["per_example"], abs=LOSS_TOL)


def test_plain_modern_t5_of_the_same_weights(parity_dir, expected, batch, tmp_path, tokenizer):
    """Bias dropped (a plain modern T5 of the same weights) = the original with the bias
    zeroed; its step-0 scores miss the bias's per-head constant; answers = score_path's."""
    load_original(parity_dir).save_plain_t5(tmp_path)
    plain = FiDT5.load(tmp_path).eval()
    assert not plain.has_legacy_xattn_bias and not getattr(plain.config, "fid_legacy_layer_norm", False)
    total, each = losses(plain, batch)
    diagnostic = expected["diagnostic_zeroed_legacy_bias"]
    assert total == pytest.approx(diagnostic["batch"], abs=LOSS_TOL)
    # Per example, modern T5's norm (× rsqrt, not ÷ sqrt) rounds differently in float32:
    # example 3 (loss 13.2) moves by 1.3e-4. The zeroed-bias test above checks 1e-4
    # with 3.0.2's arithmetic.
    assert each == pytest.approx(diagnostic["per_example"], abs=2 * LOSS_TOL)
    ids, mask, _, _ = batch
    generated, scores = generate_with_scores(plain, ids, mask, max_length=MAX_LENGTH)
    shift = expected["legacy_xattn_bias"]["bucket0_mean_over_heads"]
    original = torch.tensor(expected["score_path"]["passage_scores"])
    torch.testing.assert_close(scores + shift, original, atol=SCORE_TOL, rtol=0)
    assert padded(generated) == expected["score_path"]["generated_ids"]
    assert decode(tokenizer, generated) == expected["score_path"]["answers"]
    # it is a plain T5: the stock class loads it with nothing missing or left over
    _, info = T5ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_save_and_reload_keep_the_legacy_bias(parity_dir, expected, batch, tmp_path):
    model = load_original(parity_dir)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["fid_legacy_xattn_bias"] is True and config["fid_legacy_layer_norm"] is True
    reloaded = FiDT5.load(tmp_path)
    assert reloaded.has_legacy_xattn_bias
    total, each = losses(reloaded, batch)
    assert total == pytest.approx(expected["train_loss"]["batch"], abs=LOSS_TOL)
    assert each == pytest.approx(expected["train_loss"]["per_example"], abs=LOSS_TOL)
    ids, mask, _, _ = batch
    generated, scores = generate_with_scores(reloaded, ids, mask, max_length=MAX_LENGTH)
    assert padded(generated) == expected["plain_path"]["generated_ids"]
    torch.testing.assert_close(scores, torch.tensor(expected["score_path"]["passage_scores"]), atol=SCORE_TOL, rtol=0)


def test_training_updates_the_legacy_table(parity_dir, batch):
    model = load_original(parity_dir).train()
    ids, mask, labels, _ = batch
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    grad = model.decoder.block[0].layer[1].EncDecAttention.relative_attention_bias.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_convert_legacy_cli(parity_dir, expected, batch, tmp_path, capsys):
    assert main(["convert-legacy", str(parity_dir / "fid_checkpoint"), str(tmp_path / "keep")]) == 0
    kept = FiDT5.load(tmp_path / "keep")
    assert kept.has_legacy_xattn_bias
    assert losses(kept, batch)[0] == pytest.approx(expected["train_loss"]["batch"], abs=LOSS_TOL)

    args = ["convert-legacy", str(parity_dir / "fid_checkpoint"), str(tmp_path / "drop"), "--legacy_bias", "drop"]
    assert main(args) == 0
    config = json.loads((tmp_path / "drop" / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"]
    assert not any(key.startswith("fid_") for key in config)
    dropped = FiDT5.load(tmp_path / "drop")
    assert not dropped.has_legacy_xattn_bias
    assert losses(dropped, batch)[0] == pytest.approx(expected["diagnostic_zeroed_legacy_bias"]["batch"], abs=LOSS_TOL)

    assert main(args) == 1  # destination exists
    assert "already exists" in capsys.readouterr().err
    assert main(["convert-legacy", str(tmp_path / "keep"), str(tmp_path / "again")]) == 1  # not an original checkpoint
    assert "not an original FiD checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drop", "keep"]  # no temporary directories left
