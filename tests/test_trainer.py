"""The shared training loop: schedule, accumulation, checkpoints, resume."""

import logging

import pytest
import torch
from transformers import T5ForConditionalGeneration

from src.cli import set_seed
from src.configs import train_config
from src.distributed import init_distributed
from src.options import Options
from src.toy.tiny_models import build_word_tokenizer, tiny_t5_config
from src.train import checkpoint
from src.train.optim import lr_lambda
from src.train.trainer import EpochSampler, Task, train

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def make_opt(tmp_path, *args):
    options = Options()
    options.add_optim_options()
    options.parser.add_argument("--train_data", default="none")
    return options.parse(["--checkpoint_dir", str(tmp_path), "--device", "cpu", *args])


def test_linear_schedule_warmup_and_decay(tmp_path):
    opt = make_opt(tmp_path, "--scheduler", "linear", "--warmup_steps", "10", "--total_steps", "110")
    f = lr_lambda(opt)
    assert [f(0), f(5), f(10), f(60), f(110), f(200)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    opt.scheduler_steps = 210
    assert lr_lambda(opt)(110) == pytest.approx(0.5)
    opt.fixed_lr = True
    assert lr_lambda(opt)(150) == 1.0
    opt.scheduler = "fixed"
    assert lr_lambda(opt)(0) == 1.0


def test_epoch_sampler_partitions_and_resumes():
    full = [list(EpochSampler(10, seed=1, epoch=0, rank=r, world_size=3)) for r in range(3)]
    assert all(len(part) == 4 for part in full)
    assert set(sum(full, [])) == set(range(10))
    assert list(EpochSampler(10, 1, 0, 1, 3, start=2)) == full[1][2:]
    assert list(EpochSampler(10, 1, 1)) != list(EpochSampler(10, 1, 0))


class Seq2SeqData(torch.utils.data.Dataset):
    def __init__(self, tokenizer, n=12):
        g = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(n):
            words = [WORDS[i] for i in torch.randint(0, len(WORDS), (5,), generator=g)]
            self.items.append((tokenizer(" ".join(words))["input_ids"], tokenizer(words[2])["input_ids"]))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(batch):
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x, _ in batch], batch_first=True)
    labels = torch.nn.utils.rnn.pad_sequence([torch.tensor(y) for _, y in batch], batch_first=True, padding_value=-100)
    return ids, labels


class Killed(Exception):
    pass


def run(tmp_path, name, total_steps, losses, tokenizer, kill_at=None):
    opt = make_opt(
        tmp_path, "--name", name, "--total_steps", str(total_steps), "--eval_freq", "3", "--save_freq", "100",
        "--per_gpu_batch_size", "4", "--accumulation_steps", "2", "--scheduler", "linear", "--warmup_steps", "2",
        "--lr", "1e-2",
    )  # fmt: skip
    run_dir = tmp_path / name
    resume = checkpoint.latest(run_dir)
    set_seed(0)
    if resume:
        model = T5ForConditionalGeneration.from_pretrained(resume)
    else:
        model = T5ForConditionalGeneration(tiny_t5_config(len(tokenizer), dropout_rate=0.3))

    def loss_fn(model, batch):
        if kill_at is not None and len(losses) == kill_at:
            raise Killed  # the process dies before computing this batch
        ids, labels = batch
        loss = model(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).loss
        losses.append(round(loss.item(), 6))
        return loss

    def eval_fn(model):
        return {"loss": float(losses[-1])}

    logger = logging.getLogger("fid")
    task = Task(Seq2SeqData(tokenizer), collate, loss_fn, eval_fn, metric="loss", higher_is_better=False)
    runtime = init_distributed("cpu")
    return train(task, model, tokenizer, train_config(opt), runtime, run_dir, resume, logger)


@pytest.mark.parametrize("kill_at, saved_at", [(7, 6), (5, 4)])
def test_resume_gives_the_same_losses(tmp_path, kill_at, saved_at):
    """Killed, then resumed from `latest` = uninterrupted, loss for loss (dropout on).

    Evaluation every 3 steps with accumulation 2: the evaluation at step 3 falls inside an
    accumulation cycle, so its save waits for step 4 (saving at 3 would lose a gradient).
    """
    tokenizer = build_word_tokenizer(WORDS, "t5")
    straight: list[float] = []
    run(tmp_path, "straight", 9, straight, tokenizer)
    first: list[float] = []
    with pytest.raises(Killed):
        run(tmp_path, "resumed", 9, first, tokenizer, kill_at=kill_at)
    latest = checkpoint.latest(tmp_path / "resumed")
    assert checkpoint.load_training_state(latest)["step"] == saved_at
    second: list[float] = []
    final = run(tmp_path, "resumed", 9, second, tokenizer)
    assert len(straight) == 9 and len(first) == kill_at and len(second) == 9 - saved_at
    first = first[:saved_at]
    assert first + second == straight
    assert final["step"] == 9
    root = checkpoint.checkpoint_root(tmp_path / "resumed")
    assert {p.name for p in root.iterdir()} >= {"latest", "best_dev"}
    assert not [p for p in root.iterdir() if p.name.startswith(".") or p.name.endswith(".old")]
    state = torch.load(root / "latest" / checkpoint.STATE_FILE, weights_only=True)
    assert state["step"] == 9 and state["options"]["total_steps"] == 9


def test_interrupted_swap_leaves_a_loadable_checkpoint(tmp_path):
    """A kill between the two renames of a save leaves `latest.old`, which `latest()` finds."""
    tokenizer = build_word_tokenizer(WORDS, "t5")
    run(tmp_path, "r", 3, [], tokenizer)
    root = checkpoint.checkpoint_root(tmp_path / "r")
    (root / "latest").rename(root / "latest.old")
    found = checkpoint.latest(tmp_path / "r")
    assert found == root / "latest.old"
    assert checkpoint.load_training_state(found)["step"] == 3


def test_start_point_resumes_unless_model_path_changes(tmp_path):
    tokenizer = build_word_tokenizer(WORDS, "t5")
    run(tmp_path, "r", 3, [], tokenizer)
    latest = checkpoint.latest(tmp_path / "r")
    assert checkpoint.start_point(tmp_path / "r", "none", "t5-small", "t5-base") == (str(latest), latest)
    assert checkpoint.start_point(tmp_path / "fresh", "none", "t5-small", "t5-base") == ("t5-small", None)
    # not what the run started from: a fresh start
    assert checkpoint.start_point(tmp_path / "r", "some/other/reader", "t5-small", "t5-base") == (
        "some/other/reader",
        None,
    )
    assert checkpoint.start_point(tmp_path / "fresh", "none", None, "t5-base") == ("t5-base", None)
