"""Embed one shard of the passages with a trained retriever (README "5. Retrieve").

    python generate_passage_embeddings.py --model_path <retriever_dir> --passages psgs_w100.tsv \
        --output_path wikipedia_embeddings/wiki --shard_id 0 --num_shards 10 --per_gpu_batch_size 500

Shard `shard_id` of `num_shards` covers passages [start, end) in file order (equal
shards, the last takes the remainder) and is written to
`<output_path>_<shard_id:02d>.npz` (passage ids + float32 embeddings; no pickle).
Run one process per shard, e.g. one per GPU.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from src.cli import cli, init_logger, warn_ignored
from src.datasets import format_passage
from src.devices import default_device, resolve_precision
from src.embedding import embed_texts, pools_over_padding, shard_path, shard_range, write_shard
from src.errors import DataError, PassageFileError
from src.options import Options
from src.passages import PassageStore
from src.retriever import load_retriever

# Shared option groups: accepted (the original's scripts shared them), unused here: no run
# directory (the shard goes to --output_path), no process group (one process per shard,
# --device picks the GPU), no randomness, no training, no DataLoader.
IGNORED = (
    "name",
    "checkpoint_dir",
    "model_name_or_path",
    "maxload",
    "local_rank",
    "main_port",
    "seed",
    "eval_freq",
    "save_freq",
    "eval_print_freq",
    "num_workers",
)


def get_options(argv=None):
    options = Options("Embed one shard of a passages .tsv with a trained retriever.")
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
    return options.parse(argv)


def main(argv=None) -> None:
    opt = get_options(argv)
    logger = init_logger(None)
    warn_ignored(opt, IGNORED, logger)
    if not opt.passages:
        raise DataError("--passages is required (a .tsv with columns id, text, title)")
    if opt.model_path in (None, "none"):
        raise DataError("--model_path is required (a directory saved by train_retriever.py)")
    opt.device = device = default_device(opt.device)
    opt.precision = resolve_precision(opt.precision, device)

    try:
        store = PassageStore(opt.passages)
    except PassageFileError as e:
        raise DataError(str(e)) from None
    try:
        start, end = shard_range(len(store), opt.shard_id, opt.num_shards)
    except ValueError as e:
        raise DataError(str(e)) from None
    output = shard_path(opt.output_path, opt.shard_id)
    logger.info(
        "shard %d/%d: passages [%d, %d) of %d in %s -> %s",
        opt.shard_id,
        opt.num_shards,
        start,
        end,
        len(store),
        opt.passages,
        output,
    )

    model, tokenizer = load_retriever(opt.model_path, opt, logger, trained=True)
    model = model.eval().to(device)
    fixed_padding = opt.no_sort_by_length or pools_over_padding(model, "passage")
    logger.info(
        "device %s, %s, batch %d, %s",
        device,
        opt.precision,
        opt.per_gpu_batch_size,
        "fixed padding" if fixed_padding else "length-sorted batches with dynamic padding",
    )

    texts = (format_passage(p["title"], p["text"], opt.no_title) for p in store.iter_range(start, end))
    t0 = time.time()
    with tqdm(total=end - start, desc=f"shard {opt.shard_id}", unit="psg") as bar:
        embeddings = embed_texts(
            model.embed_passages,
            tokenizer,
            texts,
            batch_size=opt.per_gpu_batch_size,
            max_length=opt.passage_maxlength,
            device=device,
            precision=opt.precision,
            sort_by_length=not opt.no_sort_by_length,
            pad_to_max_length=fixed_padding,
            progress=bar,
        )
    elapsed = time.time() - t0
    write_shard(output, store.ids(start, end), embeddings)
    logger.info(
        "wrote %d embeddings of dim %d to %s (%.1f passages/s)",
        len(embeddings),
        embeddings.shape[1] if embeddings.size else 0,
        output,
        (end - start) / max(elapsed, 1e-9),
    )


if __name__ == "__main__":
    cli(main)
