"""What the training loop is told: typed settings built once from the command line
(`src/options.py`), so the loop never reads the argparse namespace."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule of the original FiD (`--optim --lr --scheduler ...`)."""

    optim: str = "adam"  # adam | adamw
    lr: float = 1e-4
    weight_decay: float = 0.1  # adamw only
    scheduler: str = "fixed"  # fixed | linear
    warmup_steps: int = 1000
    scheduler_steps: int | None = None  # None: total_steps
    fixed_lr: bool = False  # linear: flat after warmup
    total_steps: int = 1000


@dataclass(frozen=True)
class TrainConfig:
    """The loop's cadence and batch shape. A step is one batch; the optimizer steps every
    `accumulation_steps` batches."""

    total_steps: int = 1000
    per_gpu_batch_size: int = 1
    accumulation_steps: int = 1
    clip: float = 1.0  # max global gradient norm; <= 0: no clipping
    eval_freq: int = 500
    save_freq: int = 5000
    seed: int = 0
    num_workers: int = 0
    precision: str = "fp32"  # autocast dtype: fp32 | bf16 | fp16
    optim: OptimConfig = field(default_factory=OptimConfig)
    train_data: str = "none"  # named in errors
    options: Mapping[str, Any] = field(default_factory=dict)  # every flag as plain data, saved with checkpoints
