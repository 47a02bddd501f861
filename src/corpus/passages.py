"""The passages TSV (DPR `psgs_w100.tsv` layout) as a store that fits in memory at any size.

The file is never loaded: one pass records where each row starts and how long it is,
plus its id, in numpy arrays (12 bytes per passage for DPR's integer ids, instead of
~1 KB of Python objects), and that index is cached next to the file. A lookup reads one row from
disk and parses it. Fix of the original, which built a dict of 21M tuples.

File format: a header naming the columns `id`, `text`, `title` (any order, DPR writes
`id\\ttext\\ttitle`), then one passage per row, tab-separated, with the csv quoting
DPR's writer uses (a field holding quotes is wrapped in `"` with inner quotes doubled).
"""

from __future__ import annotations

import array
import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from src.errors import PassageFileError
from src.files import ProcessFile, atomic_write

logger = logging.getLogger("fid.passages")  # a child of the scripts' "fid" logger

INDEX_VERSION = 1
REQUIRED_COLUMNS = ("id", "text", "title")
MAX_ROW_LINES = 100  # a quoted field may span lines; a runaway quote stops here
MAX_REPORTED_ERRORS = 100
ID_PREFIX = "wiki:"  # DPR's retrieval files (newer versions) prefix passage ids with it


def strip_id_prefix(pid: str) -> str:
    """A passage id without DPR's "wiki:" prefix ("wiki:123" -> "123"); other ids as they are.
    The one rule for the store's lookups and preprocess.py's converters."""
    return pid[len(ID_PREFIX) :] if pid.startswith(ID_PREFIX) else pid


def _parse_row(raw: bytes, n_columns: int) -> list[str]:
    """Fields of one row (which may span several lines); raises ValueError with the reason."""
    text = raw.decode("utf-8").rstrip("\r\n")
    try:  # keepends: a newline inside a quoted field is part of the text
        rows = list(csv.reader(text.splitlines(keepends=True), delimiter="\t", strict=True))
    except csv.Error as e:
        raise ValueError(f"csv quoting error: {e}") from None
    if len(rows) != 1:
        raise ValueError("row spans several lines outside a quoted field")
    fields = rows[0]
    if len(fields) != n_columns:
        raise ValueError(f"expected {n_columns} tab-separated fields, found {len(fields)}")
    return fields


def _opens_quote(line: bytes) -> bool:
    """Whether a line leaves a quoted field open, so the row continues on the next line.

    Only fields that start with a quote are quoted fields in csv; a stray quote inside
    an unquoted field is literal text, so we count quotes only when some field opens
    with one. Inside a quoted field quotes come in doubled pairs, plus the closing one.
    """
    if b'"' not in line:
        return False
    if not (line.startswith(b'"') or b'\t"' in line):
        return False
    return line.count(b'"') % 2 == 1


def _rows(f, offset: int, bar) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, first line number, raw bytes) of each non-blank row after the header;
    a row with a quoted field may span several lines."""
    line_no, pending = 1, 0  # pending: bytes read since the last progress update
    while line := f.readline():
        start, first_line, raw = offset, line_no + 1, line
        line_no += 1
        offset += len(line)
        if _opens_quote(line):  # a quoted field continues on the next line(s)
            for _ in range(MAX_ROW_LINES):
                more = f.readline()
                if not more:
                    break
                raw += more
                line_no += 1
                offset += len(more)
                if raw.count(b'"') % 2 == 0:
                    break
        pending += len(raw)
        if pending > 1 << 24:
            bar.update(pending)
            pending = 0
        if raw.strip():  # blank lines (e.g. a trailing one) are not rows
            yield start, first_line, raw
    bar.update(pending)


def _row_id(raw: bytes, n_columns: int, id_col: int) -> bytes:
    """The id field of a row; ValueError / UnicodeDecodeError for a bad row."""
    if b'"' not in raw and raw.count(b"\t") == n_columns - 1:  # the common row: fast path
        raw.decode("utf-8")
        row_id = raw.rstrip(b"\r\n").split(b"\t")[id_col]
    else:
        row_id = _parse_row(raw, n_columns)[id_col].encode("utf-8")
    if not row_id.strip():
        raise ValueError("empty id")
    return row_id


def compact_ids(ids) -> np.ndarray:
    """Passage ids as int64 (8 bytes each) when every one is an integer written the canonical
    way (str(int(id)) == id, as in DPR's psgs_w100.tsv), else as a unicode array.
    `.astype(str)` of the int64 form gives back the very same strings."""
    a = np.asarray(ids)
    if a.dtype.kind == "i":
        return a.astype(np.int64, copy=False)
    if a.dtype.kind == "u" and (not a.size or int(a.max()) <= np.iinfo(np.int64).max):
        return a.astype(np.int64)
    a = np.char.decode(a, "utf-8") if a.dtype.kind == "S" else a.astype(str)
    if not a.size:
        return a
    try:
        ints = a.astype(np.int64)
    except (ValueError, OverflowError):
        return a
    return ints if np.array_equal(ints.astype(str), a) else a  # no "007", "+7", " 7"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fid" / "passages"


class PassageStore:
    """Random access to a passages TSV by id and by row, without loading it.

    store["123"], store[123], store["wiki:123"] -> {"id": "123", "title": ..., "text": ...}
    len(store), "123" in store, store.row(i), store.iter_range(start, end), iter(store).

    strict=True: a row that does not parse is an error naming its line number;
    strict=False: such rows are skipped and counted in a warning (`store.bad_rows`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        strict: bool = True,
        cache_dir: str | os.PathLike | None = None,
        rebuild: bool = False,
        show_progress: bool = True,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"passages file not found: {self.path}")
        self.strict = strict
        self.show_progress = show_progress
        self._file = ProcessFile(self.path)
        stat = self.path.stat()
        self._signature = {"version": INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

        index = None
        for cache_path in [] if rebuild else self._cache_candidates(cache_dir):
            index = self._load_index(cache_path)
            if index is not None:
                logger.info("passages: reusing index %s", cache_path)
                break
        if index is None:
            index = self._build_index()
            self._save_index(index, cache_dir)
        self._set_index(index)
        self._report_bad_rows()
        if not len(self):
            raise PassageFileError(
                f"{self.path}: no passages that parse"
                if self.meta["n_bad_rows"]
                else f"{self.path}: no passages (a header and no rows: id<TAB>text<TAB>title per line)"
            )

    # ---- the offset index -------------------------------------------------

    def _cache_candidates(self, cache_dir) -> list[Path]:
        """Next to the file first; a user cache dir for read-only locations."""
        if cache_dir is not None:
            return [Path(cache_dir) / self._cache_name()]
        return [self.path.with_name(self.path.name + ".idx.npz"), _default_cache_dir() / self._cache_name()]

    def _cache_name(self) -> str:
        digest = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:16]
        return f"{self.path.name}.{digest}.idx.npz"

    def _load_index(self, cache_path: Path) -> dict | None:
        if not cache_path.is_file():
            return None
        try:
            with np.load(cache_path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if any(meta.get(k) != v for k, v in self._signature.items()):
                    logger.info("passages: index %s is stale (file changed), rebuilding", cache_path)
                    return None
                return {"meta": meta, **{k: data[k] for k in data.files if k != "meta"}}
        except (OSError, ValueError, KeyError) as e:
            logger.warning("passages: ignoring unreadable index %s (%s)", cache_path, e)
            return None

    def _save_index(self, index: dict, cache_dir) -> None:
        for cache_path in self._cache_candidates(cache_dir):
            try:
                with atomic_write(cache_path, "wb") as f:
                    arrays = {k: v for k, v in index.items() if k != "meta"}
                    np.savez(f, meta=np.array(json.dumps(index["meta"])), **arrays)
                logger.info("passages: wrote index %s", cache_path)
                return
            except OSError as e:  # read-only directory: try the next location
                logger.warning("passages: could not write index %s (%s)", cache_path, e)
        logger.warning("passages: index not cached; it will be rebuilt next time")

    def _build_index(self) -> dict:
        """One pass over the file: row offsets, lengths, ids; bad rows with line numbers."""
        starts = array.array("q")
        lengths = array.array("I")
        id_chunks: list[np.ndarray] = []
        ids: list[bytes] = []
        bad_rows: list[list] = []  # [line number, reason], the first MAX_REPORTED_ERRORS
        n_bad = 0

        with (
            open(self.path, "rb") as f,
            tqdm(
                total=self._signature["size"],
                unit="B",
                unit_scale=True,
                desc=f"indexing {self.path.name}",
                disable=not self.show_progress,
            ) as bar,
        ):
            header = f.readline()
            columns = self._parse_header(header.removeprefix(b"\xef\xbb\xbf"))  # a UTF-8 BOM is not a column name
            n_columns = len(columns)
            id_col, text_col, title_col = (columns.index(c) for c in REQUIRED_COLUMNS)
            for start, first_line, raw in _rows(f, len(header), bar):
                try:
                    row_id = _row_id(raw, n_columns, id_col)
                except (ValueError, UnicodeDecodeError) as e:
                    n_bad += 1
                    reason = str(e) if not isinstance(e, UnicodeDecodeError) else "not valid UTF-8"
                    if len(bad_rows) < MAX_REPORTED_ERRORS:
                        bad_rows.append([first_line, reason])
                    continue
                starts.append(start)
                lengths.append(len(raw))
                ids.append(row_id)
                if len(ids) >= 1 << 20:  # keep the Python bytes objects few
                    id_chunks.append(np.array(ids, dtype=bytes))
                    ids = []
        id_chunks.append(np.array(ids, dtype=bytes))
        all_ids = np.concatenate(id_chunks)
        id_chunks.clear()  # at 21M rows each copy of the ids is 170 MB

        index = {
            "meta": {
                **self._signature,
                "columns": [id_col, text_col, title_col, n_columns],
                "n_bad_rows": n_bad,
                "bad_rows": bad_rows,
            },
            "starts": np.frombuffer(starts, dtype=np.int64),  # views: the arrays are complete
            "lengths": np.frombuffer(lengths, dtype=np.uint32),
        }
        index.update(self._id_arrays(all_ids))
        return index

    def _parse_header(self, header: bytes) -> list[str]:
        if not header.strip():
            raise PassageFileError(
                f"{self.path}:1: empty {'file' if not header else 'first line'} (expected the header "
                "id<TAB>text<TAB>title, then one passage per line)"
            )
        try:
            columns = [c.strip().lower() for c in header.decode("utf-8").rstrip("\r\n").split("\t")]
        except UnicodeDecodeError:
            raise PassageFileError(f"{self.path}:1: header is not valid UTF-8") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise PassageFileError(
                f"{self.path}:1: header must name the columns id, text, title (tab-separated, "
                f"as in DPR's psgs_w100.tsv); found {columns[:5]}, missing {missing}"
            )
        return columns

    def _id_arrays(self, ids: np.ndarray) -> dict:
        """id -> row mapping: arithmetic for contiguous integer ids (DPR), else a sorted array."""
        int_ids = None
        if len(ids) and ids[0].isdigit() and ids[-1].isdigit():
            try:
                candidate = ids.astype(np.int64)
                step = 1 << 20  # compared a million at a time: the bytes form of 21M ids is 440 MB
                if all(  # no leading zeros, signs or spaces
                    np.array_equal(candidate[i : i + step].astype(bytes), ids[i : i + step])
                    for i in range(0, len(ids), step)
                ):
                    int_ids = candidate
            except (ValueError, OverflowError):
                pass
        if int_ids is not None and np.array_equal(int_ids, int_ids[0] + np.arange(len(int_ids))):
            return {"int_ids": int_ids[:1]}  # only the first id is kept: row = id - first
        keys = int_ids if int_ids is not None else ids
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if len(dup):
            value = sorted_keys[dup[0]]
            rows = sorted(order[dup[0] : dup[0] + 2].tolist())
            value = value.decode() if isinstance(value, bytes) else str(int(value))
            raise PassageFileError(
                f"{self.path}: passage id {value!r} appears more than once (data rows {rows}, counting from 0)"
            )
        return {"int_ids" if int_ids is not None else "str_ids": keys, "order": order}

    def _set_index(self, index: dict) -> None:
        self.meta = index["meta"]
        self._id_col, self._text_col, self._title_col, self._n_columns = self.meta["columns"]
        self._starts = index["starts"]
        self._lengths = index["lengths"]
        self._order = index.get("order")
        self._int_ids = index.get("int_ids")
        self._str_ids = index.get("str_ids")
        self._contiguous = self._int_ids is not None and self._order is None
        if self._order is not None:  # sorted copy of the ids for binary search
            keys = self._int_ids if self._int_ids is not None else self._str_ids
            self._sorted_keys = keys[self._order]

    def _report_bad_rows(self) -> None:
        n_bad = self.meta["n_bad_rows"]
        self.bad_rows = [tuple(r) for r in self.meta["bad_rows"]]
        if not n_bad:
            return
        shown = "; ".join(f"line {line}: {reason}" for line, reason in self.bad_rows[:5])
        message = f"{self.path}: {n_bad} row(s) do not parse ({shown}{'; ...' if n_bad > 5 else ''})"
        if self.strict:
            raise PassageFileError(message + " — fix these rows (PassageStore(path, strict=False) skips them)")
        logger.warning("%s — skipped", message)

    # ---- lookups ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._starts)

    def _row_of(self, key) -> int | None:
        """Row index of a passage id (int, str, or 'wiki:'-prefixed str), None if absent."""
        if isinstance(key, (bytes, np.bytes_)):
            key = key.decode("utf-8")
        if isinstance(key, (int, np.integer)):
            key = str(int(key))
        if not isinstance(key, str):
            return None
        row = self._lookup(key)
        if row is None and strip_id_prefix(key) != key:
            row = self._lookup(strip_id_prefix(key))
        return row

    def _lookup(self, key: str) -> int | None:
        if self._int_ids is not None:
            if not key.isdigit() or len(key) > 18 or str(int(key)) != key:
                return None
            value = int(key)
            if self._contiguous:
                row = value - int(self._int_ids[0])
                return row if 0 <= row < len(self) else None
        else:
            value = key.encode("utf-8")
        pos = int(np.searchsorted(self._sorted_keys, value))
        if pos < len(self._sorted_keys) and self._sorted_keys[pos] == value:
            return int(self._order[pos])
        return None

    def __contains__(self, key) -> bool:
        return self._row_of(key) is not None

    def __getitem__(self, key) -> dict:
        row = self._row_of(key)
        if row is None:
            raise KeyError(f"passage id {key!r} not in {self.path}")
        return self.row(row)

    def get(self, key, default=None):
        row = self._row_of(key)
        return default if row is None else self.row(row)

    def row(self, i: int) -> dict:
        """The i-th passage in file order (bad rows skipped)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} passages")
        raw = self._file.pread(int(self._lengths[i]), int(self._starts[i]))
        return self._to_passage(raw)

    def _to_passage(self, raw: bytes) -> dict:
        fields = _parse_row(raw, self._n_columns)
        return {"id": fields[self._id_col], "title": fields[self._title_col], "text": fields[self._text_col]}

    def iter_range(self, start: int = 0, end: int | None = None) -> Iterator[dict]:
        """Passages of rows [start, end) in file order, read sequentially (for sharding)."""
        end = len(self) if end is None else min(end, len(self))
        start = max(0, start)
        if start >= end:
            return
        with open(self.path, "rb", buffering=1 << 20) as f:
            f.seek(int(self._starts[start]))
            position = int(self._starts[start])
            for i in range(start, end):
                row_start, length = int(self._starts[i]), int(self._lengths[i])
                if row_start != position:  # a skipped bad row in between
                    f.seek(row_start)
                raw = f.read(length)
                position = row_start + length
                yield self._to_passage(raw)

    def __iter__(self) -> Iterator[dict]:
        return self.iter_range(0, len(self))

    def ids(self, start: int = 0, end: int | None = None) -> list[str]:
        """Ids of rows [start, end) without reading the file."""
        end = len(self) if end is None else min(end, len(self))
        if self._contiguous:
            return [str(int(self._int_ids[0]) + i) for i in range(start, end)]
        if self._int_ids is not None:
            return [str(v) for v in self._int_ids[start:end].tolist()]
        return [v.decode("utf-8") for v in self._str_ids[start:end].tolist()]

    def id_array(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Ids of rows [start, end) as `compact_ids` gives them (int64 for integer ids, else
        unicode), without a Python string per passage: 8 bytes each for DPR's ids."""
        end = len(self) if end is None else min(end, len(self))
        start = max(0, min(start, end))
        if self._contiguous:
            return int(self._int_ids[0]) + np.arange(start, end, dtype=np.int64)
        if self._int_ids is not None:
            return self._int_ids[start:end].astype(np.int64)
        return np.array([v.decode("utf-8") for v in self._str_ids[start:end].tolist()], dtype=str)

    def close(self) -> None:
        self._file.close()

    def __repr__(self) -> str:
        return f"PassageStore({str(self.path)!r}, {len(self)} passages)"
