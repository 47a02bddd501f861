"""Question files, validation errors, and the reader/retriever collators."""

import json
import math

import pytest
from transformers import AutoTokenizer

from src.data.datasets import ReaderCollator, ReaderDataset, RetrieverCollator, RetrieverDataset, encode_targets
from src.data.offsets import QuestionFile
from src.data.questions import example_name, iter_entries, load_questions, require_targets, write_questions
from src.errors import DataError
from src.toy.tiny_models import build_word_tokenizer


@pytest.fixture(scope="module")
def parity_tokenizer(parity_dir):
    return AutoTokenizer.from_pretrained(parity_dir / "tokenizer")


def test_collator_matches_original_inputs(parity_dir, parity_tokenizer):
    """Passages without special tokens, targets with exactly one </s>: the ids of inputs.json."""
    expected = json.loads((parity_dir / "inputs.json").read_text())
    examples = load_questions(parity_dir / "data.json", rank=True)
    dataset = ReaderDataset(examples, n_context=3)
    collator = ReaderCollator(parity_tokenizer, text_maxlength=24, n_context=3)
    index, labels, ids, mask = collator([dataset[i] for i in range(len(dataset))])
    assert ids.shape == (6, 3, 24)
    for b, ex in enumerate(expected["examples"]):
        assert dataset[b]["passages"] == ex["passage_strings"]
        assert ids[b].tolist() == ex["input_ids"]
        assert mask[b].tolist() == ex["attention_mask"]
        assert labels[b].tolist() == ex["labels"]
        assert labels[b][labels[b] != -100].tolist() == ex["labels_unpadded"]
    # The tokenizer itself appends </s>; the collator must not add a second one.
    assert parity_tokenizer("paris")["input_ids"][-1] == parity_tokenizer.eos_token_id
    assert (labels == parity_tokenizer.eos_token_id).sum() == 6


def test_answer_maxlength_pads_and_truncates(parity_tokenizer):
    labels = encode_targets(parity_tokenizer, ["the old king", "paris"], answer_maxlength=3)
    assert labels.shape == (2, 3)
    assert labels[1].tolist()[:2] == [25, 1] and labels[1, 2] == -100
    assert (labels != -100).long().tolist() == [[1, 1, 1], [1, 1, 0]]


def test_missing_passages_are_fully_masked(parity_dir, parity_tokenizer):
    examples = load_questions(parity_dir / "data.json", rank=True)
    examples[0]["ctxs"] = examples[0]["ctxs"][:1]
    dataset = ReaderDataset(examples, n_context=3)
    _, _, ids, mask = ReaderCollator(parity_tokenizer, 24, 3)([dataset[0]])
    assert mask[0, 0].sum() > 0
    assert mask[0, 1:].sum() == 0 and (ids[0, 1:] == parity_tokenizer.pad_token_id).all()


def test_ctxs_sorted_by_numeric_or_string_score(tmp_path):
    path = tmp_path / "q.jsonl"
    ctxs = [{"title": "a", "text": "x", "score": "1.5"}, {"title": "b", "text": "y", "score": 7}]
    path.write_text(json.dumps({"question": "q?", "answers": ["x"], "ctxs": ctxs}) + "\n")
    examples = load_questions(path, rank=True)  # ranks the ctxs, once
    assert examples[0]["id"] == 0  # default id: position in the file
    assert [c["title"] for c in examples[0]["ctxs"]] == ["b", "a"]
    assert ReaderDataset(examples, n_context=1)[0]["passages"] == ["question: q? title: b context: y"]


def test_random_target_depends_on_seed_epoch_index():
    examples = [{"question": "q", "answers": [f"a{i}" for i in range(50)]}]
    ds = ReaderDataset(examples, 1, seed=3)
    first = ds[0]["target"]
    assert ds[0]["target"] == first  # deterministic within an epoch
    ds.set_epoch(1)
    seen = {ReaderDataset(examples, 1, seed=s)[0]["target"] for s in range(20)}
    assert len(seen) > 1


def test_write_and_reload_keeps_unknown_fields(tmp_path):
    examples = [
        {"id": "q1", "question": "caf\u00e9?", "answers": ["a"], "extra": {"k": [1, 2]}, "ctxs": []},
        {"id": "q2", "question": "q?", "ctxs": [], "note": "x\ud800y"},  # a lone surrogate, kept as it came
    ]
    for name in ("out.json", "out.jsonl"):
        write_questions(tmp_path / name, examples)
        assert load_questions(tmp_path / name) == examples
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert "caf\u00e9" in text and "\\ud800" in text  # UTF-8 as usual; that example \\u-escaped
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"question": "q"}, {"answers": ["a"]}]', "example 2: missing or non-string 'question'"),
        ('[{"question": "q"}, {"id": "q7", "answers": ["a"]}]', "example 2 (id q7): missing or non-string 'q"),
        ('[{"question": "q", "answers": "a"}]', "'answers' must be a list of strings"),
        ('[{"question": "q", "ctxs": [{"title": "t"}]}]', "ctx 0: expected an object with a string 'text'"),
        ('[{"question": "q", "ctxs": [{"text": "t", "score": "high"}]}]', "score 'high' is not a number"),
        ('[{"question": "q",\n "answers": [}]', "line 2: invalid JSON"),
        ('{"question": "q"}', "expected a JSON list"),
        # lone surrogates (a \\u escape without its pair) where the scripts tokenize or write text
        ('[{"question": "q"}, {"question": "a\\ud800"}]', "example 2: 'question' is not valid Unicode: a lone"),
        ('[{"question": "q", "answers": ["a", "\\udc00b"]}]', "example 1: 'answers' is not valid Unicode"),
        ('[{"question": "q", "target": "\\ud83d"}]', "example 1: 'target' is not valid Unicode"),
        ('[{"id": "\\udfff", "question": "q"}]', "example 1 (id \\udfff): 'id' is not valid Unicode"),
        ('[{"question": "q", "ctxs": [{"text": "t"}, {"text": "\\ud800"}]}]', "ctx 1: 'text' is not valid Unicode"),
        ('[{"question": "q", "ctxs": [{"title": "\\ud800", "text": "t"}]}]', "ctx 0: 'title' is not valid Unicode"),
    ],
)
def test_bad_files_name_file_and_example(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_questions(path)
    assert str(path) in str(e.value) and message in str(e.value)
    with pytest.raises(DataError) as e:  # the scripts' reader on demand: the same error
        QuestionFile(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_bad_jsonl_line_and_missing_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q"}\n\n{"question": \n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 3: invalid JSON"):
        load_questions(path)
    with pytest.raises(DataError, match="no such file"):
        load_questions(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "text",
    [
        "[", "[  \n", "[1,]", "[1 2]", "[{}\n", "[{} x", "[]x", "[1] [2]", "{}{}", "x", "[,]", '[{"a": 1,}]',
        "[1.]", "[-]", "[1e]", "[1e5, -0.5E+3, 12]", '[{"q": "a\\u00e9b"}, "open', '[\n {"a": [1, 2\n  ,3]},\n {"b":\n',
        '[{"a": "x"}, {"b": tru}]', '[{"a": "\x01"}]', '[{"a": "\\q"}]', "[NaN, -Infinity]", '{"Data": []}', "3",
    ],
)  # fmt: skip
def test_streaming_reader_reads_and_fails_as_json_load(tmp_path, text):
    """Every buffer size gives json.load's entries, or its message, line and column."""
    path = tmp_path / "file.json"
    path.write_text(text)
    try:
        expected = json.loads(text)
    except json.JSONDecodeError as e:
        expected = f"{path}, line {e.lineno}: invalid JSON ({e.msg}, column {e.colno}"
    for chunk in (1, 2, 3, 7, 1 << 20):
        try:
            got = [entry for _, entry in iter_entries(path, chunk_chars=chunk)]
        except DataError as e:
            got = str(e)
        if isinstance(expected, str):
            assert isinstance(got, str) and got.startswith(expected), (chunk, got)
        elif isinstance(expected, list):
            assert json.dumps(got) == json.dumps(expected), chunk  # NaN != NaN: compare the text
        else:
            assert "expected a JSON list of examples" in got


def test_messages_name_an_example_by_position_and_id(tmp_path):
    """1-based positions (lines of JSON lines), and the example's own id: not one a loader filled in."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 3, "question": "q"}\n{"id": "b", "question": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2 \(id b\): missing or non-string 'question'"):
        load_questions(path)
    assert example_name(0, {"id": 0}) == "example 1"  # an id that is its position: filled in by a loader
    assert example_name(4, {"id": "q4"}) == "example 5 (id q4)" and example_name(4, [1]) == "example 5"


def test_training_needs_a_target_or_answers():
    with pytest.raises(DataError, match="example 2: no 'target' and no 'answers'"):
        require_targets([{"question": "q", "answers": ["a"]}, {"question": "q", "answers": []}], "train.json")


def test_retriever_collator_shapes_and_padding():
    tok = build_word_tokenizer(["what is the capital of france paris london"], "bert")
    examples = [
        {"question": "capital of france", "ctxs": [{"title": "paris", "text": "capital", "score": 2.0}] * 3},
        {"question": "what", "ctxs": [{"title": "london", "text": "is the capital", "score": "1"}]},
    ]
    ds = RetrieverDataset(examples, n_context=3)
    index, q_ids, q_mask, p_ids, p_mask, gold = RetrieverCollator(tok, 3, 8, 16)([ds[0], ds[1]])
    assert q_ids.shape[0] == 2 and p_ids.shape[:2] == (2, 3) and gold.shape == (2, 3)
    assert q_ids[0, 0] == tok.cls_token_id  # BERT-style special tokens on the retriever side
    assert gold[1, 0] == 1.0 and math.isinf(gold[1, 1]) and p_mask[1, 1:].sum() == 0
    with pytest.raises(DataError, match="ctx 0 has no 'score'"):
        RetrieverDataset([{"question": "q", "ctxs": [{"title": "t", "text": "x"}]}], 1, source="w.json")
