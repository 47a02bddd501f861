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
from src.modeling import check_model_path, config_model_type, has_sharded_weights, loading
from src.reader import legacy, precision
from src.reader import packing as packing_module
from src.reader.packing import EncodedPassages

# config.json's model_type → what it is; the FiD class of each is in FAMILIES (end of file).
SUPPORTED = {
    "t5": "T5 (original, v1.1, LM-adapted, Flan-T5)",
    "mt5": "mT5",
    "umt5": "UMT5",
}


def unsupported(where: str, model_type: str | None) -> ModelPathError:
    kinds = ", ".join(f"{name} ({what})" for name, what in SUPPORTED.items())
    return ModelPathError(f"{where}: config.json is a {model_type} model; a FiD reader is one of model_type {kinds}")


@dataclass(frozen=True)
class ReaderVariant:
    """How a saved reader computes: fields of its config.json, read here and nowhere else
    (loading, the scorers and packing ask the model's `variant`).

    The family is the config's model_type. T5 v1.1 / LM-adapted / Flan-T5 are `t5` with
    gated-GELU feed-forward (transformers reads `feed_forward_proj`) and an output embedding
    of their own, without T5's d_model^-0.5 rescaling of the decoder output (transformers
    records `tie_word_embeddings: false` as `scale_decoder_outputs`); every mT5 and UMT5
    has its own output embedding; UMT5 has a relative position table in every layer.
    """

    family: str = "t5"  # config.model_type: t5 | mt5 | umt5
    untied_lm_head: bool = False  # lm_head is its own matrix, not the input embedding
    legacy_xattn_bias: bool = False  # fid_legacy_xattn_bias: 3.0.2's cross-attention position bias
    legacy_layer_norm: bool = False  # fid_legacy_layer_norm: 3.0.2's RMS-norm arithmetic

    @classmethod
    def of(cls, config: transformers.PretrainedConfig) -> ReaderVariant:
        family = config.model_type
        if family not in SUPPORTED:
            raise unsupported(type(config).__name__, family)
        return cls(
            family=family,
            # transformers 5 forces tie_word_embeddings=True in T5-family configs; for t5 and
            # umt5 the saved `tie_word_embeddings: false` survives as scale_decoder_outputs.
            untied_lm_head=family == "mt5" or not getattr(config, "scale_decoder_outputs", True),
            legacy_xattn_bias=bool(getattr(config, "fid_legacy_xattn_bias", False)),
            legacy_layer_norm=bool(getattr(config, "fid_legacy_layer_norm", False)),
        )


class FiDReader:
    """Fusion-in-Decoder on a T5-family encoder-decoder (paper [1], §3): each passage is
    encoded on its own, the decoder attends over all of them at once. A mixin: FiDT5,
    FiDMT5 and FiDUMT5 (end of file) put it before transformers' own class of their family,
    whose code runs unchanged.

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

    def __init__(self, config: transformers.PretrainedConfig, packing: bool = True):
        variant = ReaderVariant.of(config)
        super().__init__(config)
        self.packing = packing  # a run-time choice (--no_packing), not saved with the model
        # Sharded training (--fsdp) needs the same module calls on every rank: one encoder
        # call per forward (a single length bucket) instead of one per bucket.
        self.max_buckets = packing_module.MAX_BUCKETS
        self.variant = variant
        self.untie_lm_head()
        precision.keep_wo_in_float32(self)  # fp16 autocast would overflow T5's feed-forward output
        if self.variant.legacy_xattn_bias:
            legacy.enable_legacy_xattn_bias(self)
        if self.variant.legacy_layer_norm:
            legacy.enable_legacy_layer_norm(self)

    @property
    def has_legacy_xattn_bias(self) -> bool:
        return self.variant.legacy_xattn_bias

    def untie_lm_head(self) -> None:
        """T5 v1.1 / Flan-T5 / mT5 / UMT5 learn their own output embedding. transformers 5
        ties it to the input embedding whenever the two are equal (a model built from a
        config): give lm_head its own copy, so that training updates them separately."""
        if self.variant.untied_lm_head and self.lm_head.weight is self.shared.weight:
            self.lm_head.weight = torch.nn.Parameter(self.shared.weight.detach().clone())

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
        lengths = packing_module.lengths_if_packable(attention_mask) if self.packing else None
        if lengths is not None:
            # The legacy bias sees each key's position in the N·L sequence: keep that layout.
            return packing_module.encode_in_buckets(
                self.encoder,
                input_ids,
                attention_mask,
                packed=not self.has_legacy_xattn_bias,
                lengths=lengths,
                buckets=self.max_buckets,
            )
        return packing_module.encode_padded(self.encoder, input_ids, attention_mask)

    def encode_passages(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[BaseModelOutput, packing_module.PassageLayout]:
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
        # transformers turns synced_gpus on for FSDP modules (each step waits for every rank);
        # evaluation under --fsdp gathers every unit first (src/train/fsdp.py), so ranks
        # generate on their own.
        kwargs.setdefault("synced_gpus", False)
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
    def load(cls, path: str | Path, logger: logging.Logger | None = None, packing: bool = True, **kwargs):
        """The FiD reader of the checkpoint's own family, whatever class it is called on
        (`FiDT5.load(an_mt5)` gives a FiDMT5): see `load_reader_model`."""
        return load_reader_model(path, logger=logger, packing=packing, **kwargs)

    def save_plain_t5(self, path: str | Path, logger: logging.Logger | None = None, warn: bool = True) -> None:
        """Save as a plain modern T5 (`T5ForConditionalGeneration` loads it; no FiD
        config fields). Drops the legacy bias if there is one, which changes outputs."""
        legacy.plain_t5(self).save_pretrained(path)
        if self.variant.family != "t5":
            raise ValueError(f"save_plain_t5 is for T5 readers; this one is {self.variant.family}")
        if self.has_legacy_xattn_bias and warn:
            (logger or logging.getLogger("fid")).warning(
                "saved %s as plain T5 without the legacy cross-attention bias: its answers, losses and "
                "scores differ from the original model's (scores by about the mean of the bias table's "
                "bucket 0 over heads; see docs/parity.md)",
                path,
            )


class FiDT5(FiDReader, transformers.T5ForConditionalGeneration):
    """FiD on T5: the original, v1.1, LM-adapted and Flan-T5 (model_type t5)."""


class FiDMT5(FiDReader, transformers.MT5ForConditionalGeneration):
    """FiD on mT5 (model_type mt5): T5 v1.1's architecture with a multilingual vocabulary."""


class FiDUMT5(FiDReader, transformers.UMT5ForConditionalGeneration):
    """FiD on UMT5 (model_type umt5): every layer has its own relative position table. Its
    self-attention biases depend only on distances within one sequence (each passage is
    encoded alone, right-padded, so bucketing changes nothing) and its cross-attention has
    none, so the packed key layout is exact."""


FAMILIES: dict[str, type[FiDReader]] = {"t5": FiDT5, "mt5": FiDMT5, "umt5": FiDUMT5}


def reader_family(path: str | Path) -> str:
    """The model_type of a checkpoint (directory or hub name), checked to be a FiD family.
    Very old T5 configs lack model_type: t5."""
    local = Path(path)
    if local.is_dir():
        model_type = config_model_type(local) or "t5"
    else:
        with loading(path, "reader"):  # a hub name that does not resolve: a bad model path
            model_type = transformers.AutoConfig.from_pretrained(str(path)).model_type
    if model_type not in FAMILIES:
        raise unsupported(str(path), model_type)
    return model_type


def load_reader_model(
    path: str | Path, logger: logging.Logger | None = None, packing: bool = True, **from_pretrained_kwargs
) -> FiDReader:
    """A FiD reader of the checkpoint's family (FiDT5 / FiDMT5 / FiDUMT5) from a plain model
    (hub name or directory), a directory saved by this code, or a checkpoint saved by the
    original FiD code (transformers 3.0.2: encoder keys under `encoder.encoder.` with
    `.module.` in the block keys). A directory whose weights are sharded (a `--fsdp`
    `latest`) gives the architecture only: the training strategy loads the shards. Logs
    which kind it was and whether the legacy cross-attention bias is on."""
    log = logger or logging.getLogger("fid")
    check_model_path(path, "reader")
    local = Path(path)
    keys = None
    if local.is_dir() and not (local / "config.json").is_file():
        raise ModelPathError(f"{local}: no config.json, not a T5 / FiD checkpoint directory")
    family = reader_family(path)
    cls = FAMILIES[family]
    if local.is_dir():
        original = legacy.original_fid_state(local) if family == "t5" else None
        if original is not None:
            model = legacy.load_original_fid(cls, local, original, log)
            model.packing = packing
            return model
        try:
            keys = legacy.checkpoint_keys(local)
        except Exception as e:  # a corrupt or truncated weights file: safetensors/torch errors of all kinds
            raise ModelPathError(f"{local}: cannot read the model weights ({type(e).__name__}: {e})") from e
        if keys is None and has_sharded_weights(local):
            with loading(path, "reader"):
                config = transformers.AutoConfig.from_pretrained(str(local))
            log.info(
                "%s: sharded weights (--fsdp); the %s architecture is built here, the shards load later", path, family
            )
            return cls(config, packing=packing)
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
    model.untie_lm_head()  # equal saved matrices are tied again by from_pretrained
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
        lm_head = "own output embedding" if model.variant.untied_lm_head else "tied output embedding"
        log.info("loaded %s weights from %s (%s): legacy cross-attention bias off", family, path, lm_head)
    return model
