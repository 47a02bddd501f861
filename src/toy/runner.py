"""The loop runner of run_loop.py: each step is a real script run as a subprocess with the
flags a user would type (printed, and logged to `commands.log` in the run directory).

One round: train_reader.py → test_reader.py --write_crossattention_scores (train, dev,
test) → train_retriever.py → generate_passage_embeddings.py (one shard per process) →
passage_retrieval.py (train, dev, test) → the next round's ctxs. Each step is given only
the flags it reads. The metrics and the table are report.py's.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from src.data.questions import load_questions, read_ctxs, write_questions
from src.retriever.model import passage_template_for
from src.toy import world as toy
from src.toy.config import LoopConfig
from src.toy.report import (
    ctxs_mrr_recall,
    ctxs_topk,
    reader_em,
    round_result,
    table,
    write_report,
    write_variants_report,
    xattn_top1,
)

SCRIPTS = Path(__file__).resolve().parents[2]  # the repository root: the scripts and `src`

# ---------------------------------------------------------------------------
# Running the scripts
# ---------------------------------------------------------------------------


class Runner:
    """Runs the steps of one run directory; `timings` holds each step's seconds."""

    def __init__(self, config: LoopConfig, run_dir: Path):
        self.config, self.run_dir = config, run_dir
        self.log = open(run_dir / "commands.log", "a", encoding="utf-8")
        self.timings: dict[str, float] = {}
        self.env = dict(os.environ, PYTHONPATH=str(SCRIPTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def command(self, script: str, args: list[str], distributed: bool = True) -> list[str]:
        """The command line of one step: torchrun with --nproc > 1 (when `distributed`), and --device."""
        launcher = [sys.executable]
        if distributed and self.config.nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.config.nproc}"]
        device = ["--device", self.config.device] if self.config.device else []
        return launcher + [str(SCRIPTS / script)] + args + device

    def __call__(self, label: str, script: str, args: list[str], distributed: bool = True) -> None:
        """Run one step; stop the loop with the step's own output if it fails."""
        label = label.replace("/", "_")
        cmd = self.command(script, args, distributed)
        print(f"\n[{label}] " + " ".join(shlex.quote(c) for c in [script] + args), flush=True)
        self.log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        self.log.flush()
        t0 = time.time()
        step_log = self.run_dir / "logs" / f"{label}.log"
        step_log.parent.mkdir(exist_ok=True)
        with open(step_log, "w", encoding="utf-8") as out:
            proc = subprocess.run(cmd, cwd=SCRIPTS, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.timings[label] = time.time() - t0
        if proc.returncode != 0:
            tail = step_log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
            sys.exit(
                f"run_loop.py: step {label} failed (exit {proc.returncode}); its log {step_log} ends:\n"
                + "\n".join(tail)
            )
        print(f"[{label}] done in {self.timings[label]:.1f}s (log: {step_log})", flush=True)

    def parallel(self, label: str, script: str, args_per_process: list[list[str]]) -> None:
        """Run one process per argument list at once (not torchrun); stop the loop if one fails."""
        label = label.replace("/", "_")
        procs = []
        t0 = time.time()
        for i, args in enumerate(args_per_process):
            cmd = self.command(script, args, distributed=False)
            print(f"\n[{label}{i}] " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
            self.log.write(" ".join(shlex.quote(c) for c in cmd) + " &\n")
            procs.append(
                subprocess.Popen(cmd, cwd=SCRIPTS, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            )
        for i, proc in enumerate(procs):
            _, err = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"run_loop.py: {label} process {i} failed:\n{err.decode(errors='replace')[-3000:]}")
        self.timings[label] = time.time() - t0


# ---------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------


def reader_flags(config: LoopConfig) -> list[str]:
    flags = ["--n_context", str(config.n_context), "--text_maxlength", str(config.text_maxlength)]
    flags += ["--precision", config.precision]
    return flags + (["--no_title"] if config.no_title else [])


def passage_flags(config: LoopConfig) -> list[str]:
    """How passages are read into the retriever (train_retriever.py, generate_passage_embeddings.py).
    No --precision: the corpus scripts keep their default (the original's: fp16 on GPU,
    fp32 on CPU), so the toy table is the one measured before they honoured the flag."""
    flags = ["--passage_maxlength", str(config.passage_maxlength)]
    return flags + (["--no_title"] if config.no_title else [])


def train_reader(run: Runner, config: LoopConfig, name: str, start: str, fresh: bool, train: Path, dev: Path) -> Path:
    args = [
        "--train_data", str(train), "--eval_data", str(dev),
        "--model_name_or_path" if fresh else "--model_path", start,
        "--checkpoint_dir", str(run.run_dir), "--name", name,
        "--per_gpu_batch_size", str(config.reader_batch_size),
        "--total_steps", str(config.reader_steps), "--warmup_steps", str(max(config.reader_steps // 20, 1)),
        "--scheduler", "linear", "--lr", str(config.reader_lr), "--optim", "adamw", "--weight_decay", "0.0",
        "--dropout", "0.0", "--eval_freq", str(config.reader_eval_freq), "--save_freq", str(config.reader_steps),
        "--eval_print_freq", "100000", "--seed", str(config.seed),
    ] + reader_flags(config)  # fmt: skip
    run(name, "train_reader.py", args)
    return run.run_dir / name / "checkpoint" / "best_dev"


def test_reader(run: Runner, config: LoopConfig, name: str, model: Path, data: Path, maxload: int = -1) -> Path:
    args = [
        "--model_path", str(model), "--eval_data", str(data), "--checkpoint_dir", str(run.run_dir), "--name", name,
        "--per_gpu_batch_size", "32", "--write_results", "--write_crossattention_scores",
        "--generation_max_length", str(config.generation_max_length), "--maxload", str(maxload),
        "--score_kind", config.score_kind,
    ] + reader_flags(config)  # fmt: skip
    run(name, "test_reader.py", args)
    return run.run_dir / name


def train_retriever(
    run: Runner, config: LoopConfig, name: str, start: str, train: Path, dev: Path, query_side: bool = False
) -> Path:
    args = [
        "--train_data", str(train), "--eval_data", str(dev), "--model_name_or_path", start,
        "--checkpoint_dir", str(run.run_dir), "--name", name, "--n_context", str(config.retriever_n_context),
        "--per_gpu_batch_size", str(config.retriever_batch_size), "--indexing_dimension", str(config.indexing_dimension),
        "--question_maxlength", str(config.question_maxlength),
        "--total_steps", str(config.retriever_steps), "--warmup_steps", str(max(config.retriever_steps // 10, 1)),
        "--scheduler", "linear", "--lr", str(config.retriever_lr), "--optim", "adamw", "--weight_decay", "0.0",
        "--dropout", "0.0", "--eval_freq", str(max(config.retriever_steps // 3, 1)),
        "--save_freq", str(config.retriever_steps), "--eval_print_freq", "100000", "--seed", str(config.seed),
        "--precision", config.precision, "--retriever_loss", config.retriever_loss,
    ] + (["--in_batch_negatives"] if config.in_batch_negatives else []) + passage_flags(config)  # fmt: skip
    if query_side:  # the passage side stays the starting retriever's: its index stays valid
        args.append("--query_side_retriever_training")
    run(name, "train_retriever.py", args)
    return run.run_dir / name / "checkpoint" / "best_dev"


def embed_corpus(run: Runner, config: LoopConfig, label: str, model: str, passages: Path, prefix: Path) -> None:
    """The whole corpus, one shard per process (--nproc of them, in parallel), to `prefix`_*."""
    args = [
        "--model_path", model, "--passages", str(passages), "--output_path", str(prefix),
        "--per_gpu_batch_size", "256",
    ] + passage_flags(config)  # fmt: skip
    shards = max(config.nproc, 1)
    if shards == 1:
        run(f"{label}_embed", "generate_passage_embeddings.py", args, distributed=False)
        return
    sharded = [args + ["--shard_id", str(shard), "--num_shards", str(shards)] for shard in range(shards)]
    run.parallel(f"{label}_embed", "generate_passage_embeddings.py", sharded)


def embed_and_retrieve(
    run: Runner,
    config: LoopConfig,
    label: str,
    model: str,
    passages: Path,
    splits: dict[str, Path],
    index: Path | None = None,
) -> dict[str, Path]:
    """Embed the corpus (unless `index`: the prefix of shards embedded before, still valid
    after query-side training) and retrieve for every split: {split: retrieved question file}."""
    out = run.run_dir / label
    prefix = index or out / "embeddings" / "passages"
    if index is None:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        embed_corpus(run, config, label, model, passages, prefix)
    retrieved = {}
    for split, data in splits.items():
        retrieved[split] = out / "retrieved" / f"{split}.json"
        run(f"{label}_retrieve_{split}", "passage_retrieval.py", [
            "--model_path", model, "--passages", str(passages), "--passages_embeddings", f"{prefix}_*",
            "--data", str(data), "--output_path", str(retrieved[split]), "--n-docs", str(config.n_docs),
            "--question_maxlength", str(config.question_maxlength), "--validation_workers", "1",
        ], distributed=False)  # fmt: skip
    return retrieved


def top_ctxs(src: Path, dst: Path, n: int) -> Path:
    """`src` with each question's ctxs cut to the n the reader reads (`read_ctxs`).

    The reader scores only the first n_context ctxs; any further ctxs would keep their
    retriever scores in dataset_wscores.json, and train_retriever.py, which sorts ctxs
    by score, would mix the two scales. So every file the reader reads holds exactly
    the passages it reads."""
    questions = load_questions(src)
    if all(len(q.get("ctxs") or []) <= n for q in questions):
        return src
    for q in questions:
        q["ctxs"] = read_ctxs(q, n)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_questions(dst, questions)
    return dst


def make_toy(config: LoopConfig, run_dir: Path) -> LoopConfig:
    """Toy world, BM25 ctxs and tiny starting models, written into the run directory; returns
    the config with their paths as the data and the starting models."""
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    n = config.toy_entities
    split = max(n * len(toy.ATTRIBUTES) // 12, 10)  # 1/12 of the questions each for dev and test
    world = toy.make_world(seed=config.seed, n_entities=n, n_dev=split, n_test=split)
    bm25 = toy.add_bm25_ctxs(world.train, world.passages, config.n_docs)
    toy.add_bm25_ctxs(world.dev + world.test, world.passages, config.n_docs, bm25)
    toy.write_passages_tsv(data / "psgs_w100.tsv", world.passages)
    for name, questions in (("train", world.train), ("dev", world.dev), ("test", world.test)):
        write_questions(data / f"{name}.json", questions)
    models = run_dir / "models"
    recipe = {  # the recipe the loop's flags give (the scripts read it from the model)
        "passage_template": passage_template_for(None, config.no_title),
        "question_maxlength": config.question_maxlength,
        "passage_maxlength": config.passage_maxlength,
    }
    reader = toy.build_reader(models / "reader_start", world, seed=config.seed)
    retriever = toy.build_retriever(
        models / "retriever_start", world, dim=config.indexing_dimension, seed=config.seed, **recipe
    )
    print(
        f"toy world: {len(world.passages)} passages, {len(world.train)}/{len(world.dev)}/{len(world.test)} "
        f"train/dev/test questions, BM25 ctxs, tiny models in {models}",
        flush=True,
    )
    return dataclasses.replace(
        config,
        train_data=str(data / "train.json"),
        eval_data=str(data / "dev.json"),
        test_data=str(data / "test.json"),
        passages=str(data / "psgs_w100.tsv"),
        reader_model=str(reader),
        retriever_model=str(retriever),
    )


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def run_round(
    run: Runner,
    config: LoopConfig,
    tag: str,
    splits: dict[str, Path],
    reader: str,
    fresh: bool,
    retriever: str,
    passages: Path,
    index: Path | None = None,
) -> tuple[Path, dict[str, Path], Path, dict[str, Path]]:
    """One round's steps from the reader and retriever `reader`, `retriever` on `splits`:
    (its reader, {split: scoring run dir}, its retriever, {split: retrieved file}). With
    `index` (query-side training) the retriever trains its question side only and searches
    the shards at `index`, embedded before the loop, instead of re-embedding the corpus."""
    reader = train_reader(run, config, f"{tag}/reader", reader, fresh, splits["train"], splits["dev"])
    scored = {
        split: test_reader(
            run, config, f"{tag}/score_{split}", reader, path, config.score_maxload if split == "train" else -1
        )
        for split, path in splits.items()
    }
    retriever = train_retriever(
        run, config, f"{tag}/retriever", retriever,
        scored["train"] / "dataset_wscores.json", scored["dev"] / "dataset_wscores.json", query_side=index is not None,
    )  # fmt: skip
    retrieved = embed_and_retrieve(run, config, f"{tag}/retrieval", str(retriever), passages, splits, index)
    return reader, scored, retriever, retrieved


@dataclass
class Setup:
    """What every run of the loop starts from: its config (the toy world's files and models
    filled in), the data cut to n_context, and the baselines."""

    config: LoopConfig
    run: Runner
    passages: Path
    splits: dict[str, Path]
    test_questions: list[dict]
    first_stage: dict[int, float]
    first_stage_name: str
    retriever_init: dict[int, float]
    reader_init_em: float
    started: float


def prepare(config: LoopConfig) -> Setup:
    """The toy world (by default), the first stage's top n_context ctxs per split, and the
    baselines: the starting retriever over the whole corpus ("before distillation") and
    the starting reader on the test set (what its initialisation alone gives)."""
    run_dir = Path(config.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if config.toy:
        config = make_toy(config, run_dir)
    run = Runner(config, run_dir)
    passages, n = Path(config.passages), config.n_context
    test_questions = load_questions(config.test_data, rank=True)
    first_stage = ctxs_topk(test_questions)  # the first stage's own ranking, all its ctxs
    first_stage_name = "BM25 (first stage)" if config.toy else "the first stage (input ctxs)"
    inputs = {"train": config.train_data, "dev": config.eval_data, "test": config.test_data}
    splits = {s: top_ctxs(Path(p), run_dir / "data" / f"{s}.top{n}.json", n) for s, p in inputs.items()}
    init = embed_and_retrieve(run, config, "retriever_init", config.retriever_model, passages, {"test": splits["test"]})
    retriever_init = ctxs_topk(load_questions(init["test"], rank=True))
    start_scored = test_reader(run, config, "reader_init/score_test", Path(config.reader_model), splits["test"])
    reader_init_em = reader_em(start_scored, test_questions)
    return Setup(
        config,
        run,
        passages,
        splits,
        test_questions,
        first_stage,
        first_stage_name,
        retriever_init,
        reader_init_em,
        started,
    )


def loop_rounds(config: LoopConfig, setup: Setup, query_side: bool = False, prefix: str = "") -> list[dict]:
    """The rounds of one variant: re-embedding the corpus each round, or (`query_side`)
    training the question side only and searching the index of the starting retriever."""
    run, passages, splits, n = setup.run, setup.passages, setup.splits, config.n_context
    index = run.run_dir / "retriever_init" / "embeddings" / "passages" if query_side else None
    rounds: list[dict] = []
    reader, fresh, retriever = config.reader_model, True, config.retriever_model
    for r in range(1, config.rounds + 1):
        print(f"\n===== {prefix}round {r} =====", flush=True)
        reader, scored, retriever, retrieved = run_round(
            run, config, f"{prefix}round{r}", splits, reader, fresh, retriever, passages, index
        )
        em = (
            reader_em(scored["dev"], load_questions(splits["dev"])),
            reader_em(scored["test"], setup.test_questions),
        )
        xattn = xattn_top1(load_questions(scored["test"] / "dataset_wscores.json"), n, config.seed)
        test_retrieved = load_questions(retrieved["test"], rank=True)
        topk = (setup.first_stage, setup.retriever_init, ctxs_topk(test_retrieved))
        reader_ctxs = setup.first_stage_name if r == 1 else f"round {r - 1}'s distilled retriever"
        rounds.append(
            round_result(r, reader_ctxs, (*em, setup.reader_init_em), xattn, topk, ctxs_mrr_recall(test_retrieved))
        )
        print(f"\n===== {prefix}round {r} results =====\n" + table(rounds, setup.first_stage_name), flush=True)
        splits = {s: top_ctxs(p, p.with_suffix(f".top{n}.json"), n) for s, p in retrieved.items()}
        reader, fresh, retriever = str(reader), False, str(retriever)
    return rounds


def run_loop(config: LoopConfig, setup: Setup | None = None) -> Path:
    """Run the rounds that run_loop.py's options describe; returns the run directory.
    `--query_side both`: the two variants from the same setup, side by side in report.md."""
    setup = setup or prepare(config)
    config, run = setup.config, setup.run
    variants = {"off": [False], "on": [True], "both": [False, True]}[config.query_side or "off"]
    results = {qs: loop_rounds(config, setup, qs, "query_side/" if qs and len(variants) > 1 else "") for qs in variants}
    rounds = results[variants[-1]] if len(variants) == 1 else results[False]
    wall = time.time() - setup.started
    md = write_report(run.run_dir, config, rounds, setup.first_stage_name, run.timings, wall)
    if len(variants) > 1:
        md = write_variants_report(run.run_dir, results[False], results[True], setup.first_stage_name, run.timings)
    print(f"\n{md}\nrun directory (report.md, report.json):", flush=True)
    print(run.run_dir, flush=True)
    return run.run_dir
