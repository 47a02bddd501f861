"""Train a Fusion-in-Decoder reader (paper [1]).

    python train_reader.py --train_data train.json --eval_data dev.json \
        --model_size base --per_gpu_batch_size 1 --n_context 100 --name my_experiment

Multi-GPU: `torchrun --nproc_per_node 8 train_reader.py ...`. A run whose directory
already holds `checkpoint/latest` resumes from it (docs/distributed.md, resuming).
"""

from __future__ import annotations

from src.cli import cli, finish, start_run, warn_ignored
from src.configs import config_from, train_config
from src.data.datasets import ReaderDataset, unread_ctxs
from src.data.offsets import QuestionFile
from src.data.questions import require_targets
from src.modeling import count_params, set_dropout
from src.options import Options
from src.reader.task import ReaderConfig, load_reader, reader_task
from src.train import checkpoint
from src.train.fsdp import FullySharded, training_strategy
from src.train.optim import schedule_pitfalls, unused_flags
from src.train.trainer import train

# Every flag of the groups this script takes is used here; those optimisation flags that the
# chosen --optim / --scheduler do not read get a warning when set (optim.unused_flags).
IGNORED: tuple[str, ...] = ()


def main(argv: list[str] | None = None) -> None:
    options = Options("Train a Fusion-in-Decoder reader.")
    options.add_reader_options()
    options.add_optim_options()
    options.mark_ignored(IGNORED)
    opt = options.parse(argv)
    run_dir, logger, runtime = start_run(opt, options, lock=True, ignored=IGNORED)
    train_cfg, reader_cfg = train_config(opt), config_from(ReaderConfig, opt)
    warn_ignored(opt, options.given, unused_flags(train_cfg.optim), logger)
    for warning in schedule_pitfalls(train_cfg.optim, train_cfg.accumulation_steps):
        logger.warning(warning)

    # Data first: a bad file should fail before a large model loads. Read on demand: each
    # process holds only the offsets of the examples (docs/scripts.md).
    train_examples = QuestionFile(opt.train_data, opt.maxload, rank=True)
    require_targets(train_examples, opt.train_data)
    train_dataset = ReaderDataset(train_examples, opt.n_context, opt.no_title, seed=opt.seed, source=opt.train_data)
    eval_examples = QuestionFile(opt.eval_data, opt.maxload, rank=True) if opt.eval_data != "none" else []
    eval_dataset = ReaderDataset(eval_examples, opt.n_context, opt.no_title, source=opt.eval_data)
    logger.info("%d training examples, %d dev examples", len(train_dataset), len(eval_dataset))
    if "n_context" not in options.given and (warning := unread_ctxs(train_examples, opt.n_context, opt.train_data)):
        logger.warning(warning)

    default_model = f"t5-{opt.model_size}"
    model_dir, resume_dir = checkpoint.start_point(run_dir, opt.model_path, opt.model_name_or_path, default_model)
    logger.info("model weights from %s%s", model_dir, " (resuming)" if resume_dir else "")
    fallback_tokenizer = opt.model_name_or_path or default_model
    model, tokenizer = load_reader(
        model_dir, opt.tokenizer_name_or_path, fallback_tokenizer, packing=not opt.no_packing, log=logger
    )
    set_dropout(model, opt.dropout)
    model.set_checkpoint(opt.use_checkpoint)
    strategy = training_strategy(opt.fsdp, runtime, logger)
    if isinstance(strategy, FullySharded):  # the same encoder calls on every rank; sharding moves it to the device
        model.max_buckets = 1
    else:
        model = model.to(runtime.device)
    logger.info("reader: %.1fM parameters on %s", count_params(model) / 1e6, runtime.device)

    task = reader_task(reader_cfg, tokenizer, train_dataset, eval_dataset)
    train(task, model, tokenizer, train_cfg, runtime, run_dir, resume_dir, logger, strategy)
    logger.info("done: checkpoints in %s", checkpoint.checkpoint_root(run_dir))
    finish()


if __name__ == "__main__":
    cli(main)
