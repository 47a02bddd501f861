"""GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): the retriever's loss over a batch of any size at the activation memory of
one chunk of texts.

1. Embed the questions and the passages `chunk_size` texts at a time without keeping
   activations (no_grad), saving the random state before each chunk.
2. Compute the loss (any registered loss, in-batch negatives across ranks included) on
   the embeddings, detached, and backpropagate it to them: each embedding's gradient.
3. Replay each chunk with activations, from its saved random state (the same dropout
   masks), and backpropagate its cached gradient into the encoder.

The parameter gradients are those of one backward through the whole batch (the loss is a
function of the embeddings only); they differ only by float rounding. Under DDP every
replay but the last runs in `no_sync()`, so the accumulated gradient is averaged once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from src.devices import precision_autocast

Embed = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RandomState:
    """The torch random state (CPU, and the device's when CUDA) at one point, to replay."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def chunk_slices(n: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def embed_without_graph(
    model, ids: torch.Tensor, mask: torch.Tensor, side: str, chunk_size: int, precision: str, device: torch.device
) -> tuple[torch.Tensor, list[RandomState]]:
    """Embeddings (n, d) of the texts ids/mask (n, L), chunk by chunk under no_grad, and the
    random state before each chunk (for the replay)."""
    parts, states = [], []
    with torch.no_grad():
        for part in chunk_slices(ids.shape[0], chunk_size):
            states.append(RandomState(device))
            with precision_autocast(precision, device):
                parts.append(model(ids[part], mask[part], embed=side).float())
    return torch.cat(parts), states


def replay(
    model,
    chunks: list[tuple[torch.Tensor, torch.Tensor, str, RandomState, torch.Tensor]],
    precision: str,
    device: torch.device,
) -> None:
    """Each chunk (ids, mask, side, random state, gradient of its embeddings) again, with
    activations, and its cached gradient backpropagated. The random state after the replay
    is the one after the last chunk's first pass, as without the cache."""
    no_sync = getattr(model, "no_sync", None)  # DDP (and FSDP): synchronise on the last backward only
    end_state = RandomState(device)
    for i, (ids, mask, side, state, grad) in enumerate(chunks):
        last = i == len(chunks) - 1
        state.restore()
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            with precision_autocast(precision, device):
                embeddings = model(ids, mask, embed=side)
            embeddings.float().backward(grad)
    end_state.restore()


def grad_cache_backward(
    model,
    question_ids: torch.Tensor,
    question_mask: torch.Tensor,
    passage_ids: torch.Tensor,
    passage_mask: torch.Tensor,
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scale: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int,
    precision: str,
    device: torch.device,
) -> torch.Tensor:
    """Backpropagate `scale(loss)` into `model` (the retriever, or its DDP wrapper) the
    GradCache way; returns the loss (detached).

    question_ids/mask (B, Lq); passage_ids/mask (B, N, Lp); loss_of(questions (B, d),
    passages (B·N, d)) → scalar loss; `scale`: the trainer's (accumulation, GradScaler).
    Passage embeddings that carry no gradient (the frozen passage side of query-side
    training) are not replayed."""
    B, N, Lp = passage_ids.shape
    flat_ids, flat_mask = passage_ids.reshape(B * N, Lp), passage_mask.reshape(B * N, Lp)
    questions, q_states = embed_without_graph(
        model, question_ids, question_mask, "questions", chunk_size, precision, device
    )
    passages, p_states = embed_without_graph(model, flat_ids, flat_mask, "passages", chunk_size, precision, device)
    trains_passages = any(p.requires_grad for p in _passage_parameters(model))
    questions = questions.detach().requires_grad_()
    passages = passages.detach().requires_grad_(trains_passages)
    with precision_autocast(precision, device):
        loss = loss_of(questions, passages)
    scale(loss).backward()
    chunks = [
        (question_ids[part], question_mask[part], "questions", state, questions.grad[part])
        for part, state in zip(chunk_slices(B, chunk_size), q_states)
    ]
    if trains_passages:
        chunks += [
            (flat_ids[part], flat_mask[part], "passages", state, passages.grad[part])
            for part, state in zip(chunk_slices(B * N, chunk_size), p_states)
        ]
    replay(model, chunks, precision, device)
    return loss.detach()


def _passage_parameters(model):
    """The parameters that embed passages: the frozen copy's under query-side training."""
    module = getattr(model, "module", model)  # the retriever inside a DDP wrapper
    return module.passage_side.parameters() if module.passage_side is not None else module.parameters()
