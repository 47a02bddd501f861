"""What a new user reads: every flag of every script has a description in --help that states
its default once, and the silent pitfalls (a warmup longer than the run, ctxs never read
because --n_context was left at 1) get one warning with the numbers."""

import argparse
import json
import logging
import re

import numpy as np
import pytest
from test_flags import parser_of  # the parser a script's main builds, stopped at parse

import generate_passage_embeddings
import passage_retrieval
import preprocess
import run_loop
import test_reader
import train_reader
import train_retriever
from src.cli import close_loggers
from src.data.datasets import unread_ctxs
from src.toy.tiny_models import save_tiny_t5
from src.train.config import OptimConfig
from src.train.optim import schedule_pitfalls

OPTIONS_SCRIPTS = [train_reader, test_reader, train_retriever, generate_passage_embeddings, passage_retrieval]


def all_parsers(parser: argparse.ArgumentParser, name: str):
    """(name, parser) of a parser and of its sub-commands (preprocess.py's modes)."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for mode, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {mode}")


def rendered_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The text --help prints for one flag, with what the formatter appends ("(default: X)")."""
    text = parser._get_formatter()._get_help_string(action) or ""
    return text % dict(vars(action), prog=parser.prog, default=action.default)


@pytest.fixture(scope="module")
def parsers():
    mp = pytest.MonkeyPatch()
    out = [(m.__name__, parser_of(m, mp)) for m in OPTIONS_SCRIPTS]
    out += [("preprocess", preprocess.build_parser()), ("run_loop", run_loop.build_parser())]
    return [pair for name, top in out for pair in all_parsers(top, name)]


def test_every_flag_of_every_script_is_described_with_its_default_stated_once(parsers):
    assert len(parsers) >= 7 + 4  # the seven scripts and preprocess.py's four modes
    problems = []
    for name, parser in parsers:
        for action in parser._actions:
            if action.dest == "help" or isinstance(action, argparse._SubParsersAction):
                continue
            flag = "/".join(action.option_strings) or action.dest
            text = rendered_help(parser, action)
            if not (action.help or "").strip():
                problems.append(f"{name} {flag}: no description")
            stated = len(re.findall(r"\bdefault\b|\bunset\b", text, re.IGNORECASE))
            if stated > 1:
                problems.append(f"{name} {flag}: default stated {stated} times: {text}")
            if "(default: None)" in text or "(default: False)" in text:
                problems.append(f"{name} {flag}: says nothing about its default: {text}")
    assert not problems, "\n".join(problems)


def test_a_flag_with_a_value_shows_it_once_and_the_texts_say_what_happens(parsers):
    helps = {(name, f): rendered_help(p, a) for name, p in parsers for a in p._actions for f in a.option_strings}
    assert helps[("run_loop", "--reader_steps")] == "train_reader.py --total_steps (default: 300)"
    assert helps[("run_loop", "--reader_model")].count("t5-base") == 1
    assert "(default: None)" not in helps[("run_loop", "--reader_model")]
    loss = helps[("train_retriever", "--retriever_loss")]
    assert ",;" not in loss and "kl: KL(" in loss and "; emdr: EMDR" in loss and loss.endswith("(default: kl)")
    scores = helps[("test_reader", "--write_crossattention_scores")]
    assert "first --n_context ctxs" in scores and "every ctx" not in scores
    assert helps[("test_reader", "--score_kind")].count("default") == 1


def test_a_warmup_as_long_as_the_run_is_a_warning_with_the_numbers():
    linear = OptimConfig(scheduler="linear", warmup_steps=1000, total_steps=300)
    (warning,) = schedule_pitfalls(linear)
    assert "--warmup_steps 1000" in warning and "300 optimizer steps" in warning and "0.3 x --lr" in warning
    (warning,) = schedule_pitfalls(OptimConfig(scheduler="linear", warmup_steps=100, total_steps=300), 4)
    assert "75 optimizer steps" in warning and "--accumulation_steps 4" in warning  # the schedule counts updates
    assert schedule_pitfalls(OptimConfig(scheduler="linear", warmup_steps=100, total_steps=300)) == []
    assert schedule_pitfalls(OptimConfig(scheduler="fixed", warmup_steps=1000, total_steps=300)) == []
    assert schedule_pitfalls(OptimConfig(scheduler="linear", warmup_steps=0, total_steps=300)) == []


def test_ctxs_beyond_the_default_n_context_are_a_warning_with_the_numbers():
    examples = [{"question": "q", "ctxs": [{"text": "t"}] * n} for n in (10, 10, 4)]
    warning = unread_ctxs(examples, 1, "train.json")
    assert warning.startswith("train.json: its examples hold up to 10 ctxs (median 10)")
    assert "--n_context is 1" in warning and "--n_context 10" in warning
    assert unread_ctxs(examples, 10, "train.json") is None
    assert unread_ctxs([], 1, "empty.json") is None


# ---------------------------------------------------------------------------
# Through the scripts: each warning once, and the score export names its kind
# ---------------------------------------------------------------------------

WORDS = "what color does anna like red blue green title context question".split()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("help")
    t5 = save_tiny_t5(root / "t5", [" ".join(WORDS)], d_model=16, layers=1, heads=2)
    rng = np.random.default_rng(0)
    questions = [
        {
            "id": f"q{i}",
            "question": "what color does anna like",
            "answers": [str(rng.choice(["red", "blue"]))],
            "ctxs": [{"id": str(j), "title": "anna", "text": f"anna like {c}"} for j, c in enumerate(WORDS[5:8])],
        }
        for i in range(4)
    ]
    (root / "q.json").write_text(json.dumps(questions))
    return root, t5


def run_main(module, args, caplog) -> list[str]:
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger="fid"):
            module.main([str(a) for a in args])
    finally:
        close_loggers()
    return [r.getMessage() for r in caplog.records]


def test_train_reader_warns_once_for_a_long_warmup_and_unread_ctxs(small, caplog):
    root, t5 = small
    messages = run_main(train_reader, [
        "--train_data", root / "q.json", "--model_name_or_path", t5, "--checkpoint_dir", root / "runs",
        "--name", "reader", "--total_steps", "2", "--scheduler", "linear", "--warmup_steps", "5",
        "--text_maxlength", "12", "--per_gpu_batch_size", "2", "--device", "cpu",
    ], caplog)  # fmt: skip
    warmup = [m for m in messages if "--warmup_steps 5 is not below the 2 optimizer steps" in m]
    unread = [m for m in messages if "hold up to 3 ctxs" in m and "--n_context is 1" in m]
    assert len(warmup) == 1 and len(unread) == 1, messages


def test_test_reader_names_the_score_kind_it_exported(small, caplog):
    root, t5 = small
    messages = run_main(test_reader, [
        "--model_path", t5, "--eval_data", root / "q.json", "--checkpoint_dir", root / "runs", "--name", "scores",
        "--n_context", "2", "--text_maxlength", "12", "--device", "cpu", "--write_crossattention_scores",
        "--score_kind", "pdist",
    ], caplog)  # fmt: skip
    assert any("reader scores (--score_kind pdist) of the first 2 ctxs written to" in m for m in messages), messages
    assert not any("cross-attention scores written" in m for m in messages)
    assert not any("--n_context is" in m for m in messages)  # given: no warning
