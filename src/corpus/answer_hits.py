"""Which retrieved passages contain an answer (hasanswer, DPR convention) and the retrieval
metrics over a stream of examples: top-k accuracy, MRR@k, recall@k (docs/corpus-at-scale.md)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ProcessPoolExecutor

from src.metrics import TopKAccuracy, question_hits

REPORTED_K = (1, 5, 20, 100)


class AnswerHits:
    """hasanswer of every ctx (DPR convention) and the top-k accuracy, over examples handed
    in batches: one first-hit rank per question is kept (TopKAccuracy), not the texts. One
    pool of `workers` processes for the whole run (a context manager: closes it)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.topk = TopKAccuracy()
        self.seconds, self.without_answers = 0.0, 0

    def __enter__(self) -> AnswerHits:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def _hits(self, answers: list[list[str]], texts: list[list[str]]) -> list[list[bool]]:
        if self.workers <= 1 or len(answers) < 2 * self.workers:
            return [question_hits(a, t) for a, t in zip(answers, texts)]
        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=self.workers)
        return list(self.pool.map(question_hits, answers, texts, chunksize=max(1, len(answers) // (8 * self.workers))))

    def label(self, examples: list[dict]) -> None:
        """Set every ctx's hasanswer from its text (False without answers) and count the hits."""
        t0 = time.time()
        with_answers = [ex for ex in examples if ex.get("answers")]
        hits = self._hits(
            [ex["answers"] for ex in with_answers], [[c["text"] for c in ex.get("ctxs") or []] for ex in with_answers]
        )
        for ex, ex_hits in zip(with_answers, hits):
            for ctx, hit in zip(ex.get("ctxs") or [], ex_hits):
                ctx["hasanswer"] = hit
        for ex in examples:
            if not ex.get("answers"):
                for ctx in ex.get("ctxs") or []:
                    ctx["hasanswer"] = False
        self.topk.add(hits)
        self.without_answers += len(examples) - len(with_answers)
        self.seconds += time.time() - t0

    def log(self, logger: logging.Logger) -> None:
        """How many were labelled, and the top-k accuracy (every k: the `fid.topk` logger)."""
        skipped = self.without_answers
        logger.info(
            "hasanswer computed for %d questions in %.1fs%s",
            self.topk.questions,
            self.seconds,
            f" ({skipped} without answers are left out of the accuracy)" if skipped else "",
        )
        accuracy = self.topk.accuracy()
        if not accuracy:
            logger.info("no question with answers and passages: no top-k accuracy")
            return
        shown = sorted({k for k in REPORTED_K if k <= len(accuracy)} | {len(accuracy)})
        logger.info("top-k accuracy: " + ", ".join(f"top-{k} {100 * accuracy[k - 1]:.2f}%" for k in shown))
        mrr = self.topk.mrr(shown)
        recall, with_hits = self.topk.recall(shown)
        logger.info("MRR@k: " + ", ".join(f"MRR@{k} {mrr[k]:.4f}" for k in shown))
        logger.info(
            "recall@k (share of the answer-bearing passages retrieved that are in the top k; %d questions with "
            "one): %s",
            with_hits,
            ", ".join(f"recall@{k} {100 * recall[k]:.2f}%" for k in shown),
        )
        every_k = "top-k accuracy for every k: " + " ".join(f"{k}:{a:.4f}" for k, a in enumerate(accuracy, 1))
        logging.getLogger("fid.topk").info(every_k)
