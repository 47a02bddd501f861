"""Checkpoints of the original FiD code (transformers 3.0.2) and its arithmetic.

The readers released with paper [1] were trained and evaluated with transformers 3.0.2,
which differs from today's T5 in three ways that change their outputs:
- layout: encoder keys under `encoder.encoder.` with `.module.` in the block keys;
- decoder block 0's cross-attention had its own relative position table, shared by all
  decoder blocks (`fid_legacy_xattn_bias` in our config);
- the RMS norm divided by √(mean(x²)+ε) instead of multiplying by rsqrt (float32
  rounding only; `fid_legacy_layer_norm`).
This module holds all three, for `FiDT5` (reader_model.py) to switch on when it loads
such a checkpoint; `convert.py` rewrites one to our format or to plain T5.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5Attention, T5LayerNorm

from src.errors import ModelPathError
from src.modeling import loading

# Decoder block 0's cross-attention position table, as transformers 3.0.2 (the original
# FiD's version) created and saved it. Modern T5 has no such table.
LEGACY_XATTN_BIAS_KEY = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"

LEGACY_MAX_DISTANCE = 128  # hard-coded in 3.0.2's relative position buckets


def legacy_xattn_bias(table: nn.Embedding, query_length: int, key_length: int, past: int = 0) -> torch.Tensor:
    """transformers 3.0.2's cross-attention position bias: (1, heads, query_length, key_length).

    Decoder position i = past + row attends to encoder position j (counted over the whole
    concatenated N·L sequence, as 3.0.2 saw it) with W[bucket(j − i), head], where the
    buckets are T5's unidirectional ones: j ≥ i always falls in bucket 0, so only the
    first i encoder positions (the start of passage 0) see other values.
    """
    device = table.weight.device
    decoder_positions = torch.arange(past, past + query_length, device=device)[:, None]
    encoder_positions = torch.arange(key_length, device=device)[None, :]
    buckets = T5Attention._relative_position_bucket(
        encoder_positions - decoder_positions,
        bidirectional=False,
        num_buckets=table.num_embeddings,
        max_distance=LEGACY_MAX_DISTANCE,
    )  # (query_length, key_length)
    return table(buckets).permute(2, 0, 1).unsqueeze(0)


def _legacy_xattn_bias_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on decoder block 0's cross-attention: pass the legacy bias as its
    `position_bias`.

    T5Attention adds `position_bias` to q·kᵀ before the mask (eager and SDPA alike) and
    returns it, and T5Stack hands block 0's to every later block's cross-attention: the
    same sharing as in 3.0.2, without touching T5's attention code. A plain function of
    the module (not a bound method) so that deep copies of the model stay correct.
    """
    hidden_states = args[0] if args else kwargs["hidden_states"]  # (B, q, d)
    key_value_states = kwargs.get("key_value_states")  # (B, N·L, d)
    if key_value_states is None:
        return None
    query_length = hidden_states.shape[1]
    past = 0
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None:
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        # Block 0's self-attention has already stored this step's positions.
        past = int(self_cache.get_seq_length(0)) - query_length
    kwargs["position_bias"] = legacy_xattn_bias(
        module.relative_attention_bias, query_length, key_value_states.shape[1], past
    )
    return args, kwargs


class _LegacyT5LayerNorm(T5LayerNorm):
    """T5's RMS norm in transformers 3.0.2's order of operations: x / √(mean(x²) + ε).

    Modern T5 multiplies by rsqrt instead: the same function, but float32 rounding
    differs in the last bit, and in a trained network that alone moves a loss by ~1e-4
    (example 3 of the parity fixtures). Used only for original FiD checkpoints.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states / torch.sqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


def enable_legacy_xattn_bias(model) -> None:
    """3.0.2's cross-attention position table on decoder block 0, applied by a pre-hook."""
    attention = model.decoder.block[0].layer[1].EncDecAttention
    if not hasattr(attention, "relative_attention_bias"):
        # Same name and shape as 3.0.2, so the original key loads and saves as is.
        attention.relative_attention_bias = nn.Embedding(
            model.config.relative_attention_num_buckets, model.config.num_heads
        )
    attention.register_forward_pre_hook(_legacy_xattn_bias_pre_hook, with_kwargs=True)
    model.config.fid_legacy_xattn_bias = True  # saved in config.json: reloads keep it


def enable_legacy_layer_norm(model) -> None:
    for module in model.modules():
        if type(module) is T5LayerNorm:
            module.__class__ = _LegacyT5LayerNorm  # same parameters, 3.0.2's arithmetic


def _modern_t5_key(key: str) -> str:
    """Original FiD key → T5 key: `encoder.encoder.block.3.module.layer…` → `encoder.block.3.layer…`."""
    if key.startswith("encoder.encoder."):
        key = "encoder." + key[len("encoder.encoder.") :]
        key = re.sub(r"^encoder\.block\.(\d+)\.module\.", r"encoder.block.\1.", key)
    return key


def original_fid_state(path: Path) -> dict[str, torch.Tensor] | None:
    """The state dict of an original FiD checkpoint in `path`, or None if it is not one."""
    weights = path / "pytorch_model.bin"
    if not weights.is_file() or any(path.glob("*.safetensors")):
        return None
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise ModelPathError(f"{weights}: cannot read the checkpoint ({e})") from e
    return state if any(key.startswith("encoder.encoder.") for key in state) else None


def checkpoint_keys(path: Path) -> set[str] | None:
    """Parameter names stored in a local checkpoint directory (None if not found)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            return set(json.loads((path / index_name).read_text())["weight_map"])
    if (path / "model.safetensors").is_file():
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return set(f.keys())
    if (path / "pytorch_model.bin").is_file():
        return set(torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True))
    return None


def load_original_fid(cls, path: Path, state: dict[str, torch.Tensor], log: logging.Logger):
    """A `cls` (FiDT5) from an original checkpoint's config and state dict, with the legacy
    bias when the weights carry its table and always the legacy norm."""
    # A 3.0.2 config.json has no num_decoder_layers / feed_forward_proj /
    # tie_word_embeddings: T5Config's defaults for them (decoder layers = num_layers,
    # relu, tied embeddings with rescaled decoder output) are 3.0.2's architecture.
    with loading(path, "original FiD checkpoint"):
        config = transformers.T5Config.from_pretrained(path)
    state = {_modern_t5_key(key): tensor for key, tensor in state.items()}
    legacy = LEGACY_XATTN_BIAS_KEY in state
    if legacy:
        config.fid_legacy_xattn_bias = True
    config.fid_legacy_layer_norm = True
    config.architectures = [cls.__name__]
    model = cls(config)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ModelPathError(f"{path / 'pytorch_model.bin'}: does not match its config.json: {e}") from e
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        raise ModelPathError(
            f"{path / 'pytorch_model.bin'}: does not match its config.json as an original FiD T5 checkpoint "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    model.eval()
    log.info(
        "loaded original FiD checkpoint %s (transformers 3.0.2 layout): legacy cross-attention bias %s",
        path,
        "ON (decoder block 0 has its table, as the original ran)" if legacy else "off (no table in the weights)",
    )
    return model


def plain_t5(model) -> transformers.T5ForConditionalGeneration:
    """A plain modern T5 with `model`'s weights: no FiD config fields, no legacy bias table."""
    config = transformers.T5Config.from_dict(model.config.to_dict())
    for flag in ("fid_legacy_xattn_bias", "fid_legacy_layer_norm"):
        if hasattr(config, flag):
            delattr(config, flag)
    config.architectures = ["T5ForConditionalGeneration"]
    plain = transformers.T5ForConditionalGeneration(config)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != LEGACY_XATTN_BIAS_KEY})
    return plain
