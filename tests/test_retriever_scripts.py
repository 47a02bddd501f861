"""train_retriever.py end to end on tiny dataset_wscores files: checkpoints, resume,
DDP with two processes (gloo), whole-dev-set metrics, bad input."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from src.data.datasets import RetrieverCollator, RetrieverDataset
from src.data.questions import rank_ctxs
from src.distributed import Runtime
from src.metrics import ranking_metrics
from src.retriever.losses import kl_loss
from src.retriever.model import Retriever
from src.retriever.task import RetrieverTaskConfig, evaluate
from src.toy.tiny_models import save_tiny_bert

ROOT = Path(__file__).resolve().parent.parent
WORDS = "red blue green yellow black white orange purple anna boris clara dmitri".split()


def wscores_examples(n: int, seed: int, n_ctxs: int = 4) -> list[dict]:
    """What test_reader.py --write_crossattention_scores writes: ctxs with the reader's `score`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = rng.sample(WORDS, 2)
        ctxs = []
        for j in range(n_ctxs):
            words = rng.sample(WORDS, 4)
            score = 3.0 * len(set(words) & set(q)) + rng.random()
            ctxs.append({"id": f"{i}-{j}", "title": words[0], "text": " ".join(words), "score": score})
        out.append({"id": f"q{i}", "question": " ".join(q), "answers": [q[0]], "ctxs": ctxs})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("retriever")
    bert = save_tiny_bert(root / "bert", [" ".join(WORDS), "question: title: context:"], hidden=16, layers=1)
    (root / "train_wscores.json").write_text(json.dumps(wscores_examples(16, 0)))
    dev = wscores_examples(7, 1)
    dev[0]["ctxs"] = dev[0]["ctxs"][:2]  # fewer ctxs than --n_context: padded, must not count
    with open(root / "dev_wscores.jsonl", "w") as f:
        f.writelines(json.dumps(ex) + "\n" for ex in dev)
    return root, bert


def run_script(args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + random.randint(0, 2000)), "train_retriever.py", *args]  # fmt: skip
    else:
        cmd = [sys.executable, "train_retriever.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def common(root: Path, bert: Path, name: str) -> list[str]:
    return [
        "--train_data", str(root / "train_wscores.json"), "--eval_data", str(root / "dev_wscores.jsonl"),
        "--model_name_or_path", str(bert), "--checkpoint_dir", str(root / "runs"), "--name", name,
        "--n_context", "4", "--question_maxlength", "8", "--passage_maxlength", "16", "--indexing_dimension", "8",
        "--per_gpu_batch_size", "4", "--lr", "1e-3", "--dropout", "0", "--device", "cpu",
    ]  # fmt: skip


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt / "training_state.pt", weights_only=True)["step"]


@pytest.mark.slow
def test_train_retriever_writes_checkpoints_and_resumes(setup):
    root, bert = setup
    run_script([*common(root, bert, "distil"), "--total_steps", "6", "--eval_freq", "3", "--save_freq", "6"])
    run_dir = root / "runs" / "distil"
    ckpt = run_dir / "checkpoint"
    assert {"latest", "best_dev", "step-6"} <= {p.name for p in ckpt.iterdir()}
    assert step_of(ckpt / "latest") == 6
    log = (run_dir / "run.log").read_text()
    for metric in ("dev loss", "dev inversions", "dev avg_top1", "dev avg_top5", "dev idx_top2"):
        assert metric in log
    assert list(run_dir.glob("events.out.tfevents.*"))

    # best_dev is a complete retriever directory: weights, config, tokenizer.
    best = Retriever.from_pretrained(ckpt / "best_dev")
    assert best.dim == 8 and best.config.projection
    AutoTokenizer.from_pretrained(ckpt / "best_dev")
    best_metric = torch.load(ckpt / "best_dev" / "training_state.pt", weights_only=True)["best_metric"]
    assert best_metric is not None and best_metric > 0

    # Same command with more steps resumes from latest (step 6), not from the BERT.
    proc = run_script([*common(root, bert, "distil"), "--total_steps", "9", "--eval_freq", "3", "--save_freq", "100"])
    log = (run_dir / "run.log").read_text()
    assert "resumed at step 6" in log and "step 9/9" in log
    assert step_of(ckpt / "latest") == 9
    assert proc.returncode == 0

    # --model_path: start from the trained retriever with a fresh optimizer, keeping its
    # trained projection even if --indexing_dimension asks for another size.
    run_script([
        *common(root, bert, "from_best"), "--model_path", str(ckpt / "best_dev"), "--indexing_dimension", "32",
        "--total_steps", "2", "--eval_freq", "2",
    ])  # fmt: skip
    again = Retriever.from_pretrained(root / "runs" / "from_best" / "checkpoint" / "latest")
    assert again.dim == 8
    assert "keeping it and ignoring --indexing_dimension" in (root / "runs" / "from_best" / "run.log").read_text()


@pytest.mark.slow
def test_train_retriever_two_processes(setup):
    root, bert = setup
    run_script([*common(root, bert, "ddp"), "--total_steps", "4", "--eval_freq", "2", "--save_freq", "100"], nproc=2)
    ckpt = root / "runs" / "ddp" / "checkpoint"
    assert {"latest", "best_dev"} <= {p.name for p in ckpt.iterdir()}
    assert step_of(ckpt / "latest") == 4
    log = (root / "runs" / "ddp" / "run.log").read_text()
    assert "2 processes" in log and "dev inversions" in log


def test_bad_wscores_file_exits_with_clear_error(setup, tmp_path):
    root, bert = setup
    examples = wscores_examples(3, 2)
    del examples[1]["ctxs"][0]["score"]
    bad = tmp_path / "no_scores.json"
    bad.write_text(json.dumps(examples))
    args = common(root, bert, "bad")
    args[args.index("--train_data") + 1] = str(bad)
    proc = run_script([*args, "--total_steps", "1"], check=False)
    assert proc.returncode == 2
    assert "no_scores.json" in proc.stderr and "example 2 (id q1)" in proc.stderr and "score" in proc.stderr


def test_dev_metrics_cover_the_whole_dev_set(setup):
    """The original returned the last batch's loss; ours averages every dev question."""
    root, bert = setup
    torch.manual_seed(0)
    retriever = Retriever.from_encoder(str(bert), indexing_dimension=8).eval()
    tokenizer = AutoTokenizer.from_pretrained(bert)
    examples = [json.loads(line) for line in (root / "dev_wscores.jsonl").read_text().splitlines()]
    for ex in examples:
        rank_ctxs(ex)  # as train_retriever.py loads them
    dataset = RetrieverDataset(examples, 4)
    collator = RetrieverCollator(tokenizer, 4, 8, 16)
    config = RetrieverTaskConfig(per_gpu_batch_size=3)
    metrics = evaluate(retriever, dataset, collator, config, Runtime(), logging.getLogger("test"))

    # All 7 questions in one batch, by the pure functions.
    _, q_ids, q_mask, p_ids, p_mask, gold = collator([dataset[i] for i in range(len(dataset))])
    assert gold[0, 2:].eq(-math.inf).all()  # the short question is padded
    with torch.no_grad():
        scores, _ = retriever(q_ids, q_mask, p_ids, p_mask)
    expected = {"loss": kl_loss(scores, gold).item(), **ranking_metrics(scores, gold)}
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-5), name
    # and it is not the last batch's (question 6 alone)
    last = kl_loss(scores[6:], gold[6:]).item()
    assert metrics["loss"] != pytest.approx(last, abs=1e-4)
