"""PassageStore: lookups, DPR quoting, iteration, bad rows with line numbers, index cache."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from src.corpus.passages import PassageStore, compact_ids
from src.errors import PassageFileError

DATA = Path(__file__).parent / "data" / "corpus"


def write_tsv(path: Path, body: str, header: str = "id\ttext\ttitle\n") -> Path:
    path.write_text(header + body, encoding="utf-8")
    return path


@pytest.fixture
def dpr_file(tmp_path):
    """The hand-written DPR-style file, copied so the index cache lands in tmp_path."""
    path = tmp_path / "psgs.tsv"
    path.write_bytes((DATA / "passages.tsv").read_bytes())
    return path


def test_lookup_matches_csv_reader(dpr_file):
    store = PassageStore(dpr_file, show_progress=False)
    with open(dpr_file, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    assert len(store) == len(rows) == 12
    for pid, text, title in rows:
        assert store[pid] == {"id": pid, "title": title, "text": text}
    # DPR's quoting: outer quotes removed, doubled quotes collapsed.
    assert store["2"]["text"] == 'Aaron ( or ; "Ahärôn") is a prophet, high priest, and the brother of Moses.'


def test_id_forms_and_membership(dpr_file):
    store = PassageStore(dpr_file, show_progress=False)
    assert store[7] == store["7"] == store["wiki:7"] == store[np.int64(7)]
    assert store[7]["title"] == "Jupiter"
    assert "12" in store and 12 in store and "wiki:12" in store
    for missing in ("13", 0, "-1", "07", "wiki:13", "abc", "", None, 1.5):
        assert missing not in store
    with pytest.raises(KeyError, match="13"):
        store["13"]
    assert store.get("13") is None


def test_iteration_by_range(dpr_file):
    store = PassageStore(dpr_file, show_progress=False)
    assert [p["id"] for p in store.iter_range(3, 7)] == ["4", "5", "6", "7"]
    assert list(store.iter_range(3, 7)) == [store.row(i) for i in range(3, 7)]
    assert list(store) == [store.row(i) for i in range(12)]
    assert list(store.iter_range(10, 100)) == [store.row(10), store.row(11)]
    assert list(store.iter_range(5, 5)) == []
    assert store.ids(2, 5) == ["3", "4", "5"]
    with pytest.raises(IndexError):
        store.row(12)


def test_string_and_unordered_ids(tmp_path):
    path = write_tsv(tmp_path / "s.tsv", "doc-b\tsecond\tB\ndoc-a\tfirst\tA\nwiki:9\tnine\tN\n")
    store = PassageStore(path, show_progress=False)
    assert store["doc-a"] == {"id": "doc-a", "title": "A", "text": "first"}
    assert store.row(0)["id"] == "doc-b"
    assert store["wiki:9"]["text"] == "nine"  # an id that really starts with wiki:
    assert "doc-c" not in store and "9" not in store
    assert store.ids() == ["doc-b", "doc-a", "wiki:9"]

    path = write_tsv(tmp_path / "n.tsv", "30\tthirty\tT\n10\tten\tT\n20\ttwenty\tT\n")
    store = PassageStore(path, show_progress=False)
    assert [store[k]["text"] for k in (10, "20", "wiki:30")] == ["ten", "twenty", "thirty"]
    assert "15" not in store and store.ids() == ["30", "10", "20"]


def test_column_order_from_header_and_crlf(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_bytes(b'title\tid\ttext\r\nT1\t1\tone\r\nT2\t2\t"two\r\nlines"\r\n')
    store = PassageStore(path, show_progress=False)
    assert store["1"] == {"id": "1", "title": "T1", "text": "one"}
    assert store["2"]["text"] == "two\r\nlines"


def test_multiline_quoted_field_and_stray_quote(tmp_path):
    body = '1\t"first line\nsecond ""quoted"" line"\tMulti\n2\tsays 5\'11" tall\tStray\n3\tlast\tEnd\n'
    store = PassageStore(write_tsv(tmp_path / "m.tsv", body), show_progress=False)
    assert len(store) == 3
    assert store["1"]["text"] == 'first line\nsecond "quoted" line'
    assert store["2"]["text"] == "says 5'11\" tall"
    assert store["3"]["title"] == "End"


def test_bad_rows_reported_with_line_numbers(tmp_path):
    body = '1\tok\tA\n2\tmissing title\n3\tok\tC\n4\t"bad"quote\tD\n\n5\tfine\tE\n'
    path = write_tsv(tmp_path / "bad.tsv", body)
    with pytest.raises(PassageFileError) as err:
        PassageStore(path, show_progress=False)
    message = str(err.value)
    assert str(path) in message and "2 row(s)" in message
    assert "line 3: expected 3 tab-separated fields, found 2" in message
    assert "line 5: csv quoting error" in message

    store = PassageStore(path, strict=False, show_progress=False)
    assert [p["id"] for p in store] == ["1", "3", "5"]
    assert [line for line, _ in store.bad_rows] == [3, 5]
    assert "2" not in store and store["5"]["text"] == "fine"
    assert list(store.iter_range(1, 3)) == [store["3"], store["5"]]  # reading skips the bad rows


def test_invalid_utf8_and_duplicates_and_header(tmp_path):
    path = tmp_path / "u.tsv"
    path.write_bytes(b"id\ttext\ttitle\n1\tgood\tA\n2\tbad \xff byte\tB\n")
    with pytest.raises(PassageFileError, match="line 3: not valid UTF-8"):
        PassageStore(path, show_progress=False)

    with pytest.raises(PassageFileError, match="id '7' appears more than once"):
        PassageStore(write_tsv(tmp_path / "d.tsv", "7\ta\tA\n8\tb\tB\n7\tc\tC\n"), show_progress=False)

    with pytest.raises(PassageFileError, match=r"h\.tsv:1: header must name the columns id, text, title"):
        PassageStore(write_tsv(tmp_path / "h.tsv", "1\ta\tA\n", header="1\tx\ty\n"), show_progress=False)

    with pytest.raises(FileNotFoundError):
        PassageStore(tmp_path / "nope.tsv")


def test_index_cached_next_to_file_and_reused(dpr_file, monkeypatch):
    first = PassageStore(dpr_file, show_progress=False)
    cache = dpr_file.with_name(dpr_file.name + ".idx.npz")
    assert cache.is_file()
    with np.load(cache, allow_pickle=False) as data:  # plain arrays, no pickle
        assert data["starts"].dtype == np.int64 and len(data["starts"]) == 12

    def no_rebuild(self):
        raise AssertionError("index rebuilt although the cache is valid")

    monkeypatch.setattr(PassageStore, "_build_index", no_rebuild)
    second = PassageStore(dpr_file, show_progress=False)
    assert list(second) == list(first)


def test_stale_cache_is_rebuilt(dpr_file):
    PassageStore(dpr_file, show_progress=False)
    with open(dpr_file, "a", encoding="utf-8") as f:
        f.write("13\tA new passage.\tNew\n")
    store = PassageStore(dpr_file, show_progress=False)
    assert len(store) == 13 and store["13"]["title"] == "New"


def test_read_only_directory_falls_back_to_user_cache(dpr_file, tmp_path, monkeypatch):
    user_cache = tmp_path / "user_cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(user_cache))
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def mkstemp(dir=None, **kw):  # the file's directory refuses writes (root ignores chmod)
        if Path(dir) == dpr_file.parent:
            raise PermissionError(13, "read-only", str(dir))
        return real_mkstemp(dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)  # util.atomic_write makes the temp file
    store = PassageStore(dpr_file, show_progress=False)
    assert not dpr_file.with_name(dpr_file.name + ".idx.npz").exists()
    cached = list((user_cache / "fid" / "passages").glob("psgs.tsv.*.idx.npz"))
    assert len(cached) == 1
    monkeypatch.setattr(PassageStore, "_build_index", lambda self: pytest.fail("not reused"))
    assert PassageStore(dpr_file, show_progress=False)["3"] == store["3"]


def test_reads_after_fork(dpr_file):
    store = PassageStore(dpr_file, show_progress=False)
    store["1"]  # opens the descriptor in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: its own descriptor, same answers
        os.close(read)
        os.write(write, store["9"]["title"].encode())
        os._exit(0)
    os.close(write)
    child_answer = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    assert child_answer == "Wolfgang Amadeus Mozart" == store["9"]["title"]


def test_compact_ids_are_int64_only_when_they_round_trip():
    assert compact_ids(["1", "20", "-3", "21015324"]).tolist() == [1, 20, -3, 21015324]
    assert compact_ids(np.array([4, 5], dtype=np.uint32)).dtype == np.int64
    for ids in (["1", "007"], ["1", "+7"], ["1", " 7"], ["1", "wiki:7"], ["1", "99999999999999999999"], ["1", "1e3"]):
        compact = compact_ids(ids)
        assert compact.dtype.kind == "U" and compact.tolist() == ids  # the very same strings
    assert compact_ids([b"12", b"13"]).tolist() == [12, 13]


def test_id_array_is_compact_and_equals_ids(dpr_file, tmp_path):
    store = PassageStore(dpr_file, show_progress=False)  # contiguous integer ids
    assert store.id_array().dtype == np.int64 and store.id_array(2, 5).tolist() == [3, 4, 5]
    assert store.id_array(10, 100).astype(str).tolist() == store.ids(10, 100) and len(store.id_array(5, 5)) == 0
    unordered = PassageStore(write_tsv(tmp_path / "n.tsv", "30\tx\tT\n10\ty\tT\n"), show_progress=False)
    assert unordered.id_array().tolist() == [30, 10] and unordered.id_array().dtype == np.int64
    named = PassageStore(write_tsv(tmp_path / "s.tsv", "doc-b\tx\tB\ndoc-é\ty\tA\n"), show_progress=False)
    assert named.id_array().tolist() == ["doc-b", "doc-é"] == named.ids()
