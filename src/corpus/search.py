"""Passage retrieval over embedding shards, in one process or in W `torchrun` processes
(docs/corpus-at-scale.md): each process's share of the shards and its index, chunked search,
and the merge of every process's top k into the global top k.

Corpus order: the shard files in sorted glob order, the rows of each in file order; a
passage's global row is its position in that order. Rank r of W indexes the r-th of W
contiguous runs of the files (`share_of`), so its FAISS row j is global row offset_r + j.

Ranking: by score, best first; equal scores by global row (corpus order). One process
ranks by the same rule (FAISS alone puts equal scores in descending row order), so one
process and W agree exactly.

Exact scores: FAISS's flat search over a batch of queries multiplies matrices with BLAS,
whose last float bits depend on where a vector sits in the blocks: which process holds
it, which queries share the batch, how many threads run. So a flat index's candidates
are rescored with FAISS's per-pair kernel (fvec_inner_product, the one its own search
uses for a few queries), which depends on the two vectors alone. FAISS is asked for
EXACT_MARGIN candidates beyond k, so that one that rounding pushed below the k-th still
comes back, and deeper where the cut is not clear (`flat_top_k`). The other kinds score
approximately and are ranked as FAISS scores them.
"""

from __future__ import annotations

import glob
import logging
import os
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import faiss
import numpy as np
from tqdm import tqdm

from src import distributed as dist
from src.corpus.answer_hits import AnswerHits
from src.corpus.embeddings import check_shard, read_shard
from src.corpus.faiss_index import IDS_FILE, INDEX_FILE, META_FILE, IndexConfig, Indexer
from src.corpus.passages import PassageStore
from src.data.questions import iter_entries, validate_example
from src.errors import DataError, is_bad_input

EXACT_MARGIN = 16  # candidates beyond k that a flat index returns for rescoring
SEARCH_BATCH = 2048  # queries per FAISS call (as Indexer.search_knn)
WRITE_BATCH = 512  # examples given their passage texts and hasanswer at once
_NO_ROW = np.iinfo(np.int64).max  # sorts after every real row


# ---------------------------------------------------------------------------
# Shards and each process's index
# ---------------------------------------------------------------------------


def embedding_files(pattern: str, allow_pickle: bool = False) -> list[str]:
    """Shard files matched by the glob, sorted (the corpus order), each given a quick check
    (check_shard); our saved index files are never shards."""
    files = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    skip = {INDEX_FILE, IDS_FILE, META_FILE}
    files = [p for p in files if os.path.basename(p) not in skip and not p.endswith((".log", ".tmp"))]
    if not files:
        raise DataError(f"--passages_embeddings {pattern!r} matches no embedding files")
    for path in files:
        check_shard(path, allow_pickle=allow_pickle)  # EmbeddingFileError: a bad input, named
    return files


def share_of(files: list[str], rank: int, world_size: int) -> list[str]:
    """Rank r's shard files: the r-th of W contiguous runs of `files`, as equal in number as
    can be (the first len(files) % W ranks take one more). Each process indexes whole files,
    so fewer files than processes is an error."""
    if len(files) < world_size:
        raise DataError(
            f"--passages_embeddings: {len(files)} shard file(s) for {world_size} processes; each process "
            f"indexes whole shards: run at most {len(files)} processes, or write more shards "
            "(generate_passage_embeddings.py --num_shards)"
        )
    per, extra = divmod(len(files), world_size)
    start = rank * per + min(rank, extra)
    return files[start : start + per + (rank < extra)]


def build_index(
    files: list[str],
    dim: int,
    config: IndexConfig,
    logger: logging.Logger,
    batch: int = 50000,
    allow_pickle: bool = False,
) -> Indexer:
    """Stream the shards into the index, `batch` vectors (--indexing_batch_size) at a time."""
    indexer = Indexer.from_config(dim, config)
    carry_ids, carry_emb = None, np.zeros((0, dim), np.float32)  # < batch vectors
    for path in tqdm(files, desc="indexing shards", unit="shard"):
        # compact: int64 ids and float16 stay as stored; index_data converts batch by batch
        ids, emb = read_shard(path, allow_pickle=allow_pickle, compact=True)
        if carry_ids is None:
            carry_ids = ids[:0]
        if carry_ids.dtype.kind != ids.dtype.kind:  # shards with integer and string ids: strings for both
            carry_ids, ids = carry_ids.astype(str), ids.astype(str)
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
    if carry_ids is not None and len(carry_ids):
        indexer.index_data(carry_ids, carry_emb)
    indexer.finish()
    logger.info("indexed %d passages from %d shard(s) (%s index)", len(indexer), len(files), indexer.kind)
    return indexer


# ---------------------------------------------------------------------------
# Search and merge
# ---------------------------------------------------------------------------


class TopK(NamedTuple):
    """The top k of n queries, best first; past the passages found: score -inf, row -1."""

    scores: np.ndarray  # (n, k) float32
    rows: np.ndarray  # (n, k) int64 global rows
    ids: np.ndarray  # (n, k) passage ids (int64 or str; meaningless where row is -1)

    def part(self, start: int, end: int) -> TopK:
        return TopK(self.scores[start:end], self.rows[start:end], self.ids[start:end])


def ranking(scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(n, m) candidates → (n, m) column order: score descending, then global row ascending."""
    return np.lexsort((np.where(rows >= 0, rows, _NO_ROW), -scores), axis=-1)


def exact_scores(index: faiss.IndexFlat, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """FAISS's per-pair inner product of each query (b, dim) with its candidate rows (b, m) of
    the flat index; -inf where a row is -1."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out = np.empty(rows.shape, dtype=np.float32)
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(out), faiss.swig_ptr(queries), index.get_xb(), faiss.swig_ptr(rows), index.d, *rows.shape
    )
    return out


def flat_top_k(index: faiss.IndexFlat, queries: np.ndarray, k: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top k (per-pair scores, then rows) of queries (b, dim) in a flat index: FAISS's
    `depth` best by its batched scores, rescored and ranked; (b, min(k, ntotal)) each.

    A query whose cut is not clear is searched again twice as deep: one whose depth-th FAISS
    score, plus four times the largest rounding difference seen among its candidates (and one
    part in a million), reaches its k-th exact score, since a passage left out might then
    belong in (a run of equal vectors longer than the margin, say)."""
    found_scores, found = index.search(queries, depth)  # (b, depth) each; row -1: none
    scores = np.where(found >= 0, exact_scores(index, queries, found), -np.inf)
    best = ranking(scores, found)[:, :k]
    top_scores, top_rows = np.take_along_axis(scores, best, axis=1), np.take_along_axis(found, best, axis=1)
    if depth >= index.ntotal or top_scores.shape[1] < k:
        return top_scores, top_rows
    kth = top_scores[:, -1]
    rounding = np.abs(found_scores - scores).max(axis=1)
    again = found_scores[:, -1] + 4 * rounding + 1e-6 * np.abs(kth) >= kth
    if again.any():
        top_scores[again], top_rows[again] = flat_top_k(index, queries[again], k, min(2 * depth, index.ntotal))
    return top_scores, top_rows


def search_share(indexer: Indexer, queries: np.ndarray, k: int, offset: int = 0) -> TopK:
    """The top k of every query (n, dim) among this process's passages, whose global rows
    start at `offset`."""
    indexer.finish()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    exact = isinstance(indexer.index, faiss.IndexFlat)
    depth = min(len(indexer), k + EXACT_MARGIN if exact else k)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(queries) if depth else 0, SEARCH_BATCH):
        batch = queries[start : start + SEARCH_BATCH]
        if exact:
            found_scores, found = flat_top_k(indexer.index, batch, k, depth)
        else:
            found_scores, found = indexer.index.search(batch, depth)  # (b, depth) each; row -1: none
            found_scores = np.where(found >= 0, found_scores, -np.inf)
            best = ranking(found_scores, found)
            found_scores, found = np.take_along_axis(found_scores, best, 1), np.take_along_axis(found, best, 1)
        end, width = start + len(batch), found.shape[1]
        scores[start:end, :width] = found_scores
        rows[start:end, :width] = np.where(found >= 0, found + offset, -1)
    id_map = indexer.ids
    if not len(id_map):
        return TopK(scores, rows, np.zeros(rows.shape, dtype=np.int64))
    return TopK(scores, rows, id_map[np.where(rows >= 0, rows - offset, 0)])


def merge_top_k(parts: list[TopK], k: int) -> TopK:
    """The top k of every query over all parts (each a process's TopK of the same queries)."""
    if len(parts) == 1:
        return parts[0]
    ids = [p.ids for p in parts]
    if len({a.dtype.kind for a in ids}) > 1:  # integer ids here, strings there
        ids = [a.astype(str) for a in ids]
    scores, rows, ids = (np.concatenate(a, axis=1) for a in ([p.scores for p in parts], [p.rows for p in parts], ids))
    best = ranking(scores, rows)[:, :k]
    return TopK(*(np.take_along_axis(a, best, axis=1) for a in (scores, rows, ids)))


# ---------------------------------------------------------------------------
# The processes together: setup steps, and rank 0 driving the others' searches
# ---------------------------------------------------------------------------


class PeerFailed(DataError):
    """Another process stopped on a bad input; its message says which and why."""


def failure(error: BaseException) -> tuple[bool, str]:
    """What a stopping process tells the others: (bad input?, its message or a bug's traceback)."""
    return (True, str(error)) if is_bad_input(error) else (False, "".join(traceback.format_exception(error)))


def peer_error(failed: tuple[bool, str], where: str) -> Exception:
    """Another process's bad input as PeerFailed (one line, exit 2), its bug as a RuntimeError."""
    return (PeerFailed if failed[0] else RuntimeError)(where + failed[1])


def agree(step: Callable[[], Any], group: Any = None) -> list[Any]:
    """Run `step` in every process; every process's result, in rank order, on every process.
    A bad input in any process is raised in all (the first failing rank's message), so that
    none is left waiting for the others. One process: [step()], its errors as they are."""
    if not dist.is_distributed():
        return [step()]
    error = None
    try:
        result = step()
    except Exception as e:  # sent to the others before it is raised here: nobody waits forever
        result, error = None, e
    results = dist.gather_objects((result, None if error is None else failure(error)), group)
    failed = [(rank, sent) for rank, (_, sent) in enumerate(results) if sent is not None]
    if error is not None:
        raise error
    if failed:
        raise peer_error(failed[0][1], f"rank {failed[0][0]}: ")
    return [result for result, _ in results]


class Searchers:
    """Every process's search of the same queries, driven by rank 0 (`search`, then `stop`)
    and served by the others (`serve`). Rank 0 broadcasts each chunk of question embeddings;
    each process searches its share; the TopKs come back to rank 0 only (gather, not
    all-gather), as pickled numpy arrays through `group` (dist.object_group)."""

    def __init__(self, indexer: Indexer, offset: int, k: int, group: Any = None):
        self.indexer, self.offset, self.k, self.group = indexer, offset, k, group
        self.stopped = False

    def _local(self, queries: np.ndarray) -> tuple[TopK | None, tuple[bool, str] | None]:
        try:
            return search_share(self.indexer, queries, self.k, self.offset), None
        except Exception as e:  # goes to rank 0 through the gather: nobody waits forever
            if not dist.is_distributed():
                raise
            return None, failure(e)

    def search(self, queries: np.ndarray) -> TopK:
        """Rank 0: the global top k of queries (n, dim)."""
        dist.broadcast_from_main(("search", queries), self.group)
        parts = dist.gather_to_main(self._local(queries), self.group)
        for rank, (_, failed) in enumerate(parts):
            if failed is not None:
                raise peer_error(failed, f"rank {rank}: search failed: ")
        return merge_top_k([part for part, _ in parts], self.k)

    def stop(self, error: BaseException | None = None) -> None:
        """Rank 0, at the end or on an error: the other processes stop serving."""
        if dist.is_distributed() and not self.stopped:
            dist.broadcast_from_main(("stop", None) if error is None else ("error", failure(error)), self.group)
        self.stopped = True

    def serve(self) -> None:
        """Ranks > 0: search what rank 0 sends until it says stop."""
        while True:
            tag, queries = dist.broadcast_from_main(None, self.group)
            if tag == "stop":
                return
            if tag == "error":
                raise peer_error(queries, "rank 0 stopped: ")
            dist.gather_to_main(self._local(queries), self.group)


# ---------------------------------------------------------------------------
# Question chunks in, retrieved examples out (rank 0)
# ---------------------------------------------------------------------------


def question_chunks(path: str, maxload: int, size: int, drop_ctxs: bool = False) -> Iterator[list[dict]]:
    """The examples of a question file, `size` at a time, as load_questions gives them
    (validated; `id` = position where absent), the first `maxload` (< 0: all). Streamed:
    check the whole file first (questions.check_questions). `drop_ctxs`: empty each
    example's ctxs (retrieval replaces them; the key keeps its place in the example)."""
    chunk: list[dict] = []
    for k, (where, ex) in enumerate(iter_entries(path)):
        if 0 <= maxload <= k:
            break
        validate_example(ex, f"{path}, {where}")
        if "id" not in ex:
            ex["id"] = k
        if drop_ctxs and "ctxs" in ex:
            ex["ctxs"] = []
        chunk.append(ex)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def attach_passages(examples: list[dict], top: TopK, store: PassageStore, passages_path: str) -> None:
    """Each example's ctxs: its top passages `{id, title, text, score}`, best first."""
    for ex, scores, rows, ids in zip(examples, top.scores, top.rows, top.ids):
        found = rows >= 0
        ctxs = []
        for pid, score in zip(ids[found].tolist(), scores[found].tolist()):
            passage = store.get(str(pid))
            if passage is None:
                raise DataError(f"passage id {str(pid)!r} of the embeddings is not in {passages_path}")
            ctxs.append({**passage, "score": score})
        ex["ctxs"] = ctxs


def retrieved_examples(
    chunks: Iterator[list[dict]],
    embed: Callable[[list[dict]], np.ndarray],
    searchers: Searchers,
    store: PassageStore,
    passages_path: str,
    hits: AnswerHits,
    stats: dict[str, float],
    bar=None,
) -> Iterator[dict]:
    """Rank 0: the examples with their retrieved ctxs, chunk after chunk: embed the chunk's
    questions (n, dim), search every process, then WRITE_BATCH examples at a time attach
    the passages and hasanswer, hand them on and let them go. `stats`: seconds spent
    embedding and searching, added up."""
    for chunk in chunks:
        t0 = time.time()
        queries = embed(chunk)
        t1 = time.time()
        top = searchers.search(queries)
        stats["embed"] += t1 - t0
        stats["search"] += time.time() - t1
        pending, done = deque(chunk), 0
        chunk.clear()  # the reader still holds this list: hold the examples in `pending` alone
        while pending:
            part = [pending.popleft() for _ in range(min(WRITE_BATCH, len(pending)))]
            attach_passages(part, top.part(done, done + len(part)), store, passages_path)
            hits.label(part)
            done += len(part)
            yield from part
            if bar is not None:
                bar.update(len(part))


def evaluated_examples(chunks: Iterator[list[dict]], hits: AnswerHits) -> Iterator[dict]:
    """--evaluate_only: the examples with every ctx's hasanswer recomputed, chunk after chunk."""
    for chunk in chunks:
        hits.label(chunk)
        yield from chunk
