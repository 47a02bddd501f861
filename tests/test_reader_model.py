"""FiDT5 on tiny random T5s: per-passage encoding, training, generation, cross-attention
scores, missing passages, checkpoint formats and activation checkpointing."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import T5ForConditionalGeneration

from src.errors import ModelPathError
from src.reader.legacy import LEGACY_XATTN_BIAS_KEY
from src.reader.model import FiDT5
from src.reader.scores import generate_with_scores
from src.toy.tiny_models import tiny_t5_config

VOCAB = 40
EOS = 1


def tiny_fid(seed: int = 0, **config_kw) -> FiDT5:
    torch.manual_seed(seed)
    return FiDT5(tiny_t5_config(VOCAB, **config_kw)).eval()


def passages(B: int = 2, N: int = 3, L: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (B, N, L) ids with right padding of varied lengths (every passage ≥ 2 tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, N, L), generator=g)
    lengths = torch.randint(2, L + 1, (B, N), generator=g)
    mask = (torch.arange(L)[None, None, :] < lengths[..., None]).long()
    return ids * mask, mask


def independent_scores(model: FiDT5, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paper [2]'s score from the weights: q·kᵀ of the first decoded token in every decoder layer,
    averaged over layers, heads and each passage's real tokens (0 for an empty passage).

    The only thing taken from the model run is each cross-attention sublayer's input
    (hook on T5LayerCrossAttention); normalisation, projections and the dot products
    are recomputed here by hand."""
    B, N, L = ids.shape
    H, dk = model.config.num_heads, model.config.d_kv
    enc = torch.stack(
        [model.encoder(input_ids=ids[:, n], attention_mask=mask[:, n]).last_hidden_state for n in range(N)], dim=1
    ).reshape(B, N * L, -1)  # each passage alone, then concatenated
    inputs = {}
    hooks = [
        block.layer[1].register_forward_hook(lambda m, a, kw, out, i=i: inputs.__setitem__(i, a[0]), with_kwargs=True)
        for i, block in enumerate(model.decoder.block)
    ]
    start = torch.full((B, 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=start)
    for h in hooks:
        h.remove()
    total = torch.zeros(B, N * L, dtype=torch.float64)
    for i, block in enumerate(model.decoder.block):
        xattn = block.layer[1]
        x = inputs[i][:, 0].double()  # (B, d)
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + xattn.layer_norm.variance_epsilon)
        x = x * xattn.layer_norm.weight.double()
        q = (x @ xattn.EncDecAttention.q.weight.double().T).reshape(B, H, dk)
        k = (enc.double() @ xattn.EncDecAttention.k.weight.double().T).reshape(B, N * L, H, dk)
        total += torch.einsum("bhd,bjhd->bhj", q, k).mean(1)
    token = (total / len(model.decoder.block)).reshape(B, N, L)
    m = mask.double()
    return ((token * m).sum(-1) / m.sum(-1).clamp(min=1)).float()


def test_encoder_runs_per_passage_and_decoder_sees_the_concatenation():
    model = tiny_fid()
    model.packing = False  # the original layout; the packed one: tests/test_packing.py
    ids, mask = passages(B=2, N=3, L=7)
    enc, layout = model.encode_passages(ids, mask)
    flat_mask = layout.mask
    assert enc.last_hidden_state.shape == (2, 3 * 7, model.config.d_model)
    assert torch.equal(flat_mask, mask.reshape(2, 21))
    states = enc.last_hidden_state.reshape(2, 3, 7, -1)
    for n in range(3):  # each passage as if encoded alone by a plain T5 encoder
        alone = model.encoder(input_ids=ids[:, n], attention_mask=mask[:, n]).last_hidden_state
        real = mask[:, n].bool()
        torch.testing.assert_close(states[:, n][real], alone[real], atol=1e-6, rtol=1e-5)
    labels = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, -100]])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 4, VOCAB)
    # the decoder over the concatenation = plain T5 fed the concatenated encoder states
    plain = T5ForConditionalGeneration(model.config)
    plain.load_state_dict(model.state_dict())
    ref = plain(encoder_outputs=(enc.last_hidden_state,), attention_mask=flat_mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)


def test_one_passage_equals_plain_t5():
    model = tiny_fid()
    plain = T5ForConditionalGeneration(model.config).eval()
    plain.load_state_dict(model.state_dict())
    ids, mask = passages(B=2, N=1, L=6)
    labels = torch.tensor([[4, 5, EOS], [6, EOS, -100]])
    ours = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref = plain(input_ids=ids[:, 0], attention_mask=mask[:, 0], labels=labels)
    torch.testing.assert_close(ours.logits, ref.logits)
    gen = model.generate(ids, mask, max_length=6)
    ref_gen = plain.generate(input_ids=ids[:, 0], attention_mask=mask[:, 0], max_length=6, do_sample=False)
    assert torch.equal(gen, ref_gen)


def test_overfitting_a_few_examples_then_generate_returns_the_targets():
    model = tiny_fid(seed=3).train()
    ids, mask = passages(B=3, N=2, L=6, seed=4)
    targets = [[11, 12, 13, EOS], [14, 15, EOS], [16, EOS]]
    labels = torch.full((3, 4), -100)
    for b, t in enumerate(targets):
        labels[b, : len(t)] = torch.tensor(t)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    model.eval()
    generated = model.generate(ids, mask, max_length=10)
    assert generated.shape[1] <= 10
    for b, t in enumerate(targets):
        assert generated[b, 0].item() == model.config.decoder_start_token_id
        assert generated[b, 1 : len(t) + 1].tolist() == t
    beams = model.generate(ids, mask, max_length=10, num_beams=3)
    for b, t in enumerate(targets):
        assert beams[b, 1 : len(t) + 1].tolist() == t


def test_max_length_counts_the_decoder_start_token():
    model = tiny_fid()
    model.generation_config.eos_token_id = None  # never stop early
    ids, mask = passages()
    assert model.generate(ids, mask, max_length=5).shape == (2, 5)


def test_generate_with_more_decoder_than_encoder_layers():
    model = tiny_fid(layers=1, num_decoder_layers=3)
    ids, mask = passages()
    cached = model.generate(ids, mask, max_length=8)
    uncached = model.generate(ids, mask, max_length=8, use_cache=False)
    assert torch.equal(cached, uncached)
    generated, scores = generate_with_scores(model, ids, mask, max_length=8)
    assert torch.equal(generated, cached)
    torch.testing.assert_close(scores, independent_scores(model, ids, mask), atol=1e-5, rtol=0)


def test_scores_equal_an_independent_qk_computation():
    model = tiny_fid(seed=5)
    ids, mask = passages(B=3, N=4, L=9, seed=6)
    mask[1, 3] = 0  # a missing passage
    generated, scores = generate_with_scores(model, ids, mask, max_length=6)
    assert scores.shape == (3, 4) and scores.dtype == torch.float32
    assert torch.equal(generated, model.generate(ids, mask, max_length=6))
    torch.testing.assert_close(scores, independent_scores(model, ids, mask), atol=1e-5, rtol=0)
    assert scores[1, 3].item() == 0.0
    # eager attention gives the same (the hooks sit on the projections, not on a kernel)
    model.set_attn_implementation("eager")
    _, eager_scores = generate_with_scores(model, ids, mask, max_length=6)
    torch.testing.assert_close(eager_scores, scores, atol=1e-6, rtol=0)
    # the first step of every beam is the same: beams do not change the scores
    _, beam_scores = generate_with_scores(model, ids, mask, max_length=6, num_beams=2)
    torch.testing.assert_close(beam_scores, scores, atol=1e-6, rtol=0)


def test_score_variants():
    model = tiny_fid(seed=7)
    ids, mask = passages(B=2, N=3, L=8, seed=8)
    mask[0, 2] = 0
    _, default = generate_with_scores(model, ids, mask, max_length=6)
    _, probs = generate_with_scores(model, ids, mask, max_length=6, score_kind="xattn_softmax")
    # mean probability per token × tokens, summed over passages = 1 (per layer and head)
    n_tokens = mask.sum(-1).float()
    torch.testing.assert_close((probs * n_tokens).sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    assert probs[0, 2].item() == 0.0
    _, value_norm = generate_with_scores(model, ids, mask, max_length=6, score_kind="xattn_value_norm")
    assert (value_norm[mask.any(-1)] > 0).all() and value_norm[0, 2].item() == 0.0
    assert not torch.allclose(value_norm, probs)
    # all answer tokens with a one-token answer (max_length=2) = the first token only
    _, all_tokens = generate_with_scores(model, ids, mask, max_length=2, score_kind="xattn_all_tokens")
    torch.testing.assert_close(all_tokens, default, atol=1e-5, rtol=0)
    _, longer = generate_with_scores(model, ids, mask, max_length=6, score_kind="xattn_all_tokens")
    assert not torch.allclose(longer, default)
    with pytest.raises(ValueError, match="score_kind"):
        generate_with_scores(model, ids, mask, score_kind="nope")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_scores_are_computed_in_float32_under_autocast(dtype):
    """Under bf16/fp16 autocast the q and k projections give half-precision tensors. The scores
    are their products taken in float32: a float64 computation from the same projections (hooked
    here) agrees to float32 rounding, where a product in half precision is off by ~1e-3. And bf16
    stays close to an fp32 run, with the same answers."""
    model = tiny_fid(seed=14)
    ids, mask = passages(B=2, N=3, L=9, seed=15)
    mask[1, 2] = 0  # a missing passage
    ids = ids * mask
    queries, keys = {}, {}  # each layer's first call: the first decoding step

    def keep(store: dict, i: int, out: torch.Tensor) -> None:  # returns None: the output is not replaced
        store.setdefault(i, out)

    hooks = []
    for i, block in enumerate(model.decoder.block):
        attention = block.layer[1].EncDecAttention
        hooks.append(attention.q.register_forward_hook(lambda m, a, out, i=i: keep(queries, i, out[:, 0])))
        hooks.append(attention.k.register_forward_hook(lambda m, a, out, i=i: keep(keys, i, out)))
    with torch.autocast("cpu", dtype=dtype):
        generated, scores = generate_with_scores(model, ids, mask, max_length=6)
    for h in hooks:
        h.remove()
    assert queries[0].dtype == keys[0].dtype == dtype and scores.dtype == torch.float32
    B, N, _ = ids.shape
    H, dk = model.config.num_heads, model.config.d_kv
    token = sum(
        torch.einsum("bhd,bshd->bhs", queries[i].double().view(B, H, dk), keys[i].double().view(B, -1, H, dk)).mean(1)
        for i in queries
    ) / len(queries)  # (B, S): the packed layout, each question's real tokens in passage order
    want = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        start = 0
        for n, length in enumerate(mask[b].sum(-1).tolist()):
            if length:
                want[b, n] = token[b, start : start + length].mean()
            start += length
    torch.testing.assert_close(scores, want.float(), atol=1e-5, rtol=1e-5)
    if dtype == torch.bfloat16:
        fp32_generated, fp32_scores = generate_with_scores(model, ids, mask, max_length=6)
        assert torch.equal(generated, fp32_generated)
        torch.testing.assert_close(scores, fp32_scores, atol=1e-2, rtol=0)
        assert (scores - fp32_scores).abs().max() > 1e-5  # bf16 really ran (the projections rounded)


def test_padded_missing_passages_change_nothing():
    model = tiny_fid(seed=9)
    ids, mask = passages(B=2, N=2, L=7, seed=10)
    garbage = torch.randint(3, VOCAB, (2, 1, 7))
    padded_ids, padded_mask = torch.cat([ids, garbage], 1), torch.cat([mask, torch.zeros(2, 1, 7).long()], 1)
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        gen, scores = generate_with_scores(model, ids, mask, max_length=8)
        pgen, pscores = generate_with_scores(model, padded_ids, padded_mask, max_length=8)
        assert torch.equal(gen, pgen)
        torch.testing.assert_close(pscores[:, :2], scores, atol=1e-6, rtol=0)
        assert (pscores[:, 2] == 0).all()
        labels = torch.tensor([[5, 6, EOS], [7, EOS, -100]])
        torch.testing.assert_close(
            model(input_ids=padded_ids, attention_mask=padded_mask, labels=labels).loss,
            model(input_ids=ids, attention_mask=mask, labels=labels).loss,
        )


def test_use_checkpoint_gives_equal_gradients():
    model = tiny_fid(seed=11, dropout_rate=0.1).train()
    ids, mask = passages(B=2, N=3, L=7, seed=12)
    labels = torch.tensor([[5, 6, EOS], [7, EOS, -100]])
    calls = []
    model.encoder.block[0].layer[0].register_forward_hook(lambda *a: calls.append(1))

    def grads(use: bool) -> dict[str, torch.Tensor]:
        model.set_checkpoint(use)
        model.zero_grad()
        calls.clear()
        torch.manual_seed(0)  # same dropout masks
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), None
    encoder_calls = len(calls)  # one per length bucket (packing.py)
    assert encoder_calls >= 1
    checkpointed = grads(True)
    assert len(calls) == 2 * encoder_calls  # each bucket's encoder block ran again in the backward pass
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


# -- checkpoint formats ---------------------------------------------------------


def _same_outputs(a: torch.nn.Module, b: FiDT5) -> None:
    ids, mask = passages(B=2, N=2, L=6, seed=13)
    labels = torch.tensor([[5, 6, EOS], [7, EOS, -100]])
    if isinstance(a, FiDT5):
        ref = a(input_ids=ids, attention_mask=mask, labels=labels).logits
    else:  # a plain T5 fed FiD's concatenated encoder states
        enc, layout = b.encode_passages(ids, mask)
        ref = a(encoder_outputs=(enc.last_hidden_state,), attention_mask=layout.mask, labels=labels).logits
    torch.testing.assert_close(b(input_ids=ids, attention_mask=mask, labels=labels).logits, ref)


def test_plain_t5_directory_loads(tmp_path, caplog):
    torch.manual_seed(0)
    plain = T5ForConditionalGeneration(tiny_t5_config(VOCAB)).eval()
    plain.save_pretrained(tmp_path)
    direct = FiDT5.from_pretrained(tmp_path).eval()
    with caplog.at_level(logging.INFO, logger="fid"):
        loaded = FiDT5.load(tmp_path)
    assert "legacy cross-attention bias off" in caplog.text
    assert not loaded.has_legacy_xattn_bias
    assert not hasattr(loaded.decoder.block[0].layer[1].EncDecAttention, "relative_attention_bias")
    _same_outputs(plain, loaded)
    _same_outputs(plain, direct)


def test_modern_checkpoint_carrying_the_legacy_tensor_keeps_the_bias_off(tmp_path, caplog):
    torch.manual_seed(0)
    plain = T5ForConditionalGeneration(tiny_t5_config(VOCAB)).eval()
    plain.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights[LEGACY_XATTN_BIAS_KEY] = torch.full((32, 4), 5.0)  # as some hub T5 checkpoints still carry
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="fid"):
        loaded = FiDT5.load(tmp_path)
    assert "dropped" in caplog.text and "OFF" in caplog.text
    assert not loaded.has_legacy_xattn_bias
    _same_outputs(plain, loaded)


def write_original_fid_checkpoint(model: T5ForConditionalGeneration, path, legacy_table: torch.Tensor | None = None):
    """What the original FiD code saved (transformers 3.0.2): encoder wrapped twice and
    its blocks in a checkpoint wrapper; config.json without the fields 3.0.2 lacked."""
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("encoder."):
            key = "encoder.encoder." + key[len("encoder.") :]
            parts = key.split(".")
            if parts[2] == "block":
                key = ".".join(parts[:4] + ["module"] + parts[4:])
        state[key] = tensor.clone()
    if legacy_table is not None:
        state[LEGACY_XATTN_BIAS_KEY] = legacy_table
    torch.save(state, path / "pytorch_model.bin")
    config = model.config.to_dict()
    for field in ("num_decoder_layers", "feed_forward_proj", "tie_word_embeddings", "dense_act_fn", "is_gated_act"):
        config.pop(field, None)
    config["architectures"] = ["FiDT5"]
    (path / "config.json").write_text(json.dumps(config))


def test_original_fid_checkpoint_loads(tmp_path, caplog):
    torch.manual_seed(0)
    plain = T5ForConditionalGeneration(tiny_t5_config(VOCAB)).eval()
    write_original_fid_checkpoint(plain, tmp_path / "orig")
    keys = torch.load(tmp_path / "orig" / "pytorch_model.bin", weights_only=True)
    assert "encoder.encoder.block.1.module.layer.0.SelfAttention.q.weight" in keys
    with caplog.at_level(logging.INFO, logger="fid"):
        loaded = FiDT5.load(tmp_path / "orig")
    assert "original FiD checkpoint" in caplog.text and "bias off" in caplog.text
    assert loaded.config.num_decoder_layers == loaded.config.num_layers
    assert loaded.config.feed_forward_proj == "relu" and loaded.config.tie_word_embeddings
    for key, tensor in plain.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor, rtol=0, atol=0, msg=key)
    # only float32 rounding of the norms differs from modern T5 (3.0.2's arithmetic)
    ids, mask = passages(B=2, N=2, L=6, seed=13)
    enc, layout = loaded.encode_passages(ids, mask)
    ref = plain(
        encoder_outputs=(enc.last_hidden_state,), attention_mask=layout.mask, decoder_input_ids=torch.zeros(2, 1).long()
    )
    ours = loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.zeros(2, 1).long())
    torch.testing.assert_close(ours.logits, ref.logits, atol=1e-5, rtol=1e-5)


def test_original_fid_checkpoint_with_the_legacy_table(tmp_path, caplog):
    torch.manual_seed(0)
    plain = T5ForConditionalGeneration(tiny_t5_config(VOCAB)).eval()
    table = torch.randn(32, 4)
    write_original_fid_checkpoint(plain, tmp_path / "orig", legacy_table=table)
    with caplog.at_level(logging.INFO, logger="fid"):
        loaded = FiDT5.load(tmp_path / "orig")
    assert "bias ON" in caplog.text
    assert loaded.has_legacy_xattn_bias
    assert torch.equal(loaded.decoder.block[0].layer[1].EncDecAttention.relative_attention_bias.weight, table)
    # the bias changes outputs; scores at step 0 shift by the mean over heads of table[0]
    ids, mask = passages(B=2, N=2, L=6, seed=13)
    without = FiDT5(plain.config).eval()
    without.load_state_dict(plain.state_dict())
    _, s_with = generate_with_scores(loaded, ids, mask, max_length=2)
    _, s_without = generate_with_scores(without, ids, mask, max_length=2)
    torch.testing.assert_close(s_with - s_without, torch.full_like(s_with, table[0].mean().item()), atol=1e-4, rtol=0)
    # save → reload keeps it
    loaded.save_pretrained(tmp_path / "ours")
    again = FiDT5.load(tmp_path / "ours")
    assert again.has_legacy_xattn_bias and again.config.fid_legacy_layer_norm
    _same_outputs(loaded, again)


def test_save_plain_t5_round_trip(tmp_path):
    model = tiny_fid(seed=14)
    model.save_plain_t5(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"]
    assert not any(k.startswith("fid_") for k in config)
    plain, info = T5ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _same_outputs(plain.eval(), model)


def test_load_errors(tmp_path):
    with pytest.raises(ModelPathError, match="config.json"):
        FiDT5.load(tmp_path)
    torch.manual_seed(0)
    plain = T5ForConditionalGeneration(tiny_t5_config(VOCAB))
    write_original_fid_checkpoint(plain, tmp_path / "orig")
    config = json.loads((tmp_path / "orig" / "config.json").read_text())
    config["d_ff"] = 128  # weights no longer match
    (tmp_path / "orig" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelPathError, match="pytorch_model.bin"):
        FiDT5.load(tmp_path / "orig")
