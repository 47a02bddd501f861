"""Turn public QA files into our question format (docs/scripts.md).

Four modes, one per way people arrive:

  fid        the original FiD recipe (the default: `python preprocess.py DOWNLOAD_DIR OUTPUT_DIR`):
             NQ-open + TriviaQA + FiD's split indices and passage-id lists + psgs_w100.tsv
             -> OUTPUT_DIR/NQ/{train,dev,test}.json, OUTPUT_DIR/TQA/{train,dev,test}.json
  dpr        a DPR retriever output (string scores, `has_answer`, ids maybe `wiki:123`) -> ours
  bm25       a BM25/pyserini run (TREC run file or JSON) + questions + passages -> ours
  questions  question files without passages (DPR .qa.csv, JSON lines, JSON, NQ-open,
             TriviaQA) -> ours, for passage_retrieval.py

Every output is written atomically (nothing is left behind on an error); every bad
input stops with a message naming the file and the line or example. The converters and
the readers of the public formats live in src/data/converters.py and src/data/public_files.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from src.cli import cli, init_logger
from src.data.converters import convert_dpr, convert_fid, convert_questions, join_bm25

MODES = ("fid", "dpr", "bm25", "questions")
SPLITS = ("train", "dev", "test")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

EXAMPLES = """\
modes (python preprocess.py MODE --help for each):
  fid        the original recipe; also the default when no mode is named:
               python preprocess.py open_domain_data/download open_domain_data
               python preprocess.py fid open_domain_data/download open_domain_data --datasets NQ
  dpr        DPR retriever output -> ours:
               python preprocess.py dpr nq-dev-dpr.json data/NQ/dev.json --passages psgs_w100.tsv
  bm25       TREC/JSON run + questions + passages -> ours:
               python preprocess.py bm25 --run run.nq-test.bm25.trec --questions nq-test.qa.csv \\
                   --passages psgs_w100.tsv --output data/NQ/test.bm25.json
  questions  questions without passages (for passage_retrieval.py):
               python preprocess.py questions nq-test.qa.csv data/NQ/test.questions.json
"""


def count_or_all(text: str) -> int:
    """argparse type of --n_docs: a positive integer, or -1 for all."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1 and value != -1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, or -1 for all, got {value}")
    return value


def skip_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--skip_missing_passages",
        action="store_true",
        help="drop passage ids that are not in the passages file (counted in the log) instead of stopping",
    )


def n_docs_flag(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument(
        "--n_docs",
        "--n-docs",
        dest="n_docs",
        type=count_or_all,
        default=default,
        help=f"keep the top N passages (default {default}; -1: all)",
    )


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="preprocess.py",
        description="Turn public QA files into FiD question files (question, answers, target, ctxs).",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    modes = parser.add_subparsers(dest="mode", metavar="MODE")

    fid = modes.add_parser(
        "fid",
        help="the original recipe: NQ-open + TriviaQA + FiD split files -> NQ/ and TQA/",
        formatter_class=formatter,
        description=(
            "The original FiD recipe. DOWNLOAD_DIR holds what get-data.sh downloads: NQ-open.{train,dev}.jsonl,\n"
            "triviaqa-unfiltered/unfiltered-web-{train,dev}.json, {NQ,TQA}.{train,dev,test}.idx.json and\n"
            "{nq,tqa}_passages/{train,dev,test}.json; OUTPUT_DIR holds psgs_w100.tsv. Writes\n"
            "OUTPUT_DIR/NQ/{train,dev,test}.json and OUTPUT_DIR/TQA/{train,dev,test}.json\n"
            "(train and dev from the public train file, test from the public dev file)."
        ),
        epilog="example:\n  python preprocess.py open_domain_data/download open_domain_data",
    )
    fid.add_argument("download_dir", help="the downloaded public and FiD files")
    fid.add_argument("output_dir", help="where NQ/ and TQA/ are written; holds psgs_w100.tsv")
    fid.add_argument("--passages", help="passages TSV (default: OUTPUT_DIR/psgs_w100.tsv)")
    fid.add_argument(
        "--datasets", nargs="+", choices=("NQ", "TQA"), default=["NQ", "TQA"], help="which datasets (default: both)"
    )
    fid.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="which splits (default: all)")
    skip_flag(fid)

    dpr = modes.add_parser(
        "dpr",
        help="a DPR retriever output -> ours",
        formatter_class=formatter,
        description=(
            "DPR's dense_retriever.py output ([{question, answers, ctxs: [{id, title, text, score, has_answer}]}],\n"
            "JSON list or JSON lines) -> ours: scores as numbers, has_answer -> hasanswer, ids without 'wiki:'.\n"
            "The ctx order (DPR's ranking) is kept. With --passages, ids are checked and missing title/text filled."
        ),
        epilog="example:\n  python preprocess.py dpr nq-dev-dpr.json data/NQ/dev.json --passages psgs_w100.tsv",
    )
    dpr.add_argument("input", help="DPR retrieval output (.json list or .jsonl)")
    dpr.add_argument("output", help="question file to write (.json, or .jsonl for JSON lines)")
    dpr.add_argument("--passages", help="passages TSV to check ids against and fill missing title/text")
    n_docs_flag(dpr, -1)
    skip_flag(dpr)

    add_run_modes(modes, formatter)
    return parser


def add_run_modes(modes, formatter) -> None:
    """The bm25 and questions modes."""
    bm25 = modes.add_parser(
        "bm25",
        help="a BM25/pyserini run + questions + passages -> ours",
        formatter_class=formatter,
        description=(
            "Join a run with its questions and the passages. The run: a TREC run file ('qid Q0 docid rank score tag',\n"
            "ordered by rank) or JSON {qid: [[docid, score], ...]} (ordered by score). Question ids: the 'id' field of\n"
            "JSON questions (TriviaQA: QuestionId), else the 0-based position in the file (pyserini's ids for DPR's\n"
            ".qa.csv topics). hasanswer is marked with DPR's rule when the questions have answers."
        ),
        epilog=(
            "example:\n  python preprocess.py bm25 --run run.nq-test.bm25.trec --questions nq-test.qa.csv \\\n"
            "      --passages psgs_w100.tsv --output data/NQ/test.bm25.json"
        ),
    )
    bm25.add_argument("--run", required=True, help="TREC run file, or JSON {qid: [[docid, score], ...]}")
    bm25.add_argument("--questions", required=True, help="questions: DPR .qa.csv, .jsonl, .json or TriviaQA")
    bm25.add_argument("--passages", required=True, help="passages TSV (psgs_w100.tsv layout)")
    bm25.add_argument("--output", required=True, help="question file to write (.json or .jsonl)")
    n_docs_flag(bm25, 100)
    skip_flag(bm25)

    questions = modes.add_parser(
        "questions",
        help="question files without passages -> ours (input of passage_retrieval.py)",
        formatter_class=formatter,
        description=(
            "Questions without passages -> ours: DPR's .qa.csv/.tsv (question<TAB>['answer', ...]), JSON lines or a\n"
            "JSON list of {question, answers|answer, target?, id?} (NQ-open included), or TriviaQA {'Data': [...]}\n"
            "(answers = Aliases, target = Value). ids: 'id', else QuestionId, else the position in the file."
        ),
        epilog="example:\n  python preprocess.py questions nq-test.qa.csv data/NQ/test.questions.json",
    )
    questions.add_argument("input", help="question file")
    questions.add_argument("output", help="question file to write (.json or .jsonl)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    # The original's call had no mode: `preprocess.py DOWNLOAD_DIR OUTPUT_DIR` means `fid`.
    # (A download directory literally named like a mode can be given as ./dpr.)
    if argv and argv[0] not in MODES and not argv[0].startswith("-"):
        argv = ["fid", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode is None:
        parser.print_help()
        parser.exit(2)
    return args


def run(args: argparse.Namespace) -> None:
    """The mode's converter (src/data/converters.py) with the mode's flags."""
    if args.mode == "fid":
        convert_fid(
            Path(args.download_dir),
            Path(args.output_dir),
            args.passages,
            args.datasets,
            args.splits,
            args.skip_missing_passages,
        )
    elif args.mode == "dpr":
        convert_dpr(Path(args.input), Path(args.output), args.passages, args.n_docs, args.skip_missing_passages)
    elif args.mode == "bm25":
        paths = (Path(args.run), Path(args.questions), Path(args.passages), Path(args.output))
        join_bm25(*paths, args.n_docs, args.skip_missing_passages)
    else:
        convert_questions(Path(args.input), Path(args.output))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    init_logger(None, True)
    run(args)


if __name__ == "__main__":
    cli(main)
