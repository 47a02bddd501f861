"""Passages without padding waste: an exact speed-up of the FiD reader (docs/speed.md).

Users run `--text_maxlength` 200–250 while real passages (question + title + text) are
~150–190 tokens, and with 100 passages per question the longest one is nearly always
close to the maximum, so padding "to the longest in the batch" saves nothing. Two
changes remove the padding and change no output beyond float rounding:

- the encoder reads each passage on its own, so the B·N passages of a batch are encoded
  in length buckets (sorted by length, each bucket padded only to its own longest) and
  only their real tokens are kept (`encode_in_buckets`);
- the decoder's cross-attention is over each question's real tokens only, concatenated
  in passage order and padded to the batch's longest question (`EncodedPassages.fused`);
  attention to a masked key is exactly zero, so the order and padding of keys do not
  change the decoder. `PassageLayout` maps per-position scores back to passages.

Original checkpoints with the legacy 3.0.2 cross-attention bias see the absolute
position of each key in the N·L sequence, so their decoder keeps the padded layout
(`packed=False`); their encoder is bucketed all the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput

MAX_BUCKETS = 8  # more buckets waste less padding but make smaller encoder calls
BUCKET_SLACK = 1 / 8  # a bucket takes passages down to 7/8 of its longest: ≤ 12.5% padding each
# A bucket holds at least this many (padded) tokens, whatever its slack: smaller encoder
# calls leave threads (a GPU's SMs) idle and cost more than the padding they save
# (bench/bench_packing.py; README "Speed").
MIN_BUCKET_TOKENS = 2048
# Bucket widths and the decoder's key length rounded up to a multiple of 16: tensor-core
# friendly, and SDPA pads an additive attention bias whose last dimension is not a
# multiple of 16 by copying it, in every layer.
ALIGN = 16


def _round_up(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


def lengths_if_packable(attention_mask: torch.Tensor) -> list[int] | None:
    """The B·N passage lengths (real tokens) on the host when every passage's real tokens come
    first (right padding, as our collator writes) and every question has at least one real
    token: the cases where the packed path is exact; else None (the padded path). One
    device-to-host read: the bucket sizes need the lengths on the host anyway."""
    B, N, L = attention_mask.shape
    lengths = attention_mask.sum(-1)  # (B, N)
    prefix = torch.arange(L, device=attention_mask.device) < lengths[..., None]
    ok = (attention_mask.bool() == prefix).all() & (lengths.sum(1) > 0).all()
    values = torch.cat([ok.reshape(1).to(lengths.dtype), lengths.reshape(-1)]).tolist()
    return values[1:] if values[0] else None


def packable(attention_mask: torch.Tensor) -> bool:
    return lengths_if_packable(attention_mask) is not None


@dataclass
class PassageLayout:
    """Where each passage's tokens sit in the decoder's key sequence of S positions.

    mask (B, S): 1 at real tokens. passage (B, S): the index n < N of the passage a
    position belongs to, N at padding.
    """

    mask: torch.Tensor
    passage: torch.Tensor
    n_passages: int

    def passage_means(self, token_scores: torch.Tensor) -> torch.Tensor:
        """(B, S) scores per position → (B, N) means over each passage's real tokens (0.0 when none)."""
        B = token_scores.shape[0]
        scores = token_scores.float() * self.mask
        sums = scores.new_zeros(B, self.n_passages + 1).scatter_add_(1, self.passage, scores)
        counts = self.mask.float().new_zeros(B, self.n_passages + 1).scatter_add_(1, self.passage, self.mask.float())
        return (sums / counts.clamp(min=1.0))[:, : self.n_passages]

    def without(self, left_out: torch.Tensor) -> torch.Tensor:
        """Masks (B·c, S) that hide, for each of the c passages in `left_out` (c,), that passage."""
        keep = self.passage[:, None, :] != left_out[None, :, None]  # (B, c, S)
        return (self.mask[:, None, :] * keep).reshape(-1, self.mask.shape[1])


def padded_layout(attention_mask: torch.Tensor) -> PassageLayout:
    """The original FiD layout: passage n at positions n·L … n·L+L−1 of (B, N·L)."""
    B, N, L = attention_mask.shape
    passage = torch.arange(N, device=attention_mask.device).repeat_interleave(L).expand(B, N * L)
    mask = attention_mask.reshape(B, N * L)
    return PassageLayout(mask, passage.masked_fill(~mask.bool(), N), N)


class EncodedPassages:
    """The encoder's states of B×N passages, to be laid out for the decoder.

    Padded (the original path): `padded` (B·N, L, d), every position encoded.
    Bucketed: `real` (R, d) holds the R real tokens only; row r is token `token[r]` of
    flat passage `passage[r]` (= b·N + n). `host_lengths` (B·N ints) and `in_order` (the
    rows are passage by passage in flat order, every passage present) let the layouts
    size themselves without reading the device.
    """

    def __init__(
        self,
        attention_mask: torch.Tensor,
        padded: torch.Tensor | None = None,
        real: torch.Tensor | None = None,
        passage: torch.Tensor | None = None,
        token: torch.Tensor | None = None,
        packed: bool = True,
        host_lengths: list[int] | None = None,
        in_order: bool = False,
    ):
        self.attention_mask = attention_mask  # (B, N, L)
        self.lengths = attention_mask.sum(-1)  # (B, N)
        self.padded, self.real, self.passage, self.token = padded, real, passage, token
        self.packed = packed and padded is None
        self.host_lengths = host_lengths if host_lengths is not None else self.lengths.reshape(-1).tolist()
        self.in_order = in_order

    def _place(self, rows: int, width: int, base: torch.Tensor, in_place: bool) -> torch.Tensor:
        """(rows, width, d) states with the real token (p, t) at row-major position base[p] + t,
        zeros elsewhere. `in_place`: that is already `real`'s order with no gap (no copy)."""
        if in_place:
            return self.real.view(rows, width, -1)
        dest = base[self.passage] + self.token  # (R,)
        out = self.real.new_zeros(rows * width, self.real.shape[-1]).index_copy_(0, dest, self.real)
        return out.view(rows, width, -1)

    def fused(self) -> tuple[BaseModelOutput, PassageLayout]:
        """What the decoder cross-attends to: states (B, S, d) and their layout (its mask (B, S))."""
        B, N, L = self.attention_mask.shape
        if self.padded is not None:
            states = self.padded.reshape(B, N * L, -1)
            return BaseModelOutput(last_hidden_state=states), padded_layout(self.attention_mask)
        device = self.lengths.device
        if not self.packed:
            full = self.in_order and all(n == L for n in self.host_lengths)
            states = self._place(B * N, L, torch.arange(B * N, device=device) * L, full).reshape(B, N * L, -1)
            return BaseModelOutput(last_hidden_state=states), padded_layout(self.attention_mask)
        totals = [sum(self.host_lengths[b * N : (b + 1) * N]) for b in range(B)]  # real tokens per question
        S = _round_up(max(totals))  # aligned: keys past a question's tokens are masked padding
        offsets = self.lengths.cumsum(1) - self.lengths  # (B, N): where each passage starts
        base = (torch.arange(B, device=device)[:, None] * S + offsets).reshape(-1)  # (B·N,)
        states = self._place(B, S, base, self.in_order and all(t == S for t in totals))
        passage = torch.full((B * S,), N, dtype=torch.long, device=device)
        passage[base[self.passage] + self.token] = self.passage % N
        passage = passage.view(B, S)
        mask = (passage < N).to(self.attention_mask.dtype)
        return BaseModelOutput(last_hidden_state=states), PassageLayout(mask, passage, N)

    def alone(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each passage as its own sequence: states (B·N, W, d) and mask (B·N, W) (the
        likelihood scores read the question with one passage at a time)."""
        B, N, L = self.attention_mask.shape
        if self.padded is not None:
            return self.padded, self.attention_mask.reshape(B * N, L)
        lengths = self.lengths.reshape(-1)
        W = _round_up(max(self.host_lengths))
        full = self.in_order and all(n == W for n in self.host_lengths)
        states = self._place(B * N, W, torch.arange(B * N, device=lengths.device) * W, full)
        mask = (torch.arange(W, device=lengths.device) < lengths[:, None]).to(self.attention_mask.dtype)
        return states, mask


def encode_padded(encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncodedPassages:
    """The original path: the encoder over all (B·N, L) positions."""
    B, N, L = input_ids.shape
    mask = attention_mask.reshape(B * N, L)
    # A missing passage (fewer ctxs than N) is all padding. The encoder sees its tokens
    # anyway: a fully masked row can give NaN states with some attention kernels, and
    # NaN would leak through the decoder's masked positions (0·NaN). The decoder's
    # mask still hides such a passage completely.
    empty = ~mask.bool().any(dim=-1, keepdim=True)  # (B·N, 1)
    states = encoder(input_ids=input_ids.reshape(B * N, L), attention_mask=mask.masked_fill(empty, 1))
    return EncodedPassages(attention_mask, padded=states.last_hidden_state)


def bucket_passages(
    lengths: torch.Tensor | list[int], min_tokens: int | None = None, max_buckets: int = MAX_BUCKETS
) -> list[torch.Tensor]:
    """Flat passage indices (CPU tensors) grouped into buckets of similar length, longest
    first: a bucket takes passages down to (1 − BUCKET_SLACK) × its longest, and more until
    it holds `min_tokens` padded tokens; at most `max_buckets` buckets (1 under --fsdp, where every rank must make the same calls) (the last takes the
    rest, and so does a bucket after which fewer than `min_tokens` would be left). Passages
    of one length make one bucket, so there is no extra encoder call when nothing is
    padded. Passages without tokens are in none. `min_tokens`: MIN_BUCKET_TOKENS unless given."""
    min_tokens = MIN_BUCKET_TOKENS if min_tokens is None else min_tokens
    lengths = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep flat order
    sorted_lengths = [lengths[i] for i in order]
    n_real = sum(1 for n in sorted_lengths if n > 0)
    buckets, start = [], 0
    while start < n_real:
        floor, width = sorted_lengths[start] * (1 - BUCKET_SLACK), _round_up(sorted_lengths[start])
        end = start + 1
        if len(buckets) == max_buckets - 1:
            end = n_real
        while end < n_real and (sorted_lengths[end] >= floor or (end - start) * width < min_tokens):
            end += 1
        if end < n_real and (n_real - end) * _round_up(sorted_lengths[end]) < min_tokens:
            end = n_real  # the rest would make a call smaller than the floor
        buckets.append(torch.tensor(order[start:end], dtype=torch.long))
        start = end
    return buckets


def encode_in_buckets(
    encoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    packed: bool = True,
    lengths: list[int] | None = None,
    buckets: int = MAX_BUCKETS,
) -> EncodedPassages:
    """The encoder over length buckets of the (B, N, L) passages: only real tokens kept.

    Call only when packable (`lengths`: `lengths_if_packable(attention_mask)`, computed
    here when not given). Each passage is read on its own, padded to its bucket's longest:
    its states equal the padded path's up to float rounding. Which rows to keep is planned
    on the host from `lengths` and sent to the device in one copy: no per-bucket reads.
    """
    B, N, L = input_ids.shape
    if lengths is None:
        lengths = lengths_if_packable(attention_mask)
        if lengths is None:
            raise ValueError("encode_in_buckets needs right-padded passages and a real token per question")
    ids, mask = input_ids.reshape(B * N, L), attention_mask.reshape(B * N, L)
    host = torch.tensor(lengths, dtype=torch.long)  # (B·N,) on the CPU
    groups = bucket_passages(lengths, max_buckets=buckets)
    plan, widths, full = [], [], []
    for idx in groups:
        width = min(L, _round_up(int(host[idx[0]])))  # idx[0]: the bucket's longest
        keep = torch.arange(width)[None, :] < host[idx][:, None]  # (n, width)
        rows = keep.reshape(-1).nonzero().squeeze(1)  # kept rows of the bucket's (n·width) states
        plan += [idx, rows, idx[:, None].expand(-1, width)[keep], torch.arange(width).expand(len(idx), -1)[keep]]
        widths.append(width)
        full.append(bool(keep.all()))
    sizes = [len(t) for t in plan]
    on_device = torch.cat(plan).to(ids.device, non_blocking=True).split(sizes)
    real, passage, token = [], [], []
    for b, width in enumerate(widths):
        idx, rows, bucket_passage, bucket_token = on_device[4 * b : 4 * b + 4]
        states = encoder(input_ids=ids[idx, :width], attention_mask=mask[idx, :width]).last_hidden_state
        states = states.flatten(0, 1)  # (n·width, d)
        real.append(states if full[b] else states.index_select(0, rows))  # (r, d)
        passage.append(bucket_passage)
        token.append(bucket_token)
    in_order = torch.equal(torch.cat(groups), torch.arange(B * N))  # host tensors
    return EncodedPassages(
        attention_mask,
        real=torch.cat(real),
        passage=torch.cat(passage),
        token=torch.cat(token),
        packed=packed,
        host_lengths=lengths,
        in_order=in_order,
    )
