"""Question files read on demand (src/data/offsets.py): the byte offsets of the examples,
the index cache, and QuestionFile giving exactly load_questions' examples and errors."""

import json
import logging
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest

import test_reader
from src.cli import close_loggers
from src.data import offsets as question_index
from src.data.datasets import ReaderDataset, RetrieverDataset
from src.data.offsets import QuestionFile, line_offsets, list_offsets
from src.data.questions import load_questions, require_targets, write_questions
from src.errors import DataError
from src.reader.scores import attach_scores
from src.toy.tiny_models import save_tiny_t5

# Strings that a naive scanner would take for structure: brackets, braces, commas, quotes
# escaped or not, backslash runs before a quote, unicode.
TRICKY = [
    'a "[b]", {c}: d,',
    "ends with a backslash \\",
    "\\\\\\",
    '\\"',
    "caf\u00e9 \u2028 \U0001f600 \u65e5\u672c",
    "",
]


def examples(n: int = 7) -> list[dict]:
    out = []
    for i in range(n):
        ctxs = [{"title": TRICKY[(i + j) % len(TRICKY)], "text": f"{j} {TRICKY[j % 3]}", "score": s}
                for j, s in enumerate([1.5, "3", 2, -1][: i % 5])]  # fmt: skip
        ex = {"question": TRICKY[i % len(TRICKY)] + "?", "answers": [TRICKY[i % 2]], "ctxs": ctxs}
        if i % 3 == 0:
            ex["id"] = f"q{i}"  # else the default id: the position
        if i == 4:
            ex["ctxs"].append({"title": "no score", "text": "x"})  # not every ctx scored: file order
        out.append(ex)
    return out


FORMATS = {
    "pretty.json": lambda exs: "".join(_written(exs)),  # write_questions' layout
    "compact.json": lambda exs: json.dumps(exs),  # one line
    "ascii_indent4.json": lambda exs: json.dumps(exs, indent=4, ensure_ascii=True),  # DPR's \u escapes
    "spaces.json": lambda exs: "\ufeff \n\t[ " + " ,\r\n ".join(json.dumps(e) for e in exs) + " ]\r\n\n",
    "lines.jsonl": lambda exs: "\n".join(json.dumps(e, ensure_ascii=False) for e in exs) + "\n",
    "blank_lines_crlf.jsonl": lambda exs: "\ufeff\r\n" + "\r\n\r\n  \r\n".join(json.dumps(e) for e in exs),
    "lone_cr_unicode_blank.jsonl": lambda exs: "\r".join(json.dumps(e) for e in exs) + "\n\u00a0\u3000\n\n",
}


def _written(exs: list[dict]) -> list[str]:
    path = Path(tempfile.mkdtemp()) / "w.json"
    write_questions(path, exs)
    text = path.read_text(encoding="utf-8")
    path.unlink()
    path.parent.rmdir()
    return [text]


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 24])
def test_question_file_is_load_questions(tmp_path, monkeypatch, name, chunk):
    """Same examples (default ids, ranked ctxs or not, maxload) for every layout and every
    chunk size of the scan (state carried across chunks: in a string, depth, backslash runs)."""
    monkeypatch.setattr(question_index, "CHUNK_BYTES", chunk)
    path = write(tmp_path / name, FORMATS[name](examples()))
    for rank in (False, True):
        for maxload in (-1, 0, 1, 5, 100):
            qf = QuestionFile(path, maxload, rank, show_progress=False)
            assert list(qf) == load_questions(path, maxload, rank), (rank, maxload)
    qf = QuestionFile(path, rank=True, show_progress=False)
    assert qf[-1] == qf[6] == load_questions(path, rank=True)[6]
    with pytest.raises(IndexError):
        qf[7]


def test_offsets_are_the_elements(tmp_path):
    """Each (start, end) holds exactly one top-level element, with the separators outside."""
    elements = ['{"a": "],\\"[{"}', " 12 ", '\n [1, {"b": [2, "]"]}]\n', '"\\\\"']
    path = write(tmp_path / "x.json", " [" + ",".join(elements) + "]\n")
    bar = question_index.tqdm(disable=True)
    with open(path, "rb") as f:
        starts, ends = list_offsets(f, path.stat().st_size, bar)
    data = path.read_bytes()
    assert [data[s:e].decode() for s, e in zip(starts, ends)] == elements
    assert starts.dtype == ends.dtype == np.int64
    path = write(tmp_path / "x.jsonl", '\ufeff{"a": 1}\r\n\n  \n[2]\r"3"\n')
    with open(path, "rb") as f:
        starts, ends = line_offsets(f, bar)
    data = path.read_bytes()
    assert [data[s:e] for s, e in zip(starts, ends)] == [b'{"a": 1}\r\n', b"[2]\r", b'"3"\n']


def test_facts_match_the_examples(tmp_path):
    """What the datasets check of every example, from the index: the same errors as on a list."""
    path = write(tmp_path / "q.json", json.dumps(examples()))
    qf = QuestionFile(path, rank=True, show_progress=False)
    exs = load_questions(path, rank=True)
    assert qf.facts.n_ctxs.tolist() == [len(ex["ctxs"]) for ex in exs] == [0, 1, 2, 3, 5, 0, 1]
    assert qf.facts.first_unscored.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert qf.facts.targeted.all()
    assert ReaderDataset(qf, 2).examples is qf  # nothing materialised
    scored = {"text": "t", "score": 1}
    two = write(tmp_path / "r.json", json.dumps([{"question": "q", "ctxs": [scored]}] * 2 + [{"question": "q"}]))
    unscored = write(tmp_path / "u.json", json.dumps([{"question": "q", "ctxs": [scored, {"text": "t"}]}]))
    no_target = write(tmp_path / "t.json", json.dumps([{"question": "q", "answers": ["a"]}, {"question": "q"}]))
    for read in (lambda p, m=-1: QuestionFile(p, m, True, show_progress=False), load_questions_ranked):
        assert len(RetrieverDataset(read(two, 2), 1)) == 2
        with pytest.raises(DataError, match=r"r\.json, example 3: no ctxs to train the retriever on"):
            RetrieverDataset(read(two), 1, source=str(two))
        assert len(RetrieverDataset(read(unscored), 1)) == 1  # ctx 1 is not read
        with pytest.raises(DataError, match=r"u\.json, example 1: ctx 1 has no 'score'"):
            RetrieverDataset(read(unscored), 2, source=str(unscored))
        with pytest.raises(DataError, match=r"t\.json, example 2: no 'target' and no 'answers'"):
            require_targets(read(no_target), str(no_target))


def load_questions_ranked(path: Path, maxload: int = -1) -> list[dict]:
    return load_questions(path, maxload, rank=True)


def test_cache_reused_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = write(tmp_path / "q.json", json.dumps(examples()))
    cache = tmp_path / "q.json.idx.npz"
    QuestionFile(path, show_progress=False)
    assert not cache.exists()  # small files: indexed each time, no file beside them
    first = QuestionFile(path, min_cache_bytes=0, show_progress=False)
    assert cache.exists() and list(first) == load_questions(path)
    real_build = question_index.build_index
    monkeypatch.setattr(question_index, "build_index", lambda *a: pytest.fail("the cache was not reused"))
    assert list(QuestionFile(path, min_cache_bytes=0, show_progress=False)) == list(first)

    built = []
    monkeypatch.setattr(question_index, "build_index", lambda *a: built.append(1) or real_build(*a))
    changed = examples()
    changed[0]["question"] = changed[0]["question"][::-1]  # same size, new content, new mtime
    write(path, json.dumps(changed))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert list(QuestionFile(path, min_cache_bytes=0, show_progress=False)) == load_questions(path)
    write(path, json.dumps(changed[:3]))  # other size
    assert list(QuestionFile(path, min_cache_bytes=0, show_progress=False)) == load_questions(path)
    assert len(built) == 2
    assert list(QuestionFile(path, min_cache_bytes=0, show_progress=False)) == load_questions(path)
    assert len(built) == 2  # the rebuilt index was cached


def test_read_only_directory(tmp_path, monkeypatch, caplog):
    """The user's cache directory instead; when that is read-only too, the index stays in memory."""
    (tmp_path / "data").mkdir()
    path = write(tmp_path / "data" / "q.jsonl", "\n".join(json.dumps(e) for e in examples()))
    user_cache = tmp_path / "user_cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(user_cache))
    real_mkstemp = tempfile.mkstemp
    refused = {path.parent}

    def mkstemp(dir=None, **kw):  # a directory that refuses writes (root ignores chmod)
        if Path(dir) in refused:
            raise PermissionError(13, "read-only", str(dir))
        return real_mkstemp(dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert list(QuestionFile(path, min_cache_bytes=0, show_progress=False)) == load_questions(path)
    assert not path.with_name("q.jsonl.idx.npz").exists()
    assert len(list((user_cache / "fid" / "questions").glob("q.jsonl.*.idx.npz"))) == 1

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other_cache"))
    refused.add(tmp_path / "other_cache" / "fid" / "questions")
    with caplog.at_level(logging.INFO, logger="fid.questions"):
        assert list(QuestionFile(path, min_cache_bytes=0, show_progress=False)) == load_questions(path)
    assert "index kept in memory only" in caplog.text


BAD_TEXTS = {
    "object.json": json.dumps({"data": examples(2)}),
    "one_value_then_more.json": '{"question": "q"}\n{"question": "r"}\n',
    "not_utf8.json": b'[\n{"question": "caf\xe9"}\n]\n',
    "not_utf8_late.json": b'[{"question": "q"}, {"question": "q"},\n {"question": "\xff"}]',
    "not_utf8.jsonl": b'{"question": "q"}\n{"question": "caf\xe9"}\n',
    "empty.json": "",
    "spaces.json": " \n ",
    "empty.jsonl": "\n \r\n",
    "empty_list.json": "[ ]",
    "truncated.json": '[\n{"question": "q", "ctxs": [{"title": "t", "text": "cut here',
    "truncated_after_element.json": '[{"question": "q"},\n',
    "trailing_comma.json": '[{"question": "q"},]',
    "double_comma.json": '[{"question": "q"},, {"question": "q"}]',
    "missing_comma.json": '[{"question": "q"} {"question": "q"}]',
    "extra_data.json": '[{"question": "q"}] [1]',
    "garbage_after.json": '[{"question": "q"}] x',
    "garbage_before.json": 'x [{"question": "q"}]',
    "wrong_close.json": '[{"question": "q"}}',
    "crossed.json": '[{"question": "q"]]',
    "control_char.json": '[{"question": "a\x01b"}]',
    "bad_escape.json": '[{"question": "\\q"}]',
    "list_line.jsonl": json.dumps(examples(2)) + "\n",
    "bad_line.jsonl": '{"question": "q"}\n\n{"question": \n',
    "two_on_a_line.jsonl": '{"question": "q"} {"question": "q"}\n',
    "no_question.json": json.dumps([examples(1)[0], {"answers": ["x"], "ctxs": []}]),
    "no_question.jsonl": '{"question": "q"}\n\n{"answers": []}\n',
    "no_question_cr.jsonl": '\ufeff{"question": "q"}\r\n\u00a0\r\n{"question": "q"}\r{"answers": []}\n',
    "ctx_without_text.json": json.dumps([{"question": "q", "ctxs": [{"text": "t"}, {"title": "b"}]}]),
    "score_nan.json": json.dumps([{"question": "q", "ctxs": [{"text": "t", "score": "nan"}]}]),
    "invalid_then_bad_json.json": '[{"answers": []},\n {"question": "q"}, tru]',
}


@pytest.mark.parametrize("name", list(BAD_TEXTS))
def test_bad_files_give_load_questions_errors(tmp_path, name):
    """The same message (file, line and column, or example), for every maxload."""
    content = BAD_TEXTS[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    for maxload in (-1, 0, 1, 2):
        try:
            expected = len(load_questions(path, maxload))
        except DataError as e:
            expected = str(e)
        try:
            got = len(QuestionFile(path, maxload, min_cache_bytes=0, show_progress=False))
        except DataError as e:
            got = str(e)
        assert got == expected, maxload
    # Only a file whose JSON is right is cached (its first invalid example with it: a larger
    # maxload still meets that example's error, from the cached index).
    assert path.with_name(name + ".idx.npz").exists() == name.startswith(("no_question", "ctx_", "score_", "list_line"))
    with pytest.raises(DataError, match="no such file"):
        QuestionFile(tmp_path / "missing.json")
    with pytest.raises(DataError, match="a directory"):
        QuestionFile(tmp_path)


def test_a_changed_file_is_a_clear_error_and_pickling(tmp_path):
    path = write(tmp_path / "q.jsonl", "\n".join(json.dumps(e) for e in examples()))
    qf = QuestionFile(path, show_progress=False)
    again = pickle.loads(pickle.dumps(qf))  # DataLoader workers under spawn
    assert list(again) == list(qf)
    text = path.read_text()
    write(path, "\n\n" + text[:-40])  # example 6 was at the start of line 7: now at the end of line 8
    with pytest.raises(DataError, match=r"q\.jsonl, line 8: not the example indexed there .*changed while in use"):
        qf[6]


def test_test_reader_scores_file_is_byte_identical(tmp_path, monkeypatch):
    """dataset_wscores.json streamed from a QuestionFile: the bytes today's path writes
    (load_questions, attach_scores on every example, write_questions) from the same results."""
    words = " ".join(TRICKY + ["question: title: context: ?"] + [str(j) for j in range(5)])
    model = save_tiny_t5(tmp_path / "t5", [words], d_model=16, layers=1, heads=2)
    captured = []

    def generate_answers(*args, **kwargs):
        results = real_generate(*args, **kwargs)
        captured.append(results)
        return results

    real_generate = test_reader.generate_answers
    monkeypatch.setattr(test_reader, "generate_answers", generate_answers)
    for name in ("pretty.json", "lines.jsonl"):
        data = write(tmp_path / name, FORMATS[name](examples()))
        args = ["--model_path", str(model), "--eval_data", str(data), "--checkpoint_dir", str(tmp_path / "runs"),
                "--name", name, "--n_context", "2", "--text_maxlength", "12", "--per_gpu_batch_size", "3",
                "--device", "cpu", "--write_crossattention_scores", "--write_results"]  # fmt: skip
        try:
            test_reader.main(args)
        finally:
            close_loggers()
        old = load_questions(data, rank=True)
        for r in captured[-1]:
            attach_scores(old[r["index"]], r["scores"], 2)
        write_questions(tmp_path / "old.json", old)
        new = (tmp_path / "runs" / name / "dataset_wscores.json").read_bytes()
        assert new == (tmp_path / "old.json").read_bytes()
        assert "retriever_score" in new.decode()  # ctxs beyond n_context keep their score apart
        ids = [line.split("\t")[0] for line in (tmp_path / "runs" / name / "final_output.txt").read_text().splitlines()]
        assert ids == [str(ex["id"]) for ex in old]
