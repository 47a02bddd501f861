"""The settings of one run of the loop (run_loop.py's flags), frozen once the values that
depend on toy world vs real data are filled in (`derive`). Values decided later (the toy
world's files and starting models, a signal of --compare_signals) make a new config with
dataclasses.replace; nothing writes into the flags."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from src.devices import default_device

# Sizes: tiny for the toy world, the original's defaults for real data.
SIZES = {
    "n_context": (10, 100),
    "text_maxlength": (32, 200),
    "indexing_dimension": (64, 768),
    "question_maxlength": (16, 40),
    "passage_maxlength": (32, 200),
}
REAL_MODELS = {"reader_model": "t5-base", "retriever_model": "bert-base-uncased"}


@dataclass(frozen=True)
class LoopConfig:
    """run_loop.py's flags (same names; see its --help), then `toy`: no data files given."""

    # data (all four, or none for the toy world)
    train_data: str | None = None
    eval_data: str | None = None
    test_data: str | None = None
    passages: str | None = None
    # models
    reader_model: str | None = None
    retriever_model: str | None = None
    # loop
    output_dir: str | None = None
    rounds: int = 2
    nproc: int = 1
    quick: bool = False
    seed: int = 0
    precision: str | None = None  # None: bf16 on CUDA, fp32 on CPU (see derive)
    device: str | None = None
    # reader
    n_context: int | None = None
    text_maxlength: int | None = None
    generation_max_length: int = 50
    reader_steps: int = 300
    reader_batch_size: int = 8
    reader_lr: float = 1e-4
    reader_eval_freq: int = 100
    no_title: bool | None = None
    score_maxload: int = -1
    # retriever
    retriever_steps: int = 600
    retriever_batch_size: int = 16
    retriever_lr: float = 3e-3
    retriever_n_context: int | None = None
    in_batch_negatives: bool | None = None
    compare_signals: tuple[str, ...] | None = None
    score_kind: str = "xattn"
    retriever_loss: str = "kl"
    query_side: str | None = None  # on | both: train_retriever.py --query_side_retriever_training
    indexing_dimension: int | None = None
    question_maxlength: int | None = None
    passage_maxlength: int | None = None
    n_docs: int | None = None
    # toy world
    toy_entities: int = 500
    toy: bool = False

    @property
    def data(self) -> tuple[str | None, ...]:
        return (self.train_data, self.eval_data, self.test_data, self.passages)


def default_precision(device: str | None) -> str:
    """bf16 where the steps run on CUDA (`device`, or no `device` and a GPU visible), else fp32:
    CPUs without bf16 instructions emulate bf16 matrix products, which made the toy loop's
    retriever steps 4.6x slower than fp32 on 2 cores (docs/results.md, "The toy loop")."""
    return "bf16" if default_device(device).type == "cuda" else "fp32"


def derive(config: LoopConfig, root: Path) -> LoopConfig:
    """The config with the sizes and defaults that depend on toy world vs real data filled in
    (`config.toy` is set from whether data files were given; all four or none). `root`: where
    runs/ goes when --output_dir is not given."""
    toy = all(x is None for x in config.data)
    given = dataclasses.asdict(config)
    values = {
        "toy": toy,
        "no_title": toy if config.no_title is None else config.no_title,
        "in_batch_negatives": toy if config.in_batch_negatives is None else config.in_batch_negatives,
    }
    if not toy:
        values.update({name: given[name] or default for name, default in REAL_MODELS.items()})
    for name, (toy_value, real_value) in SIZES.items():
        if given[name] is None:
            values[name] = toy_value if toy else real_value
    if config.precision is None:
        values["precision"] = default_precision(config.device)
    n_context = values.get("n_context", config.n_context)
    if config.quick:
        values.update(
            toy_entities=min(config.toy_entities, 80), reader_steps=40, reader_eval_freq=20, retriever_steps=300
        )
        n_context = values["n_context"] = min(n_context, 5)
    retriever_n_context = min(config.retriever_n_context or n_context, n_context)
    values["retriever_n_context"] = retriever_n_context
    values["n_docs"] = max(config.n_docs or 0, 20, n_context, retriever_n_context)
    if config.output_dir is None:
        values["output_dir"] = str(root / "runs" / time.strftime("loop-%Y%m%d-%H%M%S"))
    return dataclasses.replace(config, **values)
