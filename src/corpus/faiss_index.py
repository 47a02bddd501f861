"""FAISS inner-product index over passage embeddings, with the map from FAISS rows to passage ids.

Kinds (`KINDS`, the `--index_type` choices; bytes per passage for dim d, docs/corpus-at-scale.md):
"flat" (exact, 4d, the default), "sqfp16" / "sq8" (scalar quantizers: 2d / d bytes),
"pq" (product quantization: `n_subquantizers` codes of `n_bits` bits, as the original's
`--n-subquantizers`), "ivf" (inverted lists over full vectors), "ivfpq" (inverted lists
holding PQ codes: the compact kind for 21M passages) and "hnsw" (graph over full vectors).

Training (pq, ivf, ivfpq, sq8): with `train_sample=S` the first S vectors handed to
`index_data` are buffered, the index is trained on them, then they and the rest are
added; a corpus smaller than S trains on all of it when the data ends (`finish`, which
searching and saving call). Shards arrive in corpus order, so the sample is the start of
the corpus. `train_sample=None` trains on the first batch alone (the behaviour before).
FAISS's k-means writes a warning to stderr for every quantizer it trains on too few vectors
(64 lines for a pq index over 768 dims); they are captured and said once, with the flags
that give this kind of index enough (`IndexConfig`: the index flags, built once by the script).

Ids: kept as one int64 array when every id is a canonical integer (`passages.compact_ids`:
DPR's psgs_w100.tsv), else as a unicode array; search results convert only the k ids
found to strings, so callers see the TSV's ids either way.

On disk (`serialize(dir)`): `index.faiss` (faiss.write_index), `index_ids.npy` (the id
map, int64 or unicode, loaded with allow_pickle=False) and `index_meta.json`. No pickle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from src.corpus.passages import compact_ids
from src.errors import InputError
from src.files import atomic_write

logger = logging.getLogger("fid.index")  # a child of the scripts' "fid" logger

INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "index_ids.npy", "index_meta.json"
KINDS = {
    "flat": "exact inner product over float32 vectors (4*dim bytes per passage)",
    "sqfp16": "each dimension as float16 (2*dim bytes), no training, near-exact",
    "sq8": "each dimension as 8 bits in trained ranges (dim bytes)",
    "pq": "product quantization, --n-subquantizers codes of --n-bits bits, scans every code",
    "ivf": "--n_lists inverted lists of float32 vectors, --n_probe of them searched",
    "ivfpq": "--n_lists inverted lists of PQ codes (--n-subquantizers x --n-bits), --n_probe searched",
    "hnsw": "graph of float32 vectors, --hnsw_m links per node",
}
TRAINED = ("pq", "ivf", "ivfpq", "sq8")
IVF_KINDS = ("ivf", "ivfpq")
PQ_KINDS = ("pq", "ivfpq")
DEFAULT_SUBQUANTIZERS = 64  # pq / ivfpq with --n-subquantizers 0, when it divides dim
DEFAULTS = {"n_lists": 1024, "n_probe": 16, "hnsw_m": 32, "index_train_sample": 262144}
ADD_BATCH = 65536  # vectors converted to float32 and added at once: bounds FAISS's scratch memory


@dataclass(frozen=True)
class IndexConfig:
    """Which FAISS index and its settings: the index flags (--index_type, --n-subquantizers,
    --n-bits, --n_lists, --n_probe, --hnsw_m, --index_train_sample), under their dests."""

    index_type: str | None = None
    n_subquantizers: int = 0
    n_bits: int = 8
    n_lists: int = DEFAULTS["n_lists"]
    n_probe: int = DEFAULTS["n_probe"]
    hnsw_m: int = DEFAULTS["hnsw_m"]
    index_train_sample: int = DEFAULTS["index_train_sample"]

    @property
    def kind(self) -> str:
        """--index_type, or the original's rule: pq when --n-subquantizers > 0, else flat."""
        return self.index_type or ("pq" if self.n_subquantizers > 0 else "flat")


def index_kind(config: IndexConfig) -> str:
    return config.kind


def index_signature(config: IndexConfig) -> dict:
    """The settings a saved index must have been built with to be reused (besides its shards).
    n_probe is a search setting (set on the loaded index), so it is not in it."""
    kind = config.kind
    # kind, n_subquantizers, n_bits for every kind: what earlier saves recorded, so they stay valid
    signature = {"kind": kind, "n_subquantizers": config.n_subquantizers, "n_bits": config.n_bits}
    if kind in IVF_KINDS:
        signature["n_lists"] = config.n_lists
    if kind == "hnsw":
        signature["hnsw_m"] = config.hnsw_m
    if kind in TRAINED:
        signature["train_sample"] = config.index_train_sample
    return signature


def unused_index_flags(config: IndexConfig) -> dict[str, str]:
    """{flag: why} of the index flags that the chosen kind of index does not read."""
    kind = config.kind
    readers = {
        "n_lists": (IVF_KINDS, "only --index_type ivf or ivfpq reads it"),
        "n_probe": (IVF_KINDS, "only --index_type ivf or ivfpq reads it"),
        "n_subquantizers": (PQ_KINDS, "only a pq index or an ivfpq index reads it"),
        "n_bits": (PQ_KINDS, "only a pq index or an ivfpq index reads it"),
        "hnsw_m": (("hnsw",), "only --index_type hnsw reads it"),
        "index_train_sample": (TRAINED, f"only the trained kinds ({', '.join(TRAINED)}) read it"),
    }
    return {name: f"{why} (this index: {kind})" for name, (kinds, why) in readers.items() if kind not in kinds}


@contextlib.contextmanager
def faiss_stderr() -> Iterator[list[str]]:
    """The lines FAISS's C++ code writes to file descriptor 2 meanwhile (its k-means warns once
    per quantizer it trains: 64 identical lines for a pq index), handed back instead of shown."""
    sys.stderr.flush()
    saved = os.dup(2)
    lines: list[str] = []
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines.extend(held.read().decode("utf-8", errors="replace").splitlines())


def _check(condition: bool, message: str) -> None:
    """A flag value (or a corpus) the chosen index cannot work with: bad input."""
    if not condition:
        raise InputError(message)


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
        train_sample: int | None = None,
    ):
        """kind=None: "pq" when n_subquantizers > 0, else "flat" (the original's rule).
        train_sample: vectors the trained kinds learn from (None: the first batch)."""
        kind = kind or ("pq" if n_subquantizers > 0 else "flat")
        _check(kind in KINDS, f"unknown index kind {kind!r}; choose one of {tuple(KINDS)}")
        if kind in PQ_KINDS:
            if n_subquantizers == 0 and dim % DEFAULT_SUBQUANTIZERS == 0:
                n_subquantizers = DEFAULT_SUBQUANTIZERS
            _check(
                n_subquantizers > 0 and dim % n_subquantizers == 0,
                f"{kind} needs --n-subquantizers > 0 dividing dim={dim} (each code covers dim / n_subquantizers "
                f"dimensions), got {n_subquantizers}",
            )
            _check(1 <= n_bits <= 16, f"{kind} needs --n-bits between 1 and 16, got {n_bits}")
        _check(n_lists >= 1 and n_probe >= 1, f"--n_lists and --n_probe must be >= 1, got {n_lists}, {n_probe}")
        _check(hnsw_m >= 2, f"--hnsw_m must be >= 2, got {hnsw_m}")
        _check(train_sample is None or train_sample >= 1, f"the training sample must be >= 1, got {train_sample}")
        self.dim, self.kind, self.train_sample = dim, kind, train_sample
        self.config = {
            "dim": dim,
            "kind": kind,
            "n_subquantizers": n_subquantizers,
            "n_bits": n_bits,
            "n_lists": n_lists,
            "n_probe": n_probe,
            "hnsw_m": hnsw_m,
            "train_sample": train_sample,
        }
        self.index = self._new_index()
        if kind in TRAINED and train_sample is not None:
            _check(
                train_sample >= self._min_training(),
                f"a training sample of {train_sample} vectors is too small for the {kind} index: it needs at least "
                f"{self._min_training()} (one per centroid); raise --index_train_sample",
            )
        self.trained_on: int | None = None  # vectors the index was trained on (None: not trained here)
        self.train_seconds = 0.0
        self._buffer: np.ndarray | None = None  # (train_sample, dim) float32, until trained
        self._buffered = 0
        self._id_chunks: list[np.ndarray] = []
        self._ids: np.ndarray = np.zeros(0, dtype=np.int64)

    def _new_index(self) -> faiss.Index:
        dim, c, ip = self.dim, self.config, faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            return faiss.IndexFlatIP(dim)
        if self.kind in ("sq8", "sqfp16"):
            qtype = faiss.ScalarQuantizer.QT_8bit if self.kind == "sq8" else faiss.ScalarQuantizer.QT_fp16
            return faiss.IndexScalarQuantizer(dim, qtype, ip)
        if self.kind == "pq":
            return faiss.IndexPQ(dim, c["n_subquantizers"], c["n_bits"], ip)
        if self.kind == "hnsw":
            return faiss.IndexHNSWFlat(dim, c["hnsw_m"], ip)
        self._quantizer = faiss.IndexFlatIP(dim)  # must outlive the IVF index
        if self.kind == "ivf":
            index = faiss.IndexIVFFlat(self._quantizer, dim, c["n_lists"], ip)
        else:
            index = faiss.IndexIVFPQ(self._quantizer, dim, c["n_lists"], c["n_subquantizers"], c["n_bits"], ip)
        index.nprobe = c["n_probe"]
        return index

    @classmethod
    def from_config(cls, dim: int, config: IndexConfig) -> Indexer:
        """The index the flags ask for (IndexConfig: --index_type, --n-subquantizers, --n-bits,
        --n_lists, --n_probe, --hnsw_m, --index_train_sample)."""
        return cls(
            dim,
            config.n_subquantizers,
            config.n_bits,
            kind=config.kind,
            n_lists=config.n_lists,
            n_probe=config.n_probe,
            hnsw_m=config.hnsw_m,
            train_sample=config.index_train_sample,
        )

    def __len__(self) -> int:
        """Vectors handed to index_data (those still buffered for training included)."""
        return self.index.ntotal + self._buffered

    def set_n_probe(self, n_probe: int) -> None:
        """IVF kinds: lists searched per query (a search setting; no rebuild). Other kinds: nothing."""
        self.config["n_probe"] = n_probe
        if self.kind in IVF_KINDS:
            faiss.extract_index_ivf(self.index).nprobe = n_probe

    @property
    def ids(self) -> np.ndarray:
        """Passage id of every row, in row order: int64 when all are integers, else unicode."""
        if self._id_chunks:  # concatenate lazily: streaming adds stay O(batch)
            chunks = [self._ids, *self._id_chunks] if len(self._ids) else self._id_chunks
            if any(c.dtype.kind != "i" for c in chunks):  # one non-integer id: strings for all
                chunks = [c.astype(str) for c in chunks]
            self._ids = np.concatenate(chunks)
            self._id_chunks = []
        return self._ids

    def index_data(self, ids, embeddings: np.ndarray) -> None:
        """Add one batch: ids (n,) and embeddings (n, dim) of any float dtype (float16 shards
        are converted ADD_BATCH rows at a time), appended after the rows already there."""
        embeddings = np.asarray(embeddings)
        ids = compact_ids(ids)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape (n, {self.dim}), got {embeddings.shape}")
        if len(ids) != len(embeddings):
            raise ValueError(f"{len(ids)} ids for {len(embeddings)} embeddings")
        if len(ids) == 0:
            return
        self._id_chunks.append(ids)
        start = 0
        if not self.index.is_trained and self.train_sample is None:  # the first batch is the sample
            self._train(np.ascontiguousarray(embeddings, dtype=np.float32), "in the first batch")
        elif not self.index.is_trained:
            start = self._fill_buffer(embeddings)
            if self._buffered < self.train_sample:
                return
            self.finish()
        self._add(embeddings[start:])

    def _fill_buffer(self, embeddings: np.ndarray) -> int:
        """Copy rows into the training buffer until it holds train_sample; returns rows taken."""
        if self._buffer is None:  # pages are only touched as they fill
            self._buffer = np.empty((self.train_sample, self.dim), dtype=np.float32)
        take = min(self.train_sample - self._buffered, len(embeddings))
        self._buffer[self._buffered : self._buffered + take] = embeddings[:take]
        self._buffered += take
        return take

    def finish(self) -> None:
        """End of the data: train on what the buffer holds and add it (nothing if trained)."""
        if self._buffer is None:
            return
        sample = self._buffer[: self._buffered]
        self._train(sample, "")
        self._buffer, self._buffered = None, 0
        self._add(sample)

    def _min_training(self) -> int:
        """Vectors a trained kind needs at least: one per k-means centroid (sq8: its ranges)."""
        c = self.config
        centroids = {"ivf": c["n_lists"], "pq": 2 ** c["n_bits"], "sq8": 1}
        centroids["ivfpq"] = max(c["n_lists"], centroids["pq"])
        return centroids[self.kind]

    def _train(self, sample: np.ndarray, where: str) -> None:
        needed = self._min_training()
        if len(sample) < needed:  # k-means needs at least one point per centroid
            raise InputError(
                f"training the {self.kind} index needs at least {needed} vectors{' ' + where if where else ''}, "
                f"got {len(sample)} (use a flat index for small corpora)"
            )
        advice = self._small_sample_advice(len(sample))
        if advice:
            logger.warning(
                "training the %s index on %d vectors: FAISS's k-means wants >= 39 per centroid (%d for %d "
                "centroids); codes may be poor (%s)",
                self.kind,
                len(sample),
                39 * needed,
                needed,
                advice,
            )
        logger.info("training the %s index on %d vectors", self.kind, len(sample))
        t0 = time.perf_counter()
        with faiss_stderr() as chatter:
            self.index.train(sample)
        self.trained_on, self.train_seconds = len(sample), time.perf_counter() - t0
        repeated = [line for line in chatter if line.startswith("WARNING clustering")]
        for line in chatter:
            if line not in repeated:
                print(line, file=sys.stderr)
        if repeated:  # once per k-means: every pq sub-quantizer, and the ivf lists
            logger.log(
                logging.INFO if advice else logging.WARNING,
                "FAISS's k-means warned %d time(s), once per quantizer trained: %s",
                len(repeated),
                repeated[0],
            )
        logger.info("trained in %.1fs", self.train_seconds)

    def _small_sample_advice(self, n: int) -> str:
        """Which flags give FAISS's k-means its 39 vectors per centroid ("" when it has them):
        the index's own (--n_lists for ivf, --n-bits for pq, those short of it for ivfpq), and a
        larger --index_train_sample when the corpus has more vectors than the sample took."""
        if self.kind == "sq8":
            return ""
        c = self.config
        lower = [
            flag
            for flag, kinds, k in (("--n_lists", IVF_KINDS, c["n_lists"]), ("--n-bits", PQ_KINDS, 2 ** c["n_bits"]))
            if self.kind in kinds and n < 39 * k
        ]
        if not lower:
            return ""
        lower_text = "lower " + " / ".join(lower)
        if self.train_sample is not None and n >= self.train_sample:
            return f"raise --index_train_sample, or {lower_text}"
        return f"{lower_text}: the corpus has only {n} vectors" if self.train_sample else lower_text

    def _add(self, embeddings: np.ndarray) -> None:
        for start in range(0, len(embeddings), ADD_BATCH):
            self.index.add(np.ascontiguousarray(embeddings[start : start + ADD_BATCH], dtype=np.float32))

    def search_knn(self, queries: np.ndarray, k: int, batch_size: int = 2048) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top k by inner product for every query (n, dim): [(passage ids (k,) str, scores (k,))], best first.

        With fewer than k vectors indexed a query gets them all (FAISS's -1 rows dropped).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}), got {queries.shape}")
        self.finish()
        ids = self.ids
        k = min(k, len(self))
        results = []
        if k <= 0:
            return [(np.zeros(0, dtype=str), np.zeros(0, dtype=np.float32)) for _ in range(len(queries))]
        for start in range(0, len(queries), batch_size):
            scores, rows = self.index.search(queries[start : start + batch_size], k)  # (b, k) each
            found = ids[np.maximum(rows, 0)].astype(str)  # (b, k): only the ids found become strings
            for row_scores, row_ids, keep in zip(scores, found, rows >= 0):
                results.append((row_ids[keep], row_scores[keep]))
        return results

    def serialize(self, directory: str | os.PathLike, extra: dict | None = None) -> None:
        """Write index, id map and config into `directory` (each file atomically).

        `extra`: JSON-able facts stored with the config (e.g. which embedding files made
        the index), returned by `read_meta` so a caller can tell a stale index."""
        self.finish()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        logger.info("saving %s index (%d vectors) to %s", self.kind, len(self), directory)
        (directory / META_FILE).unlink(missing_ok=True)  # until it is back, the save is incomplete
        with atomic_write(directory / INDEX_FILE, "wb") as f:
            faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write))
        with atomic_write(directory / IDS_FILE, "wb") as f:
            np.save(f, self.ids, allow_pickle=False)
        meta = {**self.config, "ntotal": len(self), "trained_on": self.trained_on, "extra": extra or {}}
        with atomic_write(directory / META_FILE) as f:  # written last: its presence marks a complete save
            json.dump(meta, f, indent=1)

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        directory = Path(directory)
        return all((directory / name).is_file() for name in (INDEX_FILE, IDS_FILE, META_FILE))

    @staticmethod
    def read_meta(directory: str | os.PathLike) -> dict:
        path = Path(directory) / META_FILE
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(
                f"{path}: not the JSON a saved index keeps beside it ({e}); delete the saved index"
            ) from None
        if not isinstance(meta, dict):
            raise InputError(f"{path}: not the JSON object a saved index keeps beside it; delete the saved index")
        return meta

    @classmethod
    def deserialize_from(cls, directory: str | os.PathLike) -> Indexer:
        directory = Path(directory)
        if not cls.exists(directory):
            raise FileNotFoundError(f"no saved index in {directory} (expected {INDEX_FILE}, {IDS_FILE}, {META_FILE})")
        meta = cls.read_meta(directory)
        config = {k: meta[k] for k in ("dim", "n_subquantizers", "n_bits", "kind", "n_lists", "n_probe", "hnsw_m")}
        indexer = cls(**config, train_sample=meta.get("train_sample"))  # saves before the sample have none
        try:
            indexer.index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as e:  # FAISS's error for a truncated or foreign file
            raise InputError(f"{directory / INDEX_FILE}: cannot read the saved index ({e})") from None
        indexer.trained_on = meta.get("trained_on")
        if indexer.kind in IVF_KINDS:
            faiss.extract_index_ivf(indexer.index).nprobe = config["n_probe"]
        indexer._ids = np.load(directory / IDS_FILE, allow_pickle=False)  # int64, or unicode (older saves too)
        if len(indexer._ids) != indexer.index.ntotal or meta.get("ntotal") != indexer.index.ntotal:
            raise InputError(
                f"{directory}: index holds {indexer.index.ntotal} vectors but the id map has {len(indexer._ids)}"
            )
        logger.info("loaded %s index (%d vectors) from %s", indexer.kind, len(indexer), directory)
        return indexer
