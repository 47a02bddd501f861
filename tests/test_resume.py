"""Reliability of training runs: --dropout means every dropout, exact resume through the
scripts (one process and two), random SIGKILLs, SIGTERM, and one run per run directory."""

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import T5Config

import src.reader.task
import train_reader
from src.cli import close_loggers
from src.modeling import dropout_rates, set_dropout
from src.reader.model import FiDT5
from src.reader.task import generate_answers
from src.retriever.model import Retriever
from src.toy.tiny_models import save_tiny_bert, save_tiny_t5, tiny_t5_config

ROOT = Path(__file__).resolve().parent.parent
NAMES = "anna boris clara dmitri elena farid greta hugo".split()
COLORS = "red blue green yellow black white orange purple".split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------------
# --dropout
# ---------------------------------------------------------------------------


def test_dropout_reaches_attention_probabilities_and_survives_reload(tmp_path):
    """A config with dropout 0.0 trained with --dropout 0.1: attention gets dropout too, and
    a saved and reloaded model (a resume) has exactly the same dropout everywhere."""
    torch.manual_seed(0)
    model = FiDT5(tiny_t5_config(40, dropout_rate=0.0))
    set_dropout(model, 0.1)
    assert dropout_rates(model) == {0.1}
    attention = [m for m in model.modules() if type(m).__name__ == "T5Attention"]
    assert attention and all(m.dropout == 0.1 for m in attention)
    # Only the attention probabilities drop out: two training-mode passes differ.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids = torch.randint(1, 40, (2, 3, 7))
    labels = torch.randint(1, 40, (2, 4))
    model.train()
    a = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    b = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    assert abs(a.item() - b.item()) > 1e-6
    set_dropout(model, 0.1)
    model.save_pretrained(tmp_path / "m")
    assert T5Config.from_pretrained(tmp_path / "m").dropout_rate == 0.1
    assert dropout_rates(FiDT5.load(tmp_path / "m")) == {0.1}


def test_dropout_zero_gives_deterministic_training_steps():
    """t5-base's config says 0.1; --dropout 0 must switch attention dropout off as well."""
    torch.manual_seed(0)
    model = FiDT5(tiny_t5_config(40, dropout_rate=0.1)).train()
    set_dropout(model, 0.0)
    assert dropout_rates(model) == {0.0}
    ids = torch.randint(1, 40, (2, 3, 7))
    labels = torch.randint(1, 40, (2, 4))
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.item())
    assert losses[0] == losses[1]


def test_dropout_of_the_retriever(tmp_path):
    encoder = save_tiny_bert(tmp_path / "bert", [" ".join(NAMES)], hidden_dropout_prob=0.0)
    retriever = Retriever.from_encoder(str(encoder), indexing_dimension=8)
    set_dropout(retriever, 0.2)
    assert dropout_rates(retriever) == {0.2}
    retriever.save_pretrained(tmp_path / "r")
    reloaded = Retriever.from_pretrained(tmp_path / "r")
    assert dropout_rates(reloaded) == {0.2}
    assert reloaded.config.encoder.attention_probs_dropout_prob == 0.2


# ---------------------------------------------------------------------------
# Exact resume through the scripts
# ---------------------------------------------------------------------------


def examples(n: int, seed: int) -> list[dict]:
    """'what color does X like?'; two gold answers, so the training target is drawn at random."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, other = rng.sample(NAMES, 2)
        color, other_color = rng.sample(COLORS, 2)
        ctxs = [
            {"title": name, "text": f"{name} likes the color {color} .", "score": 2.0},
            {"title": other, "text": f"{other} likes the color {other_color} .", "score": 1.0},
        ]
        rng.shuffle(ctxs)
        out.append(
            {
                "id": f"q{i}",
                "question": f"what color does {name} like ?",
                "answers": [color, f"{color} ."],
                "ctxs": ctxs[: 1 + i % 2],
            }
        )  # fmt: skip  (one example in two lacks a passage: padding)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    texts = [" ".join(NAMES + COLORS), "question: title: context: what color does like the ? ."]
    model_dir = save_tiny_t5(root / "t5", texts, d_model=32, layers=2, dropout_rate=0.0)
    (root / "train.json").write_text(json.dumps(examples(20, 0)))
    (root / "dev.json").write_text(json.dumps(examples(4, 1)))
    return root, model_dir


def reader_args(world, name: str, total_steps: int = 10) -> list[str]:
    root, model_dir = world
    return [
        "--train_data", str(root / "train.json"), "--eval_data", str(root / "dev.json"),
        "--model_name_or_path", str(model_dir), "--checkpoint_dir", str(root / "runs"), "--name", name,
        "--n_context", "2", "--text_maxlength", "16", "--per_gpu_batch_size", "3", "--device", "cpu",
        "--dropout", "0.1", "--accumulation_steps", "2", "--eval_freq", "3", "--save_freq", "4",
        "--total_steps", str(total_steps), "--scheduler", "linear", "--warmup_steps", "2", "--scheduler_steps", "10",
        "--lr", "3e-3", "--optim", "adamw",
    ]  # fmt: skip


def command(script: str, args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(29500 + random.randint(0, 3000)), script, *args]  # fmt: skip


def run(cmd: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def weights(world, name: str, which: str = "latest") -> dict[str, torch.Tensor]:
    return load_file(world[0] / "runs" / name / "checkpoint" / which / "model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def step_of(world, name: str) -> int:
    state = torch.load(world[0] / "runs" / name / "checkpoint" / "latest" / "training_state.pt", weights_only=True)
    return state["step"]


def assert_no_leftovers(world, name: str) -> None:
    run_dir = world[0] / "runs" / name
    left = [p.name for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not left, left


@pytest.fixture(scope="module")
def straight(world):
    """The uninterrupted 10-step run every other run must reproduce."""
    run(command("train_reader.py", reader_args(world, "straight")))
    assert step_of(world, "straight") == 10
    return weights(world, "straight")


def test_evaluation_leaves_the_training_random_state_alone(world, monkeypatch):
    """Not slow, in this process: with an evaluation that draws from Python's, numpy's and
    torch's generators, evaluating at every step gives the weights (dropout 0.1) and the random
    state of a run that evaluates only at its end."""
    drawn = []

    def drawing_generate_answers(*args, **kwargs):
        drawn.append((random.random(), np.random.rand(), torch.rand(1).item()))
        return generate_answers(*args, **kwargs)

    monkeypatch.setattr(src.reader.task, "generate_answers", drawing_generate_answers)

    def train(name: str, eval_freq: int):
        drawn.clear()
        args = [*reader_args(world, name, total_steps=3), "--accumulation_steps", "1", "--eval_freq", str(eval_freq)]
        try:
            train_reader.main(args)
        finally:
            close_loggers()
        return len(drawn), weights(world, name), (random.random(), np.random.rand(), torch.rand(1).item())

    evals, every_step, state = train("eval_every_step", 1)
    evals_at_end, at_end, state_at_end = train("eval_at_end", 100)
    assert (evals, evals_at_end) == (3, 1)
    assert max_difference(every_step, at_end) == 0.0
    assert state == state_at_end
    assert max_difference(every_step, load_file(world[1] / "model.safetensors")) > 1e-4  # it trained


@pytest.mark.slow
def test_resume_from_the_command_line_is_exact(world, straight):
    """4 steps (the eval at 3 falls inside an accumulation cycle), then the same command
    with --total_steps 10: the weights of the straight run, with dropout, eval and saves on."""
    run(command("train_reader.py", reader_args(world, "resumed", total_steps=4)))
    assert step_of(world, "resumed") == 4
    proc = run(command("train_reader.py", reader_args(world, "resumed")))
    assert "resuming" in proc.stdout
    assert max_difference(weights(world, "resumed"), straight) <= 1e-6
    assert max_difference(weights(world, "resumed", "best_dev"), weights(world, "straight", "best_dev")) <= 1e-6
    assert_no_leftovers(world, "resumed")


@pytest.mark.slow
def test_resume_with_two_processes_is_exact(world):
    run(command("train_reader.py", reader_args(world, "ddp_straight"), nproc=2))
    run(command("train_reader.py", reader_args(world, "ddp_resumed", total_steps=4), nproc=2))
    run(command("train_reader.py", reader_args(world, "ddp_resumed"), nproc=2))
    assert step_of(world, "ddp_resumed") == 10
    assert max_difference(weights(world, "ddp_resumed"), weights(world, "ddp_straight")) <= 1e-6


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def progress_event(line: str) -> str | None:
    """A logged line as a point of progress: "eval 3", "saved latest 4", ... (None: not one)."""
    if match := re.search(r"INFO step (\d+)/\d+ \|", line):
        return f"eval {match[1]}"
    if match := re.search(r"saved checkpoint .*/([^/ ]+) \(step (\d+)\)", line):
        return f"saved {match[1]} {match[2]}"
    return None


@pytest.mark.slow
def test_random_sigkills_then_restarts_give_the_straight_result(world, straight):
    """SIGKILL at random moments chosen by progress, never by wall-clock: right after the
    run logs one of the straight run's events (an evaluation, i.e. while its saves run; a
    save, i.e. during the next save or the next steps), 6 random ones in order."""
    log = (world[0] / "runs" / "straight" / "run.log").read_text().splitlines()
    events = [e for e in map(progress_event, log) if e is not None][:-1]  # the last save ends the run
    targets = sorted(random.Random(1234).sample(range(len(events)), 6))
    cmd = command("train_reader.py", reader_args(world, "killed"))
    killed_after, resumed_at = [], []
    for target in [events[t] for t in targets] + [None]:
        proc = start(cmd)
        for line in proc.stdout:
            if "training from step" in line:
                resumed_at.append(int(line.split("training from step ")[1].split()[0]))
            if target is not None and progress_event(line) == target:
                proc.send_signal(signal.SIGKILL)
                killed_after.append(target)
                break
        proc.stdout.close()
        code = proc.wait(timeout=300)
        assert code == (0 if target is None else -signal.SIGKILL), (target, code)
    assert len(killed_after) == 6 and len(set(resumed_at)) > 2, (killed_after, resumed_at)
    assert step_of(world, "killed") == 10
    assert max_difference(weights(world, "killed"), straight) <= 1e-6
    assert_no_leftovers(world, "killed")


@pytest.mark.slow
def test_sigterm_saves_latest_and_the_restart_resumes_exactly(world, straight):
    proc = start(command("train_reader.py", reader_args(world, "terminated")))
    for line in proc.stdout:
        if "step 3/10" in line:  # evaluation done, mid-way through an accumulation cycle
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 143
    assert "interrupted at step 4/10" in rest
    assert step_of(world, "terminated") == 4  # saved at the end of the accumulation cycle
    run(command("train_reader.py", reader_args(world, "terminated")))
    assert max_difference(weights(world, "terminated"), straight) <= 1e-6


# ---------------------------------------------------------------------------
# One run per run directory
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_a_live_run_directory_refuses(world):
    args = reader_args(world, "busy", total_steps=100000)
    first = start(command("train_reader.py", args))
    try:
        first.stdout.readline()  # the first run has started (and holds the lock)
        proc = run(command("train_reader.py", args), expect=2)
        assert "is in use by another run" in proc.stderr and f"pid {first.pid}" in proc.stderr
        assert str(world[0] / "runs" / "busy") in proc.stderr
        assert "Traceback" not in proc.stderr
        for line in first.stdout:
            if "saved checkpoint" in line:
                break
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the killed run's lock: the restart gets past it and resumes.
    again = start(command("train_reader.py", args))
    try:
        assert any("resuming" in line for line in again.stdout)
    finally:
        again.kill()
        again.wait()


@pytest.mark.slow
def test_retriever_resume_is_exact(world, tmp_path):
    """train_retriever.py with dropout 0.1 (config 0.0), eval, saves and accumulation on."""
    root, _ = world
    bert = save_tiny_bert(tmp_path / "bert", [" ".join(NAMES + COLORS), "question: title: context: what does ?"])

    def args(name: str, total_steps: int) -> list[str]:
        return [
            "--train_data", str(root / "train.json"), "--eval_data", str(root / "dev.json"),
            "--model_name_or_path", str(bert), "--checkpoint_dir", str(root / "runs"), "--name", name,
            "--n_context", "2", "--question_maxlength", "8", "--passage_maxlength", "12", "--indexing_dimension", "8",
            "--per_gpu_batch_size", "3", "--lr", "3e-3", "--dropout", "0.1", "--device", "cpu",
            "--accumulation_steps", "2", "--eval_freq", "3", "--save_freq", "4", "--total_steps", str(total_steps),
        ]  # fmt: skip

    run(command("train_retriever.py", args("r_straight", 8)))
    run(command("train_retriever.py", args("r_resumed", 4)))
    run(command("train_retriever.py", args("r_resumed", 8)))
    assert step_of(world, "r_resumed") == 8
    assert max_difference(weights(world, "r_resumed"), weights(world, "r_straight")) <= 1e-6
    assert max_difference(weights(world, "r_resumed"), weights(world, "r_straight", "step-4")) > 1e-4  # it trained
