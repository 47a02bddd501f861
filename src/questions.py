"""Question files in and out (README "Question format"): read, validate, order, write.

Question file: a JSON list or JSON lines, one example per entry:
`{id?, question, target?, answers?, ctxs: [{id?, title, text, score?, hasanswer?}]}`.
Unknown fields are kept and written back untouched. Every script reads and writes
question files here; errors name the file and the line or example.

The reader and retriever scripts order each example's ctxs once, when they load it: by
descending score when every ctx has one (DPR and our retrieval write them), else in file
order. The reader reads the first `n_context` of them (`read_ctxs`); its scores are
written back to those (scores.attach_scores).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import DataError
from .files import atomic_write


def utf8_error(path: str | Path) -> DataError:
    """The error for a file that is not UTF-8: file, line and column of its first bad byte."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(
                    f"{path}, line {lineno}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                    "save the file as UTF-8"
                )
    return DataError(f"{path}: not UTF-8 text; save the file as UTF-8")


def json_error(
    path: str | Path,
    e: json.JSONDecodeError,
    lineno: int | None = None,
    expected: str = "a JSON list of examples, or JSON lines",
) -> DataError:
    """'file, line N: invalid JSON (...)', saying when the file is empty or ends early (truncated).
    `lineno`: the line of a JSON lines file that `e` is about."""
    if not e.doc.strip() and lineno is None:
        return DataError(f"{path}: empty file (expected {expected})")
    hint = ""
    if e.msg.startswith("Unterminated string") or e.pos >= len(e.doc.rstrip()):
        hint = (
            "; the text ends in the middle of a value: is the file truncated?"
            if lineno is None
            else "; the line ends in the middle of a value: truncated, or one example over several lines? "
            "(JSON lines hold one whole example per line)"
        )
    elif e.msg == "Extra data" and lineno is None:
        hint = "; one example per line? name the file .jsonl"
    line = e.lineno if lineno is None else lineno
    return DataError(f"{path}, line {line}: invalid JSON ({e.msg}, column {e.colno}{hint})")


def _read_entries(path: Path) -> list[tuple[str, Any]]:
    """(where, entry) pairs; `where` is 'line N' for JSON lines, 'example N' for a JSON list."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a question file")
    try:
        if path.suffix == ".jsonl":
            entries, blank = [], True
            with open(path, encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    blank = False
                    try:
                        entries.append((f"line {lineno}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise json_error(path, e, lineno) from None
            if blank:
                raise DataError(f"{path}: empty file (expected JSON lines, one example per line)")
            return entries
        with open(path, encoding="utf-8-sig") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise json_error(path, e) from None
    except UnicodeDecodeError:
        raise utf8_error(path) from None
    if isinstance(data, dict):
        keys = ", ".join(repr(k) for k in list(data)[:5]) + (", ..." if len(data) > 5 else "")
        raise DataError(
            f"{path}: expected a JSON list of examples [{{...}}, ...] (or JSON lines, one example per line, "
            f"in a .jsonl file), found a JSON object {{{keys}}}"
        )
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of examples (or a .jsonl file), got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: no examples (an empty JSON list)")
    return [(f"example {i}", ex) for i, ex in enumerate(data)]


def parse_score(value: Any, where: str) -> float:
    """A ctx score: a number, or a numeric string as DPR writes them."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where}: score must be a number, got {value!r}")
    try:
        score = float(value)
    except ValueError:
        raise DataError(f"{where}: score {value!r} is not a number") from None
    if not math.isfinite(score):
        raise DataError(f"{where}: score {value!r} is not a finite number")
    return score


def validate_example(ex: Any, where: str) -> None:
    if not isinstance(ex, dict):
        raise DataError(f"{where}: expected an object, got {type(ex).__name__}")
    if not isinstance(ex.get("question"), str):
        raise DataError(f"{where}: missing or non-string 'question'")
    if "target" in ex and not isinstance(ex["target"], str):
        raise DataError(f"{where}: 'target' must be a string")
    answers = ex.get("answers")
    if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
        raise DataError(f"{where}: 'answers' must be a list of strings")
    ctxs = ex.get("ctxs", [])
    if not isinstance(ctxs, list):
        raise DataError(f"{where}: 'ctxs' must be a list")
    for j, c in enumerate(ctxs):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise DataError(f"{where}, ctx {j}: expected an object with a string 'text'")
        if "title" in c and not isinstance(c["title"], str):
            raise DataError(f"{where}, ctx {j}: 'title' must be a string")
        if "score" in c:
            parse_score(c["score"], f"{where}, ctx {j}")


def load_questions(path: str | Path, maxload: int = -1, rank: bool = False) -> list[dict[str, Any]]:
    """Read and validate a question file; every example gets an `id` (its position if absent).
    With `rank` (the reader and retriever scripts) each example's ctxs are put in ranking
    order (`rank_ctxs`), here and only here."""
    path = Path(path)
    examples = []
    for k, (where, ex) in enumerate(_read_entries(path)):
        if 0 <= maxload <= k:
            break
        validate_example(ex, f"{path}, {where}")
        if "id" not in ex:
            ex["id"] = k
        if rank:
            rank_ctxs(ex)
        examples.append(ex)
    return examples


def write_questions(path: str | Path, examples: Iterable[dict[str, Any]]) -> None:
    """Write a question file atomically: JSON lines if the suffix is .jsonl, else a JSON list.

    `examples` may be any iterable (a generator streams: one example in memory at a time).
    """
    path = Path(path)
    jsonl = path.suffix == ".jsonl"
    with atomic_write(path) as f:
        if not jsonl:
            f.write("[")
        for k, ex in enumerate(examples):
            if jsonl:
                f.write(json.dumps(ex, ensure_ascii=False) + "\n")
            else:
                f.write(",\n" if k else "\n")
                f.write(json.dumps(ex, indent=1, ensure_ascii=False))
        if not jsonl:
            f.write("\n]\n")


def rank_ctxs(ex: dict[str, Any]) -> None:
    """Best first when every ctx has a score (stable: ties keep file order); else file order is the ranking."""
    ctxs = ex.get("ctxs") or []
    if ctxs and all("score" in c for c in ctxs):
        ctxs.sort(key=lambda c: float(c["score"]), reverse=True)


def read_ctxs(ex: dict[str, Any], n_context: int) -> list[dict[str, Any]]:
    """The ctxs a reader with `n_context` passages reads: the first n_context in ranking order."""
    return (ex.get("ctxs") or [])[:n_context]


def require_targets(examples: list[dict], path: str) -> None:
    """Training needs a target or a non-empty answers list for every example."""
    for i, ex in enumerate(examples):
        if "target" not in ex and not ex.get("answers"):
            raise DataError(f"{path}, example {i} (id {ex.get('id')}): no 'target' and no 'answers' to train on")
