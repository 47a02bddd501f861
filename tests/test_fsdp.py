"""Sharded training (--fsdp, FSDP2) on 2 gloo processes: the same weights as DDP, exact
resume from shards, a SIGKILL during a sharded save, and the consolidated best_dev."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import load_file

from src.distributed import Runtime
from src.modeling import SHARDED_DIR
from src.reader.model import FiDT5, load_reader_model
from src.retriever.model import Retriever, RetrieverConfig
from src.toy.tiny_models import save_tiny_bert, save_tiny_t5, tiny_bert_config, tiny_t5_config
from src.train import checkpoint
from src.train.fsdp import FullySharded, sharding_units

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
NAMES = "anna boris clara dmitri elena farid".split()
COLORS = "red blue green yellow black white".split()


def test_units_are_the_transformer_blocks():
    reader = FiDT5(tiny_t5_config(30, layers=3, num_decoder_layers=2))
    assert [type(m).__name__ for m in sharding_units(reader)] == ["T5Block"] * 5


def examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, other = rng.sample(NAMES, 2)
        color, other_color = rng.sample(COLORS, 2)
        ctxs = [
            {"title": name, "text": f"{name} likes the color {color} .", "score": 2.0},
            {"title": other, "text": f"{other} likes {other_color} .", "score": 1.0},
        ]
        rng.shuffle(ctxs)
        out.append({"id": f"q{i}", "question": f"what color does {name} like ?", "answers": [color],
                    "ctxs": ctxs[: 1 + i % 2]})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    texts = [" ".join(NAMES + COLORS), "question: title: context: what color does like the ? ."]
    model_dir = save_tiny_t5(root / "t5", texts, family="t5_v1_1", d_model=16, layers=2, dropout_rate=0.0)
    (root / "train.json").write_text(json.dumps(examples(12, 0)))
    (root / "dev.json").write_text(json.dumps(examples(5, 1)))
    return root, model_dir


def args(world, name: str, total_steps: int, *extra: str) -> list[str]:
    root, model_dir = world
    return [
        "--train_data", str(root / "train.json"), "--eval_data", str(root / "dev.json"),
        "--model_name_or_path", str(model_dir), "--checkpoint_dir", str(root / "runs"), "--name", name,
        "--n_context", "2", "--text_maxlength", "14", "--per_gpu_batch_size", "2", "--device", "cpu",
        "--dropout", "0.1", "--accumulation_steps", "2", "--clip", "0.05", "--eval_freq", "3", "--save_freq", "6",
        "--total_steps", str(total_steps), "--lr", "3e-3", "--optim", "adamw", *extra,
    ]  # fmt: skip


def torchrun(script_args: list[str], script: str = "train_reader.py") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), script, *script_args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(world, name: str, which: str) -> dict[str, torch.Tensor]:
    return load_file(world[0] / "runs" / name / "checkpoint" / which / "model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_fsdp_equals_ddp_and_resumes_exactly(world):
    """6 steps with accumulation 2, clipping active and dropout: --fsdp gives DDP's weights;
    4 steps + a resume from the sharded latest give the straight run's."""
    torchrun(args(world, "ddp", 6))
    torchrun(args(world, "fsdp", 6, "--fsdp"))
    ddp, fsdp = weights(world, "ddp", "step-6"), weights(world, "fsdp", "step-6")
    assert max_difference(ddp, fsdp) <= 1e-5
    latest = world[0] / "runs/fsdp/checkpoint/latest"
    assert not (latest / "model.safetensors").exists() and (latest / SHARDED_DIR / ".metadata").is_file()
    assert sorted(p.name for p in (latest / SHARDED_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (world[0] / "runs/fsdp/checkpoint/best_dev/model.safetensors").is_file()  # consolidated
    # The same dev answers: the evaluation log lines match.
    dev = [line.split("| dev")[1].split("|")[0] for line in (world[0] / "runs/ddp/run.log").read_text().splitlines()
           if "| dev" in line]  # fmt: skip
    dev_fsdp = [line.split("| dev")[1].split("|")[0]
                for line in (world[0] / "runs/fsdp/run.log").read_text().splitlines() if "| dev" in line]  # fmt: skip
    assert dev == dev_fsdp and len(dev) == 2

    # Activation checkpointing changes nothing either (dropout's RNG is replayed).
    torchrun(args(world, "resumed", 4, "--fsdp", "--use_checkpoint"))
    proc = torchrun(args(world, "resumed", 6, "--fsdp", "--use_checkpoint"))
    assert "resuming" in proc.stdout + proc.stderr
    assert max_difference(weights(world, "resumed", "step-6"), fsdp) <= 1e-6


IDS = torch.randint(3, 20, (2, 2, 6), generator=torch.Generator().manual_seed(0))


def _sharded_answers(rank: int, best: str, port: int, out: str) -> None:
    """The sharded model of `best` (2 ranks, weights and optimizer from its shards, random
    weights before) answering under FullySharded.evaluating; rank r answers question r."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    strategy = FullySharded(Runtime(rank=rank, world_size=2))
    config = load_reader_model(best).config
    wrapped = strategy.wrap(type(load_reader_model(best))(config))
    optimizer = torch.optim.AdamW(wrapped.parameters())
    state = torch.load(Path(best) / checkpoint.STATE_FILE, weights_only=True)
    strategy.load(Path(best), wrapped, optimizer, state)
    with strategy.evaluating(wrapped):
        wrapped.eval()
        answers = wrapped.generate(IDS[rank : rank + 1], torch.ones_like(IDS[rank : rank + 1]), max_length=5)
    torch.save(answers, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_consolidated_best_dev_answers_like_the_sharded_model(world, tmp_path):
    """The consolidated best_dev loaded in one process = its shards (read in one process), and
    answers as the sharded model does on 2 ranks."""
    best = world[0] / "runs/fsdp/checkpoint/best_dev"
    if not best.exists():
        torchrun(args(world, "fsdp", 6, "--fsdp"))
    model = load_reader_model(best).eval()  # consolidated: a plain save_pretrained reader
    shards = {"model": {k: torch.empty_like(v) for k, v in model.state_dict().items()}}
    dcp.load(shards, checkpoint_id=str(best / SHARDED_DIR))
    for name, tensor in model.state_dict().items():
        assert torch.equal(shards["model"][name], tensor), name
    mp.spawn(_sharded_answers, args=(str(best), free_port(), str(tmp_path / "answers")), nprocs=2, join=True)
    for rank in (0, 1):
        alone = model.generate(IDS[rank : rank + 1], torch.ones_like(IDS[rank : rank + 1]), max_length=5)
        assert torch.equal(torch.load(tmp_path / f"answers.{rank}", weights_only=True), alone)


# ---------------------------------------------------------------------------
# A SIGKILL during a sharded save (in-process, 2 gloo ranks)
# ---------------------------------------------------------------------------


class _Killed(FullySharded):
    def save(self, directory, wrapped, optimizer, consolidated=True):
        out = super().save(directory, wrapped, optimizer, consolidated)
        if self.runtime.is_main:
            os.kill(os.getpid(), signal.SIGKILL)  # shards written, the rename not done
        return out


def _kill_worker(rank: int, run_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    runtime = Runtime(rank=rank, world_size=2)
    torch.manual_seed(0)
    model = FiDT5(tiny_t5_config(30, d_model=16))
    strategy = FullySharded(runtime)
    wrapped = strategy.wrap(model)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    ids = torch.randint(3, 30, (2, 2, 5), generator=torch.Generator().manual_seed(rank))

    def step():
        wrapped(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids[:, 0].contiguous()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    checkpoint.save(run_dir, "latest", strategy, wrapped, None, optimizer, None, {}, {"step": 1})
    full = {k: v.full_tensor() for k, v in wrapped.state_dict().items()}
    if rank == 0:
        torch.save(full, Path(run_dir) / "step1.pt")
    step()
    killer = _Killed(runtime)
    checkpoint.save(run_dir, "latest", killer, wrapped, None, optimizer, None, {}, {"step": 2})


@pytest.mark.slow
def test_sigkill_during_a_sharded_save_leaves_a_loadable_latest(tmp_path):
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(_kill_worker, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    latest = checkpoint.latest(tmp_path)
    assert latest is not None and latest.name in ("latest", "latest.old")
    state = torch.load(latest / checkpoint.STATE_FILE, weights_only=True)
    assert state["step"] == 1 and state["sharded"] == SHARDED_DIR
    expected = torch.load(tmp_path / "step1.pt", weights_only=True)
    model = load_reader_model(latest)  # the architecture from the config, no weights file
    loaded = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(loaded, checkpoint_id=str(latest / SHARDED_DIR))  # two ranks' shards, read in one process
    for name, tensor in expected.items():
        assert torch.equal(loaded["model"][name], tensor), name


def test_retriever_units_are_its_encoder_layers():
    retriever = Retriever(RetrieverConfig(encoder=tiny_bert_config(30, layers=3).to_dict(), indexing_dimension=8))
    assert [type(m).__name__ for m in sharding_units(retriever)] == ["BertLayer"] * 3


@pytest.mark.slow
def test_retriever_fsdp_equals_ddp(world, tmp_path):
    """train_retriever.py --fsdp (BERT layers sharded; the encoder runs twice a step, for
    questions and passages) gives DDP's weights, with accumulation, clipping and eval."""
    root, _ = world
    bert = save_tiny_bert(tmp_path / "bert", [" ".join(NAMES + COLORS), "question: title: context: what does ?"])

    def retriever_args(name: str, *extra: str) -> list[str]:
        return [
            "--train_data", str(root / "train.json"), "--eval_data", str(root / "dev.json"),
            "--model_name_or_path", str(bert), "--checkpoint_dir", str(root / "runs"), "--name", name,
            "--n_context", "2", "--question_maxlength", "8", "--passage_maxlength", "12", "--indexing_dimension", "8",
            "--per_gpu_batch_size", "2", "--lr", "3e-3", "--dropout", "0.0", "--device", "cpu", "--clip", "0.05",
            "--accumulation_steps", "2", "--eval_freq", "3", "--save_freq", "4", "--total_steps", "4", *extra,
        ]  # fmt: skip

    torchrun(retriever_args("r_ddp"), "train_retriever.py")
    torchrun(retriever_args("r_fsdp", "--fsdp"), "train_retriever.py")
    assert max_difference(weights(world, "r_ddp", "step-4"), weights(world, "r_fsdp", "step-4")) <= 1e-5
