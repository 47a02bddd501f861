"""Distil a reader's cross-attention scores into a bi-encoder retriever (paper [2]).

    python train_retriever.py --train_data train_wscores.json --eval_data dev_wscores.json \
        --model_name_or_path bert-base-uncased --indexing_dimension 768 --n_context 100 \
        --per_gpu_batch_size 8 --total_steps 20000 --name my_retriever

The data files are `dataset_wscores.json` files written by `test_reader.py
--write_crossattention_scores`: every ctx carries the reader's `score`, the gold score
the retriever learns to match (KL between the softmaxes over each question's passages).
Multi-GPU: `torchrun --nproc_per_node 8 train_retriever.py ...`. A run whose directory
already holds `checkpoint/latest` resumes from it. Checkpoints are `save_pretrained`
directories with the tokenizer, loadable by `generate_passage_embeddings.py
--model_path` and `passage_retrieval.py --model_path`.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from src import checkpoint, dist
from src.data import RetrieverCollator, RetrieverDataset, load_questions
from src.evaluation import per_question_ranking_metrics
from src.model import Retriever, distillation_loss
from src.options import Options
from src.trainer import Task, train
from src.util import autocast, cli, count_params, set_dropout

RANKING_KS = (1, 2, 5)


def to_device(batch, device: torch.device):
    """Collator batch → (question_ids, question_mask, passage_ids, passage_mask, gold_scores) on `device`."""
    _, question_ids, question_mask, passage_ids, passage_mask, gold_scores = batch
    return tuple(t.to(device) for t in (question_ids, question_mask, passage_ids, passage_mask, gold_scores))


def make_loss_fn(opt):
    def loss_fn(model, batch) -> torch.Tensor:
        _, loss = model(
            *to_device(batch, opt.device),
            temperature_gold=opt.temperature_gold,
            temperature_score=opt.temperature_score,
            in_batch_negatives=opt.in_batch_negatives,
        )
        return loss

    return loss_fn


@torch.no_grad()
def evaluate(model: Retriever, dataset, collator, opt, logger) -> dict[str, float]:
    """Dev metrics over the whole dev set (each rank takes every world_size-th question,
    sums added over ranks): KL loss, mean inversions, avg/idx top-k (k = 1, 2, 5)."""
    was_training = model.training
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(opt.rank, len(dataset), opt.world_size))
    loader = DataLoader(
        shard, batch_size=opt.per_gpu_batch_size, shuffle=False, collate_fn=collator, num_workers=opt.num_workers
    )
    names = ["loss", "inversions"] + [f"{m}_top{k}" for m in ("avg", "idx") for k in RANKING_KS]
    sums = dict.fromkeys(names, 0.0)  # sums over this rank's questions
    count = 0
    for i, batch in enumerate(tqdm(loader, desc="dev", disable=not opt.is_main, leave=False)):
        question_ids, question_mask, passage_ids, passage_mask, gold = to_device(batch, opt.device)
        with autocast(opt):
            scores, _ = model(question_ids, question_mask, passage_ids, passage_mask)
        # Loss in fp32; batch mean × batch size, so the result is the mean over all questions.
        loss = distillation_loss(scores.float(), gold, opt.temperature_gold, opt.temperature_score)
        sums["loss"] += loss.item() * len(gold)
        for name, values in per_question_ranking_metrics(scores, gold, RANKING_KS).items():
            sums[name] += float(values.sum())
        count += len(gold)
        if opt.eval_print_freq > 0 and (i + 1) % opt.eval_print_freq == 0:
            logger.info("dev: %d / %d batches", i + 1, len(loader))
    *totals, total_count = dist.sum_over_ranks([sums[name] for name in names] + [float(count)])
    metrics = {name: total / max(total_count, 1.0) for name, total in zip(names, totals)}
    if was_training:
        model.train()
    return metrics


def main(argv: list[str] | None = None) -> None:
    options = Options("Distil a reader's cross-attention scores into a bi-encoder retriever.")
    options.add_retriever_options()
    options.add_optim_options()
    opt = options.parse(argv)
    run_dir, logger = dist.start_run(opt, lock=True)

    # Data first: a bad file should fail before a large model loads.
    train_examples = load_questions(opt.train_data, opt.maxload)
    train_dataset = RetrieverDataset(train_examples, opt.n_context, opt.no_title, source=opt.train_data)
    eval_examples = load_questions(opt.eval_data, opt.maxload) if opt.eval_data != "none" else []
    eval_dataset = RetrieverDataset(eval_examples, opt.n_context, opt.no_title, source=opt.eval_data)

    model_dir, resume_dir = checkpoint.start_point(opt, run_dir, default_model="bert-base-uncased")
    logger.info("retriever weights from %s%s", model_dir, " (resuming)" if resume_dir else "")
    retriever, tokenizer = Retriever.load(opt, model_dir, logger)
    set_dropout(retriever, opt.dropout)
    retriever = retriever.to(opt.device)
    logger.info("retriever: %.1fM parameters on %s", count_params(retriever) / 1e6, opt.device)

    collator = RetrieverCollator(
        tokenizer,
        opt.n_context,
        opt.question_maxlength,
        opt.passage_maxlength,
        pad_questions_to_max=not retriever.config.apply_question_mask,
        pad_passages_to_max=not retriever.config.apply_passage_mask,
    )
    logger.info("%d training questions, %d dev questions", len(train_dataset), len(eval_dataset))

    def eval_fn(model) -> dict[str, float]:
        return evaluate(model, eval_dataset, collator, opt, logger) if eval_examples else {}

    task = Task(train_dataset, collator, make_loss_fn(opt), eval_fn, metric="loss", higher_is_better=False)
    train(task, retriever, tokenizer, opt, run_dir, resume_dir, logger)
    logger.info("done: checkpoints in %s", checkpoint.checkpoint_root(run_dir))
    dist.destroy()


if __name__ == "__main__":
    cli(main)
