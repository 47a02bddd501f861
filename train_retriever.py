"""Distil a reader's passage scores into a bi-encoder retriever (paper [2]).

    python train_retriever.py --train_data train_wscores.json --eval_data dev_wscores.json \
        --model_name_or_path bert-base-uncased --indexing_dimension 768 --n_context 100 \
        --per_gpu_batch_size 8 --total_steps 20000 --name my_retriever

The data files are `dataset_wscores.json` files written by `test_reader.py
--write_crossattention_scores`: every ctx carries the reader's `score`, the gold score
the retriever learns to match (`--retriever_loss`, default `kl`: KL between the softmaxes
over each question's passages).
Multi-GPU: `torchrun --nproc_per_node 8 train_retriever.py ...`. A run whose directory
already holds `checkpoint/latest` resumes from it. Checkpoints are `save_pretrained`
directories with the tokenizer, loadable by `generate_passage_embeddings.py
--model_path` and `passage_retrieval.py --model_path`.
"""

from __future__ import annotations

from src.cli import cli, finish, start_run, warn_ignored
from src.configs import config_from, train_config
from src.data.datasets import RetrieverDataset, unread_ctxs
from src.data.offsets import QuestionFile
from src.modeling import count_params, set_dropout
from src.options import Options
from src.retriever.task import EncoderChoice, RetrieverTaskConfig, load_retriever, retriever_task
from src.train import checkpoint
from src.train.fsdp import training_strategy
from src.train.optim import schedule_pitfalls, unused_flags
from src.train.trainer import train

# Every flag of the groups this script takes is used here; those optimisation flags that the
# chosen --optim / --scheduler do not read get a warning when set (optim.unused_flags).
IGNORED: tuple[str, ...] = ()


def main(argv: list[str] | None = None) -> None:
    options = Options("Distil a reader's passage scores into a bi-encoder retriever.")
    options.add_retriever_options()
    options.add_optim_options()
    options.mark_ignored(IGNORED)
    opt = options.parse(argv)
    run_dir, logger, runtime = start_run(opt, options, lock=True, ignored=IGNORED)
    train_cfg = train_config(opt)
    warn_ignored(opt, options.given, unused_flags(train_cfg.optim), logger)
    for warning in schedule_pitfalls(train_cfg.optim, train_cfg.accumulation_steps):
        logger.warning(warning)

    # Data first: a bad file should fail before a large model loads. Read on demand: each
    # process holds only the offsets of the examples (docs/scripts.md).
    train_examples = QuestionFile(opt.train_data, opt.maxload, rank=True)
    RetrieverDataset.check(train_examples, opt.n_context, opt.train_data)
    eval_examples = QuestionFile(opt.eval_data, opt.maxload, rank=True) if opt.eval_data != "none" else []
    RetrieverDataset.check(eval_examples, opt.n_context, opt.eval_data)
    logger.info("%d training questions, %d dev questions", len(train_examples), len(eval_examples))
    if "n_context" not in options.given and (warning := unread_ctxs(train_examples, opt.n_context, opt.train_data)):
        logger.warning(warning)

    model_dir, resume_dir = checkpoint.start_point(
        run_dir, opt.model_path, opt.model_name_or_path, default_model="bert-base-uncased"
    )
    logger.info("retriever weights from %s%s", model_dir, " (resuming)" if resume_dir else "")
    retriever, tokenizer = load_retriever(model_dir, config_from(EncoderChoice, opt, given=set(options.given)), logger)
    if opt.query_side_retriever_training and retriever.freeze_passage_side():
        logger.info("query-side training: passages are embedded by a frozen copy of the retriever as it starts")
    elif retriever.config.frozen_passage_side:
        logger.info("query-side training: passages by the retriever's frozen passage side (saved with it)")
    # The text recipe (templates, max lengths) is the model's, saved with it.
    train_dataset = RetrieverDataset(train_examples, opt.n_context, source=opt.train_data, texts=retriever.text_recipe)
    eval_dataset = RetrieverDataset(eval_examples, opt.n_context, source=opt.eval_data, texts=retriever.text_recipe)
    set_dropout(retriever, opt.dropout)
    retriever = retriever.to(runtime.device)
    logger.info("retriever: %.1fM parameters on %s", count_params(retriever) / 1e6, runtime.device)

    task_cfg = config_from(RetrieverTaskConfig, opt)
    task = retriever_task(task_cfg, runtime, tokenizer, retriever, train_dataset, eval_dataset, logger)
    strategy = training_strategy(opt.fsdp, runtime, logger)
    train(task, retriever, tokenizer, train_cfg, runtime, run_dir, resume_dir, logger, strategy)
    logger.info("done: checkpoints in %s", checkpoint.checkpoint_root(run_dir))
    finish()


if __name__ == "__main__":
    cli(main)
