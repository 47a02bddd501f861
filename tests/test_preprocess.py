"""preprocess.py: every public format -> our question format, field by field, and bad inputs.

Fixtures in tests/data/preprocess/ are hand-written in each public layout (an invented
world of rivers, bridges and glassblowers; nothing is copied from the datasets):
  psgs_w100.tsv                        DPR passages layout, one row csv-quoted
  download/                            what the original get-data.sh leaves in DOWNLOAD_DIR
  dpr/nq-dev-retrieved.json            a DPR retriever output (string scores, wiki: ids)
  bm25/run.nq-test.{trec,json}         the same BM25 run as a TREC run file and as JSON
  questions/nq-test.qa.csv, .jsonl     DPR's question-file layout and JSON lines
Expected values are re-derived here from those raw files with plain json/csv.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import preprocess
from src.corpus.passages import strip_id_prefix
from src.data.datasets import ReaderCollator, ReaderDataset
from src.data.public_files import normalize_passage_id
from src.data.questions import iter_entries, load_questions
from src.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "preprocess"
DOWNLOAD = DATA / "download"


def read_tsv_passages(path: Path) -> dict[str, tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["id", "text", "title"]
    return {r[0]: (r[2], r[1]) for r in rows[1:]}  # id -> (title, text)


PASSAGES = read_tsv_passages(DATA / "psgs_w100.tsv")


def load_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture
def passages(tmp_path) -> Path:
    """A private copy: the passage store caches its offset index next to the file."""
    out = tmp_path / "psgs" / "psgs_w100.tsv"
    out.parent.mkdir()
    shutil.copy(DATA / "psgs_w100.tsv", out)
    return out


@pytest.fixture
def download(tmp_path) -> Path:
    """A copy of the download directory that a test may break."""
    return Path(shutil.copytree(DOWNLOAD, tmp_path / "download"))


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------
# fid: the original recipe
# ---------------------------------------------------------------------------


def check_ctxs(ctxs: list[dict], ids: list) -> None:
    assert [c["id"] for c in ctxs] == [str(i) for i in ids]
    for c in ctxs:
        assert (c["title"], c["text"]) == PASSAGES[c["id"]]
        assert set(c) == {"id", "title", "text"}


def test_fid_recipe_original_call(tmp_path, passages):
    """`python preprocess.py DOWNLOAD_DIR OUTPUT_DIR`, psgs_w100.tsv in OUTPUT_DIR, as get-data.sh calls it."""
    out = passages.parent
    proc = subprocess.run(
        [sys.executable, "preprocess.py", str(DOWNLOAD), str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    for dataset in ("NQ", "TQA"):
        assert sorted(p.name for p in (out / dataset).iterdir()) == ["dev.json", "test.json", "train.json"]

    nq_public = {
        "train": [json.loads(line) for line in open(DOWNLOAD / "NQ-open.train.jsonl")],
        "dev": [json.loads(line) for line in open(DOWNLOAD / "NQ-open.dev.jsonl")],
    }
    tqa_public = {
        "train": load_json(DOWNLOAD / "triviaqa-unfiltered" / "unfiltered-web-train.json")["Data"],
        "dev": load_json(DOWNLOAD / "triviaqa-unfiltered" / "unfiltered-web-dev.json")["Data"],
    }
    for split in ("train", "dev", "test"):
        origin = "dev" if split == "test" else "train"  # test comes from the public dev file

        index = load_json(DOWNLOAD / f"NQ.{split}.idx.json")
        lists = load_json(DOWNLOAD / "nq_passages" / f"{split}.json")
        nq = load_json(out / "NQ" / f"{split}.json")
        assert len(nq) == len(index)
        for i, (ex, k) in enumerate(zip(nq, index)):
            source = nq_public[origin][k]
            assert ex["id"] == i
            assert ex["question"] == source["question"]
            assert ex["answers"] == source["answer"]
            assert "target" not in ex
            check_ctxs(ex["ctxs"], lists[str(i)])  # NQ lists are keyed by position in the split

        index = load_json(DOWNLOAD / f"TQA.{split}.idx.json")
        lists = load_json(DOWNLOAD / "tqa_passages" / f"{split}.json")
        tqa = load_json(out / "TQA" / f"{split}.json")
        assert len(tqa) == len(index)
        for ex, k in zip(tqa, index):
            source = tqa_public[origin][k]
            assert ex["id"] == source["QuestionId"]
            assert ex["question"] == source["Question"]
            assert ex["answers"] == source["Answer"]["Aliases"]
            value = source["Answer"]["Value"]
            assert ex["target"] == (value.title() if value.isupper() else value)
            check_ctxs(ex["ctxs"], lists[source["QuestionId"]])  # TQA lists are keyed by QuestionId

        assert len(load_questions(out / "NQ" / f"{split}.json")) == len(nq)
        assert len(load_questions(out / "TQA" / f"{split}.json")) == len(tqa)

    # Spot checks written out: capitals are title-cased, other values kept; csv quoting undone.
    targets = {ex["id"]: ex["target"] for split in ("train", "dev") for ex in load_json(out / "TQA" / f"{split}.json")}
    assert targets["tc_101"] == "Aldercourt"  # "ALDERCOURT"
    assert targets["tc_103"] == "The Grand Moot"  # "THE GRAND MOOT"
    assert targets["dpql_55"] == "Mount Ceddow"  # "MOUNT CEDDOW"
    assert targets["tc_102"] == "1887"
    assert targets["bt_300"] == "kettle stew"  # lower case stays
    wren = [c for c in load_json(out / "TQA" / "dev.json")[0]["ctxs"] if c["id"] == "5"]
    assert (
        wren[0]["text"] == 'Captain Aurelio Brandt commanded the schooner "Wren" on its 1902 voyage to the Ice Islands.'
    )


def test_error_exit_code_and_message_from_the_command_line(tmp_path):
    bad = tmp_path / "dpr.json"
    bad.write_text(
        '[\n  {"question": "q", "answers": ["a"], "ctxs": [{"id": "1", "title": "t", "text": "x", "score": "7"}]},\n  {"question": 3}\n]\n'
    )
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "preprocess.py", "dpr", str(bad), str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert f"error: {bad}, line 3: missing or non-string 'question'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_in(tmp_path) == ["dpr.json"]


def test_fid_mode_subset_and_passages_flag(tmp_path, passages):
    out = tmp_path / "out"
    preprocess.main(
        ["fid", str(DOWNLOAD), str(out), "--passages", str(passages), "--datasets", "TQA", "--splits", "test"]
    )
    assert files_in(out) == ["test.json"]
    test = load_json(out / "TQA" / "test.json")
    assert [ex["id"] for ex in test] == ["bt_901", "tc_900", "tc_901"]  # TQA.test.idx.json = [2, 0, 1]
    assert test[1]["target"] == "Benedikt Sall" and test[2]["target"] == "Lake Sime"


def test_fid_lists_every_missing_file_first(tmp_path, download, passages):
    (download / "nq_passages" / "dev.json").unlink()
    (download / "triviaqa-unfiltered" / "unfiltered-web-dev.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        preprocess.main([str(download), str(out), "--passages", str(passages)])
    message = str(e.value)
    assert "2 input file(s) missing" in message
    assert str(download / "nq_passages" / "dev.json") in message
    assert str(download / "triviaqa-unfiltered" / "unfiltered-web-dev.json") in message
    assert not out.exists()  # nothing written before failing


def test_fid_missing_passages_file(tmp_path):
    with pytest.raises(DataError, match="psgs_w100.tsv"):
        preprocess.main([str(DOWNLOAD), str(tmp_path / "out")])


def test_fid_unknown_passage_id_is_an_error_or_a_counted_skip(tmp_path, download, passages, capsys):
    lists_path = download / "tqa_passages" / "test.json"
    lists = load_json(lists_path)
    lists["tc_900"] = ["23", "999", "24", "998"]
    lists_path.write_text(json.dumps(lists))
    out = tmp_path / "out"
    args = [str(download), str(out), "--passages", str(passages), "--datasets", "TQA"]

    with pytest.raises(DataError) as e:
        preprocess.main(args)
    assert str(lists_path) in str(e.value) and "'tc_900'" in str(e.value) and "'999'" in str(e.value)
    assert not (out / "TQA" / "test.json").exists()
    assert files_in(out) == ["dev.json", "train.json"]  # complete earlier splits, no temp files

    preprocess.main([*args, "--skip_missing_passages"])
    test = {ex["id"]: ex for ex in load_json(out / "TQA" / "test.json")}
    assert [c["id"] for c in test["tc_900"]["ctxs"]] == ["23", "24"]
    log = capsys.readouterr().out
    assert "skipped 2 passage id(s) not in" in log and "in 1 question(s)" in log


def test_fid_bad_inputs_name_file_and_line(tmp_path, download, passages):
    out = tmp_path / "out"
    args = [str(download), str(out), "--passages", str(passages), "--datasets", "NQ"]

    lines = (download / "NQ-open.train.jsonl").read_text().splitlines()
    lines[4] = lines[4][:-3]  # line 5 loses its closing brackets
    (download / "NQ-open.train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"NQ-open\.train\.jsonl, line 5: invalid JSON"):
        preprocess.main(args)
    shutil.copy(DOWNLOAD / "NQ-open.train.jsonl", download / "NQ-open.train.jsonl")

    (download / "NQ.test.idx.json").write_text("[3, 0, 6, 1]")  # NQ-open.dev.jsonl has 6 questions
    with pytest.raises(DataError, match=r"NQ\.test\.idx\.json, entry 2: position 6 is not in 0\.\.5"):
        preprocess.main(args)
    shutil.copy(DOWNLOAD / "NQ.test.idx.json", download / "NQ.test.idx.json")

    (download / "nq_passages" / "dev.json").write_text('{"0": ["25"], "1": ["3"], "3": ["12"]}')
    with pytest.raises(DataError, match=r"dev\.json: no passage-id list for question '2'"):
        preprocess.main(args)

    with open(download / "NQ-open.dev.jsonl", "a") as f:
        f.write('{"query": "no question field", "answer": ["x"]}\n')
    with pytest.raises(DataError, match=r"NQ-open\.dev\.jsonl, line 7: missing or non-string 'question'"):
        preprocess.main(args)
    assert files_in(out) == ["dev.json", "train.json"]  # only complete files of splits that succeeded


# ---------------------------------------------------------------------------
# dpr: DPR retriever output
# ---------------------------------------------------------------------------

DPR_FILE = DATA / "dpr" / "nq-dev-retrieved.json"


def test_dpr_conversion_field_by_field(tmp_path, passages):
    out = tmp_path / "dev.json"
    preprocess.main(["dpr", str(DPR_FILE), str(out), "--passages", str(passages)])
    raw, ours = load_json(DPR_FILE), load_json(out)
    assert len(ours) == len(raw)
    for k, (r, o) in enumerate(zip(raw, ours)):
        assert o["id"] == k and o["question"] == r["question"] and o["answers"] == r["answers"]
        assert len(o["ctxs"]) == len(r["ctxs"])
        for rc, oc in zip(r["ctxs"], o["ctxs"]):
            assert rc["id"].startswith("wiki:") and oc["id"] == rc["id"][len("wiki:") :]
            assert isinstance(oc["score"], float) and oc["score"] == float(rc["score"])
            assert oc["hasanswer"] is rc["has_answer"] and "has_answer" not in oc
            assert (oc["title"], oc["text"]) == (rc["title"], rc["text"]) == PASSAGES[oc["id"]]
    assert ours[0]["ctxs"][1]["score"] == 80.017  # "80.0170"
    assert ours[2]["ctxs"][2]["score"] == 65.0  # "65"


def test_dpr_round_trip_keeps_ranking_and_hasanswer(tmp_path):
    """DPR -> ours -> (load, reader dataset) keeps DPR's order and hasanswer; converting ours again is a no-op."""
    first, second = tmp_path / "ours.json", tmp_path / "again.jsonl"
    preprocess.main(["dpr", str(DPR_FILE), str(first)])  # no --passages: text comes from the DPR file
    preprocess.main(["dpr", str(first), str(second)])
    ours = load_json(first)
    assert [json.loads(line) for line in open(second)] == ours

    raw = load_json(DPR_FILE)
    examples = load_questions(first, rank=True)  # sorts ctxs by score: DPR's order must survive
    for r, ex in zip(raw, examples):
        assert [c["id"] for c in ex["ctxs"]] == [c["id"].removeprefix("wiki:") for c in r["ctxs"]]
        assert [c["hasanswer"] for c in ex["ctxs"]] == [c["has_answer"] for c in r["ctxs"]]
        assert [c["score"] for c in ex["ctxs"]] == sorted((float(c["score"]) for c in r["ctxs"]), reverse=True)


def test_dpr_n_docs_and_jsonl_input(tmp_path):
    jsonl = tmp_path / "dpr.jsonl"
    jsonl.write_text("".join(json.dumps(ex) + "\n" for ex in load_json(DPR_FILE)))
    out = tmp_path / "top2.json"
    preprocess.main(["dpr", str(jsonl), str(out), "--n-docs", "2"])
    ours = load_json(out)
    assert [len(ex["ctxs"]) for ex in ours] == [2, 2, 2, 2]
    assert [c["id"] for c in ours[3]["ctxs"]] == ["19", "9"]


def test_dpr_missing_text_needs_passages(tmp_path, passages):
    raw = load_json(DPR_FILE)
    for ex in raw:
        for c in ex["ctxs"]:
            del c["text"], c["title"]  # some tools write ids and scores only
    source = tmp_path / "ids_only.json"
    source.write_text(json.dumps(raw, indent=2))
    out = tmp_path / "out.json"
    with pytest.raises(DataError, match=r"ids_only\.json, line 2, ctx 0: no 'title' \(pass --passages"):
        preprocess.main(["dpr", str(source), str(out)])
    assert not out.exists()
    preprocess.main(["dpr", str(source), str(out), "--passages", str(passages)])
    for ex in load_json(out):
        for c in ex["ctxs"]:
            assert (c["title"], c["text"]) == PASSAGES[c["id"]]


def test_dpr_unknown_id_and_bad_score_leave_no_output(tmp_path, passages):
    raw = load_json(DPR_FILE)
    raw[2]["ctxs"][1]["id"] = "wiki:4242"
    source = tmp_path / "bad.json"
    source.write_text(json.dumps(raw, indent=1))
    line = [i for i, text in enumerate(source.read_text().splitlines(), 1) if text == " {"][2]  # example 2
    out = tmp_path / "out.jsonl"  # JSON lines stream: the error comes mid-write
    with pytest.raises(DataError) as e:
        preprocess.main(["dpr", str(source), str(out), "--passages", str(passages)])
    assert f"bad.json, line {line}, ctx 1: passage id 'wiki:4242' is not in" in str(e.value)
    assert files_in(tmp_path) == ["bad.json", "psgs_w100.tsv", "psgs_w100.tsv.idx.npz"]  # no output, no temp file

    raw[2]["ctxs"][1]["id"] = "wiki:25"
    raw[1]["ctxs"][3]["score"] = "high"
    source.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"bad\.json, line 1, ctx 3: score 'high' is not a number"):
        preprocess.main(["dpr", str(source), str(out)])
    assert not out.exists()


def test_streaming_json_list_matches_json_load(tmp_path):
    """The streaming reader sees the same objects as json.load, at their line, whatever the buffer size."""
    text = DPR_FILE.read_text()
    starts = [i for i, line in enumerate(text.splitlines(), 1) if line == "    {"]
    for chunk in (5, 64, 1 << 20):
        records = list(iter_entries(DPR_FILE, by_line=True, chunk_chars=chunk))
        assert [r for _, r in records] == json.loads(text)
        assert [where for where, _ in records] == [f"line {n}" for n in starts]

    broken = tmp_path / "broken.json"
    broken.write_text(text.replace('"score": "71.25"', '"score": 71.25.3'))
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(broken.read_text())
    with pytest.raises(DataError, match=rf"broken\.json, line {reference.value.lineno}: invalid JSON"):
        list(iter_entries(broken, by_line=True, chunk_chars=16))
    for bad, message in [("", "empty file"), ("[{}", "is the file truncated?"), ("[{} {}]", "Expecting ','")]:
        broken.write_text(bad)
        with pytest.raises(DataError, match=message):
            list(iter_entries(broken, by_line=True, chunk_chars=2))
    broken.write_text("[{}, 3]")  # entries that are not objects are the caller's to reject
    assert list(iter_entries(broken, by_line=True, chunk_chars=2)) == [("line 1", {}), ("line 1", 3)]
    broken.write_text('[{"question": "q", "ctxs": []},\n 3]')
    with pytest.raises(DataError, match=r"broken\.json, line 2: expected an object, got int"):
        preprocess.main(["dpr", str(broken), str(tmp_path / "out.json")])


# ---------------------------------------------------------------------------
# bm25: run file + questions + passages
# ---------------------------------------------------------------------------

QA_CSV = DATA / "questions" / "nq-test.qa.csv"


def run_bm25(tmp_path, passages, run: Path, *extra: str) -> list[dict]:
    out = tmp_path / f"bm25-{run.suffix[1:]}.json"
    preprocess.main(
        [
            "bm25",
            "--run",
            str(run),
            "--questions",
            str(QA_CSV),
            "--passages",
            str(passages),
            "--output",
            str(out),
            *extra,
        ]
    )
    return load_json(out)


def test_bm25_trec_and_json_runs(tmp_path, passages):
    trec = run_bm25(tmp_path, passages, DATA / "bm25" / "run.nq-test.trec")
    from_json = run_bm25(tmp_path, passages, DATA / "bm25" / "run.nq-test.json")
    assert trec == from_json

    runs: dict[str, list] = {}
    for line in open(DATA / "bm25" / "run.nq-test.trec"):
        qid, _, pid, rank, score, _ = line.split()
        runs.setdefault(qid, []).append((int(rank), pid, float(score)))
    questions = list(csv.reader(open(QA_CSV, newline=""), delimiter="\t"))
    assert len(trec) == len(questions)
    for k, (ex, (question, _)) in enumerate(zip(trec, questions)):
        assert ex["id"] == k and ex["question"] == question  # pyserini's qids: positions
        expected = sorted(runs[str(k)])
        assert [(c["id"], c["score"]) for c in ex["ctxs"]] == [(pid, score) for _, pid, score in expected]
        for c in ex["ctxs"]:
            assert (c["title"], c["text"]) == PASSAGES[c["id"]]
    # The run lists question 2's rank 2 first: the rank column decides.
    assert [c["id"] for c in trec[2]["ctxs"]] == ["7", "26", "29"]
    # hasanswer by DPR's token rule, decided by hand for these passages:
    assert [c["hasanswer"] for c in trec[0]["ctxs"]] == [True, True, False]  # "Petra Lindqvist"
    assert [c["hasanswer"] for c in trec[3]["ctxs"]] == [True, False, False]  # "Aurelio Brandt"
    assert [c["hasanswer"] for c in trec[4]["ctxs"]] == [True, True, False]  # "kell mark"


def test_bm25_n_docs_missing_questions_and_ids(tmp_path, passages, capsys):
    top2 = run_bm25(tmp_path, passages, DATA / "bm25" / "run.nq-test.trec", "--n-docs", "2")
    assert [[c["id"] for c in ex["ctxs"]] for ex in top2][:3] == [["1", "2"], ["3", "27"], ["7", "26"]]

    run = tmp_path / "partial.trec"
    lines = [line for line in open(DATA / "bm25" / "run.nq-test.trec") if not line.startswith("4 ")]
    run.write_text("".join(lines) + "17 Q0 3 1 1.0 bm25\n")
    partial = run_bm25(tmp_path, passages, run)
    assert partial[4]["ctxs"] == [] and len(partial[3]["ctxs"]) == 3
    log = capsys.readouterr().out
    assert "1 of 6 question(s) have no hits" in log and "1 question id(s) of the run are not in" in log

    run.write_text("".join(lines) + "1 Q0 31 4 0.5 bm25\n")
    with pytest.raises(DataError, match=r"partial\.trec, question '1', rank 4: passage id '31' is not in"):
        run_bm25(tmp_path, passages, run)
    run.write_text("".join(lines[:3]) + "1 Q0 3 first 15.75 bm25\n")
    with pytest.raises(DataError, match=r"partial\.trec, line 4: rank 'first' is not an integer"):
        run_bm25(tmp_path, passages, run)
    run.write_text("0 Q0 1 1 14.2\n")
    with pytest.raises(DataError, match=r"partial\.trec, line 1: expected 'qid Q0 docid rank score tag'"):
        run_bm25(tmp_path, passages, run)


def test_bm25_with_jsonl_question_ids(tmp_path, passages):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"q-olme": {"27": 2.0, "3": 9.5}, "3": [["17", 4], ["10", 6]]}))
    out = tmp_path / "out.jsonl"
    preprocess.main(
        ["bm25", "--run", str(run), "--questions", str(DATA / "questions" / "questions.jsonl")]
        + ["--passages", str(passages), "--output", str(out)]
    )
    ours = {ex["id"]: ex for ex in load_questions(out)}
    assert [(c["id"], c["score"]) for c in ours["q-olme"]["ctxs"]] == [("3", 9.5), ("27", 2.0)]
    assert [c["hasanswer"] for c in ours["q-olme"]["ctxs"]] == [True, False]  # "312 kilometres"
    assert [c["id"] for c in ours[3]["ctxs"]] == ["10", "17"]  # no id in the file: its position
    assert ours["q-bridge"]["ctxs"] == []

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "fine"}\n{"id": "b", "query": "wrong field"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2 \(id b\): missing or non-string 'question'"):
        preprocess.main(
            ["bm25", "--run", str(run), "--questions", str(bad), "--passages", str(passages), "--output", str(out)]
        )


# ---------------------------------------------------------------------------
# questions: no passages
# ---------------------------------------------------------------------------


def test_questions_from_dpr_qa_csv(tmp_path):
    out = tmp_path / "test.jsonl"
    preprocess.main(["questions", str(QA_CSV), str(out)])
    ours = load_questions(out)
    rows = list(csv.reader(open(QA_CSV, newline=""), delimiter="\t"))
    assert [ex["id"] for ex in ours] == list(range(len(rows)))
    assert [ex["question"] for ex in ours] == [r[0] for r in rows]
    assert ours[3]["question"] == 'who sailed the "wren" to the ice islands'
    assert ours[1]["answers"] == ["312 kilometres", "312 km"]  # Python list repr
    assert ours[4]["answers"] == ["kell mark", "the kell mark"]  # JSON list
    assert ours[5]["answers"] == ["O'Sime"]
    assert all("ctxs" not in ex for ex in ours)


def test_questions_from_jsonl_and_triviaqa(tmp_path):
    out = tmp_path / "q.json"
    preprocess.main(["questions", str(DATA / "questions" / "questions.jsonl"), str(out)])
    ours = load_questions(out)
    assert [ex["id"] for ex in ours] == ["q-bridge", "q-olme", "q-anthem", 3]
    assert ours[0]["answers"] == ["Petra Lindqvist"] and "answer" not in ours[0]  # NQ-open's "answer"
    assert ours[2]["target"] == "Benedikt Sall" and ours[2]["source"] == "handwritten"  # extra fields kept

    out = tmp_path / "tqa.json"
    preprocess.main(["questions", str(DOWNLOAD / "triviaqa-unfiltered" / "unfiltered-web-dev.json"), str(out)])
    ours = load_questions(out)
    assert [(ex["id"], ex["target"]) for ex in ours][:2] == [("tc_900", "Benedikt Sall"), ("tc_901", "Lake Sime")]
    assert ours[2]["answers"] == ["40", "forty"]


def test_questions_bad_lines(tmp_path):
    bad = tmp_path / "bad.qa.csv"
    bad.write_text("who built the varnholt bridge\t['Petra Lindqvist']\nhow long is the olme\t['312 km'\n")
    with pytest.raises(DataError, match=r"bad\.qa\.csv, line 2: answers .* are not a list"):
        preprocess.main(["questions", str(bad), str(tmp_path / "out.json")])
    bad.write_text("a question\t[1, 2]\n")
    with pytest.raises(DataError, match=r"line 1: answers must be a list of strings"):
        preprocess.main(["questions", str(bad), str(tmp_path / "out.json")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine", "answers": ["x"]}\n\n{"question": "broken", \n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: invalid JSON"):
        preprocess.main(["questions", str(bad), str(tmp_path / "out.json")])
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        preprocess.main(["questions", str(tmp_path / "nope.jsonl"), str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()


# ---------------------------------------------------------------------------
# Command line and downstream use
# ---------------------------------------------------------------------------


def test_help_shows_every_mode_with_an_example(capsys):
    with pytest.raises(SystemExit):
        preprocess.main(["--help"])
    text = capsys.readouterr().out
    for mode in preprocess.MODES:
        assert f"python preprocess.py {mode} " in text
    assert "python preprocess.py open_domain_data/download open_domain_data" in text  # the original call
    for mode in preprocess.MODES:
        with pytest.raises(SystemExit):
            preprocess.main([mode, "--help"])
        assert "example:\n  python preprocess.py" in capsys.readouterr().out


def test_positional_call_means_fid():
    args = preprocess.parse_args(["open_domain_data/download", "open_domain_data"])
    assert (args.mode, args.download_dir, args.output_dir) == ("fid", "open_domain_data/download", "open_domain_data")
    assert preprocess.parse_args(["dpr", "in.json", "out.json"]).mode == "dpr"


def test_converted_files_feed_the_reader(tmp_path, passages):
    """NQ from the recipe and a BM25 join go through the reader's dataset and collator unchanged."""
    from src.toy.tiny_models import build_word_tokenizer

    preprocess.main(["fid", str(DOWNLOAD), str(tmp_path / "out"), "--passages", str(passages), "--datasets", "NQ"])
    bm25 = run_bm25(tmp_path, passages, DATA / "bm25" / "run.nq-test.trec")
    texts = [t for title, text in PASSAGES.values() for t in (title, text)]
    tokenizer = build_word_tokenizer(texts + ["question:", "title:", "context:"], "t5")
    collator = ReaderCollator(tokenizer, text_maxlength=24, n_context=3)
    for path in (tmp_path / "out" / "NQ" / "train.json", tmp_path / "bm25-trec.json"):
        examples = load_questions(path)
        dataset = ReaderDataset(examples, n_context=3)
        index, labels, ids, mask = collator([dataset[i] for i in range(4)])
        assert ids.shape == mask.shape == (4, 3, 24)
        assert labels is not None and labels.shape[0] == 4
        assert mask[:, :, 0].all()  # every example has 3 real passages
    assert len(bm25) == 6


@pytest.mark.slow  # ~10 s: builds a tiny retriever, embeds 30 passages, searches
def test_converted_files_feed_passage_retrieval(tmp_path, passages):
    """Questions without ctxs go through embedding + retrieval; a converted DPR file through --evaluate_only."""
    import torch
    from transformers import AutoTokenizer

    import generate_passage_embeddings
    import passage_retrieval
    from src.data.datasets import format_passage
    from src.retriever.model import Retriever
    from src.toy.tiny_models import save_tiny_bert

    questions = tmp_path / "questions.json"
    preprocess.main(["questions", str(QA_CSV), str(questions)])
    texts = [format_passage(title, text) for title, text in PASSAGES.values()]
    texts += [ex["question"] for ex in load_json(questions)]
    encoder = save_tiny_bert(tmp_path / "encoder", texts, seed=0)
    torch.manual_seed(0)
    retriever_dir = tmp_path / "retriever"
    Retriever.from_encoder(str(encoder), indexing_dimension=16).save_pretrained(retriever_dir)
    AutoTokenizer.from_pretrained(encoder).save_pretrained(retriever_dir)
    generate_passage_embeddings.main(
        ["--model_path", str(retriever_dir), "--passages", str(passages), "--output_path", str(tmp_path / "emb" / "wiki"),
         "--passage_maxlength", "24", "--per_gpu_batch_size", "8"]
    )  # fmt: skip
    retrieved = tmp_path / "retrieved.json"
    passage_retrieval.main(
        ["--model_path", str(retriever_dir), "--passages", str(passages), "--data_path", str(questions),
         "--passages_embeddings", str(tmp_path / "emb" / "wiki_*"), "--output_path", str(retrieved),
         "--n-docs", "5", "--question_maxlength", "16", "--validation_workers", "1"]
    )  # fmt: skip
    before, after = load_questions(questions), load_questions(retrieved)
    assert [(ex["id"], ex["question"], ex["answers"]) for ex in after] == [
        (ex["id"], ex["question"], ex["answers"]) for ex in before
    ]
    for ex in after:
        assert len(ex["ctxs"]) == 5
        assert all(
            (c["title"], c["text"]) == PASSAGES[c["id"]] and isinstance(c["hasanswer"], bool) for c in ex["ctxs"]
        )

    # DPR's own has_answer flags agree with the recomputed ones (DPR's rule).
    ours, rescored = tmp_path / "dpr.json", tmp_path / "dpr-rescored.json"
    preprocess.main(["dpr", str(DPR_FILE), str(ours)])
    passage_retrieval.main(["--evaluate_only", "--data", str(ours), "--output_path", str(rescored)])
    for a, b in zip(load_json(ours), load_json(rescored)):
        assert [c["hasanswer"] for c in a["ctxs"]] == [c["hasanswer"] for c in b["ctxs"]]


def test_the_wiki_prefix_rule_is_the_passage_store_s():
    """The converters normalise ids with the rule PassageStore looks them up by (one function)."""
    assert normalize_passage_id(" wiki:123 ", "x") == strip_id_prefix("wiki:123") == "123"
    assert normalize_passage_id(7, "x") == "7" and strip_id_prefix("wikipedia:1") == "wikipedia:1"
    with pytest.raises(DataError, match="x: passage id must be a string or an integer"):
        normalize_passage_id(True, "x")
