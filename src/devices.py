"""Device and mixed precision: `--device`, `--precision fp32|bf16|fp16` (and the corpus
scripts' `--no_fp16`, the original's spelling of `--precision fp32`), the same in every script.

`--precision` is the dtype of torch.autocast around the model's forward passes on the
script's device (fp32: no autocast); weights stay float32 and outputs are read as float32.
Its default is fp32 in the training and test scripts and, in the corpus scripts
(generate_passage_embeddings.py, passage_retrieval.py), None: the original's fp16 on GPU,
fp32 on CPU, which `resolve_precision` turns into one of the three.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`--device` if given, else CUDA when available, else CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_precision(precision: str | None, device: str | torch.device | None = None) -> str:
    """`--precision` on `device`: as given, or for None (the corpus scripts' default) the
    original's behaviour, fp16 on GPU and fp32 on CPU."""
    if precision is None:
        return "fp16" if default_device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def precision_autocast(precision: str | None, device: str | torch.device | None = None):
    """torch.autocast for `precision` (resolved on `device`); fp32 is a no-op."""
    device = default_device(device)
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])
