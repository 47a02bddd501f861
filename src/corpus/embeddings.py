"""Texts → retriever embeddings in batches, and the embedding shard files.

Shared by generate_passage_embeddings.py (passages) and passage_retrieval.py (questions).

Batching: within each chunk of texts, batches are formed from texts sorted by token
length and padded to their own longest text (dynamic padding), so little compute goes
to padding; the rows come back in the input order. Pooling is masked, so padding does
not change an embedding; `pad_to_max_length=True` reproduces the original's fixed
padding (needed when the retriever pools over padding, `--no_passage_mask`).

Shard file `<output_path>_<shard_id:02d>.npz`: `ids` (passage ids: int64 when every id is
a canonical integer, as in psgs_w100.tsv, else a unicode array; older shards hold unicode)
and `embeddings` ((n, dim), float32, or float16 with `--embedding_dtype float16`: half the
disk), read with allow_pickle=False. Legacy shards of the original code (a pickled
`(ids, embeddings)` tuple) load only with `allow_pickle=True`.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from src.corpus.passages import compact_ids
from src.devices import precision_autocast
from src.errors import EmbeddingFileError, InputError
from src.files import atomic_write

logger = logging.getLogger("fid.embedding")  # a child of the scripts' "fid" logger

SHARD_SUFFIX = ".npz"
EMBEDDING_DTYPES = {"float32": np.float32, "float16": np.float16}  # --embedding_dtype
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
_CHUNK = 65536  # rows converted at once: no full-size temporary copy of a shard


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


@torch.inference_mode()
def embed_texts(
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokenizer,
    texts: Iterable[str],
    batch_size: int,
    max_length: int,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    sort_by_length: bool = True,
    pad_to_max_length: bool = False,
    chunk_size: int | None = None,
    progress=None,
    dtype: str = "float32",
) -> np.ndarray:
    """Embeddings (n, dim) of `texts` in `dtype` (EMBEDDING_DTYPES), in input order.

    encode(input_ids (B, L), attention_mask (B, L)) -> (B, dim): e.g. retriever.embed_passages.
    Texts are tokenized `chunk_size` at a time (default 256 batches), so memory stays
    bounded for a shard of any size. `precision`: fp32, bf16 or fp16, autocast on `device`
    (devices.precision_autocast); the embeddings come back in `dtype` whatever it is
    (float16 is checked batch by batch for values beyond its range).
    `progress`: a tqdm bar advanced by texts embedded.
    """
    device = torch.device(device)
    chunk_size = chunk_size or batch_size * 256
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    outputs: list[np.ndarray] = []
    for chunk in _chunks(texts, chunk_size):
        token_ids = tokenizer(chunk, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        lengths = np.array([len(t) for t in token_ids])
        # Longest first: a batch that does not fit in memory fails at once, not at the end.
        order = np.argsort(-lengths, kind="stable") if sort_by_length else np.arange(len(chunk))
        chunk_out: np.ndarray | None = None
        for start in range(0, len(chunk), batch_size):
            rows = order[start : start + batch_size]
            width = max_length if pad_to_max_length else int(lengths[rows].max())
            ids = np.full((len(rows), width), pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for j, r in enumerate(rows):
                ids[j, : lengths[r]] = token_ids[r]
                mask[j, : lengths[r]] = 1
            ids_t = torch.from_numpy(ids).to(device)
            mask_t = torch.from_numpy(mask).to(device)
            with precision_autocast(precision, device):
                emb = encode(ids_t, mask_t)  # (B, dim)
            emb = emb.float().cpu().numpy()
            if chunk_out is None:
                chunk_out = np.empty((len(chunk), emb.shape[1]), dtype=EMBEDDING_DTYPES[dtype])
            with np.errstate(over="ignore"):  # float16: an overflow becomes inf, reported below
                chunk_out[rows] = emb  # back to input order
            if dtype == "float16":
                _check_float16(chunk_out[rows], "the embeddings")
            if progress is not None:
                progress.update(len(rows))
        outputs.append(chunk_out)
    if not outputs:
        return np.zeros((0, 0), dtype=EMBEDDING_DTYPES[dtype])
    return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]


def pools_over_padding(model, side: str) -> bool:
    """Whether the retriever ignores the attention mask on this side (`--no_passage_mask` /
    `--no_question_mask`): the encoder then attends to padding and the embedding depends
    on the padded length, so we must pad to max length as the original did."""
    return getattr(model.config, f"apply_{side}_mask", True) is False


def shard_path(output_path: str | os.PathLike, shard_id: int) -> Path:
    """`<output_path>_<shard_id:02d>.npz`: `--output_path wikipedia_embeddings/wiki` gives
    wiki_00.npz, wiki_01.npz, ... which the glob `"wikipedia_embeddings/wiki_*"` finds."""
    return Path(f"{output_path}_{shard_id:02d}{SHARD_SUFFIX}")


def shard_range(n_passages: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """Rows [start, end) of a shard: equal shards of n // num_shards, the last takes the remainder."""
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, num_shards), got shard_id={shard_id}, num_shards={num_shards}")
    size = n_passages // num_shards
    start = shard_id * size
    end = n_passages if shard_id == num_shards - 1 else start + size
    return start, end


def shards_of_process(
    shard_id: int | None, num_shards: int | None, rank: int = 0, world_size: int = 1
) -> tuple[list[int], int]:
    """(the shards this process embeds, num_shards).

    One process: [shard_id] (default 0) of num_shards (default 1). Under torchrun with W
    processes: num_shards defaults to W and rank r embeds shards r, r+W, r+2W, ... (so
    `--num_shards 20` on 4 GPUs gives each 5); a shard_id is refused there, since each
    rank's shards follow from its rank."""
    if world_size <= 1:
        num_shards = num_shards or 1
        shard_id = 0 if shard_id is None else shard_id
        if not 0 <= shard_id < num_shards:
            raise InputError(f"--shard_id must be in [0, num_shards), got shard_id={shard_id}, num_shards={num_shards}")
        return [shard_id], num_shards
    if shard_id is not None:
        raise InputError(
            f"--shard_id picks the shard of a single process; under torchrun rank r of {world_size} embeds "
            "shards r, r+W, r+2W, ... of --num_shards (default: one per process). Drop --shard_id"
        )
    num_shards = num_shards or world_size
    if num_shards < world_size:
        raise InputError(
            f"--num_shards {num_shards} is fewer than the {world_size} processes: ranks {num_shards}.."
            f"{world_size - 1} would embed nothing. Ask for at least {world_size} shards or start fewer processes"
        )
    return list(range(rank, num_shards, world_size)), num_shards


def _check_float16(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        raise InputError(
            f"{what}: values beyond float16's range (|x| > {FLOAT16_MAX:g}) or not finite; "
            "use --embedding_dtype float32"
        )


def _as_dtype(embeddings: np.ndarray, dtype: str) -> np.ndarray:
    """`embeddings` in `dtype`, converted (and, for float16, range-checked) _CHUNK rows at a time."""
    embeddings = np.asarray(embeddings)
    target = EMBEDDING_DTYPES[dtype]
    out = embeddings if embeddings.dtype == target else np.empty(embeddings.shape, dtype=target)
    for start in range(0, len(embeddings), _CHUNK):
        part = slice(start, start + _CHUNK)
        if out is not embeddings:
            with np.errstate(over="ignore"):  # an overflow becomes inf, reported just below
                out[part] = embeddings[part]
        if dtype == "float16":
            _check_float16(out[part], f"rows {start}.. of the embeddings")
    return out


def write_shard(path: str | os.PathLike, ids, embeddings: np.ndarray, dtype: str = "float32") -> None:
    """ids (int64 when all are integers, see passages.compact_ids) + embeddings in `dtype`
    (EMBEDDING_DTYPES) as an uncompressed .npz, written to a temp file then renamed."""
    path = Path(path)
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding dtype must be one of {tuple(EMBEDDING_DTYPES)}, got {dtype!r}")
    if len(ids) != len(embeddings):
        raise ValueError(f"{len(ids)} ids for {len(embeddings)} embeddings")
    ids = compact_ids(ids) if len(ids) else np.zeros(0, dtype=str)
    embeddings = _as_dtype(embeddings, dtype)
    with atomic_write(path, "wb") as f:
        np.savez(f, ids=ids, embeddings=embeddings)


def _npy_header(z: zipfile.ZipFile, name: str) -> tuple[tuple, np.dtype] | None:
    """(shape, dtype) of one array of an .npz, from its header alone (None: a header version
    this check does not know; read_shard still checks the array)."""
    with z.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            return None
    return shape, dtype


def check_shard(path: str | os.PathLike, allow_pickle: bool = False) -> None:
    """A quick look at a shard without reading its arrays (the zip directory and the arrays'
    headers), so that a truncated or foreign file fails before the slow part; read_shard
    checks the rest."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:1] == b"\x80" and allow_pickle:
        return
    if not magic.startswith(b"PK"):
        read_shard(path, allow_pickle)  # raises the right error
        return
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            missing = [name for name in ("ids", "embeddings") if f"{name}.npy" not in names]
            if missing:
                raise EmbeddingFileError(f"{path}: not an embedding shard with 'ids' and 'embeddings' (no {missing})")
            headers = {name: _npy_header(z, name) for name in ("ids", "embeddings")}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        if isinstance(e, EmbeddingFileError):
            raise
        raise EmbeddingFileError(f"{path}: corrupt or truncated embedding shard ({e})") from None
    if None in headers.values():
        return
    (id_shape, id_dtype), (shape, dtype) = headers["ids"], headers["embeddings"]
    if len(shape) != 2 or dtype.kind != "f" or id_dtype.kind not in "iuU" or id_shape != shape[:1]:
        raise EmbeddingFileError(
            f"{path}: expected ids (n,) of integers or strings and float embeddings (n, dim), found ids "
            f"{id_dtype} {id_shape} and embeddings {dtype} {shape}"
        )


def read_shard(
    path: str | os.PathLike, allow_pickle: bool = False, compact: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,), embeddings (n, dim)) of one shard, ours or (with allow_pickle) legacy.

    Default: ids as str, embeddings as float32, whatever the shard stores. compact=True:
    ids as passages.compact_ids gives them (int64 for integer ids) and float16 embeddings
    left float16 (others float32), for streaming a shard into an index batch by batch."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK"):  # zip: our .npz
        try:
            with np.load(path, allow_pickle=False) as data:
                ids, embeddings = data["ids"], data["embeddings"]
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # BadZipFile: truncated
            raise EmbeddingFileError(
                f"{path}: corrupt or truncated embedding shard, or not one with 'ids' and 'embeddings' ({e})"
            ) from None
    elif magic[:1] == b"\x80":  # a pickle (protocol >= 2): the original code's shards
        ids, embeddings = _read_legacy(path, allow_pickle)
    else:
        raise EmbeddingFileError(
            f"{path}: not an embedding shard (expected .npz written by generate_passage_embeddings.py)"
        )
    try:
        if not (compact and embeddings.dtype == np.float16):
            embeddings = np.asarray(embeddings, dtype=np.float32)
    except (TypeError, ValueError, AttributeError) as e:
        raise EmbeddingFileError(f"{path}: embeddings are not a float matrix ({e})") from None
    if embeddings.ndim != 2 or len(ids) != len(embeddings):
        raise EmbeddingFileError(f"{path}: {len(ids)} ids for embeddings of shape {embeddings.shape}")
    return (compact_ids(ids) if compact else ids.astype(str)), embeddings


def _read_legacy(path: Path, allow_pickle: bool) -> tuple[np.ndarray, np.ndarray]:
    if not allow_pickle:
        raise EmbeddingFileError(
            f"{path}: a pickled embedding shard (the original FiD format). Unpickling runs arbitrary code; "
            "pass --allow_pickle_embeddings if you trust this file"
        )
    try:
        with open(path, "rb") as f:
            loaded = pickle.load(f)  # noqa: S301 - explicit user opt-in above
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise EmbeddingFileError(f"{path}: corrupt or truncated legacy (pickled) embedding shard ({e})") from None
    try:
        ids, embeddings = loaded
    except (TypeError, ValueError):
        raise EmbeddingFileError(f"{path}: legacy shard is not an (ids, embeddings) pair") from None
    return np.asarray([str(i) for i in ids]), np.asarray(embeddings)
