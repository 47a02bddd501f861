"""train_reader.py and test_reader.py end to end, in one process and with torchrun (gloo); one
two-process check that is fast (processes forked from the test's, not fresh interpreters)."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

import test_reader
from src.cli import close_loggers
from src.data.questions import load_questions
from src.toy.tiny_models import save_tiny_t5

ROOT = Path(__file__).resolve().parent.parent
COLORS = "red blue green yellow black white orange purple".split()
NAMES = "anna boris clara dmitri elena farid greta hugo".split()


def toy_examples(n: int, seed: int) -> list[dict]:
    """'what color is X?' with the answer in one of two passages."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, other = rng.sample(NAMES, 2)
        color, other_color = rng.sample(COLORS, 2)
        ctxs = [
            {"id": f"{i}a", "title": name, "text": f"{name} likes the color {color} .", "score": 2.0},
            {"id": f"{i}b", "title": other, "text": f"{other} likes the color {other_color} .", "score": 1.0},
        ]
        rng.shuffle(ctxs)
        ctxs.append({"id": f"{i}c", "title": other, "text": f"{other} is here .", "score": 0.5})
        out.append({"id": f"q{i}", "question": f"what color does {name} like ?", "answers": [color], "ctxs": ctxs})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    texts = [" ".join(NAMES + COLORS), "question: title: context: what color does like the ? ."]
    model_dir = save_tiny_t5(root / "t5", texts, d_model=32, layers=2)
    for split, n, seed in (("train", 24, 0), ("dev", 6, 1)):
        (root / f"{split}.json").write_text(json.dumps(toy_examples(n, seed)))
    return root, model_dir


def run_script(script: str, args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + random.randint(0, 2000)), script, *args]  # fmt: skip
    else:
        cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


COMMON = ["--n_context", "2", "--text_maxlength", "16", "--per_gpu_batch_size", "4", "--device", "cpu"]


@pytest.mark.slow
def test_train_then_test_single_and_two_processes(setup):
    root, model_dir = setup
    run_script("train_reader.py", [
        "--train_data", str(root / "train.json"), "--eval_data", str(root / "dev.json"),
        "--model_name_or_path", str(model_dir), "--checkpoint_dir", str(root / "runs"), "--name", "train",
        "--total_steps", "6", "--eval_freq", "3", "--save_freq", "6", "--lr", "1e-3", "--dropout", "0", *COMMON,
    ])  # fmt: skip
    ckpt = root / "runs" / "train" / "checkpoint"
    assert {"latest", "best_dev", "step-6"} <= {p.name for p in ckpt.iterdir()}
    log = (root / "runs" / "train" / "run.log").read_text()
    assert "dev exact_match" in log and "step 6/6" in log
    assert list((root / "runs" / "train").glob("events.out.tfevents.*"))
    opts = json.loads((root / "runs" / "train" / "options.json").read_text())
    assert opts["total_steps"] == 6 and opts["n_context"] == 2

    # The same training with DDP on 2 processes (gloo): each rank its half of every epoch.
    run_script("train_reader.py", [
        "--train_data", str(root / "train.json"), "--eval_data", str(root / "dev.json"),
        "--model_name_or_path", str(model_dir), "--checkpoint_dir", str(root / "runs"), "--name", "train2",
        "--total_steps", "4", "--eval_freq", "2", "--save_freq", "4", "--lr", "1e-3", *COMMON,
    ], nproc=2)  # fmt: skip
    assert {"latest", "best_dev", "step-4"} <= {p.name for p in (root / "runs" / "train2" / "checkpoint").iterdir()}
    assert "step 4/4" in (root / "runs" / "train2" / "run.log").read_text()

    outputs = {}
    for nproc in (1, 2):
        name = f"test{nproc}"
        run_script("test_reader.py", [
            "--model_path", str(ckpt / "latest"), "--eval_data", str(root / "dev.json"),
            "--checkpoint_dir", str(root / "runs"), "--name", name, "--write_results",
            "--write_crossattention_scores", "--per_gpu_batch_size", "2", *COMMON[:4], "--device", "cpu",
        ], nproc=nproc)  # fmt: skip
        run_dir = root / "runs" / name
        lines = (run_dir / "final_output.txt").read_text().splitlines()
        scored = load_questions(run_dir / "dataset_wscores.json")
        outputs[nproc] = (lines, scored)
        assert [line.split("\t")[0] for line in lines] == [f"q{i}" for i in range(6)]  # each example once
        assert [ex["id"] for ex in scored] == [f"q{i}" for i in range(6)]
        assert all(isinstance(c["score"], float) for ex in scored for c in ex["ctxs"][:2])
        # the third ctx was not read (--n_context 2): its retriever score is kept apart
        assert all("score" not in ex["ctxs"][2] and ex["ctxs"][2]["retriever_score"] == 0.5 for ex in scored)
        assert "EM " in (run_dir / "run.log").read_text()
    assert outputs[1][0] == outputs[2][0]
    for a, b in zip(outputs[1][1], outputs[2][1]):
        assert [c["score"] for c in a["ctxs"][:2]] == pytest.approx([c["score"] for c in b["ctxs"][:2]], abs=1e-5)


@pytest.mark.slow
def test_parity_checkpoint_through_test_reader(parity_dir, tmp_path):
    """The original FiD's own answers and scores, through our script (issue 5)."""
    expected = json.loads((parity_dir / "expected.json").read_text())
    parity_args = [
        "--model_path", str(parity_dir / "fid_checkpoint"), "--tokenizer_name_or_path", str(parity_dir / "tokenizer"),
        "--eval_data", str(parity_dir / "data.json"), "--n_context", "3", "--text_maxlength", "24",
        "--generation_max_length", "20", "--checkpoint_dir", str(tmp_path), "--device", "cpu",
    ]  # fmt: skip
    run_script("test_reader.py", [*parity_args, "--per_gpu_batch_size", "6", "--name", "plain", "--write_results"])
    lines = (tmp_path / "plain" / "final_output.txt").read_text().split("\n")[:-1]
    assert [line.split("\t", 1)[1] for line in lines] == expected["plain_path"]["answers"]
    run_script(
        "test_reader.py",
        [*parity_args, "--per_gpu_batch_size", "4", "--name", "scores", "--write_crossattention_scores"],
    )
    scored = load_questions(tmp_path / "scores" / "dataset_wscores.json")
    for ex, want in zip(scored, expected["score_path"]["passage_scores"]):
        assert [c["score"] for c in ex["ctxs"]] == pytest.approx(want, abs=5e-5)


def test_bad_eval_file_is_a_clear_error(setup, tmp_path):
    root, model_dir = setup
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "q", "ctxs": [{"title": "t"}]}]')
    proc = subprocess.run(
        [sys.executable, "test_reader.py", "--model_path", str(model_dir), "--eval_data", str(bad),
         "--checkpoint_dir", str(tmp_path), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"{bad}, example 1, ctx 0: expected an object with a string 'text'" in proc.stderr


def _test_reader_rank(rank: int, world_size: int, port: int, args: list[str]) -> None:
    """One rank of `torchrun --nproc_per_node world_size test_reader.py args`, in a forked process."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    try:
        test_reader.main(args)
    finally:
        close_loggers()


def test_two_forked_processes_score_what_one_process_scores(setup, tmp_path):
    """Not slow: test_reader.py's main in 2 processes forked from this one (gloo, the torchrun
    variables; no interpreter imports torch again), against one process: each rank takes every
    second example, rank 0 writes the merge, every example exactly once, same answers and scores."""
    root, model_dir = setup

    def args(name: str) -> list[str]:
        return [
            "--model_path", str(model_dir), "--eval_data", str(root / "dev.json"), "--checkpoint_dir", str(tmp_path),
            "--name", name, "--write_results", "--write_crossattention_scores", "--per_gpu_batch_size", "2",
            *COMMON[:4], "--device", "cpu",
        ]  # fmt: skip

    try:
        test_reader.main(args("one"))
    finally:
        close_loggers()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_test_reader_rank, args=(2, port, args("two")), nprocs=2, join=True, start_method="fork")
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "final_output.txt").read_bytes() == (one / "final_output.txt").read_bytes()
    lines = (two / "final_output.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [f"q{i}" for i in range(6)]  # each example once, in order
    scored, alone = load_questions(two / "dataset_wscores.json"), load_questions(one / "dataset_wscores.json")
    assert [ex["id"] for ex in scored] == [f"q{i}" for i in range(6)]
    for a, b in zip(scored, alone):
        assert [c["score"] for c in a["ctxs"][:2]] == pytest.approx([c["score"] for c in b["ctxs"][:2]], abs=1e-5)
        assert a["ctxs"][2]["retriever_score"] == 0.5 and "score" not in a["ctxs"][2]
    assert "2 processes" in (two / "run.log").read_text()
