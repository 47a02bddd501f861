"""Retrieve passages for every question with a trained retriever and a FAISS index (README "5. Retrieve").

    python passage_retrieval.py --model_path <retriever_dir> --passages psgs_w100.tsv \
        --data_path data.json --passages_embeddings "wikipedia_embeddings/wiki_*" \
        --output_path retrieved_data.json --n-docs 100

Writes the question file with `ctxs` replaced by the top `--n-docs` passages
`{id, title, text, score, hasanswer}`, best first, and logs top-k accuracy.

    python passage_retrieval.py --evaluate_only --data retrieved.json [--output_path out.json]

recomputes `hasanswer` and top-k accuracy of any retrieval file (ours, DPR's, BM25's).
"""

from __future__ import annotations

import glob
import logging
import logging.handlers
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from src.cli import cli, init_logger, warn_ignored
from src.datasets import format_question
from src.devices import default_device, resolve_precision
from src.embedding import check_shard, embed_texts, pools_over_padding, read_shard
from src.errors import DataError, EmbeddingFileError, PassageFileError
from src.evaluation import retrieval_hits, top_k_accuracy
from src.index import INDEX_FILE, Indexer
from src.options import Options
from src.passages import PassageStore
from src.questions import load_questions, write_questions
from src.retriever import load_retriever

REPORTED_K = (1, 5, 20, 100)

# Shared option groups and the original's command lines: accepted, unused here. No run
# directory (the log goes beside --output_path), no process group, no randomness, no
# training, no DataLoader; passages are embedded by generate_passage_embeddings.py.
IGNORED = (
    "name",
    "checkpoint_dir",
    "model_name_or_path",
    "local_rank",
    "main_port",
    "seed",
    "eval_freq",
    "save_freq",
    "eval_print_freq",
    "num_workers",
    "passage_maxlength",
)
# What only retrieval reads: ignored with --evaluate_only.
RETRIEVAL_ONLY = (
    "model_path",
    "tokenizer_name_or_path",
    "per_gpu_batch_size",
    "precision",
    "no_fp16",
    "device",
    "passages",
    "passages_embeddings",
    "n_docs",
    "save_or_load_index",
    "question_maxlength",
    "indexing_batch_size",
    "n_subquantizers",
    "n_bits",
    "index_type",
    "n_lists",
    "n_probe",
    "allow_pickle_embeddings",
)


def get_options(argv=None):
    options = Options("Retrieve passages for questions with a trained retriever and a FAISS index.")
    options.add_retrieval_options()
    options.mark_ignored(IGNORED)
    options.set_help("model_path", "the retriever: a directory saved by train_retriever.py (required)")
    options.parser.set_defaults(per_gpu_batch_size=64)
    g = options.parser.add_argument_group("retrieval extras")
    g.add_argument(
        "--index_type",
        choices=["flat", "pq", "ivf", "hnsw"],
        default=None,
        help="FAISS index (default: pq when --n-subquantizers > 0, else exact flat)",
    )
    g.add_argument("--n_lists", type=int, default=1024, help="IVF: number of inverted lists")
    g.add_argument("--n_probe", type=int, default=16, help="IVF: lists searched per query")
    g.add_argument(
        "--allow_pickle_embeddings",
        action="store_true",
        help="also read pickled embedding shards of the original code (unpickling runs code: trusted files only)",
    )
    g.add_argument(
        "--evaluate_only",
        action="store_true",
        help="no retrieval: recompute hasanswer and top-k accuracy of the retrieval file --data "
        "(and write it to --output_path if given); the retrieval flags are then ignored, with a warning",
    )
    return options.parse(argv)


def embedding_files(pattern: str, allow_pickle: bool = False) -> list[str]:
    """Shard files matched by the glob, sorted, each given a quick check (check_shard); our saved
    index files are never shards."""
    files = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    skip = {INDEX_FILE, "index_ids.npy", "index_meta.json"}
    files = [p for p in files if os.path.basename(p) not in skip and not p.endswith((".log", ".tmp"))]
    if not files:
        raise DataError(f"--passages_embeddings {pattern!r} matches no embedding files")
    for path in files:
        try:
            check_shard(path, allow_pickle=allow_pickle)
        except EmbeddingFileError as e:
            raise DataError(str(e)) from None
    return files


def shards_signature(files: list[str]) -> list[list]:
    """What the index was built from; a saved index is reused only if this is unchanged."""
    return [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files]


def build_index(files: list[str], dim: int, opt, logger: logging.Logger) -> Indexer:
    """Stream the shards into the index, `indexing_batch_size` vectors at a time."""
    indexer = Indexer(
        dim, opt.n_subquantizers, opt.n_bits, kind=opt.index_type, n_lists=opt.n_lists, n_probe=opt.n_probe
    )
    batch = opt.indexing_batch_size
    carry_ids, carry_emb = np.array([], dtype=str), np.zeros((0, dim), np.float32)  # < batch vectors
    for path in tqdm(files, desc="indexing shards", unit="shard"):
        try:
            ids, emb = read_shard(path, allow_pickle=opt.allow_pickle_embeddings)
        except EmbeddingFileError as e:
            raise DataError(str(e)) from None
        if len(emb) and emb.shape[1] != dim:
            raise DataError(f"{path}: embeddings have dimension {emb.shape[1]} but the retriever's is {dim}")
        # Top the carried vectors up to a full batch, then add the shard in slices: no
        # shard is ever copied whole (the original re-stacked everything per file).
        take = min(batch - len(carry_ids), len(ids))
        carry_ids = np.concatenate([carry_ids, ids[:take]])
        carry_emb = np.concatenate([carry_emb, emb[:take]])
        if len(carry_ids) < batch:
            continue
        indexer.index_data(carry_ids, carry_emb)
        start = take
        while len(ids) - start >= batch:
            indexer.index_data(ids[start : start + batch], emb[start : start + batch])
            start += batch
        carry_ids, carry_emb = ids[start:], emb[start:]
    if len(carry_ids):
        indexer.index_data(carry_ids, carry_emb)
    logger.info("indexed %d passages from %d shard(s) (%s index)", len(indexer), len(files), indexer.kind)
    return indexer


def index_kind(opt) -> str:
    return opt.index_type or ("pq" if opt.n_subquantizers > 0 else "flat")


def unused_index_flags(opt) -> dict[str, str]:
    """{flag: why} of the index flags that the chosen kind of index does not read."""
    kind = index_kind(opt)
    unused = {}
    if kind != "ivf":
        unused.update(dict.fromkeys(("n_lists", "n_probe"), f"only --index_type ivf reads it (this index: {kind})"))
    if kind != "pq":
        unused.update(dict.fromkeys(("n_subquantizers", "n_bits"), f"only a pq index reads it (this index: {kind})"))
    return unused


def get_index(files: list[str], dim: int, opt, logger: logging.Logger) -> Indexer:
    index_dir = Path(files[0]).parent
    signature = {
        "shards": shards_signature(files),
        "kind": index_kind(opt),
        "n_subquantizers": opt.n_subquantizers,
        "n_bits": opt.n_bits,
    }
    if signature["kind"] == "ivf":
        signature["n_lists"] = opt.n_lists  # n_probe is a search setting: set on the loaded index
    if opt.save_or_load_index and Indexer.exists(index_dir):
        if Indexer.read_meta(index_dir).get("extra") == signature:
            indexer = Indexer.deserialize_from(index_dir)
            indexer.set_n_probe(opt.n_probe)
            return indexer
        logger.warning("index in %s was built from other shards or settings; rebuilding it", index_dir)
    t0 = time.time()
    indexer = build_index(files, dim, opt, logger)
    logger.info("indexing took %.1fs", time.time() - t0)
    if opt.save_or_load_index:
        indexer.serialize(index_dir, extra=signature)
    return indexer


def add_hasanswer(examples: list[dict], workers: int, logger: logging.Logger) -> None:
    """Recompute every ctx's hasanswer from its text (DPR convention) and log top-k accuracy."""
    with_answers = [ex for ex in examples if ex.get("answers")]
    t0 = time.time()
    hits = retrieval_hits(
        [ex["answers"] for ex in with_answers],
        [[c["text"] for c in ex.get("ctxs") or []] for ex in with_answers],
        workers=workers,
    )
    for ex, ex_hits in zip(with_answers, hits):
        for ctx, hit in zip(ex.get("ctxs") or [], ex_hits):
            ctx["hasanswer"] = hit
    for ex in examples:
        if not ex.get("answers"):
            for ctx in ex.get("ctxs") or []:
                ctx["hasanswer"] = False
    skipped = len(examples) - len(with_answers)
    logger.info(
        "hasanswer computed for %d questions in %.1fs%s",
        len(with_answers),
        time.time() - t0,
        f" ({skipped} without answers are left out of the accuracy)" if skipped else "",
    )
    accuracy = top_k_accuracy(hits)
    if not accuracy:
        logger.info("no question with answers and passages: no top-k accuracy")
        return
    shown = sorted({k for k in REPORTED_K if k <= len(accuracy)} | {len(accuracy)})
    logger.info("top-k accuracy: " + ", ".join(f"top-{k} {100 * accuracy[k - 1]:.2f}%" for k in shown))
    every_k = "top-k accuracy for every k: " + " ".join(f"{k}:{a:.4f}" for k, a in enumerate(accuracy, 1))
    logging.getLogger("fid.topk").info(every_k)  # log file only (see main)


def main(argv=None) -> None:
    opt = get_options(argv)
    logger = init_logger(None)
    file_logger = logging.getLogger("fid.topk")  # accuracy for every k: log file only
    file_logger.handlers.clear()
    file_logger.propagate = False
    # The whole log, every k included, goes beside the output. It is held in memory until every
    # input has been read (open_log), so that a run stopped by a bad input leaves the previous
    # run's output and log as they were.
    held = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    if opt.output_path:
        logger.addHandler(held)
        file_logger.addHandler(held)
        file_logger.setLevel(logging.INFO)

    def open_log() -> None:
        if not opt.output_path or held not in logger.handlers:
            return
        Path(opt.output_path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(f"{opt.output_path}.log", mode="w", encoding="utf-8")
        handler.setFormatter(logger.handlers[0].formatter)
        held.setTarget(handler)
        held.flush()
        for log in (logger, file_logger):
            log.removeHandler(held)
            log.addHandler(handler)

    warn_ignored(opt, IGNORED, logger)
    if opt.evaluate_only:
        warn_ignored(opt, RETRIEVAL_ONLY, logger, reason="--evaluate_only retrieves nothing")
    else:
        warn_ignored(opt, unused_index_flags(opt), logger)
    if not opt.data:
        raise DataError("--data (or --data_path) is required: the question file")
    workers = max(1, min(opt.validation_workers, os.cpu_count() or 1))
    examples = load_questions(opt.data, opt.maxload)
    logger.info("%d questions from %s", len(examples), opt.data)

    if opt.evaluate_only:
        open_log()
        add_hasanswer(examples, workers, logger)
        if opt.output_path:
            write_questions(opt.output_path, examples)
            logger.info("wrote %s", opt.output_path)
        return

    for flag in ("passages", "passages_embeddings", "output_path"):
        if not getattr(opt, flag):
            raise DataError(f"--{flag} is required")
    if opt.model_path in (None, "none"):
        raise DataError("--model_path is required (a directory saved by train_retriever.py)")
    try:
        store = PassageStore(opt.passages)  # checked first: a bad file fails before the slow part
    except PassageFileError as e:
        raise DataError(str(e)) from None
    files = embedding_files(opt.passages_embeddings, opt.allow_pickle_embeddings)

    opt.device = device = default_device(opt.device)
    opt.precision = resolve_precision(opt.precision, device)
    model, tokenizer = load_retriever(opt.model_path, opt, logger, trained=True)
    model = model.eval().to(device)
    logger.info("embedding questions on %s in %s", device, opt.precision)
    with tqdm(total=len(examples), desc="embedding questions", unit="q") as bar:
        questions = embed_texts(
            model.embed_questions,
            tokenizer,
            [format_question(ex["question"]) for ex in examples],
            batch_size=opt.per_gpu_batch_size,
            max_length=opt.question_maxlength,
            device=device,
            precision=opt.precision,
            pad_to_max_length=pools_over_padding(model, "question"),
            progress=bar,
        )  # (n_questions, dim)
    del model
    dim = questions.shape[1]

    indexer = get_index(files, dim, opt, logger)
    t0 = time.time()
    results = indexer.search_knn(questions, opt.n_docs)
    logger.info("search: %d questions in %.1fs", len(questions), time.time() - t0)

    for ex, (ids, scores) in zip(examples, results):
        ctxs = []
        for pid, score in zip(ids.tolist(), scores.tolist()):
            passage = store.get(pid)
            if passage is None:
                raise DataError(f"passage id {pid!r} of the embeddings is not in {opt.passages}")
            ctxs.append({**passage, "score": score})
        ex["ctxs"] = ctxs
    open_log()  # every input has been read
    add_hasanswer(examples, workers, logger)
    write_questions(opt.output_path, examples)
    logger.info("wrote %d questions with %d passages each to %s", len(examples), opt.n_docs, opt.output_path)


if __name__ == "__main__":
    cli(main)
