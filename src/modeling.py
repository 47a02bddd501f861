"""What every model of ours shares: local-path checks, dropout, parameter counts."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from src.errors import ModelPathError


def check_model_path(path: str | Path, what: str = "model") -> None:
    """A path that is clearly local (./x, ../x, /x, a/b/c) must exist; hub names (t5-base,
    org/name) go to transformers. Without this a typo reads as a failed hub download."""
    text = str(path)
    local = (
        text.startswith((".", "/", "~"))
        or text.count("/") > 1  # hub names are "name" or "org/name"
        or ("/" in text and os.path.isdir(text.split("/")[0]))  # an existing local parent
    )
    if local and not os.path.exists(os.path.expanduser(text)):
        raise ModelPathError(f"{what} {text}: no such directory")


@contextlib.contextmanager
def loading(path: str | Path, what: str) -> Iterator[None]:
    """Around a transformers `from_pretrained` of a path the user gave: its OSError (a hub
    name it cannot find or download, a typo, an unreadable or invalid file in the
    directory) becomes a ModelPathError naming `what` and the path."""
    try:
        yield
    except OSError as e:
        raise ModelPathError(f"{what} {path}: cannot be loaded ({e})") from e


# Config fields that hold a dropout probability, across the encoders we load (T5, BERT-likes).
DROPOUT_CONFIG_KEYS = (
    "dropout_rate",  # T5: hidden, feed-forward and attention probabilities
    "hidden_dropout_prob",  # BERT: embeddings, hidden and feed-forward
    "attention_probs_dropout_prob",  # BERT: attention probabilities
    "attention_dropout",  # DistilBERT, BART-likes
    "dropout",  # DistilBERT, BART-likes
)

# Module attributes that hold the attention-probability dropout as a float, not as an
# nn.Dropout (transformers 5's T5Attention reads `config.dropout_rate` once, at build time).
DROPOUT_FLOAT_ATTRIBUTES = ("dropout", "attention_dropout", "dropout_p")


def set_dropout(model, p: float) -> None:
    """--dropout p for every dropout of the model: each nn.Dropout, each attention module's
    float dropout probability, and the config (so that a saved and reloaded or resumed
    model has exactly the same dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
            continue
        for name in DROPOUT_FLOAT_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, p)
    for config in (model.config, getattr(model.config, "encoder", None)):
        for key in DROPOUT_CONFIG_KEYS:
            value = getattr(config, key, None) if config is not None else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(config, key, p)


def dropout_rates(model) -> set[float]:
    """Every dropout probability the model applies in training (nn.Dropout and float attributes)."""
    rates = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            rates.add(module.p)
            continue
        for name in DROPOUT_FLOAT_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, float) and not isinstance(value, bool):
                rates.add(value)
    return rates


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def config_model_type(path: str | Path) -> str | None:
    """`model_type` of a model directory's config.json (None if absent or unreadable)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


# A --fsdp checkpoint keeps its model and optimizer shards (torch.distributed.checkpoint) here.
SHARDED_DIR = "sharded"


def has_sharded_weights(path: str | Path) -> bool:
    """True for a checkpoint directory whose weights are only in shards (a --fsdp `latest`)."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def has_weights(path: str | Path) -> bool:
    """True for a directory holding save_pretrained weights (one file or an index of shards)."""
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return any((Path(path) / name).is_file() for name in names)
