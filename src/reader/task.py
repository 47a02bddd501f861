"""The reader side of paper [1]: loading, the training loss step, evaluation (answers and
passage scores), and the `Task` that train_reader.py hands to the trainer. Mirrors retriever.py.

Evaluation splits the examples across ranks (rank r takes every world_size-th one),
generates answers (and optionally cross-attention scores), and gathers everything on
every rank, so each example appears exactly once in the merged output.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from src import distributed as dist
from src.data.datasets import ReaderCollator, ReaderDataset
from src.devices import precision_autocast
from src.metrics import mean_em
from src.modeling import check_model_path, loading
from src.reader.model import FiDT5
from src.reader.scores import generate_with_scores
from src.train.trainer import Task

logger = logging.getLogger("fid")


@dataclass(frozen=True)
class ReaderConfig:
    """How the reader reads, answers and scores: the run-time choices of train_reader.py and
    test_reader.py (the model's own choices live in its saved config)."""

    n_context: int = 1
    text_maxlength: int = 200
    answer_maxlength: int = -1
    per_gpu_batch_size: int = 1
    num_workers: int = 0
    eval_print_freq: int = 1000
    precision: str = "fp32"
    generation_max_length: int = 50
    num_beams: int = 1
    score_kind: str = "xattn"


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model")
    )


def tokenizer_source(model_dir: str | Path | None, tokenizer: str | None, fallback: str) -> str:
    """`tokenizer` (--tokenizer_name_or_path), else the model directory when it holds a
    tokenizer, else `fallback` (--model_name_or_path or t5-<model_size>)."""
    if tokenizer:
        return tokenizer
    if model_dir is not None and (has_tokenizer(model_dir) or not os.path.exists(model_dir)):
        return str(model_dir)  # a local dir with a tokenizer, or a hub name
    logger.warning("%s holds no tokenizer: using %s", model_dir, fallback)
    return fallback


def load_tokenizer(source: str):
    check_model_path(source, "tokenizer")
    with loading(source, "tokenizer"):
        return AutoTokenizer.from_pretrained(source)


def load_reader(
    model_dir: str, tokenizer: str | None, fallback_tokenizer: str, packing: bool = True, log: logging.Logger = logger
):
    """(reader, tokenizer): the model first, so that a directory without one says so rather
    than that its tokenizer is missing. `packing`: the run-time choice of --no_packing."""
    model = FiDT5.load(model_dir, logger=log, packing=packing)
    if not packing:
        log.info("--no_packing: passages padded to --text_maxlength, cross-attention over padding too")
    return model, load_tokenizer(tokenizer_source(model_dir, tokenizer, fallback_tokenizer))


def reader_loss(model, batch) -> torch.Tensor:
    """Teacher-forced token cross-entropy of one collated batch."""
    device = next(model.parameters()).device
    out = model(
        input_ids=batch.context_ids.to(device),
        attention_mask=batch.context_mask.to(device),
        labels=batch.labels.to(device),
    )
    return out.loss


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    dataset: ReaderDataset,
    collator: ReaderCollator,
    config: ReaderConfig,
    with_scores: bool = False,
    desc: str = "eval",
) -> list[dict[str, Any]]:
    """Answers (and passage scores) for every example, merged over ranks, in dataset order.

    Each result: {"index", "answer", "scores" (list of N floats, only with_scores)}.
    """
    model.eval()
    device = next(model.parameters()).device
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, mine),
        batch_size=config.per_gpu_batch_size,
        collate_fn=collator,
        num_workers=config.num_workers,
    )
    results = []
    bar = tqdm(loader, desc=desc, disable=not dist.is_main(), dynamic_ncols=True, unit="batch")
    t0, n_passages = time.perf_counter(), 0
    for i, batch in enumerate(bar):
        index, context_ids, context_mask = batch.index, batch.context_ids.to(device), batch.context_mask.to(device)
        kwargs = {"max_length": config.generation_max_length, "num_beams": config.num_beams}
        if with_scores and batch.labels is not None:
            kwargs["labels"] = batch.labels.to(device)  # the likelihood kinds score the gold answer
        with precision_autocast(config.precision, device):
            if with_scores:
                generated, scores = generate_with_scores(
                    model, context_ids, context_mask, score_kind=config.score_kind, **kwargs
                )
            else:
                generated = model.generate(input_ids=context_ids, attention_mask=context_mask, **kwargs)
        # One copy to the host per batch, not a read per example.
        generated = generated.cpu()
        scores = scores.float().cpu() if with_scores else None
        for b, idx in enumerate(index.tolist()):
            answer = tokenizer.decode(generated[b], skip_special_tokens=True, clean_up_tokenization_spaces=True)
            result = {"index": idx, "answer": answer.strip()}
            if with_scores:
                n_real = int(batch.context_mask[b].any(-1).sum())  # passages that exist (not padding; CPU)
                result["scores"] = scores[b, :n_real].tolist()
            results.append(result)
        n_passages += count_passages(batch)
        rate = _throughput(len(results), n_passages, time.perf_counter() - t0)
        bar.set_postfix_str(rate, refresh=False)
        if config.eval_print_freq > 0 and (i + 1) % config.eval_print_freq == 0:
            logger.info("%s: %d/%d batches, %s", desc, i + 1, len(loader), rate)
    if dist.is_main() and results:
        elapsed = time.perf_counter() - t0
        logger.info(
            "%s: %d questions, %d passages in %.1fs (%s, this process)",
            desc,
            len(results),
            n_passages,
            elapsed,
            _throughput(len(results), n_passages, elapsed),
        )
    merged = [r for part in dist.gather_objects(results) for r in part]
    merged.sort(key=lambda r: r["index"])
    return merged


def _throughput(questions: int, passages: int, seconds: float) -> str:
    seconds = max(seconds, 1e-9)
    return f"{questions / seconds:.3g} questions/s, {passages / seconds:.3g} passages/s"


def exact_match(results: list[dict[str, Any]], examples: list[dict[str, Any]]) -> tuple[float | None, int]:
    """Mean EM over the examples that have gold answers (None when none have), and their count."""
    return mean_em([r["answer"] for r in results], [examples[r["index"]].get("answers") for r in results])


def reader_task(config: ReaderConfig, tokenizer, train_dataset: ReaderDataset, eval_dataset: ReaderDataset) -> Task:
    """What train_reader.py trains: best_dev by dev exact match (greedy answers)."""
    # Evaluation sees no target (it generates), so the label length is irrelevant there.
    collator = ReaderCollator(tokenizer, config.text_maxlength, config.n_context, config.answer_maxlength)

    def dev_metrics(model) -> dict[str, float]:
        if not len(eval_dataset):
            return {}
        results = generate_answers(model, tokenizer, eval_dataset, collator, config, desc="dev")
        em, _ = exact_match(results, eval_dataset.examples)
        return {} if em is None else {"exact_match": em}

    return Task(
        train_dataset,
        collator,
        reader_loss,
        dev_metrics,
        metric="exact_match",
        higher_is_better=True,
        count_passages=count_passages,
    )


def count_passages(batch) -> int:
    """Passages that exist in a collated batch (missing ctxs are all padding)."""
    return int(batch.context_mask.any(-1).sum())
