"""Retriever losses against hand computations, and in-batch negatives across processes."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from src.retriever.losses import emdr_loss, get_loss, kl_loss
from src.retriever.model import Retriever, RetrieverConfig
from src.toy.tiny_models import tiny_bert_config

INF = math.inf


def test_emdr_is_the_marginal_likelihood_by_hand():
    scores = torch.tensor([[1.0, 0.0, -INF], [0.5, 2.0, 1.0]])  # question 0: a missing passage
    gold = torch.tensor([[-1.0, -3.0, -INF], [-2.0, -0.5, -4.0]])  # log p(y | passage)
    for tau in (1.0, 2.0):
        hand = 0.0
        for b in range(2):
            real = [k for k in range(3) if math.isfinite(scores[b, k]) and math.isfinite(gold[b, k])]
            z = sum(math.exp(scores[b, k] / tau) for k in real)
            hand += -math.log(sum(math.exp(scores[b, k] / tau) / z * math.exp(gold[b, k]) for k in real)) / 2
        assert emdr_loss(scores, gold, 5.0, tau).item() == pytest.approx(hand, abs=1e-6)  # T_gold does not apply
    # Stable where exp(g) underflows: g = −1000 for every passage gives 1000 exactly.
    assert emdr_loss(torch.zeros(1, 2), torch.full((1, 2), -1000.0)).item() == pytest.approx(1000.0, abs=1e-3)
    # A negative takes prior mass away from the passages that explain the answer.
    negatives = torch.tensor([[3.0, -INF], [-INF, -INF]])
    assert emdr_loss(scores, gold, negative_scores=negatives).item() > emdr_loss(scores, gold).item()
    assert get_loss("emdr") is emdr_loss and get_loss("kl") is kl_loss


def test_emdr_gradient_moves_prior_towards_the_explaining_passage():
    scores = torch.zeros(1, 2, requires_grad=True)
    emdr_loss(scores, torch.tensor([[0.0, -10.0]])).backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1]  # descent raises passage 0


def _batch(seed: int, B: int, N: int = 3, Lp: int = 6):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(5, 50, (B, 4), generator=g)
    p = torch.randint(5, 50, (B, N, Lp), generator=g)
    p_mask = torch.ones_like(p)
    p_mask[0, -1] = 0  # a missing passage
    p[1, 0] = p[0, 0]  # the same passage retrieved for two questions: not a negative of either
    gold = torch.randn(B, N, generator=g).masked_fill(p_mask.sum(-1) == 0, -INF)
    return q, torch.ones_like(q), p * p_mask, p_mask, gold


def _model():
    torch.manual_seed(0)
    return Retriever(RetrieverConfig(encoder=tiny_bert_config(50, hidden=16, layers=1), indexing_dimension=8)).eval()


def _ddp_worker(rank: int, port: int, batch, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    half = batch[0].shape[0] // 2
    local = [t[rank * half : (rank + 1) * half] for t in batch]
    model = _model()
    scores, negatives = model(*local[:4], in_batch_negatives=True)
    loss = kl_loss(scores, local[4], negative_scores=negatives)
    out[rank] = loss.item()
    torch_dist.destroy_process_group()


def test_in_batch_negatives_span_the_global_batch_under_ddp():
    """Two gloo processes with batch b = one process with batch 2b (the loss). Gradients
    flow through each rank's own passages only, so they are not those of the 2b batch."""
    batch = _batch(0, B=4)
    # Question 2's first passage copies question 0's: rank 1 must see rank 0's copy.
    batch[2][2, 0] = batch[2][0, 0]
    model = _model()
    scores, negatives = model(*batch[:4], in_batch_negatives=True)
    loss = kl_loss(scores, batch[4], negative_scores=negatives)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, batch, out), nprocs=2, join=True)
    ddp_loss = (out[0] + out[1]) / 2  # each rank's mean over its b questions
    assert ddp_loss == pytest.approx(loss.item(), abs=1e-5)
    # Without the global batch the loss would differ (fewer negatives): the test can fail.
    local = [t[:2] for t in batch]
    s_local, n_local = model(*local[:4], in_batch_negatives=True)
    assert abs(kl_loss(s_local, local[4], negative_scores=n_local).item() - out[0]) > 1e-4
