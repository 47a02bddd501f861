"""Wrong results a GPU would show, reproduced on CPU: T5's feed-forward output overflowing
fp16 (scaled `wo`), a loss that stays NaN (the run stops, naming the step), and missing
passages reaching the retriever's encoder as fully masked rows."""

import logging
import math

import pytest
import torch

from src.cli import set_seed
from src.configs import train_config
from src.distributed import init_distributed
from src.errors import NonFiniteLoss
from src.options import Options
from src.reader import precision
from src.reader.model import FiDT5
from src.retriever.model import Retriever, RetrieverConfig
from src.toy.tiny_models import tiny_bert_config, tiny_t5_config
from src.train import trainer
from src.train.trainer import Task, train


def scaled_reader(feed_forward: str, scale: float = 3e4) -> FiDT5:
    """A tiny FiD T5 whose feed-forward outputs exceed fp16's 65504 (as t5-large / Flan-T5's do)."""
    torch.manual_seed(0)
    model = FiDT5(tiny_t5_config(50, d_model=32, layers=2, feed_forward_proj=feed_forward))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, precision.FEED_FORWARD):
                module.wo.weight.mul_(scale)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 50, (2, 3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 2] = 0  # a missing passage
    mask[1, 1, 5:] = 0
    return ids, mask, torch.randint(2, 50, (2, 4), generator=g)


def loss_of(model, dtype=None):
    ids, mask, labels = batch()
    if dtype is None:
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    with torch.autocast("cpu", dtype=dtype):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize("feed_forward", ["relu", "gated-gelu"])  # t5 v1.0 / v1.1 and Flan-T5
def test_fp16_with_large_wo_gives_a_finite_loss_and_gradients(feed_forward):
    model = scaled_reader(feed_forward)
    assert all(type(m.wo) is precision.Float32Linear for m in model.modules() if isinstance(m, precision.FEED_FORWARD))
    loss = loss_of(model, torch.float16)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # The mechanism: without the float32 `wo`, fp16 autocast overflows to inf, then NaN.
    for module in model.modules():
        if isinstance(module, precision.FEED_FORWARD):
            module.wo.__class__ = torch.nn.Linear
    assert not torch.isfinite(loss_of(model, torch.float16))


def test_float32_wo_changes_nothing_outside_fp16():
    model = scaled_reader("gated-gelu", scale=1.0)
    kept = [loss_of(model).item(), loss_of(model, torch.bfloat16).item()]
    for module in model.modules():
        if isinstance(module, precision.FEED_FORWARD):
            module.wo.__class__ = torch.nn.Linear
    assert [loss_of(model).item(), loss_of(model, torch.bfloat16).item()] == kept
    assert set(model.state_dict()) == set(FiDT5(model.config).state_dict())


def nan_task(losses: list[float], bad_steps: set[int]) -> Task:
    weight = torch.nn.Parameter(torch.ones(()))

    def loss(model, batch):
        step = len(losses) + 1
        # NaN in the loss only: the gradients stay finite, as when GradScaler skips a step
        value = model.weight.sum() + torch.tensor(math.nan if step in bad_steps else 0.0)
        losses.append(value.item())
        return value

    return Task(list(range(400)), lambda b: b, loss, None, metric="loss", higher_is_better=False), weight


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def save_pretrained(self, directory):
        torch.save(self.state_dict(), directory / "weights.pt")


def run_with(tmp_path, bad_steps, total_steps=100, precision_flag="fp32"):
    options = Options()
    options.add_optim_options()
    options.parser.add_argument("--train_data", default="none")
    opt = options.parse(
        ["--checkpoint_dir", str(tmp_path), "--device", "cpu", "--total_steps", str(total_steps),
         "--eval_freq", "1000", "--save_freq", "1000", "--precision", precision_flag]
    )  # fmt: skip
    losses: list[float] = []
    task, _ = nan_task(losses, bad_steps)
    set_seed(0)
    runtime = init_distributed("cpu")
    result = train(task, Scalar(), None, train_config(opt), runtime, tmp_path / "run", None, logging.getLogger("fid"))
    return result, losses


def test_a_loss_that_stays_nan_stops_the_run_naming_the_step(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"step 8.*--precision bf16"):
        run_with(tmp_path, bad_steps=set(range(2, 200)))
    # A short run of non-finite losses (a skipped fp16 step) does not stop it.
    result, losses = run_with(tmp_path / "short", bad_steps={3, 4}, total_steps=20)
    assert result["step"] == 20 and len(losses) == 20
    assert trainer.NONFINITE_STEPS == 3 and trainer.CHECK_EVERY <= 8


def test_fp16_training_with_large_wo_never_stalls(tmp_path):
    """The reader trained under fp16 autocast with overflowing feed-forward weights: every loss finite."""
    model = scaled_reader("gated-gelu", scale=3e3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = loss_of(model, torch.float16)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# -- the retriever and missing passages -------------------------------------------------


def retriever() -> Retriever:
    torch.manual_seed(0)
    config = RetrieverConfig(encoder=tiny_bert_config(60, hidden=32, layers=2), indexing_dimension=16)
    return Retriever(config).eval()


def test_no_fully_masked_row_reaches_the_retriever_encoder_and_scores_and_gradients_are_unchanged():
    model = retriever()
    seen: list[torch.Tensor] = []
    model.encoder.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["attention_mask"].clone()), with_kwargs=True
    )
    g = torch.Generator().manual_seed(3)
    q_ids, q_mask = torch.randint(5, 60, (2, 6), generator=g), torch.ones(2, 6, dtype=torch.long)
    p_ids = torch.randint(5, 60, (2, 3, 7), generator=g)
    p_mask = torch.ones_like(p_ids)
    p_mask[:, :, 5:] = 0
    p_mask[0, 2] = 0  # question 0 has 2 passages, question 1 has 3
    p_ids = p_ids * p_mask
    scores, _ = model(q_ids, q_mask, p_ids, p_mask)
    assert all(bool(m.sum(-1).gt(0).all()) for m in seen), "a fully masked row reached the encoder"
    assert scores[0, 2] == -math.inf and torch.isfinite(scores[1]).all()
    loss = torch.log_softmax(scores, -1).masked_fill(torch.isinf(scores), 0).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    # The same questions with their real passages only, one question at a time: same scores and gradients.
    reference_scores = []
    reference_loss = 0.0
    for b, n in ((0, 2), (1, 3)):
        s, _ = model(q_ids[b : b + 1], q_mask[b : b + 1], p_ids[b : b + 1, :n], p_mask[b : b + 1, :n])
        reference_scores.append(s[0])
        reference_loss = reference_loss + torch.log_softmax(s, -1).sum()
    reference = torch.autograd.grad(reference_loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(scores[0, :2], reference_scores[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[1], reference_scores[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, reference):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
