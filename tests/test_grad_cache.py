"""GradCache (--grad_cache_chunk_size) gives the gradients of one backward through the whole
batch: every registered loss, in-batch negatives (across 2 gloo processes too), missing and
duplicate passages, dropout (replayed random state), and the weights after 3 training steps."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from src.data.datasets import RetrieverBatch
from src.modeling import set_dropout
from src.retriever.grad_cache import grad_cache_backward
from src.retriever.losses import LOSSES, get_loss
from src.retriever.model import Retriever, RetrieverConfig
from src.retriever.task import RetrieverTaskConfig, make_grad_cache_backward, make_loss
from src.toy.tiny_models import save_tiny_bert, tiny_bert_config

ROOT = Path(__file__).resolve().parent.parent
INF = float("inf")


def make_batch(seed: int, B: int = 4, N: int = 3, Lp: int = 7) -> RetrieverBatch:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(5, 50, (B, 5), generator=g)
    q_mask = torch.ones_like(q)
    q_mask[1, 3:] = 0  # a shorter question
    p = torch.randint(5, 50, (B, N, Lp), generator=g)
    p_mask = torch.ones_like(p)
    p_mask[0, -1] = 0  # a missing passage
    p_mask[2, 1, 4:] = 0  # a shorter passage
    p[1, 0] = p[0, 0]  # the same passage for two questions: not a negative of either
    gold = torch.randn(B, N, generator=g).masked_fill(p_mask.sum(-1) == 0, -INF)
    return RetrieverBatch(torch.arange(B), q * q_mask, q_mask, p * p_mask, p_mask, gold)


def tiny_retriever(seed: int = 0, **recipe) -> Retriever:
    torch.manual_seed(seed)
    config = RetrieverConfig(encoder=tiny_bert_config(50, hidden=16, layers=2), indexing_dimension=8, **recipe)
    return Retriever(config)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=1e-4), (name, (a[name] - b[name]).abs().max())


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("chunk_size", [1, 2, 5, 64])
def test_grad_cache_equals_one_backward_without_dropout(loss_name, chunk_size):
    batch = make_batch(0)
    if loss_name == "emdr":  # log-likelihoods
        batch = batch._replace(gold_scores=-batch.gold_scores.abs())
    config = RetrieverTaskConfig(retriever_loss=loss_name, in_batch_negatives=True, grad_cache_chunk_size=chunk_size)
    model = tiny_retriever(pooling="mean", normalize=loss_name == "kl").train()
    set_dropout(model, 0.0)
    loss = make_loss(config, torch.device("cpu"))(model, batch)
    (loss / 2).backward()  # the trainer's scale: 1 / accumulation steps
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    cached = make_grad_cache_backward(config, torch.device("cpu"))(model, batch, lambda x: x / 2)
    assert cached.item() == pytest.approx(loss.item(), abs=1e-6) and not cached.requires_grad
    assert_same_grads(grads(model), expected)


def chunked_reference(model, batch, chunk_size: int, loss_of) -> None:
    """The same chunked forward with activations kept, then one backward: the gradients
    GradCache must give when dropout draws the same masks."""
    B, N, Lp = batch.passage_ids.shape
    q = torch.cat([model(batch.question_ids[s : s + chunk_size], batch.question_mask[s : s + chunk_size],
                         embed="questions") for s in range(0, B, chunk_size)])  # fmt: skip
    ids, mask = batch.passage_ids.reshape(B * N, Lp), batch.passage_mask.reshape(B * N, Lp)
    p = torch.cat([model(ids[s : s + chunk_size], mask[s : s + chunk_size], embed="passages")
                   for s in range(0, B * N, chunk_size)])  # fmt: skip
    loss_of(q, p).backward()


def test_grad_cache_with_dropout_replays_each_chunks_random_state():
    batch = make_batch(1)
    model = tiny_retriever(1).train()
    set_dropout(model, 0.2)
    loss_fn = get_loss("kl")

    def loss_of(q, p):
        scores, negatives = model.scores(q, p, batch.passage_ids, batch.passage_mask, True)
        return loss_fn(scores, batch.gold_scores, 1.0, 1.0, negatives)

    torch.manual_seed(123)
    chunked_reference(model, batch, 3, loss_of)
    after_reference = torch.get_rng_state()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    args = (batch.question_ids, batch.question_mask, batch.passage_ids, batch.passage_mask, loss_of)
    grad_cache_backward(model, *args, lambda x: x, 3, "fp32", torch.device("cpu"))
    assert_same_grads(grads(model), expected)
    assert torch.equal(torch.get_rng_state(), after_reference)  # the next step draws the same masks
    # Dropout really is on: another random state gives other gradients.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    grad_cache_backward(model, *args, lambda x: x, 3, "fp32", torch.device("cpu"))
    assert any(not torch.allclose(g, expected[n], atol=1e-4) for n, g in grads(model).items())


def _ddp_worker(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    full = make_batch(2, B=4)
    batch = RetrieverBatch(*(t[rank * 2 : rank * 2 + 2] for t in full))
    config = RetrieverTaskConfig(in_batch_negatives=True, grad_cache_chunk_size=2)
    results = []
    for use_cache in (False, True):
        model = tiny_retriever(0)
        set_dropout(model, 0.0)
        ddp = torch.nn.parallel.DistributedDataParallel(model.train())
        if use_cache:
            loss = make_grad_cache_backward(config, torch.device("cpu"))(ddp, batch, lambda x: x)
        else:
            loss = make_loss(config, torch.device("cpu"))(ddp, batch)
            loss.backward()
        results.append((loss.item(), grads(model)))
    out[rank] = results
    torch_dist.destroy_process_group()


def test_grad_cache_under_ddp_with_in_batch_negatives_across_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, out), nprocs=2, join=True)
    for rank in (0, 1):
        (loss, expected), (cached_loss, got) = out[rank]
        assert cached_loss == pytest.approx(loss, abs=1e-6)
        assert_same_grads(got, expected)  # averaged over the ranks by DDP, once
    assert_same_grads(out[0][1][1], out[1][1][1])  # every rank holds the same averaged gradient


def wscores(n: int, seed: int) -> list[dict]:
    words = "red blue green yellow black white orange purple anna boris clara dmitri".split()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = rng.sample(words, 2)
        ctxs = [
            {"id": f"{i}-{j}", "title": "t", "text": " ".join(rng.sample(words, 4)), "score": 3 * rng.random()}
            for j in range(3)
        ]
        out.append({"id": f"q{i}", "question": " ".join(q), "answers": [q[0]], "ctxs": ctxs})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("grad_cache")
    words = "red blue green yellow black white orange purple anna boris clara dmitri question: context:"
    bert = save_tiny_bert(root / "bert", [words], hidden=16, layers=1)
    (root / "train.json").write_text(json.dumps(wscores(8, 0)))
    return root, bert


def train(root: Path, bert: Path, name: str, nproc: int, *extra: str) -> dict[str, torch.Tensor]:
    args = [
        "--train_data", str(root / "train.json"), "--model_name_or_path", str(bert), "--checkpoint_dir",
        str(root / "runs"), "--name", name, "--n_context", "3", "--indexing_dimension", "8", "--no_title",
        "--per_gpu_batch_size", "2", "--total_steps", "3", "--lr", "1e-2", "--dropout", "0", "--device", "cpu",
        "--in_batch_negatives", "--accumulation_steps", "2", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                     "--master_port", str(29500 + random.randint(0, 3000))]  # fmt: skip
    proc = subprocess.run(launcher + ["train_retriever.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(root / "runs" / name / "checkpoint" / "latest" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_weights_after_three_steps_are_the_same_with_grad_cache(data, nproc):
    """Through the trainer: its scale (accumulation over 2 batches) and, with 2 processes,
    DDP's synchronisation at the end of each accumulation cycle only."""
    root, bert = data
    plain = train(root, bert, f"plain{nproc}", nproc)
    cached = train(root, bert, f"cached{nproc}", nproc, "--grad_cache_chunk_size", "2")
    start = Retriever.from_encoder(str(bert), indexing_dimension=8).state_dict()
    assert plain.keys() == cached.keys()
    for name in plain:
        assert torch.allclose(plain[name], cached[name], atol=1e-5), (name, (plain[name] - cached[name]).abs().max())
    assert not torch.allclose(plain["encoder.embeddings.word_embeddings.weight"],
                              start["encoder.embeddings.word_embeddings.weight"])  # fmt: skip
