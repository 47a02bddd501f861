"""Question files in and out (docs/scripts.md): read, validate, order, write.

Question file: a JSON list or JSON lines, one example per entry:
`{id?, question, target?, answers?, ctxs: [{id?, title, text, score?, hasanswer?}]}`.
Unknown fields are kept and written back untouched. Every script reads and writes
question files here; errors name the file and the line or example. Reading streams
(`iter_entries`, one entry at a time; preprocess.py reads public files with it too). The
reader and retriever scripts read examples on demand instead of loading them
(question_index.QuestionFile: same examples, same errors).

The reader and retriever scripts order each example's ctxs once, when they load it: by
descending score when every ctx has one (DPR and our retrieval write them), else in file
order. The reader reads the first `n_context` of them (`read_ctxs`); its scores are
written back to those (scores.attach_scores).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from src.errors import DataError
from src.files import atomic_write


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
    """'file, line N: invalid JSON (...)' for a whole JSON text, saying when it is empty or ends early
    (truncated). `lineno`: the line of a JSON lines file that `e` is about."""
    if not e.doc.strip() and lineno is None:
        return DataError(f"{path}: empty file (expected {expected})")
    cut = e.msg.startswith("Unterminated string") or e.pos >= len(e.doc.rstrip())
    return _invalid_json(path, e.msg, e.lineno if lineno is None else lineno, e.colno, cut, lineno is not None)


def _invalid_json(path: str | Path, msg: str, line: int, column: int, cut: bool, in_line: bool = False) -> DataError:
    """`cut`: the error is at the end of the text (or in a string left open); `in_line`: of one JSON line."""
    hint = ""
    if cut:
        hint = (
            "; the line ends in the middle of a value: truncated, or one example over several lines? "
            "(JSON lines hold one whole example per line)"
            if in_line
            else "; the text ends in the middle of a value: is the file truncated?"
        )
    elif msg == "Extra data" and not in_line:
        hint = "; one example per line? name the file .jsonl"
    return DataError(f"{path}, line {line}: invalid JSON ({msg}, column {column}{hint})")


def iter_entries(
    path: str | Path,
    by_line: bool = False,
    wrappers: tuple[str, ...] = (),
    lines_in_json: bool = False,
    chunk_chars: int = 1 << 20,
) -> Iterator[tuple[str, Any]]:
    """(where, entry) for each entry of a question file, streamed: one entry in memory at a time.

    A .jsonl file is JSON lines (where: 'line N'); else a JSON list (where: 'example N', 1-based,
    or with `by_line` the line where the entry starts); an entry's id follows (`named`). Entries are not checked (validate_example); an
    empty list yields nothing. `wrappers`: keys of an object that holds the list (TriviaQA's
    {"Data": [...]}, where: 'Data[i]'; read whole). `lines_in_json`: a file of several JSON values
    is JSON lines whatever its name (else an error that says to name it .jsonl). Errors are those
    of json.load (same message, line and column), naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a question file")
    try:
        if path.suffix == ".jsonl":
            yield from _iter_json_lines(path)
            return
        with open(path, encoding="utf-8-sig") as f:
            text = _JsonText(path, f, chunk_chars)
            first = text.peek()
            if not first:
                raise DataError(f"{path}: empty file (expected a JSON list of examples, or JSON lines)")
            if first == "[":
                yield from text.list_entries(by_line)
                return
            data = text.value()
            several = text.peek() != ""
            if several and not lines_in_json:
                raise text.error("Extra data")
        if several:
            yield from _iter_json_lines(path)
            return
    except UnicodeDecodeError:
        raise utf8_error(path) from None
    for key in wrappers:
        if isinstance(data, dict) and isinstance(data.get(key), list):
            for i, entry in enumerate(data[key]):
                yield f"{key}[{i}]", entry
            return
    alternatives = "".join(f", or {{'{key}': [...]}}" for key in wrappers)
    if isinstance(data, dict):
        keys = ", ".join(repr(k) for k in list(data)[:5]) + (", ..." if len(data) > 5 else "")
        raise DataError(
            f"{path}: expected a JSON list of examples [{{...}}, ...] (or JSON lines, one example per line, "
            f"in a .jsonl file{alternatives}), found a JSON object {{{keys}}}"
        )
    raise DataError(
        f"{path}: expected a JSON list of examples (or a .jsonl file{alternatives}), got {type(data).__name__}"
    )


def _iter_json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    blank = True
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            blank = False
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise json_error(path, e, lineno) from None
            yield named(f"line {lineno}", entry), entry
    if blank:
        raise DataError(f"{path}: empty file (expected JSON lines, one example per line)")


_DECODER = json.JSONDecoder()
_NUMBER_CHARS = re.compile(r"[-+.eE0-9]*")


class _JsonText:
    """A JSON text read in chunks, decoded one value at a time from a sliding buffer.

    A DPR output for NQ train is several GB; json.load would need many times that. A value cut
    by the buffer's end is decoded again with more text: a failure near the end (or in a string
    left open) may be the cut, and a success may be a cut number ("1.5" read as "1").
    """

    def __init__(self, path: Path, f: IO[str], chunk_chars: int):
        self.path, self.f, self.chunk_chars = path, f, chunk_chars
        self.buf, self.pos, self.eof = "", 0, False
        self.offset = 0  # of buf[0] in the text
        self.line, self.counted, self.line_start = 1, 0, 0  # line number at buf[counted], its start's offset

    def line_at(self, i: int) -> int:
        """The line number at buf[i] (i never goes back)."""
        newline = self.buf.rfind("\n", self.counted, i)
        if newline >= 0:
            self.line += self.buf.count("\n", self.counted, i)
            self.line_start = self.offset + newline + 1
        self.counted = i
        return self.line

    def fill(self) -> bool:
        """Drop the text before pos, append the next chunk (larger for a large value); False at the end."""
        self.line_at(self.pos)
        self.offset += self.pos
        self.buf, self.counted, self.pos = self.buf[self.pos :], 0, 0
        chunk = self.f.read(max(self.chunk_chars, len(self.buf)))
        self.eof = not chunk
        self.buf += chunk
        return bool(chunk)

    def peek(self) -> str:
        """Skip whitespace; the next character ('' at the end)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def value(self) -> Any:
        """Decode the value at pos and move past it."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if not self.eof and (e.msg.startswith("Unterminated string") or e.pos >= len(self.buf) - 32):
                    self.fill()  # maybe only cut by the buffer's end: read on and retry
                    continue
                raise self.error(e.msg, e.pos) from None
            if not self.eof and _NUMBER_CHARS.match(self.buf, end).end() == len(self.buf):
                self.fill()
                continue
            self.pos = end
            return value

    def list_entries(self, by_line: bool) -> Iterator[tuple[str, Any]]:
        """The entries of the list at pos, as json.load reads them, then the end of the text."""
        self.pos += 1
        if self.peek() == "]":
            self.pos += 1
        else:
            for i in itertools.count():
                self.peek()
                line = self.line_at(self.pos)
                entry = self.value()
                yield (named(f"line {line}", entry) if by_line else example_name(i, entry)), entry
                c = self.peek()
                self.pos += 1
                if c == "]":
                    break
                if c != ",":
                    raise self.error("Expecting ',' delimiter", self.pos - 1)
        if self.peek():
            raise self.error("Extra data")

    def error(self, msg: str, i: int | None = None) -> DataError:
        i = self.pos if i is None else i
        line = self.line_at(i)
        cut = msg.startswith("Unterminated string") or i >= len(self.buf.rstrip())
        return _invalid_json(self.path, msg, line, self.offset + i - self.line_start + 1, cut)


def named(where: str, ex: Any, position: int | None = None) -> str:
    """`where` (an example's place in its file) and the example's id when it has one of its own,
    not the 0-based `position` a loader gave an example without one: 'example 3 (id q7)'."""
    ex_id = ex.get("id") if isinstance(ex, dict) else None
    if ex_id is None or (position is not None and type(ex_id) is int and ex_id == position):
        return where
    # An id that is not valid Unicode (a lone surrogate) is written as its escape: it must not
    # break the message that reports it.
    text = str(ex_id).encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{where} (id {text})"


def example_name(position: int, ex: Any = None) -> str:
    """How messages name the example at 0-based `position` of a file: by its 1-based position
    (what an editor's count gives) and its id."""
    return named(f"example {position + 1}", ex, position)


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


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a JSON escape like "\\ud800" without its pair


def _check_unicode(value: Any, where: str, field: str) -> None:
    """Strings the scripts tokenize or write as text must be valid Unicode: a lone surrogate
    (JSON allows the escape) breaks the tokenizers and UTF-8 output."""
    if isinstance(value, str) and not value.isascii() and (bad := _LONE_SURROGATE.search(value)):
        raise DataError(
            f"{where}: {field!r} is not valid Unicode: a lone surrogate {bad.group()!r} at character "
            f"{bad.start() + 1} (a JSON \\u escape without its pair)"
        )


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
    for field in ("id", "question", "target"):
        _check_unicode(ex.get(field), where, field)
    for answer in answers or ():
        _check_unicode(answer, where, "answers")
    ctxs = ex.get("ctxs", [])
    if not isinstance(ctxs, list):
        raise DataError(f"{where}: 'ctxs' must be a list")
    for j, c in enumerate(ctxs):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise DataError(f"{where}, ctx {j}: expected an object with a string 'text'")
        if "title" in c and not isinstance(c["title"], str):
            raise DataError(f"{where}, ctx {j}: 'title' must be a string")
        _check_unicode(c["text"], f"{where}, ctx {j}", "text")
        _check_unicode(c.get("title"), f"{where}, ctx {j}", "title")
        if "score" in c:
            parse_score(c["score"], f"{where}, ctx {j}")


def load_questions(path: str | Path, maxload: int = -1, rank: bool = False) -> list[dict[str, Any]]:
    """Read and validate a question file; every example gets an `id` (its position if absent).
    With `rank` (the reader and retriever scripts) each example's ctxs are put in ranking
    order (`rank_ctxs`), here and only here."""
    path = Path(path)
    entries = list(iter_entries(path))  # every entry read (and its JSON checked) before any is used
    if not entries:
        raise DataError(f"{path}: no examples (an empty JSON list)")
    examples = []
    for k, (where, ex) in enumerate(entries):
        if 0 <= maxload <= k:
            break
        validate_example(ex, f"{path}, {where}")
        if "id" not in ex:
            ex["id"] = k
        if rank:
            rank_ctxs(ex)
        examples.append(ex)
    return examples


def check_questions(path: str | Path, maxload: int = -1) -> int:
    """What load_questions checks, with its errors, streamed (one entry in memory at a time):
    every entry's JSON, then the first `maxload` examples. Returns the number of entries."""
    path = Path(path)
    n, invalid = 0, None
    for k, (where, ex) in enumerate(iter_entries(path)):
        n += 1
        if invalid is None and not 0 <= maxload <= k:
            try:
                validate_example(ex, f"{path}, {where}")
            except DataError as e:
                invalid = e  # raised once every entry's JSON is checked, as load_questions does
    if not n:
        raise DataError(f"{path}: no examples (an empty JSON list)")
    if invalid is not None:
        raise invalid
    return n


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
            if not jsonl:
                f.write(",\n" if k else "\n")
            try:
                f.write(_dumps(ex, jsonl, ensure_ascii=False))
            except UnicodeEncodeError:  # a lone surrogate in a field kept as it came: written back as its \u escape
                f.write(_dumps(ex, jsonl, ensure_ascii=True))
        if not jsonl:
            f.write("\n]\n")


def _dumps(ex: dict[str, Any], jsonl: bool, ensure_ascii: bool) -> str:
    if jsonl:
        return json.dumps(ex, ensure_ascii=ensure_ascii) + "\n"
    return json.dumps(ex, indent=1, ensure_ascii=ensure_ascii)


def rank_ctxs(ex: dict[str, Any]) -> None:
    """Best first when every ctx has a score (stable: ties keep file order); else file order is the ranking."""
    ctxs = ex.get("ctxs") or []
    if ctxs and all("score" in c for c in ctxs):
        ctxs.sort(key=lambda c: float(c["score"]), reverse=True)


def read_ctxs(ex: dict[str, Any], n_context: int) -> list[dict[str, Any]]:
    """The ctxs a reader with `n_context` passages reads: the first n_context in ranking order."""
    return (ex.get("ctxs") or [])[:n_context]


class Facts(NamedTuple):
    """What the scripts check of every example before they start, one entry per example."""

    n_ctxs: np.ndarray  # (n,) int32
    first_unscored: np.ndarray  # (n,) int32: the first ctx without a 'score' (n_ctxs when all have one)
    targeted: np.ndarray  # (n,) bool: a 'target' or a non-empty 'answers'


def example_facts(ex: dict[str, Any]) -> tuple[int, int, bool]:
    """(n_ctxs, first_unscored, targeted) of one valid example. The same in file and ranking
    order: ctxs are re-ordered only when every one has a score."""
    ctxs = ex.get("ctxs") or []
    first_unscored = next((j for j, c in enumerate(ctxs) if "score" not in c), len(ctxs))
    return len(ctxs), first_unscored, "target" in ex or bool(ex.get("answers"))


def facts(examples: Sequence[dict[str, Any]]) -> Facts:
    """The Facts of a sequence of examples: kept in the index of a file read on demand
    (question_index.QuestionFile, its `facts`: nothing is read), else computed."""
    known = getattr(examples, "facts", None)
    if isinstance(known, Facts):
        return known
    n_ctxs, first_unscored, targeted = zip(*map(example_facts, examples)) if len(examples) else ((), (), ())
    return Facts(np.array(n_ctxs, np.int32), np.array(first_unscored, np.int32), np.array(targeted, bool))


def require_targets(examples: Sequence[dict[str, Any]], path: str, why: str = "to train on") -> None:
    """Training (and scoring the gold answer) needs a target or a non-empty answers list for every example."""
    missing = np.flatnonzero(~facts(examples).targeted)
    if len(missing):
        i = int(missing[0])
        raise DataError(f"{path}, {example_name(i, examples[i])}: no 'target' and no 'answers' {why}")
