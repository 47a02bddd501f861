"""The FiD reader: a T5 whose encoder reads each passage on its own and whose decoder
attends over all of them at once (paper [1]). Passage scores from its cross-attention
live in scores.py; original-checkpoint compatibility in legacy.py."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from src.errors import ModelPathError
from src.modeling import check_model_path, config_model_type, loading
from src.reader import legacy, packing, precision
from src.reader.packing import EncodedPassages


@dataclass(frozen=True)
class ReaderVariant:
    """How a saved reader computes beyond plain T5: fields of its config.json, read here and
    nowhere else (the scorers and packing ask the model's `variant`)."""

    legacy_xattn_bias: bool = False  # fid_legacy_xattn_bias: 3.0.2's cross-attention position bias
    legacy_layer_norm: bool = False  # fid_legacy_layer_norm: 3.0.2's RMS-norm arithmetic

    @classmethod
    def of(cls, config: transformers.PretrainedConfig) -> ReaderVariant:
        return cls(
            legacy_xattn_bias=bool(getattr(config, "fid_legacy_xattn_bias", False)),
            legacy_layer_norm=bool(getattr(config, "fid_legacy_layer_norm", False)),
        )


class FiDT5(transformers.T5ForConditionalGeneration):
    """Fusion-in-Decoder on a T5 (paper [1], §3): each passage is encoded on its own, the
    decoder attends over all of them at once.

    Inputs are (B, N, L): B questions × N passages × L tokens. The encoder reads each of
    the B·N passages on its own; their states are concatenated per question into
    (B, S, d) and the decoder cross-attends over them with the matching (B, S) mask. On
    the original path S = N·L (every padding position included); with `packing` (the
    default, packing.py) S is the batch's longest question in real tokens. Parameter names are T5's,
    so `FiDT5.from_pretrained(any_t5)` works and the weights are plain T5 weights.

    Two config flags, set when loading an original FiD checkpoint and saved with the
    model, reproduce how transformers 3.0.2 (the original's version) computed:
    `fid_legacy_xattn_bias` adds 3.0.2's extra cross-attention position bias, which the
    released FiD readers were trained and evaluated with (it changes answers), and
    `fid_legacy_layer_norm` uses 3.0.2's order of operations in the RMS norms (float32
    rounding only). See `FiDT5.load`.
    """

    def __init__(self, config: transformers.T5Config, packing: bool = True):
        super().__init__(config)
        self.packing = packing  # a run-time choice (--no_packing), not saved with the model
        self.variant = ReaderVariant.of(config)
        precision.keep_wo_in_float32(self)  # fp16 autocast would overflow T5's feed-forward output
        if self.variant.legacy_xattn_bias:
            legacy.enable_legacy_xattn_bias(self)
        if self.variant.legacy_layer_norm:
            legacy.enable_legacy_layer_norm(self)

    @property
    def has_legacy_xattn_bias(self) -> bool:
        return self.variant.legacy_xattn_bias

    # -- encoder ---------------------------------------------------------------

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncodedPassages:
        """The encoder over (B, N, L) passages. With `packing` (the default; docs/speed.md)
        the passages are encoded in length buckets and the decoder reads real tokens only;
        `packing = False` (`--no_packing`) is the original path, every position encoded."""
        if input_ids.dim() != 3:
            raise ValueError(f"FiDT5 expects passages as (B, N, L) token ids, got shape {tuple(input_ids.shape)}")
        if attention_mask is None or attention_mask.shape != input_ids.shape:
            raise ValueError(
                "FiDT5 needs the passages' attention_mask with the shape of input_ids (B, N, L); "
                f"got {None if attention_mask is None else tuple(attention_mask.shape)}"
            )
        lengths = packing.lengths_if_packable(attention_mask) if self.packing else None
        if lengths is not None:
            # The legacy bias sees each key's position in the N·L sequence: keep that layout.
            return packing.encode_in_buckets(
                self.encoder, input_ids, attention_mask, packed=not self.has_legacy_xattn_bias, lengths=lengths
            )
        return packing.encode_padded(self.encoder, input_ids, attention_mask)

    def encode_passages(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[BaseModelOutput, packing.PassageLayout]:
        """(B, N, L) ids and mask → encoder states (B, S, d) for the decoder and their layout
        (`layout.mask` (B, S) is the decoder's mask). S = N·L on the original path, the
        longest question's real tokens with packing."""
        return self.encode(input_ids, attention_mask).fused()

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
        cross-entropy). Inside `generate` the encoder states come precomputed with their
        (B, S) mask; 2-D `input_ids` without them are one passage per question
        (plain T5)."""
        if encoder_outputs is None and input_ids is not None and input_ids.dim() == 3:
            encoder_outputs, layout = self.encode_passages(input_ids, attention_mask)
            input_ids, attention_mask = None, layout.mask
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
        the encoder runs here and generation gets its states with their (B, S) mask.
        """
        if input_ids is not None and input_ids.dim() == 3:
            kwargs["encoder_outputs"], layout = self.encode_passages(input_ids, attention_mask)
            attention_mask = layout.mask
            input_ids = None  # generate takes the batch size from the encoder states
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

    # -- loading and saving ----------------------------------------------------

    @classmethod
    def load(
        cls, path: str | Path, logger: logging.Logger | None = None, packing: bool = True, **from_pretrained_kwargs
    ) -> FiDT5:
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
                raise ModelPathError(f"{local}: no config.json, not a T5 / FiD checkpoint directory")
            model_type = config_model_type(local)
            if model_type is not None and model_type != "t5":  # very old configs may lack model_type
                raise ModelPathError(f"{local}: config.json is a {model_type} model, not a T5 / FiD reader checkpoint")
            original = legacy.original_fid_state(local)
            if original is not None:
                model = legacy.load_original_fid(cls, local, original, log)
                model.packing = packing
                return model
            try:
                keys = legacy.checkpoint_keys(local)
            except Exception as e:  # a corrupt or truncated weights file: safetensors/torch errors of all kinds
                raise ModelPathError(f"{local}: cannot read the model weights ({type(e).__name__}: {e})") from e
            if keys is None:
                raise ModelPathError(
                    f"{local}: no model weights (model.safetensors or pytorch_model.bin), not a T5 / FiD checkpoint"
                )
        # Train and keep weights in float32 whatever dtype they were saved in (bf16/fp16 come
        # from autocast, --precision); transformers 5 would otherwise keep the saved dtype.
        from_pretrained_kwargs.setdefault("dtype", torch.float32)
        with loading(path, "reader"):
            model = cls.from_pretrained(str(path), **from_pretrained_kwargs)
        model.packing = packing
        if model.has_legacy_xattn_bias:
            if keys is not None and legacy.LEGACY_XATTN_BIAS_KEY not in keys:
                raise ModelPathError(
                    f"{local}: config.json sets fid_legacy_xattn_bias but the weights lack {legacy.LEGACY_XATTN_BIAS_KEY}"
                )
            log.info("loaded FiD reader from %s: legacy cross-attention bias ON (recorded in its config)", path)
        elif keys is not None and legacy.LEGACY_XATTN_BIAS_KEY in keys:
            log.warning(
                "loaded T5 weights from %s: they carry %s, but these are modern T5 weights (no "
                "fid_legacy_xattn_bias in config.json), so the tensor is dropped and the legacy "
                "cross-attention bias is OFF",
                path,
                legacy.LEGACY_XATTN_BIAS_KEY,
            )
        else:
            log.info("loaded T5 weights from %s: legacy cross-attention bias off", path)
        return model

    def save_plain_t5(self, path: str | Path, logger: logging.Logger | None = None, warn: bool = True) -> None:
        """Save as a plain modern T5 (`T5ForConditionalGeneration` loads it; no FiD
        config fields). Drops the legacy bias if there is one, which changes outputs."""
        legacy.plain_t5(self).save_pretrained(path)
        if self.has_legacy_xattn_bias and warn:
            (logger or logging.getLogger("fid")).warning(
                "saved %s as plain T5 without the legacy cross-attention bias: its answers, losses and "
                "scores differ from the original model's (scores by about the mean of the bias table's "
                "bucket 0 over heads; see docs/parity.md)",
                path,
            )
