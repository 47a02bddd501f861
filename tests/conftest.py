import os
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PARITY = ROOT / "tests" / "data" / "parity"

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from src.data.questions import write_questions  # noqa: E402
from src.retriever.model import Retriever  # noqa: E402
from src.toy import world as toy  # noqa: E402
from src.toy.tiny_models import save_tiny_bert, save_tiny_t5  # noqa: E402

# Tiny models gain nothing from intra-op threads, and pytest-xdist already runs one worker
# per core (pyproject.toml's addopts): more threads, here and in the scripts the tests start
# (they inherit OMP_NUM_THREADS), only oversubscribe the cores, many times slower.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The end-to-end runs of the whole loop take minutes each. pytest-xdist hands each worker a
# whole module at a time (--dist loadscope, so module fixtures are built once), in this
# order: the modules with these runs first, then those with other slow tests, so that the
# short modules fill in around them instead of one worker finishing a long run alone.
LONGEST_FIRST = ("test_run_loop.py", "test_compare_signals.py", "test_reproducing.py")


def pytest_collection_modifyitems(config, items):
    def order(item) -> int:
        if item.get_closest_marker("slow") is None:
            return len(LONGEST_FIRST) + 1
        if item.path.name in LONGEST_FIRST:
            return LONGEST_FIRST.index(item.path.name)
        return len(LONGEST_FIRST)

    items.sort(key=order)  # stable: file order within each group


# The words of the small hand-written question files that the script tests share.
TINY_WORDS = "what color does anna boris clara like red blue green yellow question title context".split()


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return PARITY


class ToyFiles(NamedTuple):
    """The toy world (src/toy/world.py) and its files, as run_loop.py --toy writes them."""

    world: toy.ToyWorld
    root: Path
    passages: Path  # psgs_w100.tsv (id, text, title)
    splits: dict[str, Path]  # train / dev / test question files, BM25's top N_DOCS as ctxs


TOY_N_DOCS = 10


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> ToyFiles:
    """A small toy world (60 entities, 30 dev and 30 test questions, seed 0), generated once
    per session. Its questions are left without ctxs; the files carry BM25's. Treat it as
    read-only: copy a question (dict(q)) before changing it."""
    root = tmp_path_factory.mktemp("toy_world")
    world = toy.make_world(seed=0, n_entities=60, n_dev=30, n_test=30)
    toy.write_passages_tsv(root / "psgs_w100.tsv", world.passages)
    splits = {"train": world.train, "dev": world.dev, "test": world.test}
    with_ctxs = {name: [dict(q) for q in questions] for name, questions in splits.items()}
    bm25 = toy.add_bm25_ctxs(with_ctxs["train"], world.passages, TOY_N_DOCS)
    toy.add_bm25_ctxs(with_ctxs["dev"] + with_ctxs["test"], world.passages, TOY_N_DOCS, bm25)
    for name, questions in with_ctxs.items():
        write_questions(root / f"{name}.json", questions)
    return ToyFiles(world, root, root / "psgs_w100.tsv", {name: root / f"{name}.json" for name in splits})


class TinyModel(NamedTuple):
    path: Path  # a model directory: config.json, weights and the word-level tokenizer
    words: tuple[str, ...]  # the tokenizer's words (anything else is its unknown token)


@pytest.fixture(scope="session")
def tiny_fid(tmp_path_factory) -> TinyModel:
    """A tiny T5 reader directory (d_model 16, 1 layer, 2 heads, seed 0) with its tokenizer of
    TINY_WORDS, built once per session: what FiDT5.load, test_reader.py and train_reader.py read.
    Read-only: a test that trains writes elsewhere."""
    path = tmp_path_factory.mktemp("tiny_fid") / "t5"
    save_tiny_t5(path, [" ".join(TINY_WORDS)], d_model=16, layers=1, heads=2)
    return TinyModel(path, tuple(TINY_WORDS))


class TinyRetriever(NamedTuple):
    encoder: Path  # a tiny BERT directory with its tokenizer (--model_name_or_path of train_retriever.py)
    retriever: Path  # a retriever saved around it, projection to 8 dimensions (--model_path of the corpus scripts)
    words: tuple[str, ...]


@pytest.fixture(scope="session")
def tiny_retriever(tmp_path_factory) -> TinyRetriever:
    """A tiny BERT (hidden 16, 1 layer, 2 heads, seed 0) and a retriever around it (seed 0),
    with the tokenizer of TINY_WORDS, built once per session. Read-only."""
    root = tmp_path_factory.mktemp("tiny_retriever")
    bert = save_tiny_bert(root / "bert", [" ".join(TINY_WORDS)], hidden=16, layers=1, heads=2)
    torch.manual_seed(0)
    Retriever.from_encoder(str(bert), indexing_dimension=8).save_pretrained(root / "retriever")
    AutoTokenizer.from_pretrained(bert).save_pretrained(root / "retriever")
    return TinyRetriever(bert, root / "retriever", tuple(TINY_WORDS))
