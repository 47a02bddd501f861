"""Question files read on demand (docs/scripts.md): a byte-offset index of the
examples, cached beside the file, and a sequence that reads one example when asked.

NQ train with 100 passages per question is a ~5 GB JSON file: loaded whole it costs tens
of GB in every process (one per GPU). Instead one pass over the bytes records where each
example starts and ends (`list_offsets`, `line_offsets`), a second parses each example once
to check it (and keeps what the datasets check: questions.Facts), and `QuestionFile[i]`
reads bytes [start, end) and parses them. Memory: 25 bytes per example.

Errors are exactly load_questions' (file, line and column; 'example k'): whenever the fast
path meets something wrong, the file is read again by questions.check_questions, which
raises them. The index is cached as `<file>.idx.npz` (signature: size and mtime), else in
the user's cache directory when the file's directory is read-only, else kept in memory.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import operator
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, NoReturn

import numpy as np
from tqdm import tqdm

from src.data.questions import Facts, check_questions, example_facts, example_name, named, rank_ctxs, validate_example
from src.errors import DataError
from src.files import ProcessFile, atomic_write

logger = logging.getLogger("fid.questions")  # a child of the scripts' "fid" logger

INDEX_VERSION = 2  # 2: first_invalid also flags lone surrogates (validate_example)
CHUNK_BYTES = 1 << 24
# Smaller files are indexed again each time (a fraction of a second) rather than leave a
# cache file beside every small dev set and toy file.
MIN_CACHE_BYTES = 1 << 25
BOM = b"\xef\xbb\xbf"
JSON_WHITESPACE = b" \t\n\r"

_MARK = np.zeros(256, bool)  # the bytes that open, close or separate JSON values
_MARK[list(b",[]{}")] = True
_DEPTH = np.zeros(256, np.int64)  # their change of nesting depth
_DEPTH[list(b"[{")], _DEPTH[list(b"]}")] = 1, -1
_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")  # Python's text mode ends a line at \n, \r\n and \r


class Index(NamedTuple):
    starts: np.ndarray  # (n,) int64: byte offset of each example
    ends: np.ndarray  # (n,) int64: its end (exclusive)
    facts: Facts
    first_invalid: int  # the first example validate_example rejects (n when none)


# ---------------------------------------------------------------------------
# The scan: where the examples are
# ---------------------------------------------------------------------------


def _unescaped_quotes(a: np.ndarray) -> np.ndarray:
    """Positions of the quotes in `a` (uint8) that open or close a string: not preceded by an
    odd run of backslashes (only strings hold backslashes; `\\\\` is one escaped backslash)."""
    quotes = np.flatnonzero(a == ord('"'))
    backslashes = np.flatnonzero(a == ord("\\"))
    if not len(quotes) or not len(backslashes):
        return quotes
    run_starts = np.diff(backslashes, prepend=-2) != 1
    run_first = backslashes[run_starts][np.cumsum(run_starts) - 1]  # first backslash of each one's run
    last = np.maximum(np.searchsorted(backslashes, quotes) - 1, 0)  # the last backslash before each quote
    escaped = (backslashes[last] == quotes - 1) & ((quotes - run_first[last]) % 2 == 1)
    return quotes[~escaped]


def _top_marks(f: BinaryIO, bar: tqdm) -> tuple[np.ndarray, bytes]:
    """Offsets and bytes of the marks outside strings at depth 0 → 1 or 1 → 0, and of the
    commas at depth 1: for a JSON list its '[', the commas between its elements, its ']'.
    Numpy over 16 MB chunks; the state carried between chunks is (in a string, depth)."""
    offsets, marks = [], []
    base, in_string, depth, carry = 0, 0, 0, b""
    while True:
        chunk = f.read(CHUNK_BYTES)
        data = carry + chunk if carry else chunk
        if not data:
            break
        cut = len(data)
        if chunk and data.endswith(b"\\"):  # may escape the next chunk's first byte: scan it then
            cut = len(data.rstrip(b"\\"))
        a = np.frombuffer(data, np.uint8, count=cut)
        quotes = _unescaped_quotes(a)
        at = np.flatnonzero(_MARK[a])
        at = at[(np.searchsorted(quotes, at) + in_string) % 2 == 0]  # outside strings
        delta = _DEPTH[a[at]]
        after = depth + np.cumsum(delta)
        before = after - delta
        top = at[(before == 0) | ((before == 1) & (delta <= 0))]
        offsets.append(top + base)
        marks.append(a[top].tobytes())
        in_string = (in_string + len(quotes)) % 2
        depth = int(after[-1]) if len(after) else depth
        base, carry = base + cut, data[cut:]
        bar.update(len(chunk))
    return (np.concatenate(offsets) if offsets else np.zeros(0, np.int64)), b"".join(marks)


def _only_whitespace(f: BinaryIO, start: int, end: int) -> bool:
    if end - start > 1 << 20:
        return False  # the careful reader says what is there
    f.seek(start)
    return not f.read(end - start).removeprefix(BOM if start == 0 else b"").strip(JSON_WHITESPACE)


def list_offsets(f: BinaryIO, size: int, bar: tqdm) -> tuple[np.ndarray, np.ndarray] | None:
    """(starts, ends) of the elements of the JSON list in `f`, None when `f` does not hold
    one JSON list by its structure (the elements themselves are parsed later)."""
    top, marks = _top_marks(f, bar)
    if len(marks) < 2 or marks[:1] != b"[" or marks[-1:] != b"]" or marks[1:-1].strip(b",") != b"":
        return None
    if not _only_whitespace(f, 0, int(top[0])) or not _only_whitespace(f, int(top[-1]) + 1, size):
        return None
    return top[:-1] + 1, top[1:].copy()


def line_offsets(f: BinaryIO, bar: tqdm) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the non-blank lines of a JSON lines file, ends as Python's text mode
    sees them (\\n, \\r\\n or \\r); a UTF-8 BOM at the start is not part of the first line."""
    starts, ends = array.array("q"), array.array("q")
    pos = len(BOM) if f.read(len(BOM)) == BOM else 0
    f.seek(pos)
    pending = 0
    for line in f:
        for part in _LONE_CR.split(line) if b"\r" in line else (line,):
            if part.strip():
                starts.append(pos)
                ends.append(pos + len(part))
            pos += len(part)
        pending += len(line)
        if pending > 1 << 24:
            bar.update(pending)
            pending = 0
    bar.update(pending)
    return np.frombuffer(starts, np.int64).copy(), np.frombuffer(ends, np.int64).copy()


# ---------------------------------------------------------------------------
# The check: every example parsed once
# ---------------------------------------------------------------------------


def examine(f: BinaryIO, starts: np.ndarray, ends: np.ndarray, lines: bool, bar: tqdm) -> Index | None:
    """Parse and validate every example, sequentially (one in memory at a time); None when
    one is not UTF-8 or not JSON (the careful reader then names it). Lines that Python's
    str.strip finds blank (Unicode spaces only) are dropped, as load_questions skips them."""
    n = len(starts)
    keep = np.ones(n, bool)
    n_ctxs, first_unscored, targeted = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, bool)
    first_invalid, k, pos = -1, 0, 0
    f.seek(0)
    for i in range(n):
        start, end = int(starts[i]), int(ends[i])
        if start - pos > 1 << 16:
            f.seek(start)
        else:
            f.read(start - pos)  # the separator: cheaper than a seek
        raw, pos = f.read(end - start), end
        bar.update(end - start)
        try:
            text = raw.decode("utf-8")
            ex = json.loads(text)
        except UnicodeDecodeError:
            return None
        except json.JSONDecodeError:
            if lines and not text.strip():
                keep[i] = False
                continue
            return None
        try:
            validate_example(ex, "")
        except DataError:
            first_invalid = k if first_invalid < 0 else first_invalid
        else:
            n_ctxs[k], first_unscored[k], targeted[k] = example_facts(ex)
        k += 1
    facts = Facts(n_ctxs[:k], first_unscored[:k], targeted[:k])
    return Index(starts[keep], ends[keep], facts, k if first_invalid < 0 else first_invalid)


def build_index(path: Path, lines: bool, show_progress: bool = True) -> Index | None:
    """Scan and check `path` (binary, two sequential passes); None when it has a problem."""
    size = path.stat().st_size
    t0 = time.perf_counter()
    bar_options = {"unit": "B", "unit_scale": True, "disable": not show_progress}
    with open(path, "rb", buffering=1 << 20) as f:
        with tqdm(total=size, desc=f"indexing {path.name}", **bar_options) as bar:
            offsets = line_offsets(f, bar) if lines else list_offsets(f, size, bar)
        if offsets is None:
            return None
        t1 = time.perf_counter()
        with tqdm(total=int((offsets[1] - offsets[0]).sum()), desc=f"checking {path.name}", **bar_options) as bar:
            index = examine(f, *offsets, lines, bar)
    t2 = time.perf_counter()
    if index is not None:
        logger.info(
            "questions: indexed %s: %d examples, %.0f MB; offsets %.1f s (%.0f MB/s), check %.1f s (%.0f MB/s)",
            path, len(index.starts), size / 1e6, t1 - t0, size / 1e6 / max(t1 - t0, 1e-9), t2 - t1,
            size / 1e6 / max(t2 - t1, 1e-9),
        )  # fmt: skip
    return index


# ---------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fid" / "questions"


def cache_candidates(path: Path, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Next to the file first; the user's cache directory for read-only locations."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    if cache_dir is not None:
        return [Path(cache_dir) / f"{path.name}.{digest}.idx.npz"]
    return [path.with_name(path.name + ".idx.npz"), _default_cache_dir() / f"{path.name}.{digest}.idx.npz"]


def signature(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"version": INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def load_cached(cache_path: Path, expected: dict[str, int]) -> Index | None:
    if not cache_path.is_file():
        return None
    try:
        with np.load(cache_path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if any(meta.get(k) != v for k, v in expected.items()):
                logger.info("questions: index %s is stale (the file changed), indexing again", cache_path)
                return None
            facts = Facts(data["n_ctxs"], data["first_unscored"], data["targeted"])
            return Index(data["starts"], data["ends"], facts, int(meta["first_invalid"]))
    except (OSError, ValueError, KeyError) as e:
        logger.warning("questions: ignoring unreadable index %s (%s)", cache_path, e)
        return None


def save_cached(index: Index, candidates: list[Path], meta: dict[str, int]) -> None:
    for cache_path in candidates:
        try:
            with atomic_write(cache_path, "wb") as f:
                meta_text = np.array(json.dumps({**meta, "first_invalid": index.first_invalid}))
                np.savez(f, meta=meta_text, starts=index.starts, ends=index.ends, **index.facts._asdict())
            logger.info("questions: wrote index %s", cache_path)
            return
        except OSError as e:  # read-only directory: try the next location
            logger.warning("questions: could not write index %s (%s)", cache_path, e)
    logger.warning("questions: index kept in memory only; the file will be indexed again next time")


# ---------------------------------------------------------------------------
# The sequence
# ---------------------------------------------------------------------------


class QuestionFile(Sequence):
    """The examples of a question file, read on demand: `qf[i]` is `load_questions(path,
    maxload, rank)[i]` (default id, ctxs ranked with `rank`), read from disk and parsed.

    The whole file is checked when it is opened (once per version of the file: the result is
    cached with the index), with load_questions' errors. `facts` (questions.Facts) tells the
    datasets what they check without reading. Fork-safe (each process opens its own file).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        maxload: int = -1,
        rank: bool = False,
        cache_dir: str | os.PathLike | None = None,
        min_cache_bytes: int = MIN_CACHE_BYTES,
        show_progress: bool = True,
    ):
        self.path, self.rank = Path(path), rank
        self.lines = self.path.suffix == ".jsonl"
        self._file = ProcessFile(self.path)
        if not self.path.is_file():
            self._careful_error(maxload)  # no such file, a directory
        index = self._open_index(cache_dir, min_cache_bytes, show_progress)
        if index is None or not len(index.starts):
            self._careful_error(maxload)
        limit = len(index.starts) if maxload < 0 else min(maxload, len(index.starts))
        self.starts, self.ends = index.starts, index.ends
        if index.first_invalid < limit:  # its JSON is right (indexed): only that example to read
            ex = self._parse(index.first_invalid)
            validate_example(ex, f"{self.path}, {self.where(index.first_invalid, ex)}")
            self._careful_error(maxload)  # not reached: validate_example raised
        self.starts, self.ends = index.starts[:limit], index.ends[:limit]
        self.facts = Facts(*(a[:limit] for a in index.facts))

    def _open_index(self, cache_dir, min_cache_bytes: int, show_progress: bool) -> Index | None:
        meta = signature(self.path)
        candidates = cache_candidates(self.path, cache_dir) if meta["size"] >= min_cache_bytes else []
        for cache_path in candidates:
            index = load_cached(cache_path, meta)
            if index is not None:
                logger.info("questions: reusing index %s", cache_path)
                return index
        index = build_index(self.path, self.lines, show_progress)
        # Cached only when the file did not change while it was read.
        if index is not None and len(index.starts) and candidates and signature(self.path) == meta:
            save_cached(index, candidates, meta)
        return index

    def _careful_error(self, maxload: int) -> NoReturn:
        """Read the file as load_questions does, for its error."""
        check_questions(self.path, maxload)
        raise DataError(f"{self.path}: could not be indexed, though it reads as a question file (please report)")

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i) -> dict[str, Any]:
        if isinstance(i, slice):
            raise TypeError("QuestionFile: index one example at a time")
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples in {self.path}")
        i %= len(self)
        try:
            ex = self._parse(i)
            validate_example(ex, "")
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError and DataError are ValueErrors
            raise DataError(
                f"{self.path}, {self.where(i)}: not the example indexed there ({str(e).lstrip(': ')}); "
                "the file changed while in use? run again to index it again"
            ) from None
        if "id" not in ex:
            ex["id"] = i
        if self.rank:
            rank_ctxs(ex)
        return ex

    def _parse(self, i: int) -> Any:
        start, end = int(self.starts[i]), int(self.ends[i])
        return json.loads(self._file.pread(end - start, start).decode("utf-8"))

    def where(self, i: int, ex: Any = None) -> str:
        """'example N' (a JSON list: 1-based) or 'line N' (JSON lines: counted, only for messages),
        and the id of `ex` (the example there) as load_questions names it."""
        if not self.lines:
            return example_name(i, ex)
        start, pos, line_number = int(self.starts[i]), 0, 1
        with open(self.path, "rb") as f:
            for line in f:
                for part in _LONE_CR.split(line) if b"\r" in line else (line,):
                    pos += len(part)
                    if pos > start:
                        return named(f"line {line_number}", ex)
                    line_number += bool(part)
        return named(f"line {line_number}", ex)

    def close(self) -> None:
        self._file.close()

    def __repr__(self) -> str:
        return f"QuestionFile({str(self.path)!r}, {len(self)} examples)"
