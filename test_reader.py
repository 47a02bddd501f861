"""Evaluate a FiD reader; optionally write its answers and its cross-attention scores.

    python test_reader.py --model_path checkpoint/my_experiment/checkpoint/best_dev \
        --eval_data test.json --n_context 100 --per_gpu_batch_size 4 \
        --name my_test --checkpoint_dir checkpoint --write_results --write_crossattention_scores

Writes into checkpoint_dir/name/: final_output.txt (id<TAB>answer, --write_results)
and dataset_wscores.json (--write_crossattention_scores: the eval data with
ctxs[j]['score'] replaced by the reader's score of passage j, for the first
n_context ctxs; the input to train_retriever.py). Later ctxs, which the reader did not
see, keep their old score as 'retriever_score'.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from src import distributed as dist
from src.cli import cli, finish, start_run, warn_ignored
from src.configs import config_from
from src.data.datasets import ReaderCollator, ReaderDataset, unread_ctxs
from src.data.offsets import QuestionFile
from src.data.questions import require_targets, write_questions
from src.files import atomic_write
from src.options import Options
from src.reader.scores import SCORE_KINDS, attach_scores
from src.reader.task import ReaderConfig, exact_match, generate_answers, load_reader

# Shared option groups: accepted (the original's scripts shared them), unused here. Nothing
# here draws a random number (greedy or beam decoding), so --seed changes nothing.
IGNORED = ("train_data", "use_checkpoint", "answer_maxlength", "eval_freq", "save_freq", "seed")
# Used only with --write_crossattention_scores.
SCORES_ONLY = {"score_kind": "it only matters with --write_crossattention_scores"}


def with_scores(examples: Sequence[dict], results: list[dict[str, Any]], n_context: int) -> Iterator[dict]:
    """Each example with the reader's scores attached, read one at a time (streamed to the file)."""
    scores = {r["index"]: r["scores"] for r in results}
    for i, ex in enumerate(examples):
        if i in scores:
            attach_scores(ex, scores[i], n_context)
        yield ex


def main(argv: list[str] | None = None) -> None:
    options = Options("Evaluate a FiD reader; export answers and cross-attention scores.")
    options.add_reader_options()
    options.add_eval_options()
    options.mark_ignored(IGNORED)
    options.set_help("model_path", "the reader to evaluate: a checkpoint directory (required)")
    options.set_help(
        "model_name_or_path",
        "only the tokenizer here: used when --model_path holds none and no --tokenizer_name_or_path is given "
        "(default: t5-<model_size>)",
    )
    options.set_help("model_size", "t5 size of the fallback tokenizer t5-<size> (see --model_name_or_path)")
    opt = options.parse(argv)
    if opt.model_path == "none":
        options.parser.error("--model_path is required (a reader checkpoint directory)")
    # The data is checked before the run directory is touched and before a large model loads;
    # read on demand: each process holds only the offsets of the examples.
    examples = QuestionFile(opt.eval_data, opt.maxload, rank=True)
    if opt.write_crossattention_scores and SCORE_KINDS[opt.score_kind].needs_target:
        require_targets(examples, opt.eval_data, why=f"--score_kind {opt.score_kind} scores the gold answer")
    run_dir, logger, runtime = start_run(opt, options, ignored=IGNORED)
    if not opt.write_crossattention_scores:
        warn_ignored(opt, options.given, SCORES_ONLY, logger)

    dataset = ReaderDataset(examples, opt.n_context, opt.no_title, source=opt.eval_data, first_answer=True)
    if "n_context" not in options.given and (warning := unread_ctxs(examples, opt.n_context, opt.eval_data)):
        logger.warning(warning)
    fallback_tokenizer = opt.model_name_or_path or f"t5-{opt.model_size}"
    model, tokenizer = load_reader(
        opt.model_path, opt.tokenizer_name_or_path, fallback_tokenizer, packing=not opt.no_packing, log=logger
    )
    model = model.to(runtime.device)
    collator = ReaderCollator(tokenizer, opt.text_maxlength, opt.n_context)
    logger.info("evaluating %s: %d examples, %d processes", opt.eval_data, len(examples), runtime.world_size)

    results = generate_answers(
        model,
        tokenizer,
        dataset,
        collator,
        config_from(ReaderConfig, opt),
        with_scores=opt.write_crossattention_scores,
        desc="test",
    )
    em, n = exact_match(results, examples)
    if em is None:
        logger.info("%d answers generated; no gold answers in %s, so no EM", len(results), opt.eval_data)
    else:
        logger.info("EM %.5f over %d examples with answers (%s)", em, n, opt.eval_data)

    if runtime.is_main:
        if opt.write_results:
            with atomic_write(run_dir / "final_output.txt") as f:
                for r in results:
                    f.write(f"{examples[r['index']]['id']}\t{r['answer']}\n")
            logger.info("answers written to %s", run_dir / "final_output.txt")
        if opt.write_crossattention_scores:
            write_questions(run_dir / "dataset_wscores.json", with_scores(examples, results, opt.n_context))
            logger.info(
                "reader scores (--score_kind %s) of the first %d ctxs written to %s",
                opt.score_kind,
                opt.n_context,
                run_dir / "dataset_wscores.json",
            )
    dist.barrier()
    finish()


if __name__ == "__main__":
    cli(main)
