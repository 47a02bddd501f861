"""Retrieve passages for every question with a trained retriever and a FAISS index (docs/corpus-at-scale.md).

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
passages and writes the output (the run: src/corpus/driver.py; the search and merge:
src/corpus/search.py).

    python passage_retrieval.py --evaluate_only --data retrieved.json [--output_path out.json]

recomputes `hasanswer` and top-k accuracy of any retrieval file (ours, DPR's, BM25's).
"""

from __future__ import annotations

import argparse
import signal

from src import distributed as dist
from src.argparsing import positive_int
from src.cli import cli, finish, init_logger, warn_ignored
from src.configs import config_from
from src.corpus.driver import HeldLog, RetrievalConfig, evaluate, retrieve
from src.corpus.faiss_index import IndexConfig, unused_index_flags
from src.devices import default_device
from src.errors import DataError, InputError
from src.options import Options
from src.retriever.task import EncoderChoice

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
    config = config_from(RetrievalConfig, opt, index=config_from(IndexConfig, opt))
    logger = init_logger(None, runtime.is_main)
    log = HeldLog(config.output_path if runtime.is_main else None, logger)
    try:
        if runtime.is_main:
            warn_ignored(opt, options.given, IGNORED, logger)
            if config.evaluate_only:
                warn_ignored(opt, options.given, RETRIEVAL_ONLY, logger, reason="--evaluate_only retrieves nothing")
            else:
                warn_ignored(opt, options.given, unused_index_flags(config.index), logger)
        if not config.data:
            raise DataError("--data (or --data_path) is required: the question file")
        if not config.evaluate_only:
            retrieve(config, config_from(EncoderChoice, opt, given=set(options.given)), runtime, logger, log)
        elif runtime.is_main:  # the other processes have nothing to do
            evaluate(config, logger, log)
    except (InputError, OSError):
        if runtime.is_distributed:  # every rank ends with the message and exit 2 (torchrun stops the others)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    finally:
        finish()


if __name__ == "__main__":
    cli(main)
