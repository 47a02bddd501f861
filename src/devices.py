"""Device and mixed precision: `--device`, `--precision fp32|bf16|fp16` (and the corpus
scripts' `--no_fp16`, the original's spelling of fp32), the same in every script."""

from __future__ import annotations

import contextlib

import torch


def default_device(device: str | None = None) -> torch.device:
    """`--device` if given, else CUDA when available, else CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast(opt) -> contextlib.AbstractContextManager:
    """Mixed precision from `--precision` on the run's device; fp32 is a no-op."""
    precision = getattr(opt, "precision", "fp32")
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(getattr(opt, "device", "cpu")).type
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)
