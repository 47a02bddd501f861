"""A toy knowledge source for running the whole FiD loop offline, in minutes, on a CPU.

The world is generated from a seed: invented entities (syllable-composed names) with a
few attributes each, one short passage per (entity, attribute) fact, and one question
per fact. Every answer is an invented word that appears in exactly one passage of the
corpus, so the DPR `hasanswer` string test and "the passage stating the fact" agree,
and test answers are words the reader never produced in training: it has to read them.
Questions come with look-alike distractors by construction: the same entity's other
attributes (same name) and the same attribute of other entities (same key word).

Also here: a short BM25 (the first-stage retriever that gives the initial `ctxs`), a
full-corpus top-k accuracy helper, and the tiny reader/retriever model directories the
demo starts from. The reader starts with a hand-set word-matching prior (see
tiny_models.py's `word_matching_prior`), a stand-in for the pretraining the papers' t5-base brings.

Everything is invented: names, templates, values. Nothing comes from a real dataset.
"""

from __future__ import annotations

import csv
import math
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration

from src.errors import InputError
from src.metrics import retrieval_hits, top_k_accuracy_at
from src.retriever.model import Retriever
from src.toy.tiny_models import build_word_tokenizer, save_tiny_bert, tiny_t5_config, word_matching_prior

# ---------------------------------------------------------------------------
# The world: entities, attributes, passages, questions
# ---------------------------------------------------------------------------

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "st"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "", "n", "r", "l", "s"]


@dataclass(frozen=True)
class Attribute:
    """One kind of fact. `{e}` is the entity, `{v}` the two-word value."""

    name: str
    passage_templates: tuple[str, ...]
    question_templates: tuple[str, ...]


ATTRIBUTES: tuple[Attribute, ...] = (
    # Every template of an attribute shares one key word (born, trade, pet, dish,
    # instrument, river) with its questions, and no other attribute uses it.
    Attribute(
        "birthplace",
        ("{e} was born in the town of {v} .", "born in {v} , {e} never saw the sea ."),
        ("where was {e} born ?", "in which town was {e} born ?", "what place was {e} born in ?"),
    ),
    Attribute(
        "trade",
        ("by trade {e} is a {v} .", "{e} earns a living as a {v} , a fine trade ."),
        ("what is the trade of {e} ?", "what trade does {e} follow ?", "by trade , what is {e} ?"),
    ),
    Attribute(
        "pet",
        ("{e} keeps a {v} as a pet .", "the pet of {e} is a {v} that sleeps all day ."),
        ("what pet does {e} keep ?", "which animal is the pet of {e} ?", "what kind of pet has {e} got ?"),
    ),
    Attribute(
        "dish",
        ("the favourite dish of {e} is {v} with bread .", "{e} cooks a dish of {v} on feast days ."),
        ("what is the favourite dish of {e} ?", "which dish does {e} cook ?", "what dish does {e} love most ?"),
    ),
    Attribute(
        "instrument",
        ("{e} plays an instrument called the {v} .", "the instrument of {e} is the {v} ."),
        ("which instrument does {e} play ?", "what instrument is played by {e} ?", "what is the instrument of {e} ?"),
    ),
    Attribute(
        "river",
        ("{e} lives near the river {v} .", "the house of {e} stands on the bank of the river {v} ."),
        (
            "near which river does {e} live ?",
            "on which river is the house of {e} ?",
            "what river flows by the home of {e} ?",
        ),
    ),
)


@dataclass
class ToyWorld:
    passages: list[dict]  # {"id", "title", "text"}
    train: list[dict]  # {"id", "question", "answers", "target"} (no ctxs yet)
    dev: list[dict]
    test: list[dict]
    facts: list[tuple[str, str, str]] = field(default_factory=list)  # (entity, attribute, value)

    def texts(self) -> list[str]:
        """Text to build tokenizers from: the corpus plus the question templates (never the
        question files themselves, so nothing about any split leaks into the vocabulary)."""
        templates = [t.format(e="", v="") for a in ATTRIBUTES for t in a.question_templates]
        formatting = ["question : title : context :"]
        return [p["title"] + " " + p["text"] for p in self.passages] + templates + formatting


def _word_pool(rng: random.Random, n: int, taken: set[str], syllables: tuple[int, int]) -> list[str]:
    pool: list[str] = []
    while len(pool) < n:
        k = rng.randint(*syllables)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(k))
        if word not in taken and len(word) >= 4:
            taken.add(word)
            pool.append(word)
    return pool


def make_world(seed: int = 0, n_entities: int = 500, n_dev: int = 250, n_test: int = 250) -> ToyWorld:
    """Generate the toy world deterministically from `seed`.

    n_entities × len(ATTRIBUTES) passages and as many questions (one per fact); dev and
    test questions are disjoint from train (different facts, same entities). Every value
    is a word of its own, so each answer occurs in exactly one passage of the corpus.
    """
    rng = random.Random(seed)
    template_words = {w for a in ATTRIBUTES for t in a.passage_templates + a.question_templates for w in t.split()}
    taken = template_words | {"question", "title", "context"}
    entities = _word_pool(rng, n_entities, taken, (2, 3))
    passages: list[dict] = []
    facts: list[tuple[str, str, str]] = []
    questions: list[dict] = []
    for attr in ATTRIBUTES:
        values = _word_pool(rng, n_entities, taken, (2, 3))
        for entity, value in zip(entities, values):
            facts.append((entity, attr.name, value))
            text = rng.choice(attr.passage_templates).format(e=entity, v=value)
            passages.append({"title": entity, "text": text})
            question = rng.choice(attr.question_templates).format(e=entity)
            questions.append({"question": question, "answers": [value], "target": value})
    # Shuffle so passage ids and question order carry no information about the fact.
    order = list(range(len(passages)))
    rng.shuffle(order)
    passages = [{"id": str(i + 1), **passages[j]} for i, j in enumerate(order)]
    facts = [facts[j] for j in order]
    questions = [{"id": f"toy-{i}", **questions[j]} for i, j in enumerate(order)]
    n_train = len(questions) - n_dev - n_test
    if n_train <= 0:
        raise InputError(
            f"{n_entities} toy entities give {len(questions)} questions: n_dev + n_test = {n_dev + n_test} leaves "
            "none for training (raise --toy_entities)"
        )
    return ToyWorld(
        passages=passages,
        train=questions[:n_train],
        dev=questions[n_train : n_train + n_dev],
        test=questions[n_train + n_dev :],
        facts=facts,
    )


# ---------------------------------------------------------------------------
# First stage: BM25
# ---------------------------------------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)


def bm25_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 over a list of documents, sparse scoring with numpy.

    score(q, d) = Σ_{t ∈ q} idf(t) · tf(t,d)·(k1+1) / (tf(t,d) + k1·(1 − b + b·|d|/avgdl)),
    idf(t) = log(1 + (n − df + 0.5)/(df + 0.5)) (the non-negative Lucene form).
    """

    def __init__(self, documents: Sequence[str], k1: float = 1.2, b: float = 0.75):
        self.n = len(documents)
        tokenized = [bm25_tokens(d) for d in documents]
        lengths = np.array([len(t) for t in tokenized], dtype=np.float32)
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-9))  # (n,)
        # Postings: term -> (doc indices, BM25 tf weights); idf applied at query time.
        postings: dict[str, tuple[list[int], list[float]]] = {}
        for doc, tokens in enumerate(tokenized):
            for term, tf in Counter(tokens).items():
                docs, weights = postings.setdefault(term, ([], []))
                docs.append(doc)
                weights.append(tf * (k1 + 1) / (tf + norm[doc]))
        self.postings = {
            t: (np.array(d, dtype=np.int64), np.array(w, dtype=np.float32)) for t, (d, w) in postings.items()
        }
        self.idf = {t: math.log(1 + (self.n - len(d) + 0.5) / (len(d) + 0.5)) for t, (d, _) in self.postings.items()}

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query`, shape (n,)."""
        out = np.zeros(self.n, dtype=np.float32)
        for term in bm25_tokens(query):
            if term in self.postings:
                docs, weights = self.postings[term]
                out[docs] += self.idf[term] * weights
        return out

    def topk(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and scores of the k best documents, best first (ties broken by index)."""
        return top_k(self.scores(query), k)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = np.lexsort((part, -scores[part]))  # descending score, then ascending index
    return part[order], scores[part[order]]


def add_bm25_ctxs(questions: list[dict], passages: list[dict], n_docs: int, bm25: BM25 | None = None) -> BM25:
    """Attach the BM25 top `n_docs` passages as `ctxs` (with `score`), in place."""
    bm25 = bm25 or BM25([p["title"] + " " + p["text"] for p in passages])
    for q in questions:
        idx, sc = bm25.topk(q["question"], n_docs)
        q["ctxs"] = [
            {"id": passages[i]["id"], "title": passages[i]["title"], "text": passages[i]["text"], "score": float(s)}
            for i, s in zip(idx, sc)
        ]
    return bm25


# ---------------------------------------------------------------------------
# Top-k accuracy over the whole corpus, for any scoring
# ---------------------------------------------------------------------------


def topk_accuracy(
    questions: list[dict],
    passages: list[dict],
    score_fn: Callable[[dict], np.ndarray],
    ks: Iterable[int] = (1, 5, 20),
) -> dict[int, float]:
    """Share of questions with an answer-bearing passage in the top k of the whole corpus.

    `score_fn(question) -> (n_passages,)` scores every passage; the rankings' hits and
    accuracy are evaluation.py's (DPR hasanswer on the passage text, as
    passage_retrieval.py does).
    """
    ks = sorted(ks)
    rankings = [top_k(score_fn(q), ks[-1])[0] for q in questions]
    hits = retrieval_hits([q["answers"] for q in questions], [[passages[i]["text"] for i in idx] for idx in rankings])
    return top_k_accuracy_at(hits, ks)


# ---------------------------------------------------------------------------
# Files on disk
# ---------------------------------------------------------------------------


def write_passages_tsv(path: str | Path, passages: list[dict]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "text", "title"])
        for p in passages:
            writer.writerow([p["id"], p["text"], p["title"]])
    tmp.replace(path)


# ---------------------------------------------------------------------------
# Tiny models: a reader with a word-matching prior, a random-start retriever
# ---------------------------------------------------------------------------


def build_reader(
    path: str | Path, world: ToyWorld, d_model: int = 64, layers: int = 2, heads: int = 4, seed: int = 0
) -> Path:
    """Tokenizer + tiny T5 with the word-matching prior, saved as an ordinary model directory."""
    path = Path(path)
    tokenizer = build_word_tokenizer(world.texts(), "t5")
    torch.manual_seed(seed)
    config = tiny_t5_config(len(tokenizer), d_model=d_model, layers=layers, heads=heads, d_ff=2 * d_model)
    config.d_kv = d_model  # wide heads: the matching head needs all content dims (see the prior)
    model = T5ForConditionalGeneration(config)
    word_matching_prior(model, tokenizer, world.passages, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_retriever(
    path: str | Path,
    world: ToyWorld,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    dim: int = 64,
    seed: int = 0,
    **recipe,
) -> Path:
    """Tokenizer + tiny random BERT wrapped as a `Retriever` (projection to `dim`, mean
    pooling, the text `recipe`: RetrieverConfig fields), saved as one directory: the
    retriever's random start, which is both what distillation starts from and the "before
    distillation" baseline of the report."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_bert(tmp, world.texts(), seed=seed, hidden=hidden, layers=layers, heads=heads)
        torch.manual_seed(seed)
        retriever = Retriever.from_encoder(tmp, indexing_dimension=dim, **recipe)
        retriever.save_pretrained(path)
        AutoTokenizer.from_pretrained(tmp).save_pretrained(path)
    return path
