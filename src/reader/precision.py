"""T5 under fp16 autocast: the feed-forward output projection `wo` in float32.

transformers keeps `wo` in float32 only when *loading* in fp16 (`_keep_in_fp32_modules`
= ["wo"], for t5-large, T5 v1.1 and Flan-T5, whose feed-forward outputs exceed fp16's
65504; huggingface/transformers#20287). We keep float32 weights and run under
torch.autocast (`--precision`), which computes every Linear in fp16 whatever its weight's
dtype: `wo`'s output then overflows to inf, the fp32 residual stream never triggers T5's
own fp16 clamps, and the loss becomes NaN. `keep_wo_in_float32` makes every `wo` of the
T5 feed-forward blocks (T5DenseActDense and T5DenseGatedActDense alike) compute in
float32 with autocast off. Outside fp16 autocast it computes exactly as before; the saved
weights are unchanged (the modules change class, not parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.t5 import modeling_t5


class Float32Linear(nn.Linear):
    """A Linear that computes in float32 under fp16 autocast (its input is cast up, its
    output is float32). Other autocast dtypes (bf16, whose range is float32's) and no
    autocast: nn.Linear's computation, unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if not (torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16):
            return super().forward(x)
        with torch.autocast(device_type=device_type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


FEED_FORWARD = (modeling_t5.T5DenseActDense, modeling_t5.T5DenseGatedActDense)


def keep_wo_in_float32(model: nn.Module) -> int:
    """Every T5 feed-forward `wo` of `model` computes in float32 under fp16 autocast (in
    place); returns how many. Call once after loading, before wrapping (DDP/FSDP)."""
    count = 0
    for module in model.modules():
        if isinstance(module, FEED_FORWARD) and type(module.wo) is nn.Linear:
            module.wo.__class__ = Float32Linear
            count += 1
    return count
