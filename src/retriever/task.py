"""The retriever side of paper [2]: loading, the training loss step, dev evaluation, and
the `Task` that train_retriever.py hands to the trainer. Mirrors reader.py."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from dataclasses import dataclass

import torch
import transformers
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from src import distributed as dist
from src.data.datasets import RetrieverCollator, RetrieverDataset
from src.devices import precision_autocast
from src.distributed import Runtime
from src.metrics import per_question_ranking_metrics
from src.modeling import check_model_path, has_sharded_weights, has_weights
from src.retriever.losses import get_loss
from src.retriever.model import Retriever, RetrieverConfig, is_saved_retriever
from src.train.trainer import Task

logger = logging.getLogger("fid")

RANKING_KS = (1, 2, 5)


@dataclass(frozen=True)
class EncoderChoice:
    """How a fresh retriever is built around an encoder (`--indexing_dimension --no_projection
    --extract_cls --no_question_mask --no_passage_mask`); a saved retriever keeps its own.
    `given`: the flags the user set (a saved retriever says when they ask otherwise)."""

    indexing_dimension: int = 768
    no_projection: bool = False
    extract_cls: bool = False
    no_question_mask: bool = False
    no_passage_mask: bool = False
    tokenizer_name_or_path: str | None = None
    given: Collection[str] = ()


@dataclass(frozen=True)
class RetrieverTaskConfig:
    """How the retriever learns and is evaluated in train_retriever.py."""

    n_context: int = 1
    question_maxlength: int = 40
    passage_maxlength: int = 200
    per_gpu_batch_size: int = 1
    num_workers: int = 0
    eval_print_freq: int = 1000
    precision: str = "fp32"
    retriever_loss: str = "kl"
    temperature_gold: float = 1.0
    temperature_score: float = 1.0
    in_batch_negatives: bool = False


def load_retriever(
    model_dir: str, choice: EncoderChoice = EncoderChoice(), log: logging.Logger = logger, trained: bool = False
):
    """(retriever, tokenizer) from `model_dir`: a retriever saved by train_retriever.py, or
    (unless `trained`) any BERT-like encoder (hub name or directory), around which a fresh
    retriever is built with `--indexing_dimension --no_projection --extract_cls
    --no_question_mask --no_passage_mask` from `choice`. A saved retriever keeps its own
    settings (its trained projection included) and says so when a flag asks otherwise.
    Tokenizer: `--tokenizer_name_or_path`, else `model_dir`."""
    model_dir = str(model_dir)
    if trained and not os.path.exists(model_dir):
        raise FileNotFoundError(
            f"--model_path {model_dir}: no such directory (a retriever saved by train_retriever.py)"
        )
    if trained and not is_saved_retriever(model_dir):
        raise FileNotFoundError(
            f"--model_path {model_dir}: not a saved retriever (a directory written by train_retriever.py, "
            "with a config.json of model_type fid_retriever)"
        )
    check_model_path(model_dir, "retriever")
    if os.path.isdir(model_dir) and not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir}: no config.json, not a retriever or encoder (BERT-like) directory")
    if is_saved_retriever(model_dir) and has_sharded_weights(model_dir) and not has_weights(model_dir):
        retriever = Retriever(RetrieverConfig.from_pretrained(model_dir))  # a --fsdp latest: shards load later
    elif is_saved_retriever(model_dir):
        retriever = Retriever.from_pretrained(model_dir, dtype=torch.float32)
        _warn_if_options_differ(retriever.config, choice, model_dir, log)
    else:
        retriever = Retriever.from_encoder(
            model_dir,
            indexing_dimension=choice.indexing_dimension,
            projection=not choice.no_projection,
            extract_cls=choice.extract_cls,
            apply_question_mask=not choice.no_question_mask,
            apply_passage_mask=not choice.no_passage_mask,
        )
    tokenizer_dir = choice.tokenizer_name_or_path or model_dir
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    c = retriever.config
    log.info(
        "retriever from %s (tokenizer %s): dim %d, projection %s, pooling %s, question mask %s, passage mask %s",
        model_dir,
        tokenizer_dir,
        c.indexing_dimension,
        c.projection,
        "cls" if c.extract_cls else "mean",
        c.apply_question_mask,
        c.apply_passage_mask,
    )
    return retriever, tokenizer


def _warn_if_options_differ(config: RetrieverConfig, choice: EncoderChoice, model_dir: str, log) -> None:
    """A saved retriever keeps the embedding it was trained with; say so when a flag set
    on the command line asks for another one."""
    flags = {  # flag: (config field, value the flag asks for)
        "no_projection": ("projection", lambda v: not v),
        "indexing_dimension": ("indexing_dimension", lambda v: v),
        "extract_cls": ("extract_cls", lambda v: v),
        "no_question_mask": ("apply_question_mask", lambda v: not v),
        "no_passage_mask": ("apply_passage_mask", lambda v: not v),
    }
    for flag, (field, asked) in flags.items():
        if flag not in choice.given:
            continue  # not set by the user
        if getattr(config, field) != asked(getattr(choice, flag)):
            trained = getattr(config, field)
            log.warning("%s was trained with %s=%s: keeping it and ignoring --%s", model_dir, field, trained, flag)


def to_device(batch, device: torch.device):
    """RetrieverBatch → (question_ids, question_mask, passage_ids, passage_mask, gold_scores) on `device`."""
    return tuple(
        t.to(device)
        for t in (batch.question_ids, batch.question_mask, batch.passage_ids, batch.passage_mask, batch.gold_scores)
    )


def make_loss(config: RetrieverTaskConfig, device: torch.device):
    """The training loss step: `--retriever_loss` of the scores against the reader's gold
    scores, with the batch's other passages as negatives under `--in_batch_negatives`."""
    loss_fn = get_loss(config.retriever_loss)

    def loss(model, batch) -> torch.Tensor:
        question_ids, question_mask, passage_ids, passage_mask, gold = to_device(batch, device)
        scores, negatives = model(question_ids, question_mask, passage_ids, passage_mask, config.in_batch_negatives)
        return loss_fn(scores, gold, config.temperature_gold, config.temperature_score, negatives)

    return loss


@torch.no_grad()
def evaluate(
    model: Retriever, dataset, collator, config: RetrieverTaskConfig, runtime: Runtime, logger
) -> dict[str, float]:
    """Dev metrics over the whole dev set (each rank takes every world_size-th question,
    sums added over ranks): the --retriever_loss, mean inversions, avg/idx top-k (k = 1, 2, 5)."""
    loss_fn = get_loss(config.retriever_loss)
    was_training = model.training
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(runtime.rank, len(dataset), runtime.world_size))
    loader = DataLoader(
        shard, batch_size=config.per_gpu_batch_size, shuffle=False, collate_fn=collator, num_workers=config.num_workers
    )
    names = ["loss", "inversions"] + [f"{m}_top{k}" for m in ("avg", "idx") for k in RANKING_KS]
    sums = dict.fromkeys(names, 0.0)  # sums over this rank's questions
    count = 0
    for i, batch in enumerate(tqdm(loader, desc="dev", disable=not runtime.is_main, leave=False)):
        question_ids, question_mask, passage_ids, passage_mask, gold = to_device(batch, runtime.device)
        with precision_autocast(config.precision, runtime.device):
            scores, _ = model(question_ids, question_mask, passage_ids, passage_mask)
        # Loss in fp32, never with in-batch negatives; batch mean × batch size, so the result
        # is the mean over all questions.
        loss = loss_fn(scores.float(), gold, config.temperature_gold, config.temperature_score)
        sums["loss"] += loss.item() * len(gold)
        for name, values in per_question_ranking_metrics(scores, gold, RANKING_KS).items():
            sums[name] += float(values.sum())
        count += len(gold)
        if config.eval_print_freq > 0 and (i + 1) % config.eval_print_freq == 0:
            logger.info("dev: %d / %d batches", i + 1, len(loader))
    *totals, total_count = dist.sum_over_ranks([sums[name] for name in names] + [float(count)])
    metrics = {name: total / max(total_count, 1.0) for name, total in zip(names, totals)}
    if was_training:
        model.train()
    return metrics


def retriever_task(
    config: RetrieverTaskConfig,
    runtime: Runtime,
    tokenizer,
    retriever: Retriever,
    train_dataset: RetrieverDataset,
    eval_dataset,
    log=logger,
):
    """What train_retriever.py trains: best_dev by the dev loss (lower is better)."""
    collator = RetrieverCollator(
        tokenizer,
        config.n_context,
        config.question_maxlength,
        config.passage_maxlength,
        pad_questions_to_max=not retriever.config.apply_question_mask,
        pad_passages_to_max=not retriever.config.apply_passage_mask,
    )

    def dev_metrics(model) -> dict[str, float]:
        return evaluate(model, eval_dataset, collator, config, runtime, log) if len(eval_dataset) else {}

    return Task(
        train_dataset, collator, make_loss(config, runtime.device), dev_metrics, metric="loss", higher_is_better=False
    )
