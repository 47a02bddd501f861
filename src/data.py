"""Question files in and out, datasets and collators (SPEC §2, §3, §5).

Question file: a JSON list or JSON lines, one example per entry:
`{id?, question, target?, answers?, ctxs: [{id?, title, text, score?, hasanswer?}]}`.
Unknown fields are kept and written back untouched.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .util import atomic_write

logger = logging.getLogger("fid")


class DataError(ValueError):
    """A question file that does not follow the format; the message names file and example."""


# ---------------------------------------------------------------------------
# Question files
# ---------------------------------------------------------------------------


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
    """'file, line N: invalid JSON (...)', saying when the file is empty or ends early (truncated).
    `lineno`: the line of a JSON lines file that `e` is about."""
    if not e.doc.strip() and lineno is None:
        return DataError(f"{path}: empty file (expected {expected})")
    hint = ""
    if e.msg.startswith("Unterminated string") or e.pos >= len(e.doc.rstrip()):
        hint = (
            "; the text ends in the middle of a value: is the file truncated?"
            if lineno is None
            else "; the line ends in the middle of a value: truncated, or one example over several lines? "
            "(JSON lines hold one whole example per line)"
        )
    elif e.msg == "Extra data" and lineno is None:
        hint = "; one example per line? name the file .jsonl"
    line = e.lineno if lineno is None else lineno
    return DataError(f"{path}, line {line}: invalid JSON ({e.msg}, column {e.colno}{hint})")


def _read_entries(path: Path) -> list[tuple[str, Any]]:
    """(where, entry) pairs; `where` is 'line N' for JSON lines, 'example N' for a JSON list."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a question file")
    try:
        if path.suffix == ".jsonl":
            entries, blank = [], True
            with open(path, encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    blank = False
                    try:
                        entries.append((f"line {lineno}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise json_error(path, e, lineno) from None
            if blank:
                raise DataError(f"{path}: empty file (expected JSON lines, one example per line)")
            return entries
        with open(path, encoding="utf-8-sig") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise json_error(path, e) from None
    except UnicodeDecodeError:
        raise utf8_error(path) from None
    if isinstance(data, dict):
        keys = ", ".join(repr(k) for k in list(data)[:5]) + (", ..." if len(data) > 5 else "")
        raise DataError(
            f"{path}: expected a JSON list of examples [{{...}}, ...] (or JSON lines, one example per line, "
            f"in a .jsonl file), found a JSON object {{{keys}}}"
        )
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of examples (or a .jsonl file), got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: no examples (an empty JSON list)")
    return [(f"example {i}", ex) for i, ex in enumerate(data)]


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
    ctxs = ex.get("ctxs", [])
    if not isinstance(ctxs, list):
        raise DataError(f"{where}: 'ctxs' must be a list")
    for j, c in enumerate(ctxs):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise DataError(f"{where}, ctx {j}: expected an object with a string 'text'")
        if "title" in c and not isinstance(c["title"], str):
            raise DataError(f"{where}, ctx {j}: 'title' must be a string")
        if "score" in c:
            parse_score(c["score"], f"{where}, ctx {j}")


def load_questions(path: str | Path, maxload: int = -1) -> list[dict[str, Any]]:
    """Read and validate a question file; every example gets an `id` (its position if absent)."""
    path = Path(path)
    examples = []
    for k, (where, ex) in enumerate(_read_entries(path)):
        if 0 <= maxload <= k:
            break
        validate_example(ex, f"{path}, {where}")
        if "id" not in ex:
            ex["id"] = k
        examples.append(ex)
    return examples


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
            if jsonl:
                f.write(json.dumps(ex, ensure_ascii=False) + "\n")
            else:
                f.write(",\n" if k else "\n")
                f.write(json.dumps(ex, indent=1, ensure_ascii=False))
        if not jsonl:
            f.write("\n]\n")


def format_question(question: str) -> str:
    """Question text as the reader and the retriever see it (also at retrieval time)."""
    return f"question: {question}"


def format_passage(title: str, text: str, no_title: bool = False) -> str:
    """Passage text as the reader and the retriever see it."""
    return f"context: {text}" if no_title else f"title: {title} context: {text}"


def sort_ctxs_by_score(ex: dict[str, Any]) -> None:
    """Best first when scores are present (stable: ties keep file order); else file order is the ranking."""
    ctxs = ex.get("ctxs") or []
    if ctxs and all("score" in c for c in ctxs):
        ctxs.sort(key=lambda c: float(c["score"]), reverse=True)


# ---------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------


class ReaderDataset(torch.utils.data.Dataset):
    """Question + its first `n_context` passages, as strings.

    The training target is `target` if given, else a random answer; the choice is a
    function of (seed, epoch, index) so a resumed run sees the same targets.
    """

    def __init__(self, examples: list[dict], n_context: int, no_title: bool = False, seed: int = 0, source: str = ""):
        self.examples = examples
        self.n_context = n_context
        self.no_title = no_title
        self.seed, self.epoch = seed, 0
        short = 0
        for ex in examples:
            sort_ctxs_by_score(ex)
            short += len(ex.get("ctxs") or []) < n_context
        if short:
            logger.warning(
                "%s: %d of %d examples have fewer than %d ctxs; the missing passages are fully masked",
                source or "data",
                short,
                len(examples),
                n_context,
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def target(self, index: int) -> str | None:
        ex = self.examples[index]
        if "target" in ex:
            return ex["target"]
        answers = ex.get("answers") or []
        if not answers:
            return None
        return random.Random(f"{self.seed}-{self.epoch}-{index}").choice(answers)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.examples[index]
        question = format_question(ex["question"])
        ctxs = (ex.get("ctxs") or [])[: self.n_context]
        passages = [f"{question} {format_passage(c.get('title', ''), c['text'], self.no_title)}" for c in ctxs]
        return {"index": index, "question": question, "target": self.target(index), "passages": passages}


def encode_passages(tokenizer, passages: list[list[str]], n_context: int, max_length: int):
    """Token ids (B, N, L) and mask (B, N, L); no special tokens, as the original's tokenizer.

    Each passage is truncated/padded to L = max_length. Missing passages (fewer than
    N) are all padding with an all-zero mask: the model ignores them.
    """
    pad = tokenizer.pad_token_id
    flat = [p for ps in passages for p in ps]
    enc = tokenizer(flat, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"] if flat else []
    ids = torch.full((len(passages), n_context, max_length), pad, dtype=torch.long)
    mask = torch.zeros((len(passages), n_context, max_length), dtype=torch.long)
    k = 0
    for b, ps in enumerate(passages):
        for n in range(len(ps)):
            tokens = enc[k]
            k += 1
            ids[b, n, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[b, n, : len(tokens)] = 1
    return ids, mask


def encode_targets(tokenizer, targets: list[str], answer_maxlength: int = -1):
    """Labels (B, T) ending in exactly one EOS, padding −100, and the mask (B, T).

    Whatever the tokenizer appends by itself is not used (add_special_tokens=False);
    EOS is appended here, once. With answer_maxlength > 0, T is exactly that length.
    """
    eos = tokenizer.eos_token_id
    enc = tokenizer(targets, add_special_tokens=False)["input_ids"]
    seqs = [tokens + [eos] for tokens in enc]
    if answer_maxlength > 0:
        seqs = [s[:answer_maxlength] for s in seqs]
        length = answer_maxlength
    else:
        length = max(len(s) for s in seqs)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    for b, s in enumerate(seqs):
        labels[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return labels, (labels != -100).long()


class ReaderCollator:
    """Batch = (index (B,), labels (B,T) | None, label_mask (B,T) | None, context_ids (B,N,L), context_mask (B,N,L))."""

    def __init__(self, tokenizer, text_maxlength: int, n_context: int, answer_maxlength: int = -1):
        self.tokenizer = tokenizer
        self.text_maxlength = text_maxlength
        self.n_context = n_context
        self.answer_maxlength = answer_maxlength

    def __call__(self, batch: list[dict[str, Any]]):
        index = torch.tensor([item["index"] for item in batch])
        targets = [item["target"] for item in batch]
        labels = label_mask = None
        if all(t is not None for t in targets):
            labels, label_mask = encode_targets(self.tokenizer, targets, self.answer_maxlength)
        ids, mask = encode_passages(
            self.tokenizer, [item["passages"] for item in batch], self.n_context, self.text_maxlength
        )
        return index, labels, label_mask, ids, mask


def require_targets(examples: list[dict], path: str) -> None:
    """Training needs a target or a non-empty answers list for every example."""
    for i, ex in enumerate(examples):
        if "target" not in ex and not ex.get("answers"):
            raise DataError(f"{path}, example {i} (id {ex.get('id')}): no 'target' and no 'answers' to train on")


# ---------------------------------------------------------------------------
# Retriever
# ---------------------------------------------------------------------------


class RetrieverDataset(torch.utils.data.Dataset):
    """Question, its first `n_context` passages and their gold scores (the reader's)."""

    def __init__(self, examples: list[dict], n_context: int, no_title: bool = False, source: str = "data"):
        self.examples = examples
        self.n_context = n_context
        self.no_title = no_title
        for i, ex in enumerate(examples):
            sort_ctxs_by_score(ex)  # the best n_context by gold score, as the original
            ctxs = ex.get("ctxs") or []
            if not ctxs:
                raise DataError(f"{source}, example {i} (id {ex.get('id')}): no ctxs to train the retriever on")
            missing = [j for j, c in enumerate(ctxs[:n_context]) if "score" not in c]
            if missing:
                raise DataError(
                    f"{source}, example {i} (id {ex.get('id')}): ctx {missing[0]} has no 'score' "
                    "(gold scores come from test_reader.py --write_crossattention_scores)"
                )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.examples[index]
        ctxs = ex["ctxs"][: self.n_context]
        return {
            "index": index,
            "question": format_question(ex["question"]),
            "passages": [format_passage(c.get("title", ""), c["text"], self.no_title) for c in ctxs],
            "scores": [float(c["score"]) for c in ctxs],
        }


class RetrieverCollator:
    """Batch = (index (B,), question_ids (B,Lq), question_mask (B,Lq), passage_ids (B,N,Lp),
    passage_mask (B,N,Lp), gold_scores (B,N)).

    Encoded with the tokenizer's own special tokens ([CLS] … [SEP] for BERT). Missing
    passages (fewer than N ctxs) are all padding with gold score −inf: they get no
    weight in softmax(gold), and the retriever must mask its own score there too
    (`gold_scores == -inf`).
    """

    def __init__(
        self,
        tokenizer,
        n_context: int,
        question_maxlength: int = 40,
        passage_maxlength: int = 200,
        pad_questions_to_max: bool = False,
        pad_passages_to_max: bool = False,
    ):
        self.tokenizer = tokenizer
        self.n_context = n_context
        self.question_maxlength = question_maxlength
        self.passage_maxlength = passage_maxlength
        # Without masks (--no_question_mask / --no_passage_mask) the encoder attends to
        # padding, so padding must be the same everywhere: the maximum length, as the original.
        self.question_padding = "max_length" if pad_questions_to_max else "longest"
        self.passage_padding = "max_length" if pad_passages_to_max else "longest"

    def __call__(self, batch: list[dict[str, Any]]):
        index = torch.tensor([item["index"] for item in batch])
        q = self.tokenizer(
            [item["question"] for item in batch],
            max_length=self.question_maxlength,
            truncation=True,
            padding=self.question_padding,
            return_tensors="pt",
        )
        flat = [p for item in batch for p in item["passages"]]
        p = self.tokenizer(flat, max_length=self.passage_maxlength, truncation=True, padding=self.passage_padding)
        width = max(len(x) for x in p["input_ids"])
        B, N = len(batch), self.n_context
        passage_ids = torch.full((B, N, width), self.tokenizer.pad_token_id, dtype=torch.long)
        passage_mask = torch.zeros((B, N, width), dtype=torch.long)
        gold = torch.full((B, N), -math.inf)
        k = 0
        for b, item in enumerate(batch):
            for n, score in enumerate(item["scores"]):
                passage_ids[b, n] = torch.tensor(p["input_ids"][k])
                passage_mask[b, n] = torch.tensor(p["attention_mask"][k])
                gold[b, n] = score
                k += 1
        return index, q["input_ids"], q["attention_mask"], passage_ids, passage_mask, gold
