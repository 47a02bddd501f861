"""The whole read → score → distill → index → retrieve → read loop, one command.

    python run_loop.py                      # toy world + tiny models, offline, minutes on a CPU
    python run_loop.py --quick              # the same, shrunk (the test suite runs this)
    python run_loop.py --train_data train.json --eval_data dev.json --test_data test.json \
        --passages psgs_w100.tsv --reader_model t5-base --retriever_model bert-base-uncased \
        --nproc 8 --n_context 100 --reader_steps 15000 ...   # real data, GPUs

Each step is the real script, run as a subprocess with the flags a user would type
(every command is printed and logged to `commands.log`; the runner is `src/toy/runner.py`,
the report `src/toy/report.py`). One round is

  1. train_reader.py            on the current ctxs (round 1: the first stage's)
  2. test_reader.py             on train, dev and test, --write_crossattention_scores
  3. train_retriever.py         distils the reader's scores on train (dev for best_dev)
  4. generate_passage_embeddings.py   the whole corpus, one shard per process
  5. passage_retrieval.py       new ctxs for train, dev and test → the next round

Round r > 1 continues from round r−1's best reader and retriever checkpoints: the new
reader reads the passages the distilled retriever found, and the retriever then learns
the new reader's scores on those passages, its own earlier mistakes included. "Before
distillation" in the report is always the random starting retriever. With no data
arguments the toy world of `src/toy/world.py` is generated into the run directory, with BM25
as the first stage and tiny model directories, and the retriever trains with
`--in_batch_negatives` (BM25's lists there hold only look-alike passages; see docs/toy-loop.md).

Writes `report.md` and `report.json` (one entry per round) in the run directory and
prints its path on the last line. Tensorboard: `tensorboard --logdir <run dir>`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from src.argparsing import HelpFormatter
from src.configs import config_from
from src.reader.scores import SCORE_KINDS
from src.retriever.losses import LOSSES
from src.toy.compare import DEFAULT_SIGNALS, run_comparison
from src.toy.config import LoopConfig, derive
from src.toy.runner import run_loop

ROOT = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run the FiD read → score → distill → index → retrieve loop over the real scripts.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("data (all four, or none for the toy world)")
    g.add_argument("--train_data", help="question file with first-stage ctxs")
    g.add_argument("--eval_data", help="dev question file with first-stage ctxs (reader/retriever best_dev)")
    g.add_argument("--test_data", help="test question file with first-stage ctxs (reported, never trained on)")
    g.add_argument("--passages", help="passages .tsv (id, text, title) searched by the distilled retriever")
    g = p.add_argument_group("models")
    g.add_argument(
        "--reader_model",
        help="starting T5, hub name or dir (unset: t5-base on real data, a tiny T5 built in the run dir for the toy world)",
    )
    g.add_argument(
        "--retriever_model",
        help="starting BERT-like encoder or saved retriever (unset: bert-base-uncased on real data, a tiny BERT for "
        "the toy world)",
    )
    g = p.add_argument_group("loop")
    g.add_argument("--output_dir", help="run directory (unset: runs/loop-<date-time>)")
    g.add_argument(
        "--rounds", type=int, default=2, help="rounds of the loop; round r > 1 starts from round r-1's models"
    )
    g.add_argument("--nproc", type=int, default=1, help="torchrun processes per training/scoring step")
    g.add_argument("--quick", action="store_true", help="a small world and few steps (for the test suite)")
    g.add_argument(
        "--query_side",
        nargs="?",
        const="on",
        choices=["on", "both"],
        default=None,
        help="query-side training (train_retriever.py --query_side_retriever_training): the rounds train the "
        "question side only and search the index of the starting retriever, never re-embedding the corpus; "
        "'both': the loop with and without it from the same start, side by side in report.md",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed of the toy world and of every step")
    g.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "bf16", "fp16"],
        help="--precision of every step (autocast dtype; fp16 is meant for GPUs). Default: bf16 when the steps "
        "run on CUDA, fp32 on CPU (bf16 is emulated, and slow, on CPUs without bf16 instructions)",
    )
    g.add_argument(
        "--device", default=None, help="cuda / cpu for every step (unset: each script's choice, cuda when available)"
    )
    add_step_options(p)
    g = p.add_argument_group("toy world")
    g.add_argument(
        "--toy_entities",
        type=int,
        default=500,
        help="invented entities of the toy world (6 passages and questions each)",
    )
    return p


def add_step_options(p: argparse.ArgumentParser) -> None:
    """The reader's flags, then the retriever's."""
    g = p.add_argument_group("reader")
    g.add_argument(
        "--n_context", type=int, default=None, help="passages the reader reads per question (unset: toy 10, else 100)"
    )
    g.add_argument(
        "--text_maxlength", type=int, default=None, help="max tokens of question + passage (unset: toy 32, else 200)"
    )
    g.add_argument(
        "--generation_max_length",
        type=int,
        default=50,
        help="test_reader.py's decoding length (counts the start token)",
    )
    g.add_argument("--reader_steps", type=int, default=300, help="train_reader.py --total_steps")
    g.add_argument("--reader_batch_size", type=int, default=8, help="train_reader.py --per_gpu_batch_size")
    g.add_argument("--reader_lr", type=float, default=1e-4, help="train_reader.py --lr")
    g.add_argument("--reader_eval_freq", type=int, default=100, help="train_reader.py --eval_freq (dev EM, best_dev)")
    g.add_argument(
        "--no_title", action="store_true", default=None, help="leave passage titles out (unset: on for the toy world)"
    )
    g.add_argument("--score_maxload", type=int, default=-1, help="score at most this many train questions (-1: all)")
    add_retriever_step_options(p)


def add_retriever_step_options(p: argparse.ArgumentParser) -> None:
    """The retriever's flags."""
    g = p.add_argument_group("retriever")
    g.add_argument("--retriever_steps", type=int, default=600, help="train_retriever.py --total_steps")
    g.add_argument("--retriever_batch_size", type=int, default=16, help="train_retriever.py --per_gpu_batch_size")
    g.add_argument("--retriever_lr", type=float, default=3e-3, help="train_retriever.py --lr")
    g.add_argument(
        "--retriever_n_context",
        type=int,
        default=None,
        help="passages per question in distillation, at most --n_context: the ones the reader scored (unset: --n_context)",
    )
    g.add_argument(
        "--in_batch_negatives",
        action="store_true",
        default=None,
        help="pass train_retriever.py --in_batch_negatives (unset: on for the toy world, off for real data)",
    )
    g.add_argument(
        "--no_in_batch_negatives",
        dest="in_batch_negatives",
        action="store_false",
        default=argparse.SUPPRESS,  # the dest's default is --in_batch_negatives' None
        help="the papers' loss only, also on the toy world",
    )
    g.add_argument(
        "--compare_signals",
        nargs="*",
        choices=list(SCORE_KINDS),
        default=None,
        metavar="KIND",
        help="instead of the rounds: one reader, then one retriever distilled per signal (no KIND given: "
        + ", ".join(DEFAULT_SIGNALS)
        + "; answer_logprob with --retriever_loss emdr), and one table (compare.md)",
    )
    g.add_argument(
        "--score_kind",
        choices=list(SCORE_KINDS),
        default="xattn",
        help="the reader's signal the retriever learns from (test_reader.py --score_kind)",
    )
    g.add_argument(
        "--retriever_loss",
        choices=list(LOSSES),
        default="kl",
        help="train_retriever.py --retriever_loss (emdr wants --score_kind answer_logprob)",
    )
    g.add_argument(
        "--indexing_dimension", type=int, default=None, help="retriever embedding size (unset: toy 64, else 768)"
    )
    g.add_argument(
        "--question_maxlength", type=int, default=None, help="retriever's question tokens (unset: toy 16, else 40)"
    )
    g.add_argument(
        "--passage_maxlength", type=int, default=None, help="retriever's passage tokens (unset: toy 32, else 200)"
    )
    g.add_argument(
        "--n_docs",
        type=int,
        default=None,
        help="passages retrieved per question (at least 20 and --n_context; unset: the larger of the two)",
    )


def get_options(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed flags, as the user gave them (a mix of data flags is refused)."""
    p = build_parser()
    opt = p.parse_args(argv)
    data = [opt.train_data, opt.eval_data, opt.test_data, opt.passages]
    if any(x is None for x in data) and not all(x is None for x in data):
        p.error("give all of --train_data --eval_data --test_data --passages, or none (toy world)")
    return opt


def loop_config(argv: list[str] | None = None) -> LoopConfig:
    """The loop's settings: the flags, with the sizes and defaults that depend on toy world vs
    real data filled in (src/toy/config.py's derive)."""
    opt = get_options(argv)
    signals = None if opt.compare_signals is None else tuple(opt.compare_signals)
    return derive(config_from(LoopConfig, opt, compare_signals=signals), ROOT)


def main(argv: list[str] | None = None) -> Path:
    """Run the loop; returns the run directory."""
    config = loop_config(argv)
    return run_comparison(config) if config.compare_signals is not None else run_loop(config)


if __name__ == "__main__":
    main()
