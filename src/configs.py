"""Typed configs from the command line: the one place where flags become the small
dataclasses that `src` code takes (src/train/config.py, src/reader/task.py, ...)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

from src.options import options_dict
from src.train.config import OptimConfig, TrainConfig

T = TypeVar("T")


def config_from(cls: type[T], opt: argparse.Namespace, **overrides: Any) -> T:
    """A dataclass `cls` whose fields take the values of the flags of the same names (a field
    without a flag keeps its default; `overrides` win)."""
    values = {f.name: getattr(opt, f.name) for f in dataclasses.fields(cls) if hasattr(opt, f.name)}
    return cls(**{**values, **overrides})


def train_config(opt: argparse.Namespace) -> TrainConfig:
    return config_from(TrainConfig, opt, optim=config_from(OptimConfig, opt), options=options_dict(opt))
