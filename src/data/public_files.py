"""Public QA files read with errors that say where: JSON lists, JSON lines, TriviaQA's
{"Data": [...]}, DPR's .qa.csv, and BM25 runs (TREC or JSON); each record turned into one
question of our format (README "Question format"). The converters of preprocess.py
(src/data/converters.py) join them with the passages.
"""

from __future__ import annotations

import ast
import csv
import functools
import heapq
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from src.corpus.passages import strip_id_prefix
from src.data.questions import iter_entries, json_error, parse_score, utf8_error
from src.errors import DataError

# ---------------------------------------------------------------------------
# Reading inputs with errors that say where (JSON question files: src/data/questions.py)
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
    if "Question" in record and "question" not in record:
        return triviaqa_question(record, where, position)
    if not isinstance(record.get("question"), str):
        raise DataError(f"{where}: missing or non-string 'question' (fields: {sorted(record)[:8]})")
    example = {"id": record.get("id", position), "question": record["question"]}
    if "answers" in record or "answer" in record:  # NQ-open calls them "answer"
        example["answers"] = answer_list(record["answers"] if "answers" in record else record["answer"], where)
    if "target" in record:
        if not isinstance(record["target"], str):
            raise DataError(f"{where}: 'target' must be a string")
        example["target"] = record["target"]
    for key, value in record.items():
        if key not in example and key != "answer":
            example[key] = value
    return example


def triviaqa_question(record: dict, where: str, position: int) -> dict:
    """TriviaQA's {Question, QuestionId, Answer: {Aliases, Value}} -> ours (answers: the aliases)."""
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


def answer_list(answers: Any, where: str) -> list[str]:
    """A record's answers as a list of strings (a single string is one answer)."""
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: answers must be a list of strings, got {answers!r:.80}")
    return answers


def read_questions(path: Path) -> list[dict]:
    """All questions of a public question file, in our format (small: no passages)."""
    records = tqdm(iter_question_records(path), desc=f"reading {path.name}")
    return [to_question(record, f"{path}, {where}", k) for k, (where, record) in enumerate(records)]


def normalize_passage_id(pid: Any, where: str) -> str:
    """A passage id of a DPR file or a run as the passages TSV writes it (no "wiki:" prefix)."""
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise DataError(f"{where}: passage id must be a string or an integer, got {pid!r}")
    return strip_id_prefix(str(pid).strip())


# ---------------------------------------------------------------------------
# Runs of a first-stage retriever (BM25, pyserini): TREC or JSON
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
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    return _read_json_run(path, limit) if head.startswith("{") else _read_trec_run(path, limit)


def _read_json_run(path: Path, limit: float) -> dict[str, list[tuple[str, float]]]:
    """`{qid: [[docid, score], ...]}` or `{qid: {docid: score}}`, by descending score."""
    run: dict[str, list] = {}
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


def _read_trec_run(path: Path, limit: float) -> dict[str, list[tuple[str, float]]]:
    """TREC lines `qid Q0 docid rank score tag`, by their rank column (the file need not be sorted)."""
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
    return {qid: [(docid, score) for _, _, docid, score in sorted(heap, reverse=True)] for qid, heap in heaps.items()}
