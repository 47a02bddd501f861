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
input stops with a message naming the file and the line or example.
"""

from __future__ import annotations

import argparse
import ast
import csv
import functools
import heapq
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from src.cli import cli, init_logger
from src.corpus.passages import PassageStore
from src.data.questions import iter_entries, json_error, parse_score, utf8_error, write_questions
from src.errors import DataError, PassageFileError
from src.metrics import has_answer

logger = logging.getLogger("fid")

MODES = ("fid", "dpr", "bm25", "questions")
SPLITS = ("train", "dev", "test")
DPR_ID_PREFIX = "wiki:"  # newer DPR versions write passage ids as "wiki:123"


# ---------------------------------------------------------------------------
# Reading inputs with errors that say where (JSON question files: src.questions)
# ---------------------------------------------------------------------------


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: no such file ({what})")
    return path


def read_json(path: Path, what: str) -> Any:
    """A whole JSON file (split indices, passage-id lists, JSON runs); question files: iter_records."""
    require_file(path, what)
    with open(path, encoding="utf-8-sig") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise json_error(path, e, expected=f"JSON: {what}") from None
        except UnicodeDecodeError:
            raise utf8_error(path) from None


def checked_records(read: Callable[..., Iterator[tuple[str, Any]]]) -> Callable[..., Iterator[tuple[str, Any]]]:
    """For a reader of records `read(path, ...)`: a file that is not UTF-8 is an error naming its
    first bad line, and a file without a single record is an error (not an empty output)."""

    @functools.wraps(read)
    def wrapper(path: Path, *args, **kwargs) -> Iterator[tuple[str, Any]]:
        n = 0
        try:
            for item in read(path, *args, **kwargs):
                n += 1
                yield item
        except UnicodeDecodeError:
            raise utf8_error(path) from None
        if n == 0:
            with open(path, "rb") as f:
                blank = not f.read(1 << 16).strip()
            raise DataError(f"{path}: empty file" if blank else f"{path}: no records (questions) in the file")

    return wrapper


def iter_records(path: Path, wrappers: tuple[str, ...] = ("Data",)) -> Iterator[tuple[str, Any]]:
    """("line N" or "Data[i]", record) of a JSON list, JSON lines (whatever the file's name) or, with
    keys in `wrappers`, a TriviaQA file ({"Data": [...]}); streamed (questions.iter_entries)."""
    require_file(path, "input")
    return checked_records(iter_entries)(path, by_line=True, wrappers=wrappers, lines_in_json=True)


def parse_answers(text: str, where: str) -> list[str]:
    """The answers column of a DPR .qa.csv: a Python or JSON list of strings."""
    try:
        answers = json.loads(text)
    except json.JSONDecodeError:
        try:  # DPR writes Python reprs: ['a', "b's"]
            answers = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: answers {text[:80]!r} are not a list like ['a', 'b']") from None
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: answers must be a list of strings, got {text[:80]!r}")
    return answers


@checked_records
def iter_qa_tsv(path: Path) -> Iterator[tuple[str, dict]]:
    """DPR's question files (nq-test.qa.csv, trivia-test.qa.csv): `question<TAB>['answer', ...]`.

    Parsed with csv's tab dialect as DPR reads them; the answers column may be absent.
    """
    require_file(path, "questions")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        for row in reader:
            where = f"line {reader.line_num}"
            if not row or not any(field.strip() for field in row):
                continue
            if len(row) > 2:
                raise DataError(
                    f"{path}, {where}: expected 'question<TAB>answers', found {len(row)} tab-separated fields"
                )
            record = {"question": row[0]}
            if len(row) == 2:
                record["answers"] = parse_answers(row[1], f"{path}, {where}")
            yield where, record


def iter_question_records(path: Path) -> Iterator[tuple[str, Any]]:
    """("line N" or "Data[i]", record) of a question file, by its suffix and first character."""
    if path.suffix in (".csv", ".tsv"):
        return iter_qa_tsv(path)
    return iter_records(path)


# ---------------------------------------------------------------------------
# Questions: the public formats -> ours
# ---------------------------------------------------------------------------


def triviaqa_target(value: str) -> str:
    """TriviaQA writes some answers in capitals ("PARIS"); as the original, title-case those."""
    return value.title() if value.isupper() else value


def to_question(record: Any, where: str, position: int) -> dict:
    """One question in our format from ours/DPR ({question, answers}), NQ-open ({question,
    answer}) or TriviaQA ({Question, QuestionId, Answer: {Aliases, Value}}).

    id: the record's `id`, else TriviaQA's QuestionId, else its position in the file.
    Fields we do not know are kept untouched.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if "Question" in record and "question" not in record:  # TriviaQA
        answer = record.get("Answer")
        if not isinstance(answer, dict) or not isinstance(answer.get("Value"), str):
            raise DataError(f"{where}: TriviaQA record without Answer.Value")
        aliases = answer.get("Aliases")
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise DataError(f"{where}: TriviaQA Answer.Aliases must be a list of strings")
        if not isinstance(record["Question"], str):
            raise DataError(f"{where}: 'Question' must be a string")
        return {
            "id": record.get("QuestionId", position),
            "question": record["Question"],
            "target": triviaqa_target(answer["Value"]),
            "answers": aliases,
        }
    if not isinstance(record.get("question"), str):
        raise DataError(f"{where}: missing or non-string 'question' (fields: {sorted(record)[:8]})")
    example = {"id": record.get("id", position), "question": record["question"]}
    if "answers" in record or "answer" in record:  # NQ-open calls them "answer"
        answers = record["answers"] if "answers" in record else record["answer"]
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: answers must be a list of strings, got {answers!r:.80}")
        example["answers"] = answers
    if "target" in record:
        if not isinstance(record["target"], str):
            raise DataError(f"{where}: 'target' must be a string")
        example["target"] = record["target"]
    for key, value in record.items():
        if key not in example and key != "answer":
            example[key] = value
    return example


def read_questions(path: Path) -> list[dict]:
    """All questions of a public question file, in our format (small: no passages)."""
    records = tqdm(iter_question_records(path), desc=f"reading {path.name}")
    return [to_question(record, f"{path}, {where}", k) for k, (where, record) in enumerate(records)]


# ---------------------------------------------------------------------------
# Passages
# ---------------------------------------------------------------------------


def open_passages(path: Path) -> PassageStore:
    require_file(path, "passages, DPR's psgs_w100.tsv layout: id<TAB>text<TAB>title")
    logger.info("passages: %s", path)
    try:
        store = PassageStore(path)
    except PassageFileError as e:
        raise DataError(str(e)) from None
    logger.info("passages: %d in %s", len(store), path)
    return store


def normalize_passage_id(pid: Any, where: str) -> str:
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise DataError(f"{where}: passage id must be a string or an integer, got {pid!r}")
    pid = str(pid).strip()
    return pid[len(DPR_ID_PREFIX) :] if pid.startswith(DPR_ID_PREFIX) else pid


class PassageLookup:
    """Passages by id; an unknown id is an error, or a counted skip with skip_missing."""

    def __init__(self, store: PassageStore, skip_missing: bool):
        self.store = store
        self.skip_missing = skip_missing
        self.missing = 0
        self.examples: set[str] = set()

    def get(self, pid: Any, question: str, position: str) -> dict | None:
        """`question` says where the question is, `position` where the id is within it (for errors)."""
        where = f"{question}, {position}"
        passage = self.store.get(normalize_passage_id(pid, where))
        if passage is None:
            if not self.skip_missing:
                raise DataError(
                    f"{where}: passage id {pid!r} is not in {self.store.path} "
                    "(wrong passages file? --skip_missing_passages drops such ids with a count)"
                )
            self.missing += 1
            self.examples.add(question)
        return passage

    def report(self, output: Path) -> None:
        if self.missing:
            logger.warning(
                "%s: skipped %d passage id(s) not in %s, in %d question(s)",
                output,
                self.missing,
                self.store.path,
                len(self.examples),
            )
        self.missing = 0
        self.examples = set()


def save(path: Path, examples: Iterable[dict]) -> int:
    """Write atomically, streaming (one question in memory at a time); returns the number of
    questions. An error half way leaves no output: write_questions writes a temporary file."""
    n = 0

    def counting() -> Iterator[dict]:
        nonlocal n
        for example in examples:
            n += 1
            yield example

    write_questions(path, counting())
    return n


# ---------------------------------------------------------------------------
# fid: the original recipe
# ---------------------------------------------------------------------------


def public_origin(split: str) -> str:
    """Train and dev are drawn from the public train file, test from the public dev file."""
    return "dev" if split == "test" else "train"


def fid_inputs(download_dir: Path, datasets: list[str], splits: list[str]) -> dict[str, Path]:
    """Where get-data.sh leaves each file (its tarballs unpack flat into DOWNLOAD_DIR)."""
    public = {
        "NQ": {"train": "NQ-open.train.jsonl", "dev": "NQ-open.dev.jsonl"},
        "TQA": {
            "train": "triviaqa-unfiltered/unfiltered-web-train.json",
            "dev": "triviaqa-unfiltered/unfiltered-web-dev.json",
        },
    }
    files = {}
    for name in datasets:
        for origin in sorted({public_origin(split) for split in splits}, reverse=True):
            files[f"{name} public {origin}"] = download_dir / public[name][origin]
        for split in splits:
            files[f"{name} {split} index"] = download_dir / f"{name}.{split}.idx.json"
            files[f"{name} {split} passages"] = download_dir / f"{name.lower()}_passages" / f"{split}.json"
    return files


def read_source(dataset: str, path: Path) -> list[tuple[str, dict]]:
    """The public question file, as (where, question) in file order; TriviaQA keeps its QuestionId."""
    records = iter_records(path)  # NQ-open: JSON lines (.jsonl), TriviaQA: {"Data": [...]}
    out = []
    for k, (where, record) in enumerate(tqdm(records, desc=f"reading {path.name}")):
        where = f"{path}, {where}"
        example = to_question(record, where, k)
        if dataset == "NQ":  # keep only what the recipe writes, as the original
            example = {"question": example["question"], "answers": example.get("answers")}
            if example["answers"] is None:
                raise DataError(f"{where}: NQ-open question without 'answer'")
        elif "QuestionId" not in record:
            raise DataError(f"{where}: TriviaQA record without QuestionId (the key of tqa_passages)")
        out.append((where, example))
    return out


def read_split_index(path: Path, n_source: int, source: Path) -> list[int]:
    index = read_json(path, "split index")
    if not isinstance(index, list):
        raise DataError(f"{path}: expected a JSON list of positions, got {type(index).__name__}")
    for i, k in enumerate(index):
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n_source:
            raise DataError(f"{path}, entry {i}: position {k!r} is not in 0..{n_source - 1} ({source})")
    return index


def fid_split(
    dataset: str,
    split: str,
    source: list[tuple[str, dict]],
    source_path: Path,
    files: dict[str, Path],
    lookup: PassageLookup,
) -> Iterator[dict]:
    """One split: questions picked by the index file, passages by the passage-id list.

    NQ's passage lists are keyed by position in the split ("0", "1", ...), TriviaQA's by
    QuestionId. Output ids: that same key (an int position for NQ, QuestionId for TQA).
    """
    index_path, lists_path = files[f"{dataset} {split} index"], files[f"{dataset} {split} passages"]
    index = read_split_index(index_path, len(source), source_path)
    passage_lists = read_json(lists_path, "passage-id lists")
    if not isinstance(passage_lists, dict):
        raise DataError(f"{lists_path}: expected an object question key -> list of passage ids")
    for i, k in enumerate(tqdm(index, desc=f"{dataset} {split}")):
        source_where, question = source[k]
        key = str(i) if dataset == "NQ" else question["id"]
        ids = passage_lists.get(key)
        if not isinstance(ids, list):
            raise DataError(
                f"{lists_path}: no passage-id list for question {key!r} ({dataset} {split} entry {i} = {source_where})"
            )
        ctxs = []
        for j, pid in enumerate(ids):
            passage = lookup.get(pid, f"{lists_path}, question {key!r}", f"passage {j}")
            if passage is not None:
                ctxs.append(passage)
        example = {"id": i if dataset == "NQ" else key, "question": question["question"]}
        if "target" in question:
            example["target"] = question["target"]
        example["answers"] = question["answers"]
        example["ctxs"] = ctxs
        yield example


def run_fid(args: argparse.Namespace) -> None:
    download_dir, output_dir = Path(args.download_dir), Path(args.output_dir)
    files = fid_inputs(download_dir, args.datasets, args.splits)
    passages_path = Path(args.passages) if args.passages else output_dir / "psgs_w100.tsv"
    if not args.passages and not passages_path.is_file() and (download_dir / "psgs_w100.tsv").is_file():
        passages_path = download_dir / "psgs_w100.tsv"
    files["passages"] = passages_path
    missing = [f"  {path} ({what})" for what, path in files.items() if not path.is_file()]
    if missing:  # say everything that is missing before hours of work, not after
        raise DataError(
            f"{len(missing)} input file(s) missing for `preprocess.py fid` "
            "(layout of the original get-data.sh):\n" + "\n".join(missing)
        )
    lookup = PassageLookup(open_passages(passages_path), args.skip_missing_passages)

    for dataset in args.datasets:
        public = {origin: files[f"{dataset} public {origin}"] for origin in map(public_origin, args.splits)}
        sources = {origin: read_source(dataset, path) for origin, path in public.items()}
        for split in args.splits:
            origin = public_origin(split)
            out = output_dir / dataset / f"{split}.json"
            n = save(out, fid_split(dataset, split, sources[origin], public[origin], files, lookup))
            lookup.report(out)
            logger.info("%s: %d questions (%s %s)", out, n, dataset, split)


# ---------------------------------------------------------------------------
# dpr: a DPR retriever output
# ---------------------------------------------------------------------------


def convert_dpr_example(
    record: Any, where: str, position: int, lookup: PassageLookup | None = None, n_docs: int = -1
) -> dict:
    """DPR -> ours: scores as floats, `has_answer` -> `hasanswer`, ids without `wiki:`.

    The ctx order is kept: it is DPR's ranking (best first). With a passages file, ids are
    checked and missing title/text filled in from it.
    """
    example = to_question(record, where, position)
    ctxs = example.get("ctxs")
    if not isinstance(ctxs, list):
        raise DataError(f"{where}: no 'ctxs' list (for files without passages use the `questions` mode)")
    if n_docs >= 0:
        ctxs = ctxs[:n_docs]
    converted = []
    for j, ctx in enumerate(ctxs):
        at = f"{where}, ctx {j}"
        if not isinstance(ctx, dict):
            raise DataError(f"{at}: expected an object, got {type(ctx).__name__}")
        out = {}
        if "id" in ctx:
            out["id"] = normalize_passage_id(ctx["id"], at)
        if lookup is not None:
            if "id" not in ctx:
                raise DataError(f"{at}: no 'id' to look up in {lookup.store.path}")
            passage = lookup.get(ctx["id"], where, f"ctx {j}")
            if passage is None:
                continue
            out["id"] = passage["id"]
            out["title"] = ctx.get("title", passage["title"])
            out["text"] = ctx.get("text", passage["text"])
        else:
            for field in ("title", "text"):
                if field not in ctx:
                    raise DataError(f"{at}: no '{field}' (pass --passages to fill it in from the passages file)")
                out[field] = ctx[field]
        for field in ("title", "text"):
            if not isinstance(out[field], str):
                raise DataError(f"{at}: '{field}' must be a string")
        if "score" in ctx:
            out["score"] = parse_score(ctx["score"], at)
        hasanswer = ctx.get("hasanswer", ctx.get("has_answer"))
        if hasanswer is not None:
            if not isinstance(hasanswer, bool):
                raise DataError(f"{at}: has_answer must be true or false, got {hasanswer!r}")
            out["hasanswer"] = hasanswer
        for key, value in ctx.items():  # anything else DPR or a user added
            if key not in out and key not in ("has_answer", "hasanswer"):
                out[key] = value
        converted.append(out)
    example["ctxs"] = converted
    return example


def run_dpr(args: argparse.Namespace) -> None:
    source, output = Path(args.input), Path(args.output)
    lookup = PassageLookup(open_passages(Path(args.passages)), args.skip_missing_passages) if args.passages else None
    records = iter_records(source, wrappers=())
    examples = (
        convert_dpr_example(record, f"{source}, {where}", k, lookup, args.n_docs)
        for k, (where, record) in enumerate(tqdm(records, desc=f"converting {source.name}"))
    )
    n = save(output, examples)
    if lookup is not None:
        lookup.report(output)
    logger.info("%s: %d questions from the DPR output %s", output, n, source)


# ---------------------------------------------------------------------------
# bm25: a run file joined with questions and passages
# ---------------------------------------------------------------------------


def read_run(path: Path, n_docs: int) -> dict[str, list[tuple[str, float]]]:
    """qid -> [(passage id, score)] best first, the top n_docs per question.

    TREC run lines `qid Q0 docid rank score tag` are ordered by their rank column
    (run files need not be sorted); JSON runs `{qid: [[docid, score], ...]}` (or
    `{qid: {docid: score}}`) by descending score, ties in file order.
    """
    require_file(path, "run")
    try:
        return _read_run(path, n_docs)
    except UnicodeDecodeError:
        raise utf8_error(path) from None


def _read_run(path: Path, n_docs: int) -> dict[str, list[tuple[str, float]]]:
    limit = n_docs if n_docs >= 0 else float("inf")
    run: dict[str, list] = {}
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("{"):
        data = read_json(path, "run")
        for qid, hits in tqdm(data.items(), desc=f"reading {path.name}"):
            if isinstance(hits, dict):
                hits = list(hits.items())
            if not isinstance(hits, list):
                raise DataError(f"{path}, question {qid!r}: expected a list of [passage id, score]")
            ranked = []
            for j, hit in enumerate(hits):
                if not isinstance(hit, (list, tuple)) or len(hit) != 2:
                    raise DataError(f"{path}, question {qid!r}, hit {j}: expected [passage id, score], got {hit!r:.80}")
                where = f"{path}, question {qid!r}, hit {j}"
                ranked.append((normalize_passage_id(hit[0], where), parse_score(hit[1], where)))
            ranked.sort(key=lambda h: -h[1])  # stable: ties keep file order
            run[str(qid)] = ranked[: int(min(limit, len(ranked)))]
        return run

    heaps: dict[str, list] = {}  # qid -> max-heap on rank (kept to the n_docs best)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(tqdm(f, desc=f"reading {path.name}", unit=" lines"), 1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}, line {lineno}"
            if len(fields) != 6:
                raise DataError(f"{where}: expected 'qid Q0 docid rank score tag', found {len(fields)} fields")
            qid, _, docid, rank, score, _ = fields
            try:
                rank = int(rank)
            except ValueError:
                raise DataError(f"{where}: rank {rank!r} is not an integer") from None
            entry = (-rank, lineno, normalize_passage_id(docid, where), parse_score(score, where))
            heap = heaps.setdefault(qid, [])
            if len(heap) < limit:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                heapq.heapreplace(heap, entry)
    for qid, heap in heaps.items():
        run[qid] = [(docid, score) for _, _, docid, score in sorted(heap, reverse=True)]
    return run


def run_bm25(args: argparse.Namespace) -> None:
    run_path, questions_path, output = Path(args.run), Path(args.questions), Path(args.output)
    questions = read_questions(questions_path)
    run = read_run(run_path, args.n_docs)
    lookup = PassageLookup(open_passages(Path(args.passages)), args.skip_missing_passages)
    seen, no_hits = set(), 0

    def examples():
        nonlocal no_hits
        for example in tqdm(questions, desc="joining"):
            qid = str(example["id"])
            seen.add(qid)
            hits = run.get(qid)
            if not hits:
                no_hits += 1
            ctxs = []
            for rank, (pid, score) in enumerate(hits or []):
                passage = lookup.get(pid, f"{run_path}, question {qid!r}", f"rank {rank + 1}")
                if passage is None:
                    continue
                ctx = {**passage, "score": score}
                if example.get("answers"):  # DPR's rule, as passage_retrieval.py
                    ctx["hasanswer"] = bool(has_answer(example["answers"], passage["text"]))
                ctxs.append(ctx)
            yield {**example, "ctxs": ctxs}

    n = save(output, examples())
    lookup.report(output)
    if no_hits:
        logger.warning(
            "%s: %d of %d question(s) have no hits in %s (written with empty ctxs)", output, no_hits, n, run_path
        )
    unused = len(set(run) - seen)
    if unused:
        logger.warning("%s: %d question id(s) of the run are not in %s (ignored)", run_path, unused, questions_path)
    logger.info("%s: %d questions, run %s, questions %s", output, n, run_path, questions_path)


# ---------------------------------------------------------------------------
# questions: question files without passages
# ---------------------------------------------------------------------------


def run_questions(args: argparse.Namespace) -> None:
    source, output = Path(args.input), Path(args.output)
    records = iter_question_records(source)
    examples = (
        to_question(record, f"{source}, {where}", k)
        for k, (where, record) in enumerate(tqdm(records, desc=f"converting {source.name}"))
    )
    n = save(output, examples)
    logger.info("%s: %d questions from %s", output, n, source)


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


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="preprocess.py",
        description="Turn public QA files into FiD question files (question, answers, target, ctxs).",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    modes = parser.add_subparsers(dest="mode", metavar="MODE")

    def skip_flag(p):
        p.add_argument(
            "--skip_missing_passages",
            action="store_true",
            help="drop passage ids that are not in the passages file (counted in the log) instead of stopping",
        )

    def n_docs_flag(p, default):
        p.add_argument(
            "--n_docs",
            "--n-docs",
            dest="n_docs",
            type=count_or_all,
            default=default,
            help=f"keep the top N passages (default {default}; -1: all)",
        )

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
    return parser


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    init_logger(None, True)
    {"fid": run_fid, "dpr": run_dpr, "bm25": run_bm25, "questions": run_questions}[args.mode](args)


if __name__ == "__main__":
    cli(main)
