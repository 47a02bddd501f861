"""Bad inputs, one clear error each: for every script, a table of (case id, arguments, expected
message fragment). Each case must end with exit code 2, a one-line message naming the file
(and line or example) or the option, no traceback, and every output already on disk left
as it was, byte for byte (no half-written file either).

Most cases fail before any output is opened. Those marked `late=True` fail while one of the
case's `outputs` is being written (the in-process run records what the script opens with
atomic_write, and a late case must have opened one), so that "left as it was" is really
exercised: passage_retrieval.py and preprocess.py here; test_reader.py and the training scripts
in "Late failures" at the end (an input that changes while in use), which also says why the
training scripts and generate_passage_embeddings.py cannot fail on an input while writing. Each
training table has its own run directories.

Adding a case is one line in a table. Arguments may use the placeholders of `world` below
({good}: a valid question file, {bad}: the directory of the BAD_FILES, {t5}, {bert},
{retriever}, {psgs}, {shards}, {out}). In a fragment, "…" stands for any text. Cases run
in-process (`cli(main)`, as `python script.py` does: same handler, a few ms each); those
marked `subprocess=True` run as a real `python script.py` to prove the exit code and the
absence of a traceback end to end.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

import src.files
from src.cli import cli, close_loggers
from src.corpus.embeddings import write_shard
from src.corpus.search import PeerFailed, failure, peer_error
from src.errors import DataError, InputError
from src.reader.model import FiDT5

ROOT = Path(__file__).resolve().parent.parent
WORDS = "what color does anna boris like red blue green title context question".split()


def example(i: int, **changes) -> dict:
    ctxs = [
        {"id": "1", "title": "anna", "text": "anna likes red", "score": 2.0},
        {"id": "2", "title": "boris", "text": "boris likes blue", "score": 1.0},
    ]
    return {"id": f"q{i}", "question": "what color does anna like", "answers": ["red"], "ctxs": ctxs, **changes}


def ctx(**changes) -> dict:
    return {"id": "1", "title": "anna", "text": "anna likes red", "score": 2.0, **changes}


GOOD = [example(0), example(1)]
LATIN1 = "caf\u00e9".encode("latin-1")  # b"caf\xe9": not UTF-8

# name -> content (str, bytes, or a function of the world's root for files built from others)
BAD_FILES = {
    "object.json": json.dumps({"data": GOOD}),  # the reported bug: exited 0
    "dict_of_examples.json": json.dumps({"q0": example(0)}),
    "not_utf8.json": b'[\n{"question": "' + LATIN1 + b'", "answers": ["x"]}\n]\n',
    "not_utf8.jsonl": json.dumps(example(0)).encode() + b'\n{"question": "' + LATIN1 + b'"}\n',
    "empty.json": "",
    "empty.jsonl": "\n",
    "empty_list.json": "[]",
    "truncated.json": '[\n{"question": "q", "ctxs": [{"title": "t", "text": "cut here',
    "list_line.jsonl": json.dumps(GOOD) + "\n",
    "no_question.json": json.dumps([example(0), {"answers": ["x"], "ctxs": []}]),
    "ctxs_not_list.json": json.dumps([example(0, ctxs="anna likes red")]),
    "ctx_without_text.json": json.dumps([example(0, ctxs=[ctx(), {"title": "boris"}])]),
    "score_not_number.json": json.dumps([example(0, ctxs=[ctx(score="high"), ctx(id="2")])]),
    "score_nan.json": json.dumps([example(0, ctxs=[ctx(score="nan"), ctx(id="2")])]),
    "no_gold_score.json": json.dumps([example(0), example(1, ctxs=[{"title": "a", "text": "b"}])]),
    "no_target.json": json.dumps([example(0, answers=[])]),
    "lone_surrogate.json": json.dumps([example(0), example(1, question="what color does \udc00 like")]),
    # DPR-style inputs of preprocess.py dpr (string scores, has_answer)
    "dpr_ctxs_not_list.json": json.dumps([{"question": "q", "answers": ["a"], "ctxs": {"id": "1"}}]),
    "dpr_ctx_without_text.json": json.dumps([{"question": "q", "answers": ["a"], "ctxs": [{"id": "1", "title": "t"}]}]),
    "dpr_score.json": json.dumps([{"question": "q", "ctxs": [{"id": "1", "title": "t", "text": "x", "score": "n/a"}]}]),
    # found after two records were converted (one per line)
    "dpr_score_late.json": "[\n"
    + ",\n".join(
        json.dumps(
            {"question": f"q{i}", "answers": ["a"], "ctxs": [{"id": "1", "title": "t", "text": "x", "score": s}]}
        )
        for i, s in enumerate(["1.5", "2", "n/a"])
    )
    + "\n]\n",
    "not_utf8.qa.csv": b"what color\t['red']\n" + LATIN1 + b"\t['x']\n",
    "run_score.trec": "q0 Q0 1 1 high bm25\n",
    "run_not_utf8.trec": b"q0 Q0 1 1 3.5 " + LATIN1 + b"\n",
    # passages TSVs
    "short_rows.tsv": "id\ttext\ttitle\n1\tanna likes red\tanna\n2\tonly a text\n",
    "no_header.tsv": "1\tanna likes red\tanna\n2\tboris likes blue\tboris\n",
    "empty.tsv": "",
    "header_only.tsv": "id\ttext\ttitle\n",
    "not_utf8.tsv": b"id\ttext\ttitle\n1\t" + LATIN1 + b"\tanna\n",
    # embedding shards (globs: {bad}/truncated_*)
    "truncated_00.npz": lambda root: (root / "shards_00.npz").read_bytes()[:200],
    "garbage_00.npz": b"these are not embeddings\n",
    "wrong_arrays_00.npz": lambda root: _npz(a=np.zeros(3)),
    "unknown_id_00.npz": lambda root: _shard(["1", "999"]),  # 999 is not in psgs.tsv: found while writing
    # model directories: created as directories (see world)
}
MODEL_DIRS = {"no_model": {}, "config_only": {"config.json": json.dumps({"model_type": "t5"})}}


def _npz(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _shard(ids: list[str]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, ids=np.array(ids), embeddings=np.random.default_rng(1).random((len(ids), 8), dtype=np.float32))
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_fid, tiny_retriever) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "good.json").write_text(json.dumps(GOOD))
    (root / "psgs.tsv").write_text("id\ttext\ttitle\n1\tanna likes red\tanna\n2\tboris likes blue\tboris\n")
    write_shard(root / "shards_00.npz", ["1", "2"], np.random.default_rng(0).random((2, 8), dtype=np.float32))
    (root / "run.trec").write_text("q0 Q0 1 1 3.5 bm25\n")
    bad = root / "bad"
    bad.mkdir()
    for name, content in BAD_FILES.items():
        content = content(root) if callable(content) else content
        (bad / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    for name, files in MODEL_DIRS.items():
        (bad / name).mkdir()
        for file, text in files.items():
            (bad / name / file).write_text(text)
    (root / "out").mkdir()
    return {
        "root": str(root),
        "good": str(root / "good.json"),
        "bad": str(bad),
        "t5": str(tiny_fid.path),
        "bert": str(tiny_retriever.encoder),
        "retriever": str(tiny_retriever.retriever),
        "psgs": str(root / "psgs.tsv"),
        "shards": str(root / "shards_*"),
        "run": str(root / "run.trec"),
        "out": str(root / "out"),
    }


class How(NamedTuple):
    subprocess: bool  # a real `python script.py` (else cli(main) in this process)
    late: bool  # fails while one of the case's outputs is being written


def case(case_id: str, args: list[str], fragment: str, subprocess: bool = False, late: bool = False):
    return pytest.param(args, fragment, How(subprocess, late), id=case_id)


def found_in_order(line: str, fragment: str) -> bool:
    pos = 0
    for part in fragment.split("…"):
        pos = line.find(part, pos)
        if pos < 0:
            return False
        pos += len(part)
    return True


def run_bad(script: str, args: list[str], in_subprocess: bool, capsys) -> str:
    """Run `python script args` (or its `cli(main)` in this process); assert exit code 2 and no
    traceback; return stdout + stderr."""
    if in_subprocess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("FID_DEBUG", None)
        proc = subprocess.run(
            [sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2, output[-3000:]
    else:
        module = importlib.import_module(Path(script).stem)
        capsys.readouterr()
        try:
            cli(lambda: module.main(args))
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # what `python script.py` would show as a traceback
            pytest.fail(f"{script}: {type(e).__name__} escaped cli(): {e}")
        else:
            code = 0
        finally:
            close_loggers()  # the scripts' handlers hold files and this test's streams
        captured = capsys.readouterr()
        output = captured.out + captured.err
        assert code == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return output


def fill(text: str, world: dict[str, str]) -> str:
    """The placeholders {good}, {bad}, ... replaced (other braces are kept: messages show JSON)."""
    for key, value in world.items():
        text = text.replace("{" + key + "}", value)
    return text


def record_atomic_writes(script: str, monkeypatch, on_open: Callable[[Path], None] | None = None) -> list[Path]:
    """The files the script opens with atomic_write (src/files.py) from now on, in order;
    `on_open(path)` is called as each one opens."""
    stem = Path(script).stem
    importlib.import_module(stem)
    original, opened = src.files.atomic_write, []

    def recording(path, *args, **kwargs):
        opened.append(Path(path))
        if on_open is not None:
            on_open(Path(path))
        return original(path, *args, **kwargs)

    for name, module in list(sys.modules.items()):
        if (name == stem or name.startswith("src.")) and getattr(module, "atomic_write", None) is original:
            monkeypatch.setattr(module, "atomic_write", recording)
    return opened


def check_bad_input(script, args, fragment, how, world, capsys, monkeypatch, outputs=(), on_open=None) -> None:
    """`outputs`: files already written by an earlier run; they must come out unchanged. A `late`
    case must fail after the script opened one of them for writing (`on_open`: see
    record_atomic_writes)."""
    sentinels = {}
    for path in outputs:
        path = Path(fill(path, world))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"earlier output {path.name}\n".encode())
        sentinels[path] = path.read_bytes()
    args = [fill(a, world) for a in args]
    fragment = fill(fragment, world)
    opened = [] if how.subprocess else record_atomic_writes(script, monkeypatch, on_open)
    output = run_bad(script, args, how.subprocess, capsys)
    lines = [line for line in output.splitlines() if found_in_order(line, fragment)]
    assert len(lines) == 1, f"{fragment!r} not on exactly one line of:\n{output[-3000:]}"  # said once
    if how.late:
        assert not how.subprocess and set(opened) & set(sentinels), f"failed before opening an output: {opened}"
    for path, before in sentinels.items():
        assert path.read_bytes() == before, f"{path} was overwritten"
        leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
        assert not leftovers, f"half-written files left in {path.parent}: {leftovers}"


def with_defaults(defaults: list[str], args: list[str]) -> list[str]:
    """The defaults, then the case's arguments (argparse: the last value of a flag wins)."""
    return [*defaults, *args]


# ---------------------------------------------------------------------------
# test_reader.py
# ---------------------------------------------------------------------------

QUESTION_FILE_CASES = [  # (id, file in BAD_FILES, fragment): every script that reads question files
    ("json-object", "object.json", "object.json: expected a JSON list of examples…found a JSON object {'data'}"),
    ("dict-of-examples", "dict_of_examples.json", "dict_of_examples.json: expected a JSON list of examples"),
    ("not-utf8", "not_utf8.json", "not_utf8.json, line 2: not UTF-8 text (byte 0xe9"),
    ("not-utf8-jsonl", "not_utf8.jsonl", "not_utf8.jsonl, line 2: not UTF-8 text"),
    ("empty-file", "empty.json", "empty.json: empty file"),
    ("empty-jsonl", "empty.jsonl", "empty.jsonl: empty file"),
    ("empty-list", "empty_list.json", "empty_list.json: no examples"),
    ("truncated", "truncated.json", "truncated.json, line 2: invalid JSON…is the file truncated?"),
    ("jsonl-line-not-object", "list_line.jsonl", "list_line.jsonl, line 1: expected an object, got list"),
    ("no-question", "no_question.json", "no_question.json, example 2: missing or non-string 'question'"),
    ("ctxs-not-list", "ctxs_not_list.json", "ctxs_not_list.json, example 1 (id q0): 'ctxs' must be a list"),
    ("ctx-without-text", "ctx_without_text.json", "ctx_without_text.json, example 1 (id q0), ctx 1: …'text'"),
    ("score-not-number", "score_not_number.json", "score_not_number.json, example 1 (id q0), ctx 0: score 'high'"),
    ("score-nan", "score_nan.json", "score_nan.json, example 1 (id q0), ctx 0: score 'nan' is not a finite"),
    (
        "lone-surrogate",
        "lone_surrogate.json",
        "lone_surrogate.json, example 2…'question' is not valid Unicode: a lone",
    ),
]


def question_file_cases(flag: str, subprocess_ids: tuple[str, ...] = (), skip: tuple[str, ...] = ()):
    return [
        case(case_id, [flag, f"{{bad}}/{name}"], fragment, subprocess=case_id in subprocess_ids)
        for case_id, name, fragment in QUESTION_FILE_CASES
        if case_id not in skip
    ]


TEST_READER_DEFAULTS = [
    "--model_path", "{t5}", "--eval_data", "{good}", "--checkpoint_dir", "{root}/runs", "--name", "scored",
    "--n_context", "2", "--text_maxlength", "8", "--device", "cpu", "--write_results", "--write_crossattention_scores",
]  # fmt: skip
TEST_READER_CASES = [
    *question_file_cases("--eval_data", subprocess_ids=("json-object", "not-utf8")),
    case("n_context-0", ["--n_context", "0"], "argument --n_context: must be a positive integer", subprocess=True),
    case("n_context-negative", ["--n_context", "-1"], "argument --n_context: must be a positive integer"),
    case("text_maxlength-0", ["--text_maxlength", "0"], "argument --text_maxlength: must be a positive integer"),
    case("batch-size-0", ["--per_gpu_batch_size", "0"], "argument --per_gpu_batch_size: must be a positive integer"),
    case("batch-size-text", ["--per_gpu_batch_size", "two"], "argument --per_gpu_batch_size: 'two' is not an integer"),
    case("eval_data-missing", ["--eval_data", "{bad}/nothing.json"], "nothing.json: no such file"),
    case("model_path-empty-dir", ["--model_path", "{bad}/no_model"], "no_model: no config.json, not a T5"),
    case("model_path-no-weights", ["--model_path", "{bad}/config_only"], "config_only: no model weights"),
    case(
        "model_path-bert",
        ["--model_path", "{bert}"],
        "bert: config.json is a bert model; a FiD reader is one of model_type t5",
    ),
    case("model_path-missing", ["--model_path", "{bad}/nowhere"], "reader {bad}/nowhere: no such directory"),
    case("model_path-required", ["--model_path", "none"], "--model_path is required"),
    # A signal of the gold answer on a file without one: stops before the model loads.
    case(
        "score-kind-needs-answers",
        ["--eval_data", "{bad}/no_target.json", "--score_kind", "pdist", "--model_path", "{bad}/nowhere"],
        "no_target.json, example 1 (id q0): no 'target' and no 'answers' --score_kind pdist scores the gold answer",
    ),
]


@pytest.mark.parametrize("args, fragment, how", TEST_READER_CASES)
def test_test_reader_bad_inputs(world, capsys, monkeypatch, args, fragment, how):
    outputs = ["{root}/runs/scored/dataset_wscores.json", "{root}/runs/scored/final_output.txt"]
    args = with_defaults(TEST_READER_DEFAULTS, args)
    check_bad_input("test_reader.py", args, fragment, how, world, capsys, monkeypatch, outputs)


# ---------------------------------------------------------------------------
# train_reader.py
# ---------------------------------------------------------------------------

TRAIN_READER_DEFAULTS = [
    "--train_data", "{good}", "--eval_data", "{good}", "--model_name_or_path", "{t5}", "--checkpoint_dir",
    "{root}/runs", "--n_context", "2", "--text_maxlength", "8", "--total_steps", "1", "--device", "cpu",
]  # fmt: skip
TRAIN_READER_CASES = [
    *question_file_cases("--train_data", subprocess_ids=("ctx-without-text",)),
    case("eval-json-object", ["--eval_data", "{bad}/object.json"], "object.json: expected a JSON list of examples"),
    case("eval-not-utf8", ["--eval_data", "{bad}/not_utf8.json"], "not_utf8.json, line 2: not UTF-8 text"),
    case("no-target", ["--train_data", "{bad}/no_target.json"], "no_target.json, example 1 (id q0): no 'target'"),
    case("n_context-0", ["--n_context", "0"], "argument --n_context: must be a positive integer"),
    case("text_maxlength-negative", ["--text_maxlength", "-5"], "argument --text_maxlength: must be a positive"),
    case("batch-size-0", ["--per_gpu_batch_size", "0"], "argument --per_gpu_batch_size: must be a positive integer"),
    case("total_steps-0", ["--total_steps", "0"], "argument --total_steps: must be a positive integer"),
    case("total_steps-negative", ["--total_steps", "-1"], "argument --total_steps: must be a positive integer"),
    case("eval_freq-0", ["--eval_freq", "0"], "argument --eval_freq: must be a positive integer"),
    case("model_path-empty-dir", ["--model_path", "{bad}/no_model"], "no_model: no config.json, not a T5"),
    case(
        "model-bert",
        ["--model_name_or_path", "{bert}"],
        "bert: config.json is a bert model; a FiD reader is one of model_type t5",
    ),
]


def run_name(script: str, case_id: str) -> str:
    """The run directory of a training case: each table its own (a case of one script must not
    resume a checkpoint another script's case left)."""
    return f"{Path(script).stem}-{case_id}"


def check_training_bad_input(script, defaults, args, fragment, how, world, capsys, monkeypatch, request):
    name = run_name(script, request.node.callspec.id)
    args = with_defaults(defaults, ["--name", name, *args])
    check_bad_input(script, args, fragment, how, world, capsys, monkeypatch)
    run_dir = Path(world["root"]) / "runs" / name
    assert not (run_dir / "checkpoint").exists(), "a failed start wrote checkpoints"


@pytest.mark.parametrize("args, fragment, how", TRAIN_READER_CASES)
def test_train_reader_bad_inputs(world, capsys, monkeypatch, request, args, fragment, how):
    check_training_bad_input(
        "train_reader.py", TRAIN_READER_DEFAULTS, args, fragment, how, world, capsys, monkeypatch, request
    )


# ---------------------------------------------------------------------------
# train_retriever.py
# ---------------------------------------------------------------------------

TRAIN_RETRIEVER_DEFAULTS = [
    "--train_data", "{good}", "--eval_data", "{good}", "--model_name_or_path", "{bert}", "--checkpoint_dir",
    "{root}/runs", "--n_context", "2", "--indexing_dimension", "8", "--question_maxlength", "8",
    "--passage_maxlength", "8", "--total_steps", "1", "--device", "cpu",
]  # fmt: skip
TRAIN_RETRIEVER_CASES = [
    *question_file_cases("--train_data"),
    case(
        "no-gold-score",
        ["--train_data", "{bad}/no_gold_score.json"],
        "no_gold_score.json, example 2 (id q1)…no 'score'",
    ),
    case("n_context-0", ["--n_context", "0"], "argument --n_context: must be a positive integer", subprocess=True),
    case("batch-size-0", ["--per_gpu_batch_size", "0"], "argument --per_gpu_batch_size: must be a positive integer"),
    case("total_steps-0", ["--total_steps", "0"], "argument --total_steps: must be a positive integer"),
    case("passage_maxlength-0", ["--passage_maxlength", "0"], "argument --passage_maxlength: must be a positive"),
    case("save_freq-0", ["--save_freq", "0"], "argument --save_freq: must be a positive integer"),
    case("model_path-empty-dir", ["--model_path", "{bad}/no_model"], "no_model: no config.json, not a retriever"),
    case("model-t5", ["--model_name_or_path", "{t5}"], "t5: a t5 encoder-decoder model, not an encoder"),
    case("model-missing", ["--model_name_or_path", "{bad}/nowhere"], "retriever {bad}/nowhere: no such directory"),
]


@pytest.mark.parametrize("args, fragment, how", TRAIN_RETRIEVER_CASES)
def test_train_retriever_bad_inputs(world, capsys, monkeypatch, request, args, fragment, how):
    check_training_bad_input(
        "train_retriever.py", TRAIN_RETRIEVER_DEFAULTS, args, fragment, how, world, capsys, monkeypatch, request
    )


def test_training_tables_have_their_own_run_directories():
    reader = {run_name("train_reader.py", p.id) for p in TRAIN_READER_CASES}
    retriever = {run_name("train_retriever.py", p.id) for p in TRAIN_RETRIEVER_CASES}
    assert len(reader) == len(TRAIN_READER_CASES) and len(retriever) == len(TRAIN_RETRIEVER_CASES)
    assert not reader & retriever


# ---------------------------------------------------------------------------
# generate_passage_embeddings.py
# ---------------------------------------------------------------------------

EMBEDDINGS_DEFAULTS = ["--model_path", "{retriever}", "--passages", "{psgs}", "--output_path", "{out}/wiki"]
EMBEDDINGS_CASES = [
    case("short-row", ["--passages", "{bad}/short_rows.tsv"], "short_rows.tsv: 1 row(s) do not parse (line 3: exp"),
    case("no-header", ["--passages", "{bad}/no_header.tsv"], "no_header.tsv:1: header must name the columns id, te"),
    case("empty-file", ["--passages", "{bad}/empty.tsv"], "empty.tsv:1: empty file", subprocess=True),
    case("header-only", ["--passages", "{bad}/header_only.tsv"], "header_only.tsv: no passages"),
    case("not-utf8", ["--passages", "{bad}/not_utf8.tsv"], "not_utf8.tsv: 1 row(s) do not parse (line 2: not valid"),
    case("passages-missing", ["--passages", "{bad}/nothing.tsv"], "passages file not found: {bad}/nothing.tsv"),
    case("model_path-empty-dir", ["--model_path", "{bad}/no_model"], "no_model: not a saved retriever"),
    case("model_path-encoder", ["--model_path", "{bert}"], "bert: not a saved retriever"),
    case("model_path-missing", ["--model_path", "{bad}/nowhere"], "nowhere: no such directory"),
    case("batch-size-0", ["--per_gpu_batch_size", "0"], "argument --per_gpu_batch_size: must be a positive integer"),
    case("passage_maxlength-0", ["--passage_maxlength", "0"], "argument --passage_maxlength: must be a positive"),
    case("num_shards-0", ["--num_shards", "0"], "argument --num_shards: must be a positive integer"),
    case("shard_id-too-big", ["--shard_id", "3", "--num_shards", "2"], "shard_id must be in [0, num_shards)"),
]


@pytest.mark.parametrize("args, fragment, how", EMBEDDINGS_CASES)
def test_generate_passage_embeddings_bad_inputs(world, capsys, monkeypatch, args, fragment, how):
    args = with_defaults(EMBEDDINGS_DEFAULTS, [*args, "--device", "cpu"])
    outputs = ["{out}/wiki_00.npz", "{out}/wiki_03.npz"]
    check_bad_input("generate_passage_embeddings.py", args, fragment, how, world, capsys, monkeypatch, outputs)


# ---------------------------------------------------------------------------
# passage_retrieval.py
# ---------------------------------------------------------------------------

RETRIEVAL_DEFAULTS = [
    "--model_path", "{retriever}", "--passages", "{psgs}", "--passages_embeddings", "{shards}", "--data", "{good}",
    "--output_path", "{out}/retrieved.json", "--n-docs", "2", "--device", "cpu", "--validation_workers", "1",
]  # fmt: skip
RETRIEVAL_CASES = [
    *question_file_cases("--data", skip=("empty-jsonl", "jsonl-line-not-object", "score-nan")),
    case("n-docs-0", ["--n-docs", "0"], "argument --n-docs: must be a positive integer"),
    case("n-docs-negative", ["--n-docs", "-5"], "argument --n-docs: must be a positive integer"),
    case("batch-size-0", ["--per_gpu_batch_size", "0"], "argument --per_gpu_batch_size: must be a positive integer"),
    case("glob-matches-nothing", ["--passages_embeddings", "{bad}/none_*"], "'{bad}/none_*' matches no embedding"),
    case("truncated-shard", ["--passages_embeddings", "{bad}/truncated_*"], "truncated_00.npz: corrupt or trunc", True),
    case("garbage-shard", ["--passages_embeddings", "{bad}/garbage_*"], "garbage_00.npz: not an embedding shard"),
    case("wrong-arrays", ["--passages_embeddings", "{bad}/wrong_arrays_*"], "wrong_arrays_00.npz: not an embedding"),
    case("short-row", ["--passages", "{bad}/short_rows.tsv"], "short_rows.tsv: 1 row(s) do not parse (line 3: exp"),
    case("no-header", ["--passages", "{bad}/no_header.tsv"], "no_header.tsv:1: header must name the columns"),
    case("model_path-empty-dir", ["--model_path", "{bad}/no_model"], "no_model: not a saved retriever"),
    case("evaluate-only-not-utf8", ["--evaluate_only", "--data", "{bad}/not_utf8.json"], "not_utf8.json, line 2: not"),
    case(
        "passage-missing-mid-corpus",
        ["--passages_embeddings", "{bad}/unknown_id_*"],
        "passage id '999' of the embeddings is not in {psgs}",
        late=True,
    ),
]


@pytest.mark.parametrize("args, fragment, how", RETRIEVAL_CASES)
def test_passage_retrieval_bad_inputs(world, capsys, monkeypatch, args, fragment, how):
    args = with_defaults(RETRIEVAL_DEFAULTS, args)
    outputs = ["{out}/retrieved.json", "{out}/retrieved.json.log"]
    check_bad_input("passage_retrieval.py", args, fragment, how, world, capsys, monkeypatch, outputs)


# ---------------------------------------------------------------------------
# preprocess.py
# ---------------------------------------------------------------------------

PREPROCESS_CASES = [
    case("questions-json-object", ["questions", "{bad}/object.json"], "object.json: expected a JSON list…{'data'}"),
    case("questions-not-utf8", ["questions", "{bad}/not_utf8.json"], "not_utf8.json, line 2: not UTF-8 text"),
    case("questions-not-utf8-jsonl", ["questions", "{bad}/not_utf8.jsonl"], "not_utf8.jsonl, line 2: not UTF-8"),
    case("questions-not-utf8-csv", ["questions", "{bad}/not_utf8.qa.csv"], "not_utf8.qa.csv, line 2: not UTF-8"),
    case("questions-empty", ["questions", "{bad}/empty.json"], "empty.json: empty file"),
    case("questions-empty-jsonl", ["questions", "{bad}/empty.jsonl"], "empty.jsonl: empty file"),
    case("questions-empty-list", ["questions", "{bad}/empty_list.json"], "empty_list.json: no records"),
    case("questions-truncated", ["questions", "{bad}/truncated.json"], "truncated.json, line 2: invalid JSON…trunc"),
    case("questions-no-question", ["questions", "{bad}/no_question.json"], "no_question.json, line 1: missing or"),
    case("dpr-json-object", ["dpr", "{bad}/object.json"], "object.json: expected a JSON list…found a JSON object"),
    case("dpr-not-utf8", ["dpr", "{bad}/not_utf8.json"], "not_utf8.json, line 2: not UTF-8 text", subprocess=True),
    case("dpr-ctxs-not-list", ["dpr", "{bad}/dpr_ctxs_not_list.json"], "dpr_ctxs_not_list.json, line 1: no 'ctxs'"),
    case("dpr-ctx-no-text", ["dpr", "{bad}/dpr_ctx_without_text.json"], "dpr_ctx_without_text.json, line 1, ctx 0:"),
    case("dpr-score", ["dpr", "{bad}/dpr_score.json"], "dpr_score.json, line 1, ctx 0: score 'n/a' is not a number"),
    case(
        "dpr-score-late",
        ["dpr", "{bad}/dpr_score_late.json"],
        "dpr_score_late.json, line 4, ctx 0: score 'n/a'",
        late=True,
    ),
    case("dpr-n_docs-0", ["dpr", "{good}", "--n_docs", "0"], "argument --n_docs/--n-docs: must be a positive"),
    case("dpr-short-row", ["dpr", "{good}", "--passages", "{bad}/short_rows.tsv"], "short_rows.tsv: 1 row(s) do no"),
    case("dpr-no-header", ["dpr", "{good}", "--passages", "{bad}/no_header.tsv"], "no_header.tsv:1: header must"),
    case("bm25-score", ["bm25", "--run", "{bad}/run_score.trec"], "run_score.trec, line 1: score 'high' is not a"),
    case("bm25-run-not-utf8", ["bm25", "--run", "{bad}/run_not_utf8.trec"], "run_not_utf8.trec, line 1: not UTF-8"),
    case("bm25-n_docs-negative", ["bm25", "--n-docs", "-3"], "argument --n_docs/--n-docs: must be a positive"),
    case("bm25-questions-empty", ["bm25", "--questions", "{bad}/empty.jsonl"], "empty.jsonl: empty file"),
]
BM25_DEFAULTS = ["--run", "{run}", "--questions", "{good}", "--passages", "{psgs}", "--output", "{out}/converted.json"]


@pytest.mark.parametrize("args, fragment, how", PREPROCESS_CASES)
def test_preprocess_bad_inputs(world, capsys, monkeypatch, args, fragment, how):
    mode, *rest = args
    if mode == "bm25":
        args = [mode, *BM25_DEFAULTS, *rest]
    else:  # MODE INPUT OUTPUT [flags]
        args = [mode, rest[0], "{out}/converted.json", *rest[1:]]
    check_bad_input("preprocess.py", args, fragment, how, world, capsys, monkeypatch, outputs=["{out}/converted.json"])


# ---------------------------------------------------------------------------
# Late failures: an input that changes while the script uses it
# ---------------------------------------------------------------------------
# The scripts check their inputs whole before they open an output, so a static bad file fails
# early; the cases marked late=True above are those a script can only meet while writing
# (passage_retrieval.py: a passage id of the embeddings missing from the TSV; preprocess.py: a
# bad record after good ones). The reader and retriever scripts read examples on demand, so a
# file that changes after it was checked fails where it is read again: test_reader.py while it
# writes final_output.txt, the training scripts at the next batch, after checkpoints were saved.
# The training scripts read no input while they save, and generate_passage_embeddings.py (one
# process) has read every passage before it opens its one output: neither can fail on an input
# while an output is being written.


def spread(examples: list[dict]) -> str:
    """A JSON list, one example per line."""
    return "[\n" + ",\n".join(json.dumps(e) for e in examples) + "\n]\n"


def blank_from(path: Path, example: int) -> None:
    """The file changes while in use: `example` and those after it overwritten with spaces, in
    place, at the same size (so they no longer parse where the script indexed them)."""
    data = path.read_bytes()
    start = sum(len(line) for line in data.splitlines(keepends=True)[: example + 1])  # line 0: "["
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b" " * (len(data) - start))


def test_test_reader_input_changed_while_writing(world, capsys, monkeypatch, tmp_path):
    """Examples 2 and 3 change as final_output.txt opens: it fails on example 2, after two lines;
    neither output changes and no temporary file is left."""
    data = tmp_path / "eval.json"
    data.write_text(spread([example(i) for i in range(4)]))
    args = with_defaults(TEST_READER_DEFAULTS, ["--eval_data", str(data), "--name", "test_reader-changed"])
    outputs = [
        "{root}/runs/test_reader-changed/final_output.txt",
        "{root}/runs/test_reader-changed/dataset_wscores.json",
    ]

    def change(path: Path) -> None:
        if path.name == "final_output.txt":
            blank_from(data, 2)

    fragment = f"{data}, example 3…: not the example indexed there…the file changed while in use?"
    check_bad_input("test_reader.py", args, fragment, How(False, True), world, capsys, monkeypatch, outputs, change)


@pytest.mark.parametrize("script", ["train_reader.py", "train_retriever.py"])
def test_training_input_changed_while_in_use(world, capsys, monkeypatch, tmp_path, script):
    """The train file changes after the first step was trained and saved: the next batch fails
    (exit 2, naming the file and the example) and the checkpoints on disk stay as they were."""
    data = tmp_path / "train.json"
    data.write_text(spread([example(i) for i in range(6)]))
    defaults = TRAIN_READER_DEFAULTS if script == "train_reader.py" else TRAIN_RETRIEVER_DEFAULTS
    run_dir = Path(world["root"]) / "runs" / f"{Path(script).stem}-changed"
    args = [fill(a, world) for a in defaults] + [
        "--name", run_dir.name, "--train_data", str(data), "--per_gpu_batch_size", "2", "--total_steps", "3",
        "--save_freq", "1", "--eval_freq", "100",
    ]  # fmt: skip
    module = importlib.import_module(Path(script).stem)
    dataset_class = module.ReaderDataset if script == "train_reader.py" else module.RetrieverDataset
    saved = {}

    class Changing(dataset_class):
        reads = 0

        def __getitem__(self, index):
            if getattr(self.examples, "path", None) == data:
                Changing.reads += 1
                if Changing.reads == 3:  # the second batch: step 1 is trained and saved
                    saved.update({p: p.read_bytes() for p in (run_dir / "checkpoint").rglob("*") if p.is_file()})
                    blank_from(data, 0)
            return super().__getitem__(index)

    monkeypatch.setattr(module, dataset_class.__name__, Changing)
    output = run_bad(script, args, False, capsys)
    assert any(
        found_in_order(line, f"{data}, example …: not the example indexed there") for line in output.splitlines()
    )
    assert any(p.parent.name == "latest" for p in saved) and any(p.parent.name == "step-1" for p in saved)
    after = {p: p.read_bytes() for p in (run_dir / "checkpoint").rglob("*") if p.is_file()}
    assert after == saved  # nothing written since, nothing half-written
    assert not [p for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".old"))]


# ---------------------------------------------------------------------------
# Not bad input: a bug shows its traceback (and no exit 2); FID_DEBUG shows bad inputs' too
# ---------------------------------------------------------------------------

BUGS = [ValueError("a bug: bad shape"), RuntimeError("a bug in transformers"), OSError(5, "Input/output error")]


def raise_bug(error: Exception):
    def load(*args, **kwargs):
        raise error

    return load


@pytest.mark.parametrize("error", BUGS, ids=lambda e: type(e).__name__)
def test_a_bug_is_not_reported_as_bad_input(world, capsys, monkeypatch, error):
    monkeypatch.setattr(FiDT5, "load", raise_bug(error))
    module = importlib.import_module("test_reader")
    args = [fill(a, world) for a in TEST_READER_DEFAULTS]
    try:
        with pytest.raises(type(error)) as raised:  # out of cli(): python prints its traceback, exit 1
            cli(lambda: module.main(args))
    finally:
        close_loggers()
    assert raised.value is error
    assert "error:" not in capsys.readouterr().err


def test_a_bug_shows_its_traceback_end_to_end(world):
    """As `python test_reader.py`, with the reader's loader broken: a traceback and exit 1."""
    code = (
        "import runpy, sys\n"
        "from src.reader.model import FiDT5\n"
        "def load(*args, **kwargs):\n"
        "    raise ValueError('a bug in the loader')\n"
        "FiDT5.load = load\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("FID_DEBUG", None)
    args = [fill(a, world) for a in TEST_READER_DEFAULTS]
    proc = subprocess.run(
        [sys.executable, "-c", code, "test_reader.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "ValueError: a bug in the loader" in proc.stderr
    assert "error: a bug" not in proc.stderr


def test_fid_debug_shows_the_traceback_of_a_bad_input(world, capsys, monkeypatch):
    monkeypatch.setenv("FID_DEBUG", "1")
    module = importlib.import_module("test_reader")
    args = [fill(a, world) for a in [*TEST_READER_DEFAULTS, "--eval_data", "{bad}/nothing.json"]]
    try:
        with pytest.raises(InputError, match="nothing.json: no such file"):
            cli(lambda: module.main(args))
    finally:
        close_loggers()


def test_a_bad_input_is_one_line_on_the_terminal_and_kept_in_run_log(world, capsys):
    """A training run has a run.log by the time its data is read: the error goes there too."""
    args = [*TRAIN_READER_DEFAULTS, "--name", "logged", "--train_data", "{bad}/no_target.json"]
    output = run_bad("train_reader.py", [fill(a, world) for a in args], False, capsys)
    assert [line for line in output.splitlines() if "no 'target'" in line] == [
        f"error: {world['bad']}/no_target.json, example 1 (id q0): no 'target' and no 'answers' to train on"
    ]
    log = (Path(world["root"]) / "runs" / "logged" / "run.log").read_text()
    assert "ERROR " + f"{world['bad']}/no_target.json, example 1 (id q0): no 'target'" in log


def test_what_a_process_tells_the_others_keeps_bugs_apart():
    """Under torchrun a stopping rank sends its failure to the others (src/corpus/search.py):
    a bad input stays one line (PeerFailed, exit 2), a bug arrives with its traceback."""
    try:
        raise ValueError("a bug: bad shape")
    except ValueError as e:
        bad_input, message = failure(e)
    assert not bad_input and "Traceback" in message and "ValueError: a bug: bad shape" in message
    error = peer_error((bad_input, message), "rank 1: ")
    assert not isinstance(error, InputError) and str(error).startswith("rank 1: Traceback")
    assert failure(FileNotFoundError(2, "No such file or directory", "x.json"))[0]
    sent = failure(DataError("q.json, example 2: missing or non-string 'question'"))
    assert sent == (True, "q.json, example 2: missing or non-string 'question'")
    error = peer_error(sent, "rank 0 stopped: ")
    assert isinstance(error, PeerFailed) and str(error) == "rank 0 stopped: " + sent[1]
