"""Embed the passages with a trained retriever, one shard per process (docs/scripts.md).

    python generate_passage_embeddings.py --model_path <retriever_dir> --passages psgs_w100.tsv \
        --output_path wikipedia_embeddings/wiki --shard_id 0 --num_shards 10 --per_gpu_batch_size 500

    torchrun --nproc_per_node 8 generate_passage_embeddings.py --model_path <retriever_dir> \
        --passages psgs_w100.tsv --output_path wikipedia_embeddings/wiki --embedding_dtype float16

Shard `shard_id` of `num_shards` covers passages [start, end) in file order (equal
shards, the last takes the remainder) and is written to `<output_path>_<shard_id:02d>.npz`
(passage ids + float32 or float16 embeddings; no pickle). Under torchrun each process
takes its GPU (cuda:LOCAL_RANK; CPU without GPUs) and its shards: --num_shards defaults to
the number of processes W and rank r embeds shards r, r+W, r+2W, ... (--shard_id is
refused there). Without torchrun, run one process per shard, --device picking the GPU.
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from src import distributed as dist
from src.cli import cli, finish, init_logger, warn_ignored
from src.configs import config_from
from src.corpus.embeddings import (
    embed_texts,
    pools_over_padding,
    shard_path,
    shard_range,
    shards_of_process,
    write_shard,
)
from src.corpus.passages import PassageStore
from src.devices import default_device, resolve_precision
from src.errors import DataError, PassageFileError
from src.options import Options
from src.retriever.task import EncoderChoice, load_retriever

# Shared option groups: accepted (the original's scripts shared them), unused here: no run
# directory (the shards go to --output_path), no randomness, no training, no DataLoader.
IGNORED = (
    "name",
    "checkpoint_dir",
    "model_name_or_path",
    "maxload",
    "seed",
    "eval_freq",
    "save_freq",
    "eval_print_freq",
    "num_workers",
)


def parse_options(argv=None) -> tuple[Options, argparse.Namespace]:
    options = Options(
        "Embed the passages of a .tsv with a trained retriever, one shard per process (or torchrun rank)."
    )
    options.add_embedding_options()
    options.mark_ignored(IGNORED)
    options.set_help("model_path", "the retriever: a directory saved by train_retriever.py (required)")
    options.parser.set_defaults(per_gpu_batch_size=32)
    g = options.parser.add_argument_group("embedding extras")
    g.add_argument(
        "--no_sort_by_length",
        action="store_true",
        help="batch passages in file order with fixed padding to --passage_maxlength (the original's way; slower)",
    )
    return options, options.parse(argv)


def get_options(argv=None) -> argparse.Namespace:
    return parse_options(argv)[1]


def open_store(opt) -> PassageStore:
    """The passages, their offset index built once: under torchrun rank 0 builds and caches it
    while the others wait, then they reuse it."""
    if dist.get_rank() != 0:
        dist.barrier()
    try:
        store = PassageStore(opt.passages)
    except PassageFileError as e:
        raise DataError(str(e)) from None
    finally:
        if dist.get_rank() == 0:
            dist.barrier()
    return store


def main(argv=None) -> None:
    options, opt = parse_options(argv)
    logger = init_logger(None)
    warn_ignored(opt, options.given, IGNORED, logger)
    if not opt.passages:
        raise DataError("--passages is required (a .tsv with columns id, text, title)")
    if opt.model_path in (None, "none"):
        raise DataError("--model_path is required (a directory saved by train_retriever.py)")
    # Launch (issue 20): torchrun or the tasks of an srun step, as every script (distributed.py).
    world_size = dist.launched_world_size()
    shard_ids, num_shards = shards_of_process(opt.shard_id, opt.num_shards, dist.launched_rank(), world_size)
    if world_size > 1:  # GPU LOCAL_RANK mod the visible GPUs (CPU without GPUs or with --device cpu)
        device = dist.init_distributed(
            opt.device, opt.local_rank, opt.main_port, opt.dist_timeout_minutes, tf32=not opt.no_tf32
        ).device
        if num_shards % world_size:  # the final barrier waits on the gloo wait group, not NCCL's watchdog
            logger.warning(
                "%d shards on %d processes: some embed one shard more while the others wait; a multiple of %d "
                "keeps every process busy",
                num_shards,
                world_size,
                world_size,
            )
    else:
        device = default_device(opt.device)
    precision = resolve_precision(opt.precision, device)
    try:
        store = open_store(opt)
        choice = config_from(EncoderChoice, opt, given=set(options.given))
        model, tokenizer = load_retriever(opt.model_path, choice, logger, trained=True)
        model = model.eval().to(device)
        fixed_padding = opt.no_sort_by_length or pools_over_padding(model, "passage")
        logger.info(
            "device %s, %s, batch %d, %s, %s embeddings; shards %s of %d",
            device,
            precision,
            opt.per_gpu_batch_size,
            "fixed padding" if fixed_padding else "length-sorted batches with dynamic padding",
            opt.embedding_dtype,
            shard_ids,
            num_shards,
        )
        for shard_id in shard_ids:
            embed_shard(opt, device, precision, store, model, tokenizer, shard_id, num_shards, fixed_padding, logger)
        dist.barrier()  # every shard written before rank 0 says so
        if world_size > 1 and dist.get_rank() == 0:
            logger.info("all %d shards written by %d processes", num_shards, world_size)
    finally:
        finish()


def embed_shard(
    opt, device, precision: str, store, model, tokenizer, shard_id: int, num_shards: int, fixed_padding: bool, logger
) -> None:
    start, end = shard_range(len(store), shard_id, num_shards)
    output = shard_path(opt.output_path, shard_id)
    logger.info(
        "shard %d/%d: passages [%d, %d) of %d in %s -> %s",
        shard_id,
        num_shards,
        start,
        end,
        len(store),
        opt.passages,
        output,
    )
    texts = (model.format_passage(p["title"], p["text"]) for p in store.iter_range(start, end))  # the model's recipe
    t0 = time.time()
    with tqdm(total=end - start, desc=f"shard {shard_id}", unit="psg") as bar:
        embeddings = embed_texts(
            model.embed_passages,
            tokenizer,
            texts,
            batch_size=opt.per_gpu_batch_size,
            max_length=model.config.passage_maxlength,
            device=device,
            precision=precision,
            sort_by_length=not opt.no_sort_by_length,
            pad_to_max_length=fixed_padding,
            progress=bar,
            dtype=opt.embedding_dtype,
        )
    elapsed = time.time() - t0
    write_shard(output, store.id_array(start, end), embeddings, dtype=opt.embedding_dtype)
    logger.info(
        "wrote %d %s embeddings of dim %d to %s (%.1f passages/s)",
        len(embeddings),
        opt.embedding_dtype,
        embeddings.shape[1] if embeddings.size else 0,
        output,
        (end - start) / max(elapsed, 1e-9),
    )


if __name__ == "__main__":
    cli(main)
