"""FAISS inner-product index over passage embeddings, with the map from FAISS rows to passage ids.

Kinds: "flat" (exact, the default), "pq" (product quantization: `n_subquantizers` codes
of `n_bits` bits per vector, as the original's `--n-subquantizers`), "ivf" (inverted
lists over a flat coarse quantizer) and "hnsw" (graph). The trainable kinds (pq, ivf)
are trained on the first batch handed to `index_data`, so give it a large first batch.

On disk (`serialize(dir)`): `index.faiss` (faiss.write_index), `index_ids.npy` (the
passage id of every FAISS row, a unicode array, loaded with allow_pickle=False) and
`index_meta.json`. No pickle anywhere.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import faiss
import numpy as np

from .files import atomic_write

logger = logging.getLogger("fid.index")  # a child of the scripts' "fid" logger

INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "index_ids.npy", "index_meta.json"
KINDS = ("flat", "pq", "ivf", "hnsw")


class Indexer:
    def __init__(
        self,
        dim: int,
        n_subquantizers: int = 0,
        n_bits: int = 8,
        kind: str | None = None,
        n_lists: int = 1024,
        n_probe: int = 16,
        hnsw_m: int = 32,
    ):
        """kind=None: "pq" when n_subquantizers > 0, else "flat" (the original's rule)."""
        kind = kind or ("pq" if n_subquantizers > 0 else "flat")
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS}")
        if kind == "pq" and (n_subquantizers <= 0 or dim % n_subquantizers):
            raise ValueError(f"PQ needs n_subquantizers > 0 dividing dim={dim}, got {n_subquantizers}")
        self.dim, self.kind = dim, kind
        self.config = {
            "dim": dim,
            "kind": kind,
            "n_subquantizers": n_subquantizers,
            "n_bits": n_bits,
            "n_lists": n_lists,
            "n_probe": n_probe,
            "hnsw_m": hnsw_m,
        }
        ip = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        elif kind == "pq":
            self.index = faiss.IndexPQ(dim, n_subquantizers, n_bits, ip)
        elif kind == "ivf":
            self._quantizer = faiss.IndexFlatIP(dim)  # must outlive the IVF index
            self.index = faiss.IndexIVFFlat(self._quantizer, dim, n_lists, ip)
            self.index.nprobe = n_probe
        else:
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m, ip)
        self._id_chunks: list[np.ndarray] = []
        self._ids: np.ndarray | None = np.array([], dtype=str)

    def __len__(self) -> int:
        return self.index.ntotal

    def set_n_probe(self, n_probe: int) -> None:
        """IVF: lists searched per query (a search setting; no rebuild). Other kinds: nothing."""
        self.config["n_probe"] = n_probe
        if self.kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = n_probe

    @property
    def ids(self) -> np.ndarray:
        """Passage id of every FAISS row, in row order."""
        if self._id_chunks:  # concatenate lazily: streaming adds stay O(batch)
            self._ids = np.concatenate([self._ids, *self._id_chunks])
            self._id_chunks = []
        return self._ids

    def index_data(self, ids, embeddings: np.ndarray) -> None:
        """Add one batch: ids (n,) and embeddings (n, dim), appended after the rows already there."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        ids = np.asarray(ids).astype(str)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape (n, {self.dim}), got {embeddings.shape}")
        if len(ids) != len(embeddings):
            raise ValueError(f"{len(ids)} ids for {len(embeddings)} embeddings")
        if len(ids) == 0:
            return
        if not self.index.is_trained:
            needed = self.config["n_lists"] if self.kind == "ivf" else 2 ** self.config["n_bits"]
            if len(embeddings) < needed:  # k-means needs at least one point per centroid
                raise ValueError(
                    f"training a {self.kind} index needs at least {needed} vectors in the first batch, "
                    f"got {len(embeddings)} (use a flat index for small corpora)"
                )
            logger.info("training the %s index on %d vectors", self.kind, len(embeddings))
            self.index.train(embeddings)
        self.index.add(embeddings)
        self._id_chunks.append(ids)

    def search_knn(self, queries: np.ndarray, k: int, batch_size: int = 2048) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top k by inner product for every query (n, dim): [(passage ids (k,), scores (k,))], best first.

        With fewer than k vectors indexed a query gets them all (FAISS's -1 rows dropped).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}), got {queries.shape}")
        ids = self.ids
        k = min(k, len(self))
        results = []
        if k <= 0:
            return [(ids[:0], np.zeros(0, dtype=np.float32)) for _ in range(len(queries))]
        for start in range(0, len(queries), batch_size):
            scores, rows = self.index.search(queries[start : start + batch_size], k)  # (b, k) each
            for row_scores, row_ids in zip(scores, rows):
                keep = row_ids >= 0
                results.append((ids[row_ids[keep]], row_scores[keep]))
        return results

    def serialize(self, directory: str | os.PathLike, extra: dict | None = None) -> None:
        """Write index, id map and config into `directory` (each file atomically).

        `extra`: JSON-able facts stored with the config (e.g. which embedding files made
        the index), returned by `read_meta` so a caller can tell a stale index."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        logger.info("saving %s index (%d vectors) to %s", self.kind, len(self), directory)
        (directory / META_FILE).unlink(missing_ok=True)  # until it is back, the save is incomplete
        with atomic_write(directory / INDEX_FILE, "wb") as f:
            faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write))
        with atomic_write(directory / IDS_FILE, "wb") as f:
            np.save(f, self.ids, allow_pickle=False)
        with atomic_write(directory / META_FILE) as f:  # written last: its presence marks a complete save
            json.dump({**self.config, "ntotal": len(self), "extra": extra or {}}, f, indent=1)

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        directory = Path(directory)
        return all((directory / name).is_file() for name in (INDEX_FILE, IDS_FILE, META_FILE))

    @staticmethod
    def read_meta(directory: str | os.PathLike) -> dict:
        return json.loads((Path(directory) / META_FILE).read_text())

    @classmethod
    def deserialize_from(cls, directory: str | os.PathLike) -> Indexer:
        directory = Path(directory)
        if not cls.exists(directory):
            raise FileNotFoundError(f"no saved index in {directory} (expected {INDEX_FILE}, {IDS_FILE}, {META_FILE})")
        meta = cls.read_meta(directory)
        config = {k: meta[k] for k in ("dim", "n_subquantizers", "n_bits", "kind", "n_lists", "n_probe", "hnsw_m")}
        indexer = cls(**config)
        indexer.index = faiss.read_index(str(directory / INDEX_FILE))
        if indexer.kind == "ivf":
            faiss.extract_index_ivf(indexer.index).nprobe = config["n_probe"]
        indexer._ids = np.load(directory / IDS_FILE, allow_pickle=False)
        if len(indexer._ids) != indexer.index.ntotal or meta.get("ntotal") != indexer.index.ntotal:
            raise ValueError(
                f"{directory}: index holds {indexer.index.ntotal} vectors but the id map has {len(indexer._ids)}"
            )
        logger.info("loaded %s index (%d vectors) from %s", indexer.kind, len(indexer), directory)
        return indexer
