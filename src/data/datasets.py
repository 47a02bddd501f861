"""Datasets and collators: question files → tensors (docs/scripts.md; papers [1] §3, [2] §3).

How a question and a passage read as text (`format_question`, `format_passage`) is shared
by the reader, the retriever and the corpus scripts, at training and at retrieval time.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from src.data.questions import example_name, facts, read_ctxs
from src.errors import DataError

logger = logging.getLogger("fid")


def format_question(question: str) -> str:
    """Question text as the reader sees it (and the retriever with the paper's recipe)."""
    return f"question: {question}"


def format_passage(title: str, text: str, no_title: bool = False) -> str:
    """Passage text as the reader sees it (and the retriever with the paper's recipe)."""
    return f"context: {text}" if no_title else f"title: {title} context: {text}"


@dataclass(frozen=True)
class TextRecipe:
    """How a retriever reads questions and passages: str.format templates with the fields
    {question}; {title}, {text} (saved in its config, src/retriever/model.py). Small and
    picklable: it travels to DataLoader workers instead of the model."""

    question_template: str = "question: {question}"
    passage_template: str = "title: {title} context: {text}"

    def format_question(self, question: str) -> str:
        return self.question_template.format(question=question)

    def format_passage(self, title: str, text: str) -> str:
        return self.passage_template.format(title=title, text=text)


# ---------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------


def unread_ctxs(examples: Sequence[dict], n_context: int, source: str) -> str | None:
    """A warning when the examples hold more ctxs than `n_context` reads (call it when --n_context
    was left at its default of 1): the rest are silently never read or scored."""
    n_ctxs = facts(examples).n_ctxs
    if not len(n_ctxs) or int(n_ctxs.max()) <= n_context:
        return None
    return (
        f"{source}: its examples hold up to {int(n_ctxs.max())} ctxs (median {int(np.median(n_ctxs))}), but "
        f"--n_context is {n_context} (its default): only the first {n_context} of each example are read; "
        f"pass --n_context {int(n_ctxs.max())} to read them all"
    )


class ReaderDataset(torch.utils.data.Dataset):
    """Question + its first `n_context` passages, as strings.

    `examples`: a list, or a question_index.QuestionFile (each item read from disk when
    asked). The training target is `target` if given, else a random answer; the choice is a
    function of (seed, epoch, index) so a resumed run sees the same targets. With
    `first_answer` (scoring the gold answer, scores.py) it is the first answer instead.
    """

    def __init__(
        self,
        examples: Sequence[dict],
        n_context: int,
        no_title: bool = False,
        seed: int = 0,
        source: str = "",
        first_answer: bool = False,
    ):
        self.examples = examples
        self.first_answer = first_answer
        self.n_context = n_context
        self.no_title = no_title
        self.seed, self.epoch = seed, 0
        short = int((facts(examples).n_ctxs < n_context).sum())
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

    def target(self, ex: dict, index: int) -> str | None:
        if "target" in ex:
            return ex["target"]
        answers = ex.get("answers") or []
        if not answers:
            return None
        if self.first_answer:
            return answers[0]
        return random.Random(f"{self.seed}-{self.epoch}-{index}").choice(answers)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.examples[index]
        question = format_question(ex["question"])
        ctxs = read_ctxs(ex, self.n_context)
        passages = [f"{question} {format_passage(c.get('title', ''), c['text'], self.no_title)}" for c in ctxs]
        return {"index": index, "question": question, "target": self.target(ex, index), "passages": passages}


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
    """Labels (B, T) ending in exactly one EOS, padding −100.

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
    return labels


class ReaderBatch(NamedTuple):
    index: torch.Tensor  # (B,) positions of the examples in the dataset
    labels: torch.Tensor | None  # (B, T) target ids ending in one EOS, padding −100; None without targets
    context_ids: torch.Tensor  # (B, N, L) question + passage tokens
    context_mask: torch.Tensor  # (B, N, L); a missing passage is all zeros


class ReaderCollator:
    """Examples of a ReaderDataset → one ReaderBatch."""

    def __init__(self, tokenizer, text_maxlength: int, n_context: int, answer_maxlength: int = -1):
        self.tokenizer = tokenizer
        self.text_maxlength = text_maxlength
        self.n_context = n_context
        self.answer_maxlength = answer_maxlength

    def __call__(self, batch: list[dict[str, Any]]):
        index = torch.tensor([item["index"] for item in batch])
        targets = [item["target"] for item in batch]
        labels = None
        if all(t is not None for t in targets):
            labels = encode_targets(self.tokenizer, targets, self.answer_maxlength)
        ids, mask = encode_passages(
            self.tokenizer, [item["passages"] for item in batch], self.n_context, self.text_maxlength
        )
        return ReaderBatch(index, labels, ids, mask)


# ---------------------------------------------------------------------------
# Retriever
# ---------------------------------------------------------------------------


class RetrieverDataset(torch.utils.data.Dataset):
    """Question, its first `n_context` passages and their gold scores (the reader's).

    `texts`: the retriever's TextRecipe (`Retriever.text_recipe`); None: the paper's
    (`format_question`, `format_passage` with `no_title`)."""

    def __init__(
        self,
        examples: Sequence[dict],
        n_context: int,
        no_title: bool = False,
        source: str = "data",
        texts: TextRecipe | None = None,
    ):
        self.examples = examples
        self.n_context = n_context
        self.no_title = no_title
        self.texts = texts
        self.check(examples, n_context, source)

    @staticmethod
    def check(examples: Sequence[dict], n_context: int, source: str = "data") -> None:
        """DataError for an example without ctxs or an unscored ctx among its first n_context."""
        known = facts(examples)  # from the index of a QuestionFile: nothing read here
        unscored = known.first_unscored < np.minimum(known.n_ctxs, n_context)
        bad = np.flatnonzero((known.n_ctxs == 0) | unscored)
        if len(bad):
            i = int(bad[0])
            ex = examples[i]
            if not known.n_ctxs[i]:
                raise DataError(f"{source}, {example_name(i, ex)}: no ctxs to train the retriever on")
            raise DataError(
                f"{source}, {example_name(i, ex)}: ctx {known.first_unscored[i]} has no 'score' "
                "(gold scores come from test_reader.py --write_crossattention_scores)"
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.examples[index]
        ctxs = read_ctxs(ex, self.n_context)
        if self.texts is None:
            question = format_question(ex["question"])
            passages = [format_passage(c.get("title", ""), c["text"], self.no_title) for c in ctxs]
        else:
            question = self.texts.format_question(ex["question"])
            passages = [self.texts.format_passage(c.get("title", ""), c["text"]) for c in ctxs]
        return {"index": index, "question": question, "passages": passages, "scores": [float(c["score"]) for c in ctxs]}


class RetrieverBatch(NamedTuple):
    index: torch.Tensor  # (B,)
    question_ids: torch.Tensor  # (B, Lq)
    question_mask: torch.Tensor  # (B, Lq)
    passage_ids: torch.Tensor  # (B, N, Lp)
    passage_mask: torch.Tensor  # (B, N, Lp); a missing passage is all zeros
    gold_scores: torch.Tensor  # (B, N) the reader's scores; −inf for a missing passage


class RetrieverCollator:
    """Examples of a RetrieverDataset → one RetrieverBatch.

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
        return RetrieverBatch(index, q["input_ids"], q["attention_mask"], passage_ids, passage_mask, gold)
