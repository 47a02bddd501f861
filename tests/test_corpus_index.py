"""Indexer (FAISS + id map) and embedding shard files."""

import pickle

import numpy as np
import pytest

from src.embedding import read_shard, shard_path, shard_range, write_shard
from src.errors import EmbeddingFileError
from src.index import IDS_FILE, INDEX_FILE, Indexer


def clustered(n_clusters=8, per_cluster=64, dim=32, noise=0.05, seed=0):
    """Well separated clusters: every point's nearest neighbours are its own cluster."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32) * 3
    x = np.repeat(centers, per_cluster, axis=0) + noise * rng.standard_normal((n_clusters * per_cluster, dim))
    return x.astype(np.float32), centers


def test_flat_search_is_exact_inner_product():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    ids = [f"doc{i}" for i in range(500)]
    indexer = Indexer(16)
    for start in range(0, 500, 128):  # streaming adds keep the row -> id map in order
        indexer.index_data(ids[start : start + 128], x[start : start + 128])
    assert len(indexer) == 500 and indexer.kind == "flat"
    results = indexer.search_knn(q, k=10, batch_size=3)
    expected_scores = q @ x.T  # (7, 500)
    for qi, (found_ids, scores) in enumerate(results):
        best = np.argsort(-expected_scores[qi])[:10]
        assert found_ids.tolist() == [f"doc{i}" for i in best]
        np.testing.assert_allclose(scores, expected_scores[qi, best], rtol=1e-5)
        assert np.all(np.diff(scores) <= 0)  # best first


def test_fewer_passages_than_k_and_bad_shapes():
    indexer = Indexer(4)
    assert indexer.search_knn(np.ones((2, 4), np.float32), 5)[0][0].size == 0
    indexer.index_data(["a", "b"], np.eye(4, dtype=np.float32)[:2])
    (ids, scores), *_ = indexer.search_knn(np.array([[0, 1, 0, 0]], np.float32), 5)
    assert ids.tolist() == ["b", "a"] and scores.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        indexer.index_data(["c"], np.ones((1, 5), np.float32))
    with pytest.raises(ValueError, match="2 ids for 1 embeddings"):
        indexer.index_data(["c", "d"], np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="unknown index kind"):
        Indexer(4, kind="lsh")
    with pytest.raises(ValueError, match="dividing dim"):
        Indexer(10, n_subquantizers=3)


@pytest.mark.parametrize("kind", ["flat", "pq", "ivf", "hnsw"])
def test_save_load_gives_identical_results(tmp_path, kind):
    x, _ = clustered()
    ids = [f"p{i}" for i in range(len(x))]
    indexer = Indexer(32, n_subquantizers=8 if kind == "pq" else 0, kind=kind, n_lists=8, n_probe=2)
    indexer.index_data(ids[:300], x[:300])
    indexer.index_data(ids[300:], x[300:])
    queries = x[::37] + 0.01
    before = indexer.search_knn(queries, 20)
    indexer.serialize(tmp_path, extra={"made_from": ["shard_00.npz"]})
    assert (tmp_path / INDEX_FILE).is_file()
    assert np.load(tmp_path / IDS_FILE, allow_pickle=False).tolist() == ids  # id map without pickle
    assert Indexer.read_meta(tmp_path)["extra"] == {"made_from": ["shard_00.npz"]}
    loaded = Indexer.deserialize_from(tmp_path)
    assert loaded.kind == kind and len(loaded) == len(x)
    after = loaded.search_knn(queries, 20)
    for (ids_a, sc_a), (ids_b, sc_b) in zip(before, after):
        assert ids_a.tolist() == ids_b.tolist()
        np.testing.assert_array_equal(sc_a, sc_b)


def test_pq_and_flat_agree_on_an_easy_case():
    x, centers = clustered(n_clusters=8, per_cluster=64, noise=0.05)
    ids = [f"c{i // 64}_{i % 64}" for i in range(len(x))]
    flat, pq = Indexer(32), Indexer(32, n_subquantizers=8, n_bits=8)
    assert pq.kind == "pq"
    for indexer in (flat, pq):
        indexer.index_data(ids, x)
    queries = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    for (flat_ids, flat_scores), (pq_ids, pq_scores) in zip(flat.search_knn(queries, 64), pq.search_knn(queries, 64)):
        # the same 64 passages (the query's cluster), with close scores
        assert {i.split("_")[0] for i in pq_ids} == {flat_ids[0].split("_")[0]}
        assert set(pq_ids) == set(flat_ids)
        np.testing.assert_allclose(np.sort(pq_scores), np.sort(flat_scores), atol=0.1 * np.abs(flat_scores).max())


def test_pq_needs_enough_training_vectors():
    indexer = Indexer(8, n_subquantizers=4, n_bits=8)
    with pytest.raises(ValueError, match="at least 256 vectors"):
        indexer.index_data([str(i) for i in range(100)], np.ones((100, 8), np.float32))


def test_shard_range_partitions_the_corpus():
    for n, shards in [(10, 3), (12, 4), (5, 5), (2, 3), (1000, 7)]:
        ranges = [shard_range(n, s, shards) for s in range(shards)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(end - start == n // shards for start, end in ranges[:-1])  # last takes the remainder
    with pytest.raises(ValueError, match="shard_id"):
        shard_range(10, 3, 3)


def test_shard_files_round_trip_and_legacy_pickles(tmp_path):
    path = shard_path(tmp_path / "wiki", 3)
    assert path.name == "wiki_03.npz"
    emb = np.arange(12, dtype=np.float64).reshape(3, 4)
    write_shard(path, ["10", "wiki:2", "x"], emb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wiki_03.npz"]  # no temp file left
    ids, loaded = read_shard(path)
    assert ids.tolist() == ["10", "wiki:2", "x"] and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, emb.astype(np.float32))

    legacy = tmp_path / "wiki_legacy_00"  # the original code: pickle.dump((ids, embeddings))
    with open(legacy, "wb") as f:
        pickle.dump(([1, 2], np.ones((2, 4), np.float32)), f)
    with pytest.raises(EmbeddingFileError, match="--allow_pickle_embeddings"):
        read_shard(legacy)
    ids, loaded = read_shard(legacy, allow_pickle=True)
    assert ids.tolist() == ["1", "2"] and loaded.shape == (2, 4)

    junk = tmp_path / "junk"
    junk.write_text("not embeddings")
    with pytest.raises(EmbeddingFileError, match="junk: not an embedding shard"):
        read_shard(junk)
