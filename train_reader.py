"""Train a Fusion-in-Decoder reader (paper [1]).

    python train_reader.py --train_data train.json --eval_data dev.json \
        --model_size base --per_gpu_batch_size 1 --n_context 100 --name my_experiment

Multi-GPU: `torchrun --nproc_per_node 8 train_reader.py ...`. A run whose directory
already holds `checkpoint/latest` resumes from it.
"""

from __future__ import annotations

from src import checkpoint, dist
from src.data import ReaderCollator, ReaderDataset, load_questions, require_targets
from src.model import FiDT5
from src.options import Options
from src.reader import exact_match, generate_answers, load_tokenizer, reader_loss, tokenizer_source
from src.trainer import Task, train
from src.util import cli, count_params, set_dropout


def main(argv: list[str] | None = None) -> None:
    options = Options("Train a Fusion-in-Decoder reader.")
    options.add_reader_options()
    options.add_optim_options()
    opt = options.parse(argv)
    run_dir, logger = dist.start_run(opt, lock=True)

    # Data first: a bad file should fail before a large model loads.
    train_examples = load_questions(opt.train_data, opt.maxload)
    require_targets(train_examples, opt.train_data)
    train_dataset = ReaderDataset(train_examples, opt.n_context, opt.no_title, seed=opt.seed, source=opt.train_data)
    eval_examples = load_questions(opt.eval_data, opt.maxload) if opt.eval_data != "none" else []
    eval_dataset = ReaderDataset(eval_examples, opt.n_context, opt.no_title, source=opt.eval_data)

    model_dir, resume_dir = checkpoint.start_point(opt, run_dir, default_model=f"t5-{opt.model_size}")
    logger.info("model weights from %s%s", model_dir, " (resuming)" if resume_dir else "")
    model = FiDT5.load(model_dir, logger=logger)  # first: a directory without a model says so
    tokenizer = load_tokenizer(tokenizer_source(opt, model_dir))
    set_dropout(model, opt.dropout)
    model.set_checkpoint(opt.use_checkpoint)
    model = model.to(opt.device)
    logger.info("reader: %.1fM parameters on %s", count_params(model) / 1e6, opt.device)

    # Evaluation sees no target (it generates), so the label length is irrelevant there.
    collator = ReaderCollator(tokenizer, opt.text_maxlength, opt.n_context, opt.answer_maxlength)
    logger.info("%d training examples, %d dev examples", len(train_dataset), len(eval_dataset))

    def evaluate(model) -> dict[str, float]:
        if not eval_examples:
            return {}
        results = generate_answers(model, tokenizer, eval_dataset, collator, opt, desc="dev")
        em, _ = exact_match(results, eval_examples)
        return {} if em is None else {"exact_match": em}

    task = Task(train_dataset, collator, reader_loss, evaluate, metric="exact_match", higher_is_better=True)
    train(task, model, tokenizer, opt, run_dir, resume_dir, logger)
    logger.info("done: checkpoints in %s", checkpoint.checkpoint_root(run_dir))
    dist.destroy()


if __name__ == "__main__":
    cli(main)
