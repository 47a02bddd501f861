"""`run_loop.py --compare_signals`: every reader-to-retriever signal on the same reader.

One round-1 reader is trained on the first-stage ctxs; then, for each signal, test_reader.py
exports it (`--score_kind`) on train/dev/test, train_retriever.py distils one retriever
from the same starting retriever (same seed, steps and in-batch negatives setting; loss
`emdr` for `answer_logprob`, else `kl`), and the corpus is embedded and searched. The
table gives, per signal, the distilled retriever's top-k over the whole corpus on the
test questions, beside the same retriever before distillation and the first stage, and
how long the export took.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from src.data.questions import load_questions
from src.files import atomic_write
from src.toy.config import LoopConfig
from src.toy.report import KS, ctxs_topk, fmt
from src.toy.runner import Runner, embed_and_retrieve, prepare, test_reader, train_reader, train_retriever

DEFAULT_SIGNALS = ("xattn", "pdist", "loop", "answer_logprob")
LOSS_OF = {"answer_logprob": "emdr"}  # the loss each signal is meant for; kl otherwise


def compare_signals(
    run: Runner, config: LoopConfig, splits: dict[str, Path], passages: Path, first_stage: dict, retriever_init: dict
) -> list[dict]:
    """One row per signal: {signal, loss, export_seconds, top{k}}."""
    reader = train_reader(run, config, "compare/reader", config.reader_model, True, splits["train"], splits["dev"])
    rows = []
    for signal in config.compare_signals or DEFAULT_SIGNALS:
        signal_config = dataclasses.replace(config, score_kind=signal, retriever_loss=LOSS_OF.get(signal, "kl"))
        print(f"\n===== signal {signal} (retriever loss {signal_config.retriever_loss}) =====", flush=True)
        start = time.time()
        scored = {
            split: test_reader(
                run,
                signal_config,
                f"compare/{signal}/score_{split}",
                reader,
                path,
                config.score_maxload if split == "train" else -1,
            )
            for split, path in splits.items()
        }
        export_seconds = time.time() - start
        wscores = {split: scored[split] / "dataset_wscores.json" for split in ("train", "dev")}
        retriever = train_retriever(
            run, signal_config, f"compare/{signal}/retriever", config.retriever_model, wscores["train"], wscores["dev"]
        )
        retrieved = embed_and_retrieve(
            run, signal_config, f"compare/{signal}/retrieval", str(retriever), passages, {"test": splits["test"]}
        )
        topk = ctxs_topk(load_questions(retrieved["test"], rank=True))
        rows.append(
            {"signal": signal, "loss": signal_config.retriever_loss, "export_seconds": export_seconds, "topk": topk}
        )
    rows.append({"signal": "(before distillation)", "loss": "", "export_seconds": None, "topk": retriever_init})
    rows.append({"signal": "(first stage)", "loss": "", "export_seconds": None, "topk": first_stage})
    return rows


def signals_table(rows: list[dict]) -> str:
    out = "| signal | retriever loss | " + " | ".join(f"test top-{k}" for k in KS) + " | export (s) |\n"
    out += "|---|---|" + "---|" * len(KS) + "---|\n"
    for row in rows:
        seconds = "" if row["export_seconds"] is None else f"{row['export_seconds']:.1f}"
        cells = [fmt(row["topk"][k]) for k in KS]
        out += f"| {row['signal']} | {row['loss']} | " + " | ".join(cells) + f" | {seconds} |\n"
    return out


def write_comparison(run_dir: Path, rows: list[dict], first_stage_name: str) -> str:
    md = (
        "# Reader signals compared: one reader, one retriever distilled per signal\n\n"
        + signals_table(rows)
        + f"\nTop-k: share of test questions with an answer-bearing passage in the top k over the whole corpus. "
        f"First stage: {first_stage_name}. Export: test_reader.py on train, dev and test (wall time).\n"
    )
    with atomic_write(run_dir / "compare.md") as f:
        f.write(md)
    with atomic_write(run_dir / "compare.json") as f:
        json.dump([{**r, "topk": {str(k): v for k, v in r["topk"].items()}} for r in rows], f, indent=1)
    return md


def run_comparison(config: LoopConfig) -> Path:
    """run_loop.py --compare_signals: returns the run directory (compare.md, compare.json)."""
    setup = prepare(config)
    rows = compare_signals(
        setup.run, setup.config, setup.splits, setup.passages, setup.first_stage, setup.retriever_init
    )
    md = write_comparison(setup.run.run_dir, rows, setup.first_stage_name)
    print(f"\n{md}\nwall time {(time.time() - setup.started) / 60:.1f} min; run directory (compare.md):", flush=True)
    print(setup.run.run_dir, flush=True)
    return setup.run.run_dir
