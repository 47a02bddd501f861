"""The one training loop, shared by the reader and the retriever (docs/distributed.md).

It knows nothing about readers or retrievers: a script hands it a `Task` (dataset,
collator, `loss(model, batch)`, `evaluate(model) -> {metric: value}` and the metric that
picks `best_dev`). It owns the optimizer and schedule, steps, gradient accumulation,
clipping, the eval/save cadence, `best_dev`/`step-N`/`latest`, tensorboard, the progress
bar, SIGTERM/SIGUSR1, and resuming exactly (same data order, same random state). How the
model is spread over the ranks (DDP, or FSDP with --fsdp) is a `Strategy` (strategy.py, fsdp.py).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from src import distributed as dist
from src.devices import precision_autocast
from src.distributed import Runtime
from src.errors import InputError, NonFiniteLoss
from src.train import checkpoint, runlock
from src.train.config import TrainConfig
from src.train.optim import set_optim
from src.train.strategy import DataParallel, Strategy


class EpochSampler(Sampler[int]):
    """A fixed permutation per (seed, epoch), split across ranks, that can start mid-epoch.

    Every rank gets the same number of indices (the permutation is padded by wrapping
    around, as DistributedSampler does) so DDP ranks never wait on each other.
    """

    def __init__(self, n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.seed, self.epoch = n, seed, epoch
        self.rank, self.world_size, self.start = rank, world_size, start

    def rank_indices(self) -> list[int]:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()
        per_rank = math.ceil(self.n / self.world_size)
        perm += perm[: per_rank * self.world_size - self.n]
        return perm[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self.rank_indices()[self.start :])

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size) - self.start


@dataclass
class Task:
    """What the loop trains: one side of the papers, as `reader.py` / `retriever.py` build it."""

    dataset: torch.utils.data.Dataset
    collator: Callable
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]  # (model, collated batch) → scalar loss
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None  # dev metrics; None: no dev set
    metric: str  # the dev metric that picks best_dev
    higher_is_better: bool
    count_passages: Callable[[Any], int] | None = None  # passages read in a collated batch (throughput logs)
    # Optional: a task that runs its own backward pass (e.g. GradCache) instead of `loss` +
    # backward. backward(model, batch, scale) backpropagates scale(loss) (the accumulation
    # and loss scaling of the loop) itself and returns the loss, detached. Called inside the
    # strategy's `accumulating` context, without autocast (the task applies its precision).
    backward: Callable[[torch.nn.Module, Any, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor] | None = None


# The host reads the device only at these points, never every step (a read waits for the
# GPU to finish, and it then idles while the next step is queued): the progress bar's loss
# every PROGRESS_EVERY batches, the ranks' agreement on signals and non-finite losses every
# CHECK_EVERY optimizer steps (and at every save and evaluation).
PROGRESS_EVERY = 25
CHECK_EVERY = 8
# A loss that is not finite for this many optimizer steps in a row stops the run: under
# fp16 the GradScaler would skip every step and training would stall silently.
NONFINITE_STEPS = 3


def _is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    if best is None:
        return True
    return value > best if higher_is_better else value < best


def train(
    task: Task,
    model: torch.nn.Module,
    tokenizer,
    config: TrainConfig,
    runtime: Runtime,
    run_dir: str | Path,
    resume_dir: Path | None,
    logger,
    strategy: Strategy | None = None,
):
    """Train `model` (on `runtime.device`, not yet wrapped) on `task` until `config.total_steps`
    batches, spread over the ranks by `strategy` (default: DDP); resume from `resume_dir` (a
    run's `latest`) when given. Returns {"step", "best_metric"}."""
    strategy = strategy or DataParallel(runtime)
    return Trainer(task, model, tokenizer, config, runtime, strategy, run_dir, resume_dir, logger).run()


class Trainer:
    """One run of the loop. Saves happen only at the end of an accumulation cycle: the
    gradients accumulated so far are not saved, so a resume from mid-cycle would differ."""

    def __init__(
        self,
        task: Task,
        model,
        tokenizer,
        config: TrainConfig,
        runtime: Runtime,
        strategy: Strategy,
        run_dir,
        resume_dir: Path | None,
        logger,
    ):
        self.task, self.tokenizer, self.config, self.logger = task, tokenizer, config, logger
        self.runtime, self.strategy = runtime, strategy
        self.run_dir = Path(run_dir)
        self.batches_per_epoch = math.ceil(
            math.ceil(len(task.dataset) / runtime.world_size) / config.per_gpu_batch_size
        )
        if self.batches_per_epoch == 0:
            raise InputError(f"{config.train_data}: no training examples")
        self.model = strategy.wrap(model)  # before the optimizer: a sharding strategy replaces the parameters
        self.optimizer, self.scheduler = set_optim(config.optim, self.model)
        state = {"step": 0, "best_metric": None}
        if resume_dir is not None:
            state = checkpoint.load_training_state(resume_dir, self.optimizer, self.scheduler, strategy, self.model)
            logger.info("resumed at step %d (best dev %s %s)", state["step"], task.metric, state["best_metric"])
        if runtime.is_distributed:
            checkpoint.agree_on_step(state["step"], resume_dir)
        self.step: int = state["step"]
        self.best: float | None = state["best_metric"]
        self.use_scaler = config.precision == "fp16" and runtime.device.type == "cuda"
        self.scaler = strategy.grad_scaler(self.use_scaler)
        if self.use_scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.accumulation = max(1, config.accumulation_steps)
        self.running_loss, self.running_count = torch.zeros((), dtype=torch.float64, device=runtime.device), 0
        # Optimizer steps in a row whose loss was not finite (device scalars: read at check points).
        self.nonfinite_run = torch.zeros((), dtype=torch.long, device=runtime.device)
        self.nonfinite_worst = torch.zeros_like(self.nonfinite_run)
        self.cycle_nonfinite = torch.zeros((), dtype=torch.bool, device=runtime.device)
        self.cycles = 0
        self.running_passages = 0  # since the last evaluation, this process
        self.need_latest = self.pending_step_save = False
        self.tb = None

    # -- the loop ----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg, runtime = self.config, self.runtime
        if runtime.is_main:
            from torch.utils.tensorboard import SummaryWriter  # heavy import, only where it is used

            self.tb = SummaryWriter(log_dir=str(self.run_dir))
            checkpoint.clean_interrupted_saves(self.run_dir)
        self.logger.info(
            "training from step %d to %d: %d examples, %d batches per epoch per process, %d processes",
            self.step,
            cfg.total_steps,
            len(self.task.dataset),
            self.batches_per_epoch,
            runtime.world_size,
        )
        self.model.train()
        self.t0 = time.time()
        self.bar = tqdm(total=cfg.total_steps, initial=self.step, desc="train", disable=not runtime.is_main)
        # SIGTERM (scancel, preemption): save `latest` at the next step boundary, then exit.
        with dist.handle_sigterm():
            while self.step < cfg.total_steps:
                for batch in self._epoch_loader():
                    self._train_step(batch)
                    if self.step >= cfg.total_steps:
                        break
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        return {"step": self.step, "best_metric": self.best}

    def _epoch_loader(self) -> DataLoader:
        """The rest of the current epoch, in the order an uninterrupted run sees it."""
        cfg, runtime, dataset = self.config, self.runtime, self.task.dataset
        epoch, offset = divmod(self.step, self.batches_per_epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        bs = cfg.per_gpu_batch_size
        sampler = EpochSampler(len(dataset), cfg.seed, epoch, runtime.rank, runtime.world_size, start=offset * bs)
        return DataLoader(
            dataset,
            batch_size=bs,
            sampler=sampler,
            collate_fn=self.task.collator,
            num_workers=cfg.num_workers,
            # Own generator: creating the iterator must not consume the global RNG
            # (dropout), or a resumed run would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(cfg.seed + epoch),
        )

    def _train_step(self, batch) -> None:
        cfg, model = self.config, self.model
        self.step += 1
        sync = self.step % self.accumulation == 0 or self.step == cfg.total_steps
        with self.strategy.accumulating(model, sync):
            if self.task.backward is not None:
                loss = self.task.backward(model, batch, lambda x: self.scaler.scale(x / self.accumulation))
            else:
                with precision_autocast(cfg.precision, self.runtime.device):
                    loss = self.task.loss(model, batch)
                self.scaler.scale(loss / self.accumulation).backward()
        if sync:
            self.scaler.unscale_(self.optimizer)
            if cfg.clip > 0:
                self.strategy.clip_grad_norm(model, cfg.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        self.running_loss += loss.double()  # the same float64 sum as adding loss.item()s
        self.running_count += 1
        self.cycle_nonfinite |= ~torch.isfinite(loss)
        if sync:
            self.nonfinite_run = torch.where(self.cycle_nonfinite, self.nonfinite_run + 1, 0)
            self.nonfinite_worst = torch.maximum(self.nonfinite_worst, self.nonfinite_run)
            self.cycle_nonfinite = torch.zeros_like(self.cycle_nonfinite)
        self.bar.update(1)
        if self.task.count_passages is not None:
            self.running_passages += self.task.count_passages(batch)
        if self.runtime.is_main and (self.step % PROGRESS_EVERY == 0 or self.step == cfg.total_steps):
            postfix = {"loss": f"{loss.item():.4f}", "lr": f"{self.scheduler.get_last_lr()[0]:.2e}"}
            if self.task.count_passages is not None:
                postfix["passages/s"] = f"{self.running_passages / max(time.time() - self.t0, 1e-9):.3g}"
            self.bar.set_postfix(postfix)
        if self.step % cfg.eval_freq == 0 or self.step == cfg.total_steps:
            self._evaluate()
        if self.step % cfg.save_freq == 0:
            self.pending_step_save = True
        if sync:
            self._at_cycle_end()

    def _at_cycle_end(self) -> None:
        """Saves and stops, all at the end of an accumulation cycle."""
        cfg, runtime = self.config, self.runtime
        synced = self.pending_step_save or self.need_latest  # a save: the ranks wait for each other anyway
        if self.pending_step_save:
            self._save(f"step-{self.step}")
            self.pending_step_save, self.need_latest = False, True
        if self.need_latest:
            self._save("latest")
            self.need_latest = False
        self.cycles += 1
        checkpoint_due = synced or self.cycles % CHECK_EVERY == 0 or self.step >= cfg.total_steps
        if runtime.is_distributed and not checkpoint_due:
            return  # the ranks must stop at the same step: they agree only at check points
        terminated, preempted, nonfinite = self._flags(check_loss=checkpoint_due)
        if nonfinite:
            raise NonFiniteLoss(
                f"the training loss was not finite for {NONFINITE_STEPS} or more optimizer steps in a row (seen at "
                f"step {self.step}, precision {cfg.precision}); checkpoints saved so far are in "
                f"{checkpoint.checkpoint_root(self.run_dir)}. With fp16 T5's activations overflow "
                "(T5 v1.1, Flan-T5, t5-large and up): use --precision bf16 (or fp32); else lower --lr"
            )
        if preempted:
            self._save("latest")
            if runtime.is_main:
                dist.requeue_slurm_job()
            self.logger.warning("preempted at step %d: saved latest, exiting", self.step)
            sys.exit(0)
        if terminated and self.step < cfg.total_steps:
            self._save("latest")
            self.logger.warning(
                "interrupted at step %d/%d: saved %s; run the same command to resume",
                self.step,
                cfg.total_steps,
                checkpoint.checkpoint_root(self.run_dir) / "latest",
            )
            dist.destroy()
            runlock.release()
            sys.exit(dist.EXIT_INTERRUPTED)

    def _flags(self, check_loss: bool) -> tuple[bool, bool, bool]:
        """(SIGTERM, SIGUSR1 under SLURM, a non-finite run of NONFINITE_STEPS) seen by any
        rank: one all-reduce when distributed. The loss is read from the device only when
        `check_loss` (single process: the signals are checked every cycle, for free)."""
        flags = [
            float(dist.INTERRUPTED["signal"] is not None),
            float("SLURM_JOB_ID" in os.environ and dist.PREEMPTED["flag"]),
            float(check_loss and int(self.nonfinite_worst) >= NONFINITE_STEPS),
        ]
        if self.runtime.is_distributed:
            flags = dist.sum_over_ranks(flags)
        return flags[0] > 0, flags[1] > 0, flags[2] > 0

    def _evaluate(self) -> None:
        cfg, runtime, step = self.config, self.runtime, self.step
        running = float(self.running_loss)  # the one read of the losses per evaluation
        train_loss, _ = dist.weighted_average(running / max(1, self.running_count), self.running_count)
        steps_done, self.running_count = self.running_count, 0
        self.running_loss = torch.zeros_like(self.running_loss)
        lr = self.scheduler.get_last_lr()[0]
        elapsed = time.time() - self.t0
        # Evaluation must not move the random state dropout draws from (a DataLoader alone
        # draws a seed): training is the same whatever the eval cadence, and a run stopped
        # at an evaluation resumes exactly.
        rng = checkpoint.rng_state()
        metrics = {}
        if self.task.evaluate is not None:
            with self.strategy.evaluating(self.model):
                metrics = self.task.evaluate(self.strategy.unwrap(self.model))
        checkpoint.set_rng_state(rng)
        self.model.train()
        examples_per_s = steps_done * cfg.per_gpu_batch_size * runtime.world_size / max(elapsed, 1e-9)
        message = f"step {step}/{cfg.total_steps} | train loss {train_loss:.4f} | lr {lr:.2e}"
        message += "".join(f" | dev {k} {v:.4f}" for k, v in metrics.items())
        message += f" | {elapsed:.1f}s ({examples_per_s:.1f} examples/s"
        if self.task.count_passages is not None:  # this process's passages, times the processes
            message += f", {self.running_passages * runtime.world_size / max(elapsed, 1e-9):.3g} passages/s"
        message += ")"
        self.running_passages = 0
        if self.task.metric in metrics and _is_better(metrics[self.task.metric], self.best, self.task.higher_is_better):
            self.best = metrics[self.task.metric]
            self._save("best_dev")
            message += " | new best_dev"
        self.need_latest = True
        self.logger.info(message)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", train_loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            for k, v in metrics.items():
                self.tb.add_scalar(f"dev/{k}", v, step)
            self.tb.flush()
        self.t0 = time.time()

    def _save(self, name: str) -> None:
        state = {
            "step": self.step,
            "best_metric": self.best,
            "scaler": self.scaler.state_dict() if self.use_scaler else None,
        }
        checkpoint.save(
            self.run_dir,
            name,
            self.strategy,
            self.model,
            self.tokenizer,
            self.optimizer,
            self.scheduler,
            self.config.options,
            state,
        )
