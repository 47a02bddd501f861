"""The run of passage_retrieval.py (README "5. Retrieve"): check the inputs, index this process's
share of the shards (or load its saved index), then rank 0 streams the questions through
embedding, the search of every process (src/corpus/search.py) and the output file, and
logs top-k accuracy. `--evaluate_only` recomputes hasanswer and top-k of a retrieval file.

Settings come in as a frozen `RetrievalConfig` (the flags, built once by the script) and the
process's place as a `Runtime` (src/distributed.py); what rank 0 alone loads (questions count,
passages, the retriever) is a `MainState`. The log is held until the output is written
(`HeldLog`), so a run stopped by a bad input leaves the previous output and log as they were.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from src import distributed as dist
from src.corpus.answer_hits import AnswerHits
from src.corpus.embeddings import embed_texts, pools_over_padding
from src.corpus.faiss_index import IndexConfig, Indexer, index_signature
from src.corpus.passages import PassageStore
from src.corpus.search import (
    WRITE_BATCH,
    Searchers,
    agree,
    build_index,
    embedding_files,
    evaluated_examples,
    question_chunks,
    retrieved_examples,
    share_of,
)
from src.data.questions import check_questions, write_questions
from src.devices import resolve_precision
from src.distributed import Runtime
from src.errors import DataError, PassageFileError
from src.retriever.task import EncoderChoice, load_retriever


@dataclass(frozen=True)
class RetrievalConfig:
    """passage_retrieval.py's flags (same names; see its --help), the index's in `index`."""

    data: str | None = None
    maxload: int = -1
    passages: str | None = None
    passages_embeddings: str | None = None
    output_path: str | None = None
    model_path: str | None = None
    n_docs: int = 100
    per_gpu_batch_size: int = 64
    question_maxlength: int = 40
    question_chunk_size: int | None = None
    precision: str | None = None
    validation_workers: int = 32
    save_or_load_index: bool = False
    indexing_batch_size: int = 50000
    allow_pickle_embeddings: bool = False
    evaluate_only: bool = False
    index: IndexConfig = IndexConfig()

    @property
    def workers(self) -> int:
        """Processes computing hasanswer (no more than the CPUs)."""
        return max(1, min(self.validation_workers, os.cpu_count() or 1))


@dataclass
class MainState:
    """What rank 0 alone holds: the number of questions, the passages and the retriever."""

    n_questions: int = 0
    store: PassageStore | None = None
    model: Any = None
    tokenizer: Any = None
    precision: str = "fp32"
    hits: AnswerHits | None = field(default=None, repr=False)


class HeldLog:
    """The whole log, every k included, goes beside the output (`<output_path>.log`). It is held
    in memory until the output is written (`open`), so that a run stopped by a bad input, even
    one found late, leaves the previous run's output and log as they were."""

    def __init__(self, output_path: str | None, logger: logging.Logger):
        self.output_path, self.logger = output_path, logger
        self.topk = logging.getLogger("fid.topk")  # accuracy for every k: log file only
        self.topk.handlers.clear()
        self.topk.propagate = False
        self.held = logging.handlers.MemoryHandler(
            capacity=1 << 20, flushLevel=logging.CRITICAL + 1, flushOnClose=False
        )
        if output_path:
            for log in (logger, self.topk):
                log.addHandler(self.held)
            self.topk.setLevel(logging.INFO)

    def open(self) -> None:
        if not self.output_path or self.held not in self.logger.handlers:
            return
        Path(self.output_path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(f"{self.output_path}.log", mode="w", encoding="utf-8")
        handler.setFormatter(self.logger.handlers[0].formatter)
        self.held.setTarget(handler)
        self.held.flush()
        for log in (self.logger, self.topk):
            log.removeHandler(self.held)
            log.addHandler(handler)


# ---------------------------------------------------------------------------
# Each process's index
# ---------------------------------------------------------------------------


def shards_signature(files: list[str]) -> list[list]:
    """What the index was built from; a saved index is reused only if this is unchanged."""
    return [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files]


def index_directory(files: list[str], rank: int = 0, world_size: int = 1) -> Path:
    """Where --save_or_load_index keeps a process's index: beside its shards in one process (as
    before), in `index_rank{r}_of{W}/` there under torchrun, so that no save is taken for one
    of another number of processes."""
    base = Path(files[0]).parent
    return base if world_size == 1 else base / f"index_rank{rank}_of{world_size}"


def get_index(
    files: list[str], dim: int, config: RetrievalConfig, logger: logging.Logger, rank: int = 0, world_size: int = 1
) -> Indexer:
    """This process's index of `files`: loaded with --save_or_load_index when a save of the
    same shards and settings exists, else built (and then saved with that flag)."""
    index_dir = index_directory(files, rank, world_size)
    signature = {"shards": shards_signature(files), **index_signature(config.index)}
    if world_size > 1:
        signature.update(rank=rank, world_size=world_size)
    if config.save_or_load_index and Indexer.exists(index_dir):
        if Indexer.read_meta(index_dir).get("extra") == signature:
            indexer = Indexer.deserialize_from(index_dir)
            indexer.set_n_probe(config.index.n_probe)
            return indexer
        logger.warning("index in %s was built from other shards or settings; rebuilding it", index_dir)
    t0 = time.time()
    indexer = build_index(files, dim, config.index, logger, config.indexing_batch_size, config.allow_pickle_embeddings)
    logger.info("indexing took %.1fs", time.time() - t0)
    if config.save_or_load_index:
        indexer.serialize(index_dir, extra=signature)
    return indexer


# ---------------------------------------------------------------------------
# The two runs
# ---------------------------------------------------------------------------


def n_questions(config: RetrievalConfig, logger: logging.Logger) -> int:
    """Check the whole question file before the slow part (streamed); the number retrieved for."""
    n = check_questions(config.data, config.maxload)
    n = n if config.maxload < 0 else min(n, config.maxload)
    logger.info("%d questions from %s", n, config.data)
    return n


def evaluate(config: RetrievalConfig, logger: logging.Logger, log: HeldLog) -> None:
    """--evaluate_only (rank 0): hasanswer and top-k of the retrieval file --data, rewritten to
    --output_path if given."""
    n_questions(config, logger)
    with AnswerHits(config.workers) as hits:
        examples = evaluated_examples(question_chunks(config.data, config.maxload, WRITE_BATCH), hits)
        if config.output_path:
            write_questions(config.output_path, examples)
        else:
            deque(examples, maxlen=0)
    log.open()
    hits.log(logger)
    if config.output_path:
        logger.info("wrote %s", config.output_path)


def prepare(
    config: RetrievalConfig, choice: EncoderChoice, runtime: Runtime, logger: logging.Logger, main: MainState
) -> tuple[int | None, list[str]]:
    """Every process: check the flags and find the shards. Rank 0 first checks the questions,
    opens the passages and loads the retriever (into `main`). Returns (dim on rank 0, the
    shard files)."""
    if runtime.is_main:
        main.n_questions = n_questions(config, logger)
    required = {"passages": config.passages, "passages_embeddings": config.passages_embeddings}
    for flag, value in {**required, "output_path": config.output_path}.items():
        if not value:
            raise DataError(f"--{flag} is required")
    if config.model_path in (None, "none"):
        raise DataError("--model_path is required (a directory saved by train_retriever.py)")
    if not runtime.is_main:
        return None, shard_files(config, runtime)
    try:
        main.store = PassageStore(config.passages)  # checked first: a bad file fails before the slow part
    except PassageFileError as e:
        raise DataError(str(e)) from None
    files = shard_files(config, runtime)
    main.precision = resolve_precision(config.precision, runtime.device)
    model, main.tokenizer = load_retriever(config.model_path, choice, logger, trained=True)
    main.model = model.eval().to(runtime.device)
    logger.info("embedding questions on %s in %s", runtime.device, main.precision)
    return model.dim, files


def shard_files(config: RetrievalConfig, runtime: Runtime) -> list[str]:
    """The shard files, checked to give every process a share (before rank 0 loads the model)."""
    files = embedding_files(config.passages_embeddings, config.allow_pickle_embeddings)
    share_of(files, runtime.rank, runtime.world_size)
    return files


def question_embedder(config: RetrievalConfig, main: MainState, device) -> Callable[[list[dict]], np.ndarray]:
    def embed(examples: list[dict]) -> np.ndarray:
        return embed_texts(
            main.model.embed_questions,
            main.tokenizer,
            [main.model.format_question(ex["question"]) for ex in examples],  # the model's recipe
            batch_size=config.per_gpu_batch_size,
            max_length=main.model.config.question_maxlength,
            device=device,
            precision=main.precision,
            pad_to_max_length=pools_over_padding(main.model, "question"),
        )  # (n, dim)

    return embed


def retrieve(
    config: RetrievalConfig, choice: EncoderChoice, runtime: Runtime, logger: logging.Logger, log: HeldLog
) -> None:
    """Every process: index its share; rank 0 then drives the search and writes the output."""
    group = dist.object_group()
    main = MainState()
    (dim, files), *others = agree(lambda: prepare(config, choice, runtime, logger, main), group)
    if any(theirs != files for _, theirs in others):
        raise DataError("the processes see different shard files for --passages_embeddings (no shared file system?)")
    rank, world_size = runtime.rank, runtime.world_size
    share = share_of(files, rank, world_size)
    indexer = None

    def index() -> int:
        nonlocal indexer
        indexer = get_index(share, dim, config, logger, rank, world_size)
        return len(indexer)

    sizes = agree(index, group)
    if world_size > 1:
        logger.info(
            "%d processes index %s passages (global rows from %s) of %d shard files",
            world_size,
            " + ".join(map(str, sizes)),
            ", ".join(str(sum(sizes[:r])) for r in range(world_size)),
            len(files),
        )
    searchers = Searchers(indexer, sum(sizes[:rank]), config.n_docs, group)
    if not runtime.is_main:
        searchers.serve()
        return
    try:
        write_retrieved(config, main, searchers, runtime.device, logger)
    except BaseException as e:
        with contextlib.suppress(Exception):  # the others stop too; the error is this one
            searchers.stop(e)
        raise
    searchers.stop()
    log.open()
    main.hits.log(logger)
    logger.info("wrote %d questions with %d passages each to %s", main.n_questions, config.n_docs, config.output_path)


def write_retrieved(config: RetrievalConfig, main: MainState, searchers: Searchers, device, logger) -> None:
    """Rank 0: the output, one atomic write over the stream of chunks."""
    chunk_size = config.question_chunk_size or 256 * config.per_gpu_batch_size
    embed = question_embedder(config, main, device)
    stats = {"embed": 0.0, "search": 0.0}
    with AnswerHits(config.workers) as hits, tqdm(total=main.n_questions, desc="retrieving", unit="q") as bar:
        main.hits = hits
        chunks = question_chunks(config.data, config.maxload, chunk_size, drop_ctxs=True)
        examples = retrieved_examples(chunks, embed, searchers, main.store, config.passages, hits, stats, bar)
        write_questions(config.output_path, examples)
    logger.info("embedding: %d questions in %.1fs", main.n_questions, stats["embed"])
    logger.info("search: %d questions in %.1fs", main.n_questions, stats["search"])
