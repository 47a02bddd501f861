"""The retriever side of paper [2]: loading, the training loss step, dev evaluation, and
the `Task` that train_retriever.py hands to the trainer. Mirrors reader.py."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from src import distributed as dist
from src.data.datasets import RetrieverCollator, RetrieverDataset
from src.devices import precision_autocast
from src.distributed import Runtime
from src.errors import InputError, ModelPathError
from src.metrics import per_question_ranking_metrics
from src.modeling import check_model_path, has_sharded_weights, has_weights, loading
from src.retriever.grad_cache import grad_cache_backward
from src.retriever.losses import get_loss
from src.retriever.model import (
    PAPER_QUESTION_TEMPLATE,
    Retriever,
    RetrieverConfig,
    check_template,
    is_saved_retriever,
    passage_template_for,
)
from src.train.trainer import Task

logger = logging.getLogger("fid")

RANKING_KS = (1, 2, 5)


@dataclass(frozen=True)
class EncoderChoice:
    """How a fresh retriever is built around an encoder, its text recipe included
    (`--indexing_dimension --no_projection --pooling/--extract_cls --normalize
    --similarity_scale --question_template --passage_template/--no_title --question_maxlength
    --passage_maxlength --no_question_mask --no_passage_mask`); a saved retriever keeps its
    own. `given`: the flags the user set (checked against a saved retriever's)."""

    indexing_dimension: int = 768
    no_projection: bool = False
    extract_cls: bool = False
    pooling: str | None = None  # None: cls with --extract_cls, else mean
    normalize: bool = False
    similarity_scale: float | None = None  # None: the paper's 1/√d
    question_template: str = PAPER_QUESTION_TEMPLATE
    passage_template: str | None = None  # None: the paper's, without its title part under --no_title
    no_title: bool = False
    question_maxlength: int = 40
    passage_maxlength: int = 200
    no_question_mask: bool = False
    no_passage_mask: bool = False
    tokenizer_name_or_path: str | None = None
    given: Collection[str] = ()

    def recipe(self) -> dict[str, Any]:
        """RetrieverConfig fields of a fresh retriever (InputError for contradicting flags)."""
        if self.extract_cls and self.pooling not in (None, "cls"):
            raise InputError(f"--extract_cls is --pooling cls; it contradicts --pooling {self.pooling}")
        return {
            "indexing_dimension": self.indexing_dimension,
            "projection": not self.no_projection,
            "pooling": self.pooling or ("cls" if self.extract_cls else "mean"),
            "normalize": self.normalize,
            "similarity_scale": self.similarity_scale,
            "question_template": check_template(
                self.question_template, ("question",), ("question",), "--question_template"
            ),
            "passage_template": passage_template_for(self.passage_template, self.no_title),
            "question_maxlength": self.question_maxlength,
            "passage_maxlength": self.passage_maxlength,
            "apply_question_mask": not self.no_question_mask,
            "apply_passage_mask": not self.no_passage_mask,
        }


@dataclass(frozen=True)
class RetrieverTaskConfig:
    """How the retriever learns and is evaluated in train_retriever.py (its text recipe,
    max lengths included, is the model's)."""

    n_context: int = 1
    per_gpu_batch_size: int = 1
    num_workers: int = 0
    eval_print_freq: int = 1000
    precision: str = "fp32"
    retriever_loss: str = "kl"
    temperature_gold: float = 1.0
    temperature_score: float = 1.0
    in_batch_negatives: bool = False
    grad_cache_chunk_size: int | None = None


def load_retriever(
    model_dir: str, choice: EncoderChoice = EncoderChoice(), log: logging.Logger = logger, trained: bool = False
):
    """(retriever, tokenizer) from `model_dir`: a retriever saved by train_retriever.py, or
    (unless `trained`) any BERT-like encoder (hub name or directory), around which a fresh
    retriever is built with the recipe of `choice`. A saved retriever keeps its own recipe
    (its trained projection included): a flag that contradicts it stops (InputError naming
    both values), the original's flags (`--indexing_dimension --no_projection --extract_cls
    --no_*_mask --no_title --*_maxlength`) are ignored with a warning (check_recipe).
    Tokenizer: `--tokenizer_name_or_path`, else `model_dir`."""
    model_dir = str(model_dir)
    if trained and not os.path.exists(model_dir):
        raise ModelPathError(f"--model_path {model_dir}: no such directory (a retriever saved by train_retriever.py)")
    if trained and not is_saved_retriever(model_dir):
        raise ModelPathError(
            f"--model_path {model_dir}: not a saved retriever (a directory written by train_retriever.py, "
            "with a config.json of model_type fid_retriever)"
        )
    check_model_path(model_dir, "retriever")
    if os.path.isdir(model_dir) and not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ModelPathError(f"{model_dir}: no config.json, not a retriever or encoder (BERT-like) directory")
    if is_saved_retriever(model_dir) and has_sharded_weights(model_dir) and not has_weights(model_dir):
        with loading(model_dir, "retriever"):  # a --fsdp latest: the shards load later
            retriever = Retriever(RetrieverConfig.from_pretrained(model_dir))
    elif is_saved_retriever(model_dir):
        with loading(model_dir, "retriever"):
            retriever = Retriever.from_pretrained(model_dir, dtype=torch.float32)
        check_recipe(retriever.config, choice, model_dir, log)
    else:
        retriever = Retriever.from_encoder(model_dir, **choice.recipe())
    tokenizer_dir = choice.tokenizer_name_or_path or model_dir
    check_model_path(tokenizer_dir, "tokenizer")
    with loading(tokenizer_dir, "tokenizer"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    c = retriever.config
    log.info(
        "retriever from %s (tokenizer %s): dim %d, projection %s, pooling %s, normalize %s, scale %.4g, "
        "question %r (max %d tokens, mask %s), passage %r (max %d tokens, mask %s)%s",
        model_dir,
        tokenizer_dir,
        c.indexing_dimension,
        c.projection,
        c.pooling,
        c.normalize,
        retriever.scale,
        c.question_template,
        c.question_maxlength,
        c.apply_question_mask,
        c.passage_template,
        c.passage_maxlength,
        c.apply_passage_mask,
        ", passages by the frozen passage side (query-side training)" if c.frozen_passage_side else "",
    )
    return retriever, tokenizer


# flag: (config field, the value the flag asks for). A saved retriever's own value wins.
_STOPS = {  # the recipe's flags: a contradiction would silently ruin retrieval, so it stops
    "pooling": ("pooling", lambda c: c.pooling),
    "normalize": ("normalize", lambda c: c.normalize),
    "similarity_scale": ("similarity_scale", lambda c: c.similarity_scale),
    "question_template": ("question_template", lambda c: c.question_template),
    "passage_template": ("passage_template", lambda c: passage_template_for(c.passage_template, c.no_title)),
}
_WARNS = {  # the original's flags, which its users set on every script: the model's value is used
    "no_projection": ("projection", lambda c: not c.no_projection),
    "indexing_dimension": ("indexing_dimension", lambda c: c.indexing_dimension),
    "extract_cls": ("extract_cls", lambda c: c.extract_cls),
    "no_question_mask": ("apply_question_mask", lambda c: not c.no_question_mask),
    "no_passage_mask": ("apply_passage_mask", lambda c: not c.no_passage_mask),
}
_LEGACY_RECIPE = {  # as _WARNS; a retriever saved before the recipe takes them, as it did
    "question_maxlength": ("question_maxlength", lambda c: c.question_maxlength),
    "passage_maxlength": ("passage_maxlength", lambda c: c.passage_maxlength),
    "no_title": ("passage_template", lambda c: passage_template_for(None, c.no_title)),
}


def check_recipe(config: RetrieverConfig, choice: EncoderChoice, model_dir: str, log) -> None:
    """A saved retriever keeps the embedding and text recipe it was trained with: a recipe
    flag set otherwise stops (InputError naming both values); the original's flags warn and
    follow the model. A retriever saved before the recipe was saved (`recipe_saved` False)
    takes --no_title and the max lengths from the flags, as the original's scripts did."""
    if not config.recipe_saved:
        for _flag, (field, asked) in _LEGACY_RECIPE.items():
            setattr(config, field, asked(choice))
    for flag, (field, asked) in _STOPS.items():
        if flag in choice.given and getattr(config, field) != asked(choice):
            raise InputError(
                f"--{flag} {asked(choice)!r} contradicts the retriever {model_dir}, trained with {field} "
                f"{getattr(config, field)!r}: its recipe is read from the model; drop the flag"
            )
    warned = {**_WARNS, **(_LEGACY_RECIPE if config.recipe_saved else {})}
    for flag, (field, asked) in warned.items():
        if flag in choice.given and getattr(config, field) != asked(choice):
            log.warning(
                "%s was trained with %s=%r: keeping it and ignoring --%s (%r)",
                model_dir,
                field,
                getattr(config, field),
                flag,
                asked(choice),
            )


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


def make_grad_cache_backward(config: RetrieverTaskConfig, device: torch.device):
    """`--grad_cache_chunk_size C`: the trainer's `Task.backward`, the same loss as `make_loss`
    backpropagated by GradCache (grad_cache.py), C texts through the encoder at a time."""
    loss_fn = get_loss(config.retriever_loss)

    def backward(model, batch, scale) -> torch.Tensor:
        question_ids, question_mask, passage_ids, passage_mask, gold = to_device(batch, device)
        retriever = getattr(model, "module", model)  # the scores need no wrapper: no parameters

        def loss_of(questions: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
            scores, negatives = retriever.scores(
                questions, passages, passage_ids, passage_mask, config.in_batch_negatives
            )
            return loss_fn(scores, gold, config.temperature_gold, config.temperature_score, negatives)

        return grad_cache_backward(
            model,
            question_ids,
            question_mask,
            passage_ids,
            passage_mask,
            loss_of,
            scale,
            config.grad_cache_chunk_size,
            config.precision,
            device,
        )

    return backward


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
        retriever.config.question_maxlength,
        retriever.config.passage_maxlength,
        pad_questions_to_max=not retriever.config.apply_question_mask,
        pad_passages_to_max=not retriever.config.apply_passage_mask,
    )

    def dev_metrics(model) -> dict[str, float]:
        return evaluate(model, eval_dataset, collator, config, runtime, log) if len(eval_dataset) else {}

    backward = make_grad_cache_backward(config, runtime.device) if config.grad_cache_chunk_size else None
    return Task(
        train_dataset,
        collator,
        make_loss(config, runtime.device),
        dev_metrics,
        metric="loss",
        higher_is_better=False,
        backward=backward,
    )
