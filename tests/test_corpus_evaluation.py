"""Reader EM, DPR hasanswer, top-k accuracy and the --evaluate_only command line."""

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from src.metrics import dpr_tokens, has_answer, mean_em, retrieval_hits, top_k_accuracy, top_k_accuracy_at

ROOT = Path(__file__).resolve().parent.parent


def test_dpr_tokens():
    assert dpr_tokens("Hello, World! U.S.A.") == ["hello", ",", "world", "!", "u", ".", "s", ".", "a", "."]
    assert dpr_tokens("don't 3.14 e-mail") == ["don", "'", "t", "3", ".", "14", "e", "-", "mail"]
    # NFD: an accented letter becomes letter + combining mark, still one token
    assert dpr_tokens("Café") == ["cafe\u0301"]


@pytest.mark.parametrize(
    "answers, text, expected",
    [
        (["Paris"], "Paris is the capital of France.", True),  # answer at the start
        (["France"], "Paris is the capital of France", True),  # at the very end, no punctuation
        (["France"], "Paris is the capital of France.", True),  # end, before punctuation
        (["paris"], "PARIS, the city", True),  # case
        (["Art"], "a party of artists", False),  # partial words never match
        (["par"], "Paris", False),
        (["New York"], "new  york city", True),  # whitespace differences
        (["New York"], "New-York", False),  # '-' is a token of its own
        (["York New"], "New York", False),  # order matters
        (["U.S."], "the U.S. army", True),
        (["U.S."], "the US army", False),
        (["Ahärôn"], 'Aaron ( or ; "Ahärôn") is a prophet', True),  # accents, inside quotes/parens
        (["Aharon"], 'Aaron ( or ; "Ahärôn") is a prophet', False),  # accents are not stripped
        (["Curie"], "Marie Curie's prize", True),  # possessive split into ', s
        ([unicodedata.normalize("NFC", "Café")], unicodedata.normalize("NFD", "the Café opened"), True),
        ([unicodedata.normalize("NFD", "Café")], unicodedata.normalize("NFC", "the Café opened"), True),
        (["1889"], "built in 1889.", True),
        (["1889"], "built in 18890", False),
        (["$5"], "it costs $5 now", True),
        (["wrong", "Tokyo"], "Tokyo is the capital", True),  # any answer
        ([], "anything", False),
        ([""], "anything", False),  # an empty answer matches nothing
        (["Paris"], "", False),
    ],
)
def test_has_answer(answers, text, expected):
    assert has_answer(answers, text) is expected


def test_top_k_accuracy():
    hits = [
        [False, True, False],  # first hit at rank 2
        [True, True, False],  # rank 1
        [False, False, False],  # never
        [False, False, True],  # rank 3
    ]
    assert top_k_accuracy(hits) == [0.25, 0.5, 0.75]
    # shorter rankings count as misses for no k, hits for every k after their first hit
    assert top_k_accuracy([[True], [False, False, True], []]) == pytest.approx([1 / 3, 1 / 3, 2 / 3])
    assert top_k_accuracy([]) == []
    assert top_k_accuracy([[], []]) == []


def test_top_k_accuracy_at():
    hits = [[False, True, False], [True, True, False], [False, False, False], [False, False, True]]
    assert top_k_accuracy_at(hits, (1, 2, 3)) == {1: 0.25, 2: 0.5, 3: 0.75}
    # k beyond the longest ranking: whole lists; the k's come back in the order asked
    assert top_k_accuracy_at(hits, (20, 1)) == {20: 0.75, 1: 0.25}
    assert top_k_accuracy_at([], (1, 5)) == {1: 0.0, 5: 0.0}
    assert top_k_accuracy_at([[], []], (1,)) == {1: 0.0}


def test_mean_em():
    # SQuAD normalisation, best of the gold answers; pairs without gold answers are left out
    predictions = ["The Eiffel tower!", "london", "anything", "Rome", "x"]
    gold = [["eiffel tower"], ["Paris"], None, ["Roma", "rome"], []]
    assert mean_em(predictions, gold) == (2 / 3, 3)
    assert mean_em(["a"], [None]) == (None, 0)
    assert mean_em([], []) == (None, 0)


def test_retrieval_hits_with_workers_matches_serial():
    answers = [["Paris"], ["Tokyo"], ["art"], ["Nile"]] * 10
    texts = [["Paris is big", "no"], ["x", "Tokyo!"], ["party"], []] * 10
    serial = retrieval_hits(answers, texts, workers=1)
    assert serial[:4] == [[True, False], [False, True], [False], []]
    assert retrieval_hits(answers, texts, workers=2) == serial


def test_evaluate_only_cli_on_a_dpr_style_file(tmp_path):
    """DPR's own files say `has_answer` and string scores; we recompute `hasanswer` from the text."""
    data = [
        {
            "question": "capital of france?",
            "answers": ["Paris"],
            "ctxs": [
                {"id": "wiki:3", "title": "Lyon", "text": "Lyon is a city.", "score": "80.1", "has_answer": False},
                {"id": "wiki:1", "title": "Paris", "text": "Paris, capital.", "score": "79.0", "has_answer": True},
            ],
        },
        {
            "question": "longest river?",
            "answers": ["Nile"],
            "ctxs": [{"id": "5", "title": "Nile", "text": "The Nile.", "score": "70", "hasanswer": False}],
        },
        {"question": "no answers here", "ctxs": [{"title": "t", "text": "x"}]},
        {"question": "no ctxs", "answers": ["x"]},
    ]
    src = tmp_path / "dpr.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "passage_retrieval.py", "--evaluate_only", "--data", str(src), "--output_path", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    # questions with answers: 3 (the one without ctxs is a miss); top-1: 1/3, top-2: 2/3
    assert "top-1 33.33%" in proc.stdout
    log = Path(f"{out}.log").read_text()
    assert "1:0.3333 2:0.6667" in log
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [c["hasanswer"] for c in written[0]["ctxs"]] == [False, True]
    assert written[0]["ctxs"][0]["score"] == "80.1"  # other fields untouched
    assert written[1]["ctxs"][0]["hasanswer"] is True
    assert written[2]["ctxs"][0]["hasanswer"] is False
    assert "ctxs" not in written[3]
