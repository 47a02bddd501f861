"""The loop's report (run_loop.py): the metrics of its table, the table, and the files
report.md, report.json (one entry per round) and run_summary.json.

Every metric is evaluation.py's: reader EM is `mean_em`, top-k is `top_k_accuracy_at`
over DPR hasanswer hits; the passages the reader read are `questions.read_ctxs`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import resource
from pathlib import Path

from src.data.questions import read_ctxs
from src.files import atomic_write
from src.metrics import has_answer, mean_em, mrr_at_k, recall_at_k, retrieval_hits, top_k_accuracy_at
from src.toy.config import LoopConfig

KS = (1, 5, 20)

# ---------------------------------------------------------------------------
# Metrics of the table
# ---------------------------------------------------------------------------


def reader_em(run_dir: Path, questions: list[dict]) -> float:
    """EM of `run_dir`/final_output.txt (id<TAB>answer) against the questions' answers
    (questions without answers are left out; a question without an answer line scores 0)."""
    answers = {}
    for line in (Path(run_dir) / "final_output.txt").read_text(encoding="utf-8").splitlines():
        qid, _, answer = line.partition("\t")
        answers[qid] = answer
    em, _ = mean_em([answers.get(str(q["id"]), "") for q in questions], [q.get("answers") for q in questions])
    return 0.0 if em is None else em


def xattn_top1(wscores: list[dict], n_context: int, seed: int = 0) -> tuple[float, float]:
    """(share of questions whose top reader-scored passage has the answer, the same for a
    random passage among those scored): the cross-attention score against chance.

    `wscores`: test_reader.py's dataset_wscores.json as written (ctxs in the order the
    reader read them), loaded without re-ranking."""
    rng = random.Random(seed)
    top = chance = 0.0
    counted = 0
    for q in wscores:
        ctxs = read_ctxs(q, n_context)  # the passages the reader read and scored
        if not ctxs or not q.get("answers"):
            continue
        hits = [has_answer(q["answers"], c["text"]) for c in ctxs]
        best = max(range(len(ctxs)), key=lambda j: float(ctxs[j]["score"]))
        top += hits[best]
        chance += hits[rng.randrange(len(ctxs))]
        counted += 1
    return top / max(counted, 1), chance / max(counted, 1)


def ctxs_topk(questions: list[dict], ks=KS) -> dict[int, float]:
    """Top-k accuracy of each question's ctxs in ranking order (load the file with
    `load_questions(..., rank=True)`), hasanswer recomputed from the text (DPR
    convention); questions without answers are left out."""
    counted = [q for q in questions if q.get("answers")]
    texts = [[c["text"] for c in q.get("ctxs") or []] for q in counted]
    return top_k_accuracy_at(retrieval_hits([q["answers"] for q in counted], texts), ks)


def ctxs_mrr_recall(questions: list[dict], ks=KS) -> tuple[dict[int, float], dict[int, float]]:
    """(MRR@k, recall@k) of each question's ctxs in ranking order against the answer-bearing
    ones (metrics.mrr_at_k, recall_at_k); questions without answers are left out."""
    counted = [q for q in questions if q.get("answers")]
    texts = [[c["text"] for c in q.get("ctxs") or []] for q in counted]
    hits = retrieval_hits([q["answers"] for q in counted], texts)
    return mrr_at_k(hits, ks), recall_at_k(hits, ks)[0]


def round_result(
    r: int,
    reader_ctxs: str,
    reader_em: tuple[float, float, float],
    xattn: tuple[float, float],
    topk: tuple[dict[int, float], dict[int, float], dict[int, float]],
    ranking: tuple[dict[int, float], dict[int, float]] | None = None,
) -> dict:
    """One round's entry of report.json (and column of the table).

    reader_em: (dev, test, the untrained starting reader on test); xattn: `xattn_top1`'s
    pair; topk: `ctxs_topk` of (the first stage, the retriever before distillation, the
    distilled retriever), on test; ranking: `ctxs_mrr_recall` of the distilled retriever."""
    dev_em, test_em, init_em = reader_em
    first_stage, retriever_init, retriever = topk
    return {
        "round": r,
        "reader_dev_em": dev_em,
        "reader_test_em": test_em,
        "reader_init_test_em": init_em,
        "xattn_top1_hasanswer": xattn[0],
        "xattn_top1_chance": xattn[1],
        **{f"first_stage_top{k}": first_stage[k] for k in KS},
        **{f"retriever_init_top{k}": retriever_init[k] for k in KS},
        **{f"retriever_top{k}": retriever[k] for k in KS},
        **({f"retriever_mrr{k}": ranking[0][k] for k in KS} if ranking else {}),
        **({f"retriever_recall{k}": ranking[1][k] for k in KS} if ranking else {}),
        "reader_ctxs": reader_ctxs,
    }


# ---------------------------------------------------------------------------
# The table and the files
# ---------------------------------------------------------------------------


def fmt(x: float) -> str:
    return f"{x:.3f}"


def table(rounds: list[dict], first_stage: str = "first stage") -> str:
    """Markdown table: one column per round, each metric followed by its baselines."""
    rows = [
        ("reader reads the passages of", None),
        ("reader EM, dev", "reader_dev_em"),
        ("reader EM, test", "reader_test_em"),
        ("  baseline: the starting reader, untrained", "reader_init_test_em"),
        ("test: reader's top cross-attention passage has the answer", "xattn_top1_hasanswer"),
        ("  baseline: a random passage among those it scored", "xattn_top1_chance"),
    ]
    for k in KS:
        rows += [
            (f"test top-{k} over the whole corpus: distilled retriever", f"retriever_top{k}"),
            ("  baseline: the same retriever before distillation", f"retriever_init_top{k}"),
            (f"  reference: {first_stage}", f"first_stage_top{k}"),
        ]
    for k in KS:
        rows += [
            (f"test MRR@{k}: distilled retriever", f"retriever_mrr{k}"),
            (f"test recall@{k} of the answer-bearing passages: distilled retriever", f"retriever_recall{k}"),
        ]
    rows = [(label, key) for label, key in rows if key is None or all(key in r for r in rounds)]
    out = "| | " + " | ".join(f"round {r['round']}" for r in rounds) + " |\n"
    out += "|---|" + "---|" * len(rounds) + "\n"
    for label, key in rows:
        label = label.replace("  ", "&nbsp;&nbsp;↳ ") if label.startswith("  ") else label
        cells = [r["reader_ctxs"] if key is None else fmt(r[key]) for r in rounds]
        out += f"| {label} | " + " | ".join(cells) + " |\n"
    return out


def write_report(
    run_dir: Path, config: LoopConfig, rounds: list[dict], first_stage: str, timings: dict[str, float], wall: float
) -> str:
    """report.json (the rounds), run_summary.json (times, memory, options) and report.md
    in `run_dir`; returns report.md's text."""
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest single step, Linux KiB
    summary = {
        "rounds": rounds,
        "wall_seconds": round(wall, 1),
        "peak_step_rss_mb": round(peak_mb, 1),
        "step_seconds": {k: round(v, 1) for k, v in timings.items()},
        "data": {k: str(v) for k, v in (("passages", Path(config.passages)), ("test", Path(config.test_data)))},
        "options": dataclasses.asdict(config),
    }
    # report.json is the list of rounds the issue asks for; the rest goes beside it.
    with atomic_write(run_dir / "report.json") as f:
        json.dump(rounds, f, indent=1)
    with atomic_write(run_dir / "run_summary.json") as f:
        json.dump(summary, f, indent=1)
    md = (
        f"# FiD loop: {config.rounds} round(s)\n\n{table(rounds, first_stage)}\n"
        f"Round 1's reader reads the first stage's passages; round r > 1's reader and retriever continue from\n"
        f"round r−1's, and the reader reads the passages of round r−1's distilled retriever. Top-k: share of test questions with an\n"
        f"answer-bearing passage (DPR hasanswer) in the top k over the whole corpus. Signal: {config.score_kind}; retriever\n"
        f"loss: {config.retriever_loss} over each question's passages{' + in-batch negatives' if config.in_batch_negatives else ''}.\n\n"
        f"Wall time {wall / 60:.1f} min, largest step peak RSS {peak_mb:.0f} MB, {os.cpu_count()} CPUs visible.\n"
        f"Commands: `commands.log`; tensorboard: `tensorboard --logdir {run_dir}`.\n"
    )
    with atomic_write(run_dir / "report.md") as f:
        f.write(md)
    return md


def write_variants_report(
    run_dir: Path, full: list[dict], query_side: list[dict], first_stage: str, timings: dict[str, float]
) -> str:
    """report.md (and report_query_side.json beside report.json) of `run_loop.py --query_side
    both`: the loop re-embedding the corpus each round beside query-side training over the
    starting retriever's index, one column per (variant, round)."""
    with atomic_write(run_dir / "report_query_side.json") as f:
        json.dump(query_side, f, indent=1)
    full_table = table(full, first_stage).splitlines()
    qs_table = table(query_side, first_stage).splitlines()
    header = "| | " + " | ".join(
        [f"re-embedded, round {r['round']}" for r in full] + [f"query-side, round {r['round']}" for r in query_side]
    )
    lines = [header + " |", "|---|" + "---|" * (len(full) + len(query_side))]
    for a, b in zip(full_table[2:], qs_table[2:]):
        lines.append(a + b.split("|", 2)[2])  # b's cells after its label
    embed = {
        name: sum(v for k, v in timings.items() if k.endswith("_embed") and k.startswith(prefix))
        for name, prefix in (("re-embedded", "round"), ("query-side", "query_side"))
    }
    md = (
        "# FiD loop: re-embedding the corpus each round vs query-side training\n\n" + "\n".join(lines) + "\n\n"
        "Re-embedded: the whole retriever trains and the corpus is embedded again each round. Query-side\n"
        "(`train_retriever.py --query_side_retriever_training`, Atlas): only the question side trains; the\n"
        "passages keep the starting retriever's embeddings, so the index built before the loop serves every\n"
        f"round. Corpus embedding time in the rounds: re-embedded {embed['re-embedded']:.1f}s, query-side "
        f"{embed['query-side']:.1f}s.\n"
    )
    with atomic_write(run_dir / "report.md") as f:
        f.write(md)
    return md
