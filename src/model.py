"""Models: the FiD reader (`FiDT5`) and the distilled bi-encoder retriever (`Retriever`)."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.t5.modeling_t5 import T5Attention, T5LayerNorm

from .util import check_model_path

# ---------------------------------------------------------------------------
# Reader: FiDT5
# ---------------------------------------------------------------------------

# Decoder block 0's cross-attention position table, as transformers 3.0.2 (the original
# FiD's version) created and saved it. Modern T5 has no such table.
LEGACY_XATTN_BIAS_KEY = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
LEGACY_MAX_DISTANCE = 128  # hard-coded in 3.0.2's relative position buckets
SCORE_KINDS = ("xattn", "xattn_softmax", "xattn_all_tokens", "xattn_value_norm")
# Everything `save_pretrained` of a tokenizer may write; copied along by convert-legacy.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "added_tokens.json",
)


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


class FiDT5(transformers.T5ForConditionalGeneration):
    """Fusion-in-Decoder on a T5 (SPEC §3): each passage is encoded on its own, the
    decoder attends over all of them at once.

    Inputs are (B, N, L): B questions × N passages × L tokens. The encoder runs on
    (B·N, L); its states are concatenated per question into (B, N·L, d) and the decoder
    cross-attends over them with the matching (B, N·L) mask. Parameter names are T5's,
    so `FiDT5.from_pretrained(any_t5)` works and the weights are plain T5 weights.

    Two config flags, set when loading an original FiD checkpoint and saved with the
    model, reproduce how transformers 3.0.2 (the original's version) computed:
    `fid_legacy_xattn_bias` adds 3.0.2's extra cross-attention position bias, which the
    released FiD readers were trained and evaluated with (it changes answers), and
    `fid_legacy_layer_norm` uses 3.0.2's order of operations in the RMS norms (float32
    rounding only). See `FiDT5.load`.
    """

    def __init__(self, config: transformers.T5Config):
        super().__init__(config)
        if getattr(config, "fid_legacy_xattn_bias", False):
            self._enable_legacy_xattn_bias()
        if getattr(config, "fid_legacy_layer_norm", False):
            for module in self.modules():
                if type(module) is T5LayerNorm:
                    module.__class__ = _LegacyT5LayerNorm  # same parameters, 3.0.2's arithmetic

    def _enable_legacy_xattn_bias(self) -> None:
        attention = self.decoder.block[0].layer[1].EncDecAttention
        if not hasattr(attention, "relative_attention_bias"):
            # Same name and shape as 3.0.2, so the original key loads and saves as is.
            attention.relative_attention_bias = nn.Embedding(
                self.config.relative_attention_num_buckets, self.config.num_heads
            )
        attention.register_forward_pre_hook(_legacy_xattn_bias_pre_hook, with_kwargs=True)
        self.config.fid_legacy_xattn_bias = True  # saved in config.json: reloads keep it

    @property
    def has_legacy_xattn_bias(self) -> bool:
        return bool(getattr(self.config, "fid_legacy_xattn_bias", False))

    # -- encoder ---------------------------------------------------------------

    def encode_passages(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[BaseModelOutput, torch.Tensor]:
        """(B, N, L) ids and mask → encoder states (B, N·L, d) and the decoder's mask (B, N·L)."""
        if input_ids.dim() != 3:
            raise ValueError(f"FiDT5 expects passages as (B, N, L) token ids, got shape {tuple(input_ids.shape)}")
        if attention_mask is None or attention_mask.shape != input_ids.shape:
            raise ValueError(
                "FiDT5 needs the passages' attention_mask with the shape of input_ids (B, N, L); "
                f"got {None if attention_mask is None else tuple(attention_mask.shape)}"
            )
        B, N, L = input_ids.shape
        mask = attention_mask.reshape(B * N, L)
        # A missing passage (fewer ctxs than N) is all padding. The encoder sees its tokens
        # anyway: a fully masked row can give NaN states with some attention kernels, and
        # NaN would leak through the decoder's masked positions (0·NaN). The decoder's
        # mask still hides such a passage completely.
        empty = ~mask.bool().any(dim=-1, keepdim=True)  # (B·N, 1)
        states = self.encoder(
            input_ids=input_ids.reshape(B * N, L), attention_mask=mask.masked_fill(empty, 1)
        ).last_hidden_state  # (B·N, L, d)
        return BaseModelOutput(last_hidden_state=states.reshape(B, N * L, -1)), attention_mask.reshape(B, N * L)

    def set_checkpoint(self, use: bool) -> None:
        """Activation checkpointing of the encoder blocks (`--use_checkpoint`): recompute
        them in the backward pass instead of storing activations. Same gradients (the RNG
        state is replayed for dropout); the decoder is left alone."""
        checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for block in self.encoder.block:
            block.gradient_checkpointing = use
            block._gradient_checkpointing_func = checkpoint

    # -- training --------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, encoder_outputs=None, **kwargs):
        """(B, N, L) `input_ids`/`attention_mask` (+ `labels` (B, T) for T5's token
        cross-entropy). Inside `generate` the encoder states come precomputed with the
        flattened (B, N·L) mask; 2-D `input_ids` without them are one passage per question
        (plain T5)."""
        if encoder_outputs is None and input_ids is not None and input_ids.dim() == 3:
            encoder_outputs, attention_mask = self.encode_passages(input_ids, attention_mask)
            input_ids = None
        elif attention_mask is not None and attention_mask.dim() == 3:
            attention_mask = attention_mask.flatten(1)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, encoder_outputs=encoder_outputs, **kwargs
        )

    # -- inference -------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, max_length: int | None = None, **kwargs):
        """Answers for (B, N, L) passages: (B, T) ids starting with the decoder start token.

        Greedy unless told otherwise (`num_beams`, ...). `max_length` counts the decoder
        start token, as in the original (max_length=20 → at most 19 answer tokens).
        transformers 5 refuses a 3-D mask (and without one would attend to padding), so
        the encoder runs here and generation gets its states with the (B, N·L) mask.
        """
        if input_ids is not None and input_ids.dim() == 3:
            kwargs["encoder_outputs"], attention_mask = self.encode_passages(input_ids, attention_mask)
            input_ids = input_ids.flatten(1)  # (B, N·L): generate only reads batch size and device
        if max_length is not None:
            kwargs["max_length"] = max_length
        start = self.config.decoder_start_token_id
        kwargs.setdefault("decoder_start_token_id", self.config.pad_token_id if start is None else start)
        generation_config = kwargs.get("generation_config") or self.generation_config
        use_cache = kwargs.get("use_cache", getattr(generation_config, "use_cache", True))
        if use_cache and kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            # The default cache is sized from the config's num_layers (the encoder's);
            # with num_decoder_layers != num_layers it breaks. An empty one grows as needed.
            kwargs["cache"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate_with_scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_length: int | None = None,
        score_kind: str = "xattn",
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`generate` plus one cross-attention score per passage: (ids (B, T), scores (B, N) float32).

        score_kind (paper [2]; SPEC §4):
        - "xattn" (default): pre-softmax scores q·kᵀ (+ position bias, which is non-zero
          only with the legacy bias) of the first decoded token, averaged over decoder
          layers, heads and the passage's real tokens;
        - "xattn_softmax": the same with the attention probabilities;
        - "xattn_value_norm": probabilities × the norm of each head's value vector;
        - "xattn_all_tokens": pre-softmax scores averaged over every answer token (up to
          and including the first EOS), recomputed with teacher forcing on the answer.
        A passage without any real token (padding for a missing ctx) scores 0.0 and
        changes neither the answers nor the other passages' scores.

        The scores come from forward hooks on the cross-attentions' q/k(/v) projections
        during the first decoding step; T5's attention code runs unchanged.
        """
        if score_kind not in SCORE_KINDS:
            raise ValueError(f"unknown score_kind {score_kind!r}; expected one of {', '.join(SCORE_KINDS)}")
        encoder_outputs, mask = self.encode_passages(input_ids, attention_mask)  # (B, N·L, d), (B, N·L)
        B, N, L = input_ids.shape
        if score_kind == "xattn_all_tokens":
            generated = self.generate(
                input_ids=input_ids.flatten(1),
                attention_mask=mask,
                encoder_outputs=encoder_outputs,
                max_length=max_length,
                **kwargs,
            )
            token_scores = self._teacher_forced_token_scores(generated, encoder_outputs, mask)
        else:
            capture = _CrossAttentionCapture(self, score_kind, mask)
            with capture:
                generated = self.generate(
                    input_ids=input_ids.flatten(1),
                    attention_mask=mask,
                    encoder_outputs=encoder_outputs,
                    max_length=max_length,
                    **kwargs,
                )
            token_scores = capture.token_scores()
            beams = token_scores.shape[0] // B  # beams of one question start identical
            token_scores = token_scores[::beams]
        return generated, _passage_means(token_scores.reshape(B, N, L), attention_mask)

    def _teacher_forced_token_scores(
        self, generated: torch.Tensor, encoder_outputs: BaseModelOutput, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, N·L) pre-softmax scores averaged over the answer's decoding steps."""
        decoder_input_ids = generated[:, :-1] if generated.shape[1] > 1 else generated  # (B, T)
        targets = generated[:, 1:] if generated.shape[1] > 1 else generated
        is_eos = targets == self.config.eos_token_id
        # Steps that produced an answer token or the first EOS; after it only padding.
        weights = ((is_eos.long().cumsum(dim=1) - is_eos.long()) == 0).float()  # (B, T)
        capture = _CrossAttentionCapture(self, "xattn", mask, step_weights=weights)
        with capture:
            self(
                encoder_outputs=encoder_outputs,
                attention_mask=mask,
                decoder_input_ids=decoder_input_ids,
                use_cache=False,
            )
        return capture.token_scores()

    # -- loading and saving ----------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, logger: logging.Logger | None = None, **from_pretrained_kwargs) -> FiDT5:
        """A FiDT5 from a plain T5 (hub name or directory), a directory saved by this
        code, or a checkpoint saved by the original FiD code (transformers 3.0.2: encoder
        keys under `encoder.encoder.` with `.module.` in the block keys). Logs which kind
        it was and whether the legacy cross-attention bias is on."""
        log = logger or logging.getLogger("fid")
        check_model_path(path, "reader")
        local = Path(path)
        keys = None
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise FileNotFoundError(f"{local}: no config.json, not a T5 / FiD checkpoint directory")
            model_type = _config_model_type(local)
            if model_type is not None and model_type != "t5":  # very old configs may lack model_type
                raise ValueError(f"{local}: config.json is a {model_type} model, not a T5 / FiD reader checkpoint")
            original = _original_fid_state(local)
            if original is not None:
                return cls._from_original_fid(local, original, log)
            try:
                keys = _checkpoint_keys(local)
            except Exception as e:  # a corrupt or truncated weights file: safetensors/torch errors of all kinds
                raise ValueError(f"{local}: cannot read the model weights ({type(e).__name__}: {e})") from e
            if keys is None:
                raise FileNotFoundError(
                    f"{local}: no model weights (model.safetensors or pytorch_model.bin), not a T5 / FiD checkpoint"
                )
        # Train and keep weights in float32 whatever dtype they were saved in (bf16/fp16 come
        # from autocast, --precision); transformers 5 would otherwise keep the saved dtype.
        from_pretrained_kwargs.setdefault("dtype", torch.float32)
        model = cls.from_pretrained(str(path), **from_pretrained_kwargs)
        if model.has_legacy_xattn_bias:
            if keys is not None and LEGACY_XATTN_BIAS_KEY not in keys:
                raise ValueError(
                    f"{local}: config.json sets fid_legacy_xattn_bias but the weights lack {LEGACY_XATTN_BIAS_KEY}"
                )
            log.info("loaded FiD reader from %s: legacy cross-attention bias ON (recorded in its config)", path)
        elif keys is not None and LEGACY_XATTN_BIAS_KEY in keys:
            log.warning(
                "loaded T5 weights from %s: they carry %s, but these are modern T5 weights (no "
                "fid_legacy_xattn_bias in config.json), so the tensor is dropped and the legacy "
                "cross-attention bias is OFF",
                path,
                LEGACY_XATTN_BIAS_KEY,
            )
        else:
            log.info("loaded T5 weights from %s: legacy cross-attention bias off", path)
        return model

    @classmethod
    def _from_original_fid(cls, path: Path, state: dict[str, torch.Tensor], log: logging.Logger) -> FiDT5:
        # A 3.0.2 config.json has no num_decoder_layers / feed_forward_proj /
        # tie_word_embeddings: T5Config's defaults for them (decoder layers = num_layers,
        # relu, tied embeddings with rescaled decoder output) are 3.0.2's architecture.
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
            raise ValueError(f"{path / 'pytorch_model.bin'}: does not match its config.json: {e}") from e
        tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
        missing = [key for key in result.missing_keys if key not in tied]
        if missing or result.unexpected_keys:
            raise ValueError(
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

    def save_plain_t5(self, path: str | Path, logger: logging.Logger | None = None, warn: bool = True) -> None:
        """Save as a plain modern T5 (`T5ForConditionalGeneration` loads it; no FiD
        config fields). Drops the legacy bias if there is one, which changes outputs."""
        config = transformers.T5Config.from_dict(self.config.to_dict())
        for flag in ("fid_legacy_xattn_bias", "fid_legacy_layer_norm"):
            if hasattr(config, flag):
                delattr(config, flag)
        config.architectures = ["T5ForConditionalGeneration"]
        plain = transformers.T5ForConditionalGeneration(config)
        plain.load_state_dict({k: v for k, v in self.state_dict().items() if k != LEGACY_XATTN_BIAS_KEY})
        plain.save_pretrained(path)
        if self.has_legacy_xattn_bias and warn:
            (logger or logging.getLogger("fid")).warning(
                "saved %s as plain T5 without the legacy cross-attention bias: its answers, losses and "
                "scores differ from the original model's (scores by about the mean of the bias table's "
                "bucket 0 over heads; see README)",
                path,
            )


class _CrossAttentionCapture:
    """Forward hooks that turn the decoder's cross-attention at the first call of each
    layer into per-token scores (Bk, N·L), averaged over layers and heads.

    In T5Attention the q projection runs before k, and k before v, so the k hook has
    the query of its layer. With the cache on, k runs once per layer (the first step)
    and later steps touch nothing here; without it, later calls are ignored.
    `step_weights` (Bk, T) averages over T decoder positions (teacher forcing).
    """

    def __init__(self, model: FiDT5, kind: str, mask: torch.Tensor, step_weights: torch.Tensor | None = None):
        self.model, self.kind, self.mask, self.step_weights = model, kind, mask, step_weights
        self.layers = [block.layer[1].EncDecAttention for block in model.decoder.block]
        self.queries: dict[int, torch.Tensor] = {}
        self.probs: dict[int, torch.Tensor] = {}
        self.done: set[int] = set()
        self.total: torch.Tensor | None = None
        self.handles: list = []

    def __enter__(self):
        for i, attention in enumerate(self.layers):
            self.handles.append(attention.q.register_forward_hook(functools.partial(self._on_query, i)))
            self.handles.append(attention.k.register_forward_hook(functools.partial(self._on_key, i)))
            if self.kind == "xattn_value_norm":
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
        query, key = self.queries.pop(i), self._split_heads(output)  # (Bk, H, T, dk), (Bk, H, N·L, dk)
        logits = query @ key.transpose(-1, -2)  # (Bk, H, T, N·L); T5: no 1/√dk
        if self.model.has_legacy_xattn_bias:
            table = self.layers[0].relative_attention_bias
            logits = logits + legacy_xattn_bias(table, logits.shape[2], logits.shape[3]).float()
        if self.kind == "xattn":
            self._add(logits)
            self.done.add(i)
            return
        mask = self.mask.repeat_interleave(logits.shape[0] // self.mask.shape[0], dim=0)  # (Bk, N·L)
        logits = logits.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(logits.dtype).min)
        probs = logits.softmax(dim=-1)
        if self.kind == "xattn_softmax":
            self._add(probs)
            self.done.add(i)
        else:
            self.probs[i] = probs  # weighted by value norms in _on_value

    def _on_value(self, i: int, module, inputs, output) -> None:
        if i in self.done or i not in self.probs:
            return
        value_norms = self._split_heads(output).norm(dim=-1)  # (Bk, H, N·L)
        self._add(self.probs.pop(i) * value_norms[:, :, None, :])
        self.done.add(i)

    def _add(self, per_head: torch.Tensor) -> None:
        """(Bk, H, T, N·L) → mean over heads and (weighted) steps, summed over layers."""
        per_token = per_head.mean(dim=1)  # (Bk, T, N·L)
        if self.step_weights is None:
            per_token = per_token[:, 0]
        else:
            w = self.step_weights.to(per_token)
            per_token = (per_token * w[:, :, None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp(min=1.0)
        self.total = per_token if self.total is None else self.total + per_token

    def token_scores(self) -> torch.Tensor:
        """(Bk, N·L) scores averaged over the decoder layers."""
        if len(self.done) != len(self.layers):
            raise RuntimeError(f"cross-attention scores captured in {len(self.done)} of {len(self.layers)} layers")
        return self.total / len(self.layers)


def _passage_means(token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, N, L) token scores → (B, N) means over each passage's real tokens (0.0 when it has none)."""
    mask = attention_mask.to(token_scores.dtype)
    n_tokens = mask.sum(dim=-1)  # (B, N)
    return ((token_scores * mask).sum(dim=-1) / n_tokens.clamp(min=1.0)).float()


def _modern_t5_key(key: str) -> str:
    """Original FiD key → T5 key: `encoder.encoder.block.3.module.layer…` → `encoder.block.3.layer…`."""
    if key.startswith("encoder.encoder."):
        key = "encoder." + key[len("encoder.encoder.") :]
        key = re.sub(r"^encoder\.block\.(\d+)\.module\.", r"encoder.block.\1.", key)
    return key


def _original_fid_state(path: Path) -> dict[str, torch.Tensor] | None:
    """The state dict of an original FiD checkpoint in `path`, or None if it is not one."""
    weights = path / "pytorch_model.bin"
    if not weights.is_file() or any(path.glob("*.safetensors")):
        return None
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise ValueError(f"{weights}: cannot read the checkpoint ({e})") from e
    return state if any(key.startswith("encoder.encoder.") for key in state) else None


def _checkpoint_keys(path: Path) -> set[str] | None:
    """Parameter names stored in a local checkpoint directory (None if not found)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            return set(json.loads((path / index_name).read_text())["weight_map"])
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return set(f.keys())
    if (path / "pytorch_model.bin").is_file():
        return set(torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True))
    return None


def convert_legacy(src: str | Path, dst: str | Path, legacy_bias: str, logger: logging.Logger | None = None) -> Path:
    """Convert an original FiD checkpoint directory to our format (`keep`: FiDT5 with
    the legacy bias recorded in its config) or to a plain modern T5 (`drop`). The
    destination appears complete or not at all; tokenizer files in `src` are copied."""
    log = logger or logging.getLogger("fid")
    src, dst = Path(src), Path(dst)
    if legacy_bias not in ("keep", "drop"):
        raise ValueError(f"--legacy_bias must be keep or drop, got {legacy_bias!r}")
    if not src.is_dir() or _original_fid_state(src) is None:
        raise ValueError(f"{src}: not an original FiD checkpoint (pytorch_model.bin with encoder.encoder.* keys)")
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new directory")
    model = FiDT5.load(src, logger=log)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        if legacy_bias == "keep" or not model.has_legacy_xattn_bias:
            model.save_pretrained(tmp)
        else:
            model.save_plain_t5(tmp, warn=False)  # the warning below names the destination
        for name in _TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if model.has_legacy_xattn_bias and legacy_bias == "keep":
        log.info("wrote %s: FiDT5 weights with the legacy cross-attention bias (load with FiDT5.load)", dst)
    elif model.has_legacy_xattn_bias:
        log.warning(
            "wrote %s: plain T5 without the legacy bias; it no longer reproduces the original's answers "
            "exactly (fine-tune it, or convert with --legacy_bias keep for the published numbers)",
            dst,
        )
    else:
        log.info("wrote %s: plain T5 (the checkpoint had no legacy bias)", dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.model", description="FiD reader checkpoint tools (no network needed)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert-legacy",
        help="convert a checkpoint saved by the original FiD code (e.g. nq_reader_base)",
        description="Convert a checkpoint saved by the original FiD code (transformers 3.0.2 layout).",
    )
    convert.add_argument("src", help="original checkpoint directory (config.json + pytorch_model.bin)")
    convert.add_argument("dst", help="new directory to write (must not exist)")
    convert.add_argument(
        "--legacy_bias",
        choices=("keep", "drop"),
        default="keep",
        help="keep: FiDT5 format with 3.0.2's cross-attention bias (reproduces the original's answers); "
        "drop: plain modern T5 weights without it (outputs change; default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        convert_legacy(args.src, args.dst, args.legacy_bias)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------
# Retriever
# ---------------------------------------------------------------------------


class RetrieverConfig(transformers.PretrainedConfig):
    """Configuration of the bi-encoder retriever: the encoder's own config plus how
    token states become one vector (paper [2], §3; SPEC §5).

    `encoder` is any BERT-like config (saved inline in config.json, so a saved retriever
    reloads without the original encoder directory). `indexing_dimension` is the size
    of the embeddings that go into the index: the projection's output size, or the
    encoder's hidden size when `projection` is off (kept in sync by `Retriever`).
    """

    model_type = "fid_retriever"
    sub_configs_defaults = {
        "encoder": transformers.configuration_utils.SubConfigSpec(
            config_class=transformers.AutoConfig, model_type="bert"
        )
    }

    encoder: transformers.PretrainedConfig | dict | None = None
    indexing_dimension: int = 768
    apply_question_mask: bool = True
    apply_passage_mask: bool = True
    extract_cls: bool = False
    projection: bool = True


class Retriever(transformers.PreTrainedModel):
    """One encoder shared by questions and passages; score(q, p) = ⟨e_q, e_p⟩ / √d.

    Embedding of a text (B, L) → encoder states (B, L, hidden) → [Linear(hidden → d) +
    LayerNorm, unless `config.projection` is off] → pooling: the first token when
    `extract_cls`, else the mean over tokens (over non-padding tokens when the mask is
    applied) → (B, d).

    Build one with `Retriever.from_encoder("bert-base-uncased", ...)` (or any local
    BERT-like directory), reload a trained one with `Retriever.from_pretrained(dir)`.
    """

    config_class = RetrieverConfig
    # Not an attribute name: no prefix games when loading, the keys are ours as saved.
    base_model_prefix = "retriever"

    def __init__(self, config: RetrieverConfig, encoder: transformers.PreTrainedModel | None = None):
        super().__init__(config)
        # `encoder` lets `from_encoder` hand over pretrained weights without first
        # building (and randomly initialising) a second copy of the encoder.
        self.encoder = encoder if encoder is not None else transformers.AutoModel.from_config(config.encoder)
        config.encoder = self.encoder.config  # one config object, saved inside ours
        # The pooler (BERT's tanh head on [CLS]) is never used: drop it, or DDP finds
        # parameters without gradients and stops.
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        hidden = self.encoder.config.hidden_size
        if config.projection:
            self.proj = nn.Linear(hidden, config.indexing_dimension)
            self.norm = nn.LayerNorm(config.indexing_dimension)
        else:
            config.indexing_dimension = hidden
        self.post_init()

    # -- construction --------------------------------------------------------

    @classmethod
    def from_encoder(
        cls,
        model_name_or_path: str = "bert-base-uncased",
        indexing_dimension: int = 768,
        projection: bool = True,
        extract_cls: bool = False,
        apply_question_mask: bool = True,
        apply_passage_mask: bool = True,
    ) -> Retriever:
        """A fresh retriever around a pretrained encoder (hub name or local directory).

        The projection (if any) starts random; with `projection=False` the embedding
        size is the encoder's hidden size and `indexing_dimension` is ignored.
        """
        encoder_config = transformers.AutoConfig.from_pretrained(model_name_or_path)
        if isinstance(encoder_config, RetrieverConfig):
            raise ValueError(
                f"{model_name_or_path} is a saved retriever, not an encoder: load it with Retriever.from_pretrained "
                "(or --model_path)"
            )
        if getattr(encoder_config, "is_encoder_decoder", False):
            raise ValueError(
                f"{model_name_or_path}: a {encoder_config.model_type} encoder-decoder model, not an encoder "
                "(BERT-like) for the retriever"
            )
        retriever_config = RetrieverConfig(
            encoder=encoder_config,
            indexing_dimension=indexing_dimension if projection else encoder_config.hidden_size,
            projection=projection,
            extract_cls=extract_cls,
            apply_question_mask=apply_question_mask,
            apply_passage_mask=apply_passage_mask,
        )
        # Load the encoder with the (shared) sub-config only now: building the
        # RetrieverConfig resets its attention implementation, loading sets it again.
        encoder = transformers.AutoModel.from_pretrained(
            model_name_or_path, config=retriever_config.encoder, dtype=torch.float32
        )
        return cls(retriever_config, encoder=encoder)

    @classmethod
    def load(cls, opt, model_dir: str | None = None, logger: logging.Logger | None = None):
        """(retriever, tokenizer) from options.

        Weights: `model_dir` if given (e.g. a run's `latest` when resuming), else
        `--model_path` (a saved retriever), else `--model_name_or_path` (a saved
        retriever or any BERT-like encoder; default bert-base-uncased). A new retriever
        takes `--indexing_dimension --no_projection --extract_cls --no_question_mask
        --no_passage_mask` from `opt`; a saved one keeps its own (its trained projection
        included). Tokenizer: `--tokenizer_name_or_path`, else the weights' directory.
        """
        log = logger or logging.getLogger("fid")
        model_path = getattr(opt, "model_path", "none")
        if model_dir is None:
            if model_path not in (None, "", "none"):
                model_dir = model_path
            else:
                model_dir = getattr(opt, "model_name_or_path", None) or "bert-base-uncased"
        model_dir = str(model_dir)
        check_model_path(model_dir, "retriever")
        if os.path.isdir(model_dir) and not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(f"{model_dir}: no config.json, not a retriever or encoder (BERT-like) directory")
        if is_saved_retriever(model_dir):
            retriever = cls.from_pretrained(model_dir, dtype=torch.float32)
            _warn_if_options_differ(retriever.config, opt, model_dir, log)
        else:
            retriever = cls.from_encoder(
                model_dir,
                indexing_dimension=getattr(opt, "indexing_dimension", 768),
                projection=not getattr(opt, "no_projection", False),
                extract_cls=getattr(opt, "extract_cls", False),
                apply_question_mask=not getattr(opt, "no_question_mask", False),
                apply_passage_mask=not getattr(opt, "no_passage_mask", False),
            )
        tokenizer_dir = getattr(opt, "tokenizer_name_or_path", None) or model_dir
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        c = retriever.config
        log.info(
            "retriever from %s (tokenizer %s): dim %d, projection %s, pooling %s, question mask %s, passage mask %s",
            model_dir,
            tokenizer_dir,
            c.indexing_dimension,
            c.projection,
            "cls" if c.extract_cls else "mean",
            c.apply_question_mask,
            c.apply_passage_mask,
        )
        return retriever, tokenizer

    # -- embeddings ------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.config.indexing_dimension

    def embed_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, apply_mask: bool = True, extract_cls: bool = False
    ) -> torch.Tensor:
        """(B, L) token ids → (B, d) embeddings.

        `apply_mask=False` is the original's `--no_*_mask`: the encoder then attends to
        padding as well and the mean runs over all L positions.
        """
        states = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask if apply_mask else None
        ).last_hidden_state  # (B, L, hidden)
        if extract_cls:
            # Projection and LayerNorm act per token: pooling first gives the same vector.
            return self._project(states[:, 0])  # (B, d)
        states = self._project(states)  # (B, L, d)
        if not apply_mask:
            return states.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
        # clamp: an all-padding row (a missing passage) gives 0, not NaN.
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, d)

    def _project(self, states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(states)) if self.config.projection else states

    def embed_questions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, Lq) → (B, d), with the question-side flags of the config."""
        return self.embed_text(input_ids, attention_mask, self.config.apply_question_mask, self.config.extract_cls)

    def embed_passages(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, Lp) → (B, d), with the passage-side flags of the config (what the index holds)."""
        return self.embed_text(input_ids, attention_mask, self.config.apply_passage_mask, self.config.extract_cls)

    # -- scores and loss ---------------------------------------------------------

    def forward(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        passage_ids: torch.Tensor,
        passage_mask: torch.Tensor,
        gold_scores: torch.Tensor | None = None,
        temperature_gold: float = 1.0,
        temperature_score: float = 1.0,
        in_batch_negatives: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (B, N) of each question's N passages, and the distillation loss when
        `gold_scores` (B, N) are given.

        question_ids/mask: (B, Lq); passage_ids/mask: (B, N, Lp). A passage whose mask
        is all zeros (fewer ctxs than N) gets score −inf: no weight in any softmax.
        `in_batch_negatives`: the other questions' passages in the batch join each
        question's softmax with gold probability 0 (see `distillation_loss`).
        """
        B, N, Lp = passage_ids.shape
        question = self.embed_questions(question_ids, question_mask)  # (B, d)
        passages = self.embed_passages(passage_ids.reshape(B * N, Lp), passage_mask.reshape(B * N, Lp))  # (B·N, d)
        # Every question against every passage of the batch; its own are the diagonal blocks.
        all_scores = (question @ passages.T).float() / math.sqrt(question.size(-1))  # (B, B·N)
        missing = passage_mask.reshape(B * N, Lp).sum(-1) == 0  # (B·N,)
        all_scores = all_scores.masked_fill(missing, -math.inf)
        own = torch.arange(B, device=all_scores.device)
        scores = all_scores.view(B, B, N)[own, own]  # (B, N)
        loss = None
        if gold_scores is not None:
            negatives = None
            if in_batch_negatives:
                negatives = all_scores.masked_fill(_own_or_copy(passage_ids, passage_mask), -math.inf)
            loss = distillation_loss(scores, gold_scores, temperature_gold, temperature_score, negatives)
        return scores, loss


def _own_or_copy(passage_ids: torch.Tensor, passage_mask: torch.Tensor) -> torch.Tensor:
    """(B, B·N) mask of the batch's passages that may not serve as question b's in-batch
    negatives: its own, and copies of its own in other questions' lists (the same passage
    retrieved for two questions is not a negative of either)."""
    B, N, Lp = passage_ids.shape
    flat = (passage_ids * passage_mask).reshape(B * N, Lp)
    _, passage_class = torch.unique(flat, dim=0, return_inverse=True)  # (B·N,) equal text, equal class
    own_class = passage_class.view(B, N)  # (B, N)
    return (own_class.unsqueeze(-1) == passage_class.view(1, 1, B * N)).any(dim=1)  # (B, B·N)


def distillation_loss(
    scores: torch.Tensor,
    gold_scores: torch.Tensor,
    temperature_gold: float = 1.0,
    temperature_score: float = 1.0,
    negative_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(softmax(gold/T_gold) ‖ softmax(scores/T_score)) over each question's passages,
    averaged over questions (paper [2], eq. 3).

    scores, gold_scores: (B, N). Entries that are −inf in either (missing passages)
    take no part. Note the original averaged over all B·N entries (KLDivLoss's "mean"),
    i.e. its loss is this one divided by N.

    negative_scores: (B, M), optional. Scores of extra passages with gold probability 0
    (in-batch negatives; −inf entries take no part): they join the student's softmax
    only, so the KL pushes them down. Not in the papers, where a question's own ctxs are
    all the retriever sees (an extension, `--in_batch_negatives`).
    """
    scores, gold_scores = scores.float(), gold_scores.float().to(scores.device)
    valid = torch.isfinite(gold_scores) & torch.isfinite(scores)  # (B, N)
    neg_inf = torch.tensor(-math.inf, device=scores.device)
    # Fill with −inf before the softmax, then 0 in the log-probabilities, so that
    # 0·log 0 never turns into NaN in the forward or the backward pass.
    log_p = torch.log_softmax(torch.where(valid, gold_scores / temperature_gold, neg_inf), dim=-1)
    student = torch.where(valid, scores / temperature_score, neg_inf)  # (B, N)
    if negative_scores is not None:
        student = torch.cat([student, negative_scores.float() / temperature_score], dim=-1)  # (B, N + M)
    log_q = torch.log_softmax(student, dim=-1)[:, : scores.size(-1)]  # (B, N)
    log_p, log_q = log_p.masked_fill(~valid, 0.0), log_q.masked_fill(~valid, 0.0)
    kl = (log_p.exp() * valid * (log_p - log_q)).sum(dim=-1)  # (B,)
    return kl.mean()


def _config_model_type(path: str | Path) -> str | None:
    """`model_type` of a model directory's config.json (None if absent or unreadable)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def is_saved_retriever(path: str | Path) -> bool:
    """Whether `path` is a directory written by `Retriever.save_pretrained`."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text()).get("model_type") == RetrieverConfig.model_type
    except (OSError, json.JSONDecodeError):
        return False


def _warn_if_options_differ(config: RetrieverConfig, opt, model_dir: str, log: logging.Logger) -> None:
    """A saved retriever keeps the embedding it was trained with; say so when a flag set
    on the command line asks for another one."""
    defaults = getattr(opt, "_defaults", {})
    flags = {  # flag: (config field, value the flag asks for)
        "no_projection": ("projection", lambda v: not v),
        "indexing_dimension": ("indexing_dimension", lambda v: v),
        "extract_cls": ("extract_cls", lambda v: v),
        "no_question_mask": ("apply_question_mask", lambda v: not v),
        "no_passage_mask": ("apply_passage_mask", lambda v: not v),
    }
    for flag, (field, asked) in flags.items():
        if flag not in defaults or getattr(opt, flag) == defaults[flag]:
            continue  # not set by the user
        if getattr(config, field) != asked(getattr(opt, flag)):
            trained = getattr(config, field)
            log.warning("%s was trained with %s=%s: keeping it and ignoring --%s", model_dir, field, trained, flag)


transformers.AutoConfig.register(RetrieverConfig.model_type, RetrieverConfig, exist_ok=True)
transformers.AutoModel.register(RetrieverConfig, Retriever, exist_ok=True)


if __name__ == "__main__":  # python -m src.model convert-legacy SRC DST (reader section's `main`)
    sys.exit(main())
