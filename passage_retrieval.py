"""Retrieve passages for every question with a trained retriever and a FAISS index (README "5. Retrieve").

    python passage_retrieval.py --model_path <retriever_dir> --passages psgs_w100.tsv \
        --data_path data.json --passages_embeddings "wikipedia_embeddings/wiki_*" \
        --output_path retrieved_data.json --n-docs 100

    torchrun --nproc_per_node 8 passage_retrieval.py ...same flags...

Writes the question file with `ctxs` replaced by the top `--n-docs` passages
`{id, title, text, score, hasanswer}`, best first, and logs top-k accuracy. Questions go
through in chunks of `--question_chunk_size` (read, embed, search, write), so memory does
not grow with their number. Under torchrun each process indexes a share of the shard
files and searches every question against it; rank 0 embeds the questions, merges the
processes' top k into the global one (the same as one process gives), attaches the
passages and writes the output (src/corpus/search.py).

    python passage_retrieval.py --evaluate_only --data retrieved.json [--output_path out.json]

recomputes `hasanswer` and top-k accuracy of any retrieval file (ours, DPR's, BM25's).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from src import distributed as dist
from src.cli import cli, finish, init_logger, warn_ignored
from src.corpus.embeddings import embed_texts, pools_over_padding
from src.corpus.faiss_index import Indexer, index_signature, unused_index_flags
from src.corpus.passages import PassageStore
from src.corpus.search import (
    WRITE_BATCH,
    AnswerHits,
    Searchers,
    agree,
    build_index,
    embedding_files,
    evaluated_examples,
    index_directory,
    question_chunks,
    retrieved_examples,
    shards_signature,
    share_of,
)
from src.data.datasets import format_question
from src.data.questions import check_questions, write_questions
from src.devices import default_device, resolve_precision
from src.errors import DataError, PassageFileError
from src.options import Options, config_from, positive_int
from src.retriever.task import EncoderChoice, load_retriever

# Shared option groups and the original's command lines: accepted, unused here. No run
# directory (the log goes beside --output_path), no randomness, no training, no DataLoader;
# passages are embedded by generate_passage_embeddings.py.
IGNORED = (
    "name",
    "checkpoint_dir",
    "model_name_or_path",
    "seed",
    "eval_freq",
    "save_freq",
    "eval_print_freq",
    "num_workers",
    "passage_maxlength",
)
# What only retrieval reads: ignored with --evaluate_only.
RETRIEVAL_ONLY = (
    "model_path",
    "tokenizer_name_or_path",
    "per_gpu_batch_size",
    "precision",
    "no_fp16",
    "device",
    "passages",
    "passages_embeddings",
    "n_docs",
    "save_or_load_index",
    "question_maxlength",
    "indexing_batch_size",
    "n_subquantizers",
    "n_bits",
    "index_type",
    "n_lists",
    "n_probe",
    "hnsw_m",
    "index_train_sample",
    "allow_pickle_embeddings",
    "question_chunk_size",
)


def parse_options(argv=None) -> tuple[Options, argparse.Namespace]:
    options = Options("Retrieve passages for questions with a trained retriever and a FAISS index.")
    options.add_retrieval_options()
    options.add_index_options()
    options.mark_ignored(IGNORED)
    options.set_help("model_path", "the retriever: a directory saved by train_retriever.py (required)")
    options.parser.set_defaults(per_gpu_batch_size=64)
    g = options.parser.add_argument_group("retrieval extras")
    g.add_argument(
        "--allow_pickle_embeddings",
        action="store_true",
        help="also read pickled embedding shards of the original code (unpickling runs code: trusted files only)",
    )
    g.add_argument(
        "--evaluate_only",
        action="store_true",
        help="no retrieval: recompute hasanswer and top-k accuracy of the retrieval file --data "
        "(and write it to --output_path if given); the retrieval flags are then ignored, with a warning",
    )
    g.add_argument(
        "--question_chunk_size",
        type=positive_int,
        default=None,
        help="questions read, embedded, searched and written at a time: memory grows with it, not with the "
        "number of questions (default: 256 x --per_gpu_batch_size, the window in which questions are sorted "
        "by length into embedding batches, so the embeddings are those of one call over the whole file)",
    )
    return options, options.parse(argv)


def get_options(argv=None) -> argparse.Namespace:
    return parse_options(argv)[1]


def get_index(files: list[str], dim: int, opt, logger: logging.Logger, rank: int = 0, world_size: int = 1) -> Indexer:
    """This process's index of `files`: loaded with --save_or_load_index when a save of the
    same shards and settings exists, else built (and then saved with that flag)."""
    index_dir = index_directory(files, rank, world_size)
    signature = {"shards": shards_signature(files), **index_signature(opt)}
    if world_size > 1:
        signature.update(rank=rank, world_size=world_size)
    if opt.save_or_load_index and Indexer.exists(index_dir):
        if Indexer.read_meta(index_dir).get("extra") == signature:
            indexer = Indexer.deserialize_from(index_dir)
            indexer.set_n_probe(opt.n_probe)
            return indexer
        logger.warning("index in %s was built from other shards or settings; rebuilding it", index_dir)
    t0 = time.time()
    indexer = build_index(files, dim, opt, logger)
    logger.info("indexing took %.1fs", time.time() - t0)
    if opt.save_or_load_index:
        indexer.serialize(index_dir, extra=signature)
    return indexer


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


def main(argv=None) -> None:
    options, opt = parse_options(argv)
    # Launch (issue 20): torchrun or the tasks of an srun step, as every script (distributed.py). Only
    # rank 0 embeds questions on --device; the others search FAISS on the CPU and never touch CUDA.
    if dist.launched_world_size() > 1:
        runtime = dist.init_distributed(
            opt.device, opt.local_rank, opt.main_port, opt.dist_timeout_minutes, not opt.no_tf32, cpu_beyond_main=True
        )
        if runtime.is_main:
            opt.device = str(runtime.device)
    else:
        runtime = dist.Runtime(device=default_device(opt.device))
    opt.rank, opt.world_size, opt.is_main = runtime.rank, runtime.world_size, runtime.is_main
    logger = init_logger(None, opt.is_main)
    log = HeldLog(opt.output_path if opt.is_main else None, logger)
    try:
        if opt.is_main:
            warn_ignored(opt, options.given, IGNORED, logger)
            if opt.evaluate_only:
                warn_ignored(opt, options.given, RETRIEVAL_ONLY, logger, reason="--evaluate_only retrieves nothing")
            else:
                warn_ignored(opt, options.given, unused_index_flags(opt), logger)
        if not opt.data:
            raise DataError("--data (or --data_path) is required: the question file")
        if not opt.evaluate_only:
            retrieve(opt, config_from(EncoderChoice, opt, given=set(options.given)), logger, log)
        elif opt.is_main:  # the other processes have nothing to do
            evaluate(opt, logger, log)
    finally:
        finish()


def n_questions(opt, logger: logging.Logger) -> int:
    """Check the whole question file before the slow part (streamed); the number retrieved for."""
    n = check_questions(opt.data, opt.maxload)
    n = n if opt.maxload < 0 else min(n, opt.maxload)
    logger.info("%d questions from %s", n, opt.data)
    return n


def evaluate(opt, logger: logging.Logger, log: HeldLog) -> None:
    n_questions(opt, logger)
    with AnswerHits(max(1, min(opt.validation_workers, os.cpu_count() or 1))) as hits:
        examples = evaluated_examples(question_chunks(opt.data, opt.maxload, WRITE_BATCH), hits)
        if opt.output_path:
            write_questions(opt.output_path, examples)
        else:
            deque(examples, maxlen=0)
    log.open()
    hits.log(logger)
    if opt.output_path:
        logger.info("wrote %s", opt.output_path)


def prepare(opt, choice: EncoderChoice, logger: logging.Logger, main_state: dict) -> tuple[int | None, list[str]]:
    """Every process: check the flags and find the shards. Rank 0 first checks the questions,
    opens the passages and loads the retriever (into `main_state`). Returns (dim on rank 0,
    the shard files)."""
    if opt.is_main:
        main_state["n"] = n_questions(opt, logger)
    for flag in ("passages", "passages_embeddings", "output_path"):
        if not getattr(opt, flag):
            raise DataError(f"--{flag} is required")
    if opt.model_path in (None, "none"):
        raise DataError("--model_path is required (a directory saved by train_retriever.py)")
    if not opt.is_main:
        return None, embedding_files(opt.passages_embeddings, opt.allow_pickle_embeddings)
    try:
        main_state["store"] = PassageStore(opt.passages)  # checked first: a bad file fails before the slow part
    except PassageFileError as e:
        raise DataError(str(e)) from None
    files = embedding_files(opt.passages_embeddings, opt.allow_pickle_embeddings)
    opt.device = default_device(opt.device)
    opt.precision = resolve_precision(opt.precision, opt.device)
    model, main_state["tokenizer"] = load_retriever(opt.model_path, choice, logger, trained=True)
    main_state["model"] = model.eval().to(opt.device)
    logger.info("embedding questions on %s in %s", opt.device, opt.precision)
    return model.dim, files


def question_embedder(model, tokenizer, opt) -> Callable[[list[dict]], np.ndarray]:
    def embed(examples: list[dict]) -> np.ndarray:
        return embed_texts(
            model.embed_questions,
            tokenizer,
            [format_question(ex["question"]) for ex in examples],
            batch_size=opt.per_gpu_batch_size,
            max_length=opt.question_maxlength,
            device=opt.device,
            precision=opt.precision,
            pad_to_max_length=pools_over_padding(model, "question"),
        )  # (n, dim)

    return embed


def retrieve(opt, choice: EncoderChoice, logger: logging.Logger, log: HeldLog) -> None:
    group = dist.object_group()
    main_state: dict = {}
    (dim, files), *others = agree(lambda: prepare(opt, choice, logger, main_state), group)
    if any(theirs != files for _, theirs in others):
        raise DataError("the processes see different shard files for --passages_embeddings (no shared file system?)")
    share = share_of(files, opt.rank, opt.world_size)
    indexer = None

    def index() -> int:
        nonlocal indexer
        indexer = get_index(share, dim, opt, logger, opt.rank, opt.world_size)
        return len(indexer)

    sizes = agree(index, group)
    offset = sum(sizes[: opt.rank])
    if opt.world_size > 1:
        logger.info(
            "%d processes index %s passages (global rows from %s) of %d shard files",
            opt.world_size,
            " + ".join(map(str, sizes)),
            ", ".join(str(sum(sizes[:r])) for r in range(opt.world_size)),
            len(files),
        )
    searchers = Searchers(indexer, offset, opt.n_docs, group)
    if not opt.is_main:
        searchers.serve()
        return
    try:
        write_retrieved(opt, main_state, searchers, logger)
    except BaseException as e:
        with contextlib.suppress(Exception):  # the others stop too; the error is this one
            searchers.stop(e)
        raise
    searchers.stop()
    log.open()
    main_state["hits"].log(logger)
    logger.info("wrote %d questions with %d passages each to %s", main_state["n"], opt.n_docs, opt.output_path)


def write_retrieved(opt, main_state: dict, searchers: Searchers, logger: logging.Logger) -> None:
    """Rank 0: the output, one atomic write over the stream of chunks."""
    chunk_size = opt.question_chunk_size or 256 * opt.per_gpu_batch_size
    embed = question_embedder(main_state["model"], main_state["tokenizer"], opt)
    stats = {"embed": 0.0, "search": 0.0}
    workers = max(1, min(opt.validation_workers, os.cpu_count() or 1))
    with AnswerHits(workers) as hits, tqdm(total=main_state["n"], desc="retrieving", unit="q") as bar:
        main_state["hits"] = hits
        chunks = question_chunks(opt.data, opt.maxload, chunk_size, drop_ctxs=True)
        examples = retrieved_examples(chunks, embed, searchers, main_state["store"], opt.passages, hits, stats, bar)
        write_questions(opt.output_path, examples)
    logger.info("embedding: %d questions in %.1fs", main_state["n"], stats["embed"])
    logger.info("search: %d questions in %.1fs", main_state["n"], stats["search"])


if __name__ == "__main__":
    cli(main)
