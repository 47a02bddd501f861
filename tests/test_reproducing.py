"""docs/reproducing.md's recipe, run as written with toy sizes: the command blocks between its
recipe markers are taken from the markdown, the variables at their top set to toy values
(a toy world in the layout of the original downloads, a tiny T5 and BERT, a few steps), and
the whole sequence — data, reader, scores, distillation, indexing, retrieval, the next
round's reader — runs through the real scripts in bash. So the documented commands cannot rot."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from src.toy import world as toy
from src.toy.tiny_models import save_tiny_bert, save_tiny_t5

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reproducing.md"
ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$", re.MULTILINE)
# Variables the recipe assigns from earlier ones and keeps as written.
DERIVED = {"ROUND", "IN"}


def recipe_blocks() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    recipe = text.split("<!-- recipe:start -->")[1].split("<!-- recipe:end -->")[0]
    return re.findall(r"```bash\n(.*?)```", recipe, re.DOTALL)


def with_values(block: str, values: dict[str, str]) -> str:
    """The block with each of its top-level assignments of a variable in `values` replaced."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        return f"{name}={shlex.quote(values[name])}" if name in values else match.group(0)

    return ASSIGNMENT.sub(replace, block)


def test_the_recipe_sets_its_sizes_in_variables_with_the_papers_values():
    blocks = recipe_blocks()
    assert len(blocks) == 8  # settings, data, reader, scores, retriever, index, retrieve, next round
    paper = {name: value.split("#")[0].strip() for b in blocks for name, value in ASSIGNMENT.findall(b)}
    assert paper["N_CONTEXT"] == "100" and paper["TEXT_MAXLENGTH"] == "250" and paper["READER_MODEL"] == "t5-base"
    assert paper["READER_STEPS"] == "15000" and paper["READER_LR"] == "5e-5" and paper["N_DOCS"] == "100"
    assert paper["RETRIEVER_STEPS"] == "20000" and paper["RETRIEVER_LR"] == "1e-4"
    assert paper["RETRIEVER_MODEL"] == "bert-base-uncased" and paper["EMBED_BATCH"] == "500"
    commands = "\n".join(blocks)
    for script in ("preprocess.py", "train_reader.py", "test_reader.py", "train_retriever.py",
                   "generate_passage_embeddings.py", "passage_retrieval.py"):  # fmt: skip
        assert script in commands
    assert "--use_checkpoint" in commands and "--write_crossattention_scores" in commands


def write_download(root: Path, world: toy.ToyWorld, n_docs: int) -> None:
    """The toy world in the layout of the original get-data.sh (what `preprocess.py fid` reads):
    NQ-open train file = toy train + dev questions, NQ-open dev file = toy test questions, the
    split index files, and BM25's passage ids per question as the FiD passage lists."""
    root.mkdir(parents=True)
    splits = {"train": world.train, "dev": world.dev, "test": world.test}
    toy.add_bm25_ctxs(world.train + world.dev + world.test, world.passages, n_docs)
    public = {"train": world.train + world.dev, "dev": world.test}
    for origin, questions in public.items():
        with open(root / f"NQ-open.{origin}.jsonl", "w", encoding="utf-8") as f:
            for q in questions:
                f.write(json.dumps({"question": q["question"], "answer": q["answers"]}) + "\n")
    start = {"train": 0, "dev": len(world.train), "test": 0}
    (root / "nq_passages").mkdir()
    for split, questions in splits.items():
        index = list(range(start[split], start[split] + len(questions)))
        (root / f"NQ.{split}.idx.json").write_text(json.dumps(index))
        lists = {str(i): [c["id"] for c in q["ctxs"]] for i, q in enumerate(questions)}
        (root / "nq_passages" / f"{split}.json").write_text(json.dumps(lists))


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_with_toy_sizes(tmp_path):
    world = toy.make_world(seed=0, n_entities=12, n_dev=8, n_test=8)  # 72 passages, 56/8/8 questions
    write_download(tmp_path / "download", world, n_docs=6)
    (tmp_path / "data").mkdir()
    toy.write_passages_tsv(tmp_path / "data" / "psgs_w100.tsv", world.passages)
    t5 = save_tiny_t5(tmp_path / "t5", world.texts(), d_model=16, layers=1, heads=2)
    bert = save_tiny_bert(tmp_path / "bert", world.texts(), hidden=16, layers=1, heads=2)
    runs = tmp_path / "runs"
    toy_values = {
        "DATASET": "NQ", "DOWNLOAD": str(tmp_path / "download"), "DATA": str(tmp_path / "data"), "RUNS": str(runs),
        "GPUS": "1", "LAUNCH": "python", "N_CONTEXT": "3", "TEXT_MAXLENGTH": "24",
        "READER_MODEL": str(t5), "BATCH_PER_GPU": "4", "ACCUMULATION": "2", "READER_STEPS": "2",
        "READER_WARMUP": "1", "READER_LR": "1e-3", "EVAL_EVERY": "1", "SCORE_BATCH": "8",
        "RETRIEVER_MODEL": str(bert), "RETRIEVER_BATCH": "4", "RETRIEVER_STEPS": "3",
        "RETRIEVER_SCHEDULER_STEPS": "4", "RETRIEVER_WARMUP": "1", "RETRIEVER_LR": "1e-3",
        "INDEXING_DIMENSION": "8", "SHARDS": "1", "EMBED_BATCH": "32", "N_DOCS": "4",
    }  # fmt: skip
    blocks = recipe_blocks()
    assigned = {name for b in blocks for name, _ in ASSIGNMENT.findall(b)}
    assert assigned == set(toy_values) | DERIVED, "a recipe variable without a toy value (or a stale one)"
    # Round 1: every block; round 2 (after block 7, "run blocks 2-6 again"): its reader, on the new passages.
    script = ["set -euo pipefail"] + [with_values(b, toy_values) for b in blocks + blocks[2:3]]
    (tmp_path / "recipe.sh").write_text("\n".join(script))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]  # `python`, `torchrun`: this env's
    proc = subprocess.run(
        ["bash", str(tmp_path / "recipe.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    test = json.loads((tmp_path / "data" / "NQ" / "test.json").read_text())
    assert len(test) == 8 and all(len(q["ctxs"]) == 6 for q in test)  # preprocess.py: the FiD passage lists
    answers = (runs / "scores_round1_test" / "final_output.txt").read_text().splitlines()
    assert len(answers) == 8
    scored = json.loads((runs / "scores_round1_train" / "dataset_wscores.json").read_text())
    assert all(isinstance(c["score"], float) for q in scored for c in q["ctxs"][:3])  # the first N_CONTEXT
    assert (runs / "retriever_round1" / "checkpoint" / "best_dev").is_dir()
    assert sorted(p.name for p in (runs / "embeddings_round1").iterdir()) == ["wiki_00.npz"]
    for split, n in (("train", 56), ("dev", 8), ("test", 8)):
        retrieved = json.loads((runs / "retrieved_round1" / f"{split}.json").read_text())
        assert len(retrieved) == n and all(len(q["ctxs"]) == 4 for q in retrieved)
    # Round 2 read the retrieved passages.
    assert (runs / "reader_round2" / "checkpoint" / "best_dev").is_dir()
    options = json.loads((runs / "reader_round2" / "options.json").read_text())
    assert options["train_data"] == str(runs / "retrieved_round1" / "train.json")
