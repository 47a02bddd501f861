"""Indexer (FAISS + id map) and embedding shard files."""

import logging
import pickle

import faiss
import numpy as np
import pytest

from src.cli import cli
from src.configs import config_from
from src.corpus.embeddings import check_shard, read_shard, shard_path, shard_range, shards_of_process, write_shard
from src.corpus.faiss_index import (
    IDS_FILE,
    INDEX_FILE,
    KINDS,
    IndexConfig,
    Indexer,
    index_kind,
    index_signature,
    unused_index_flags,
)
from src.errors import EmbeddingFileError
from src.options import Options


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


def unit_vectors(n=512, dim=64, seed=0):
    """Random unit vectors: in 64 dimensions any two are far apart (|<x, y>| < ~0.5)."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# Settings each kind needs to work on 512 vectors of dim 64.
KIND_SETTINGS = {
    "pq": {"n_subquantizers": 16},
    "ivfpq": {"n_subquantizers": 16, "n_lists": 4, "n_probe": 4},
    "ivf": {"n_lists": 4, "n_probe": 2},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_round_trips_and_finds_the_nearest_neighbour(tmp_path, kind, caplog):
    x = unit_vectors()
    queries = x[::7] + 0.01 * np.random.default_rng(1).standard_normal((len(x[::7]), 64)).astype(np.float32)
    ids = [str(i) for i in range(1000, 1000 + len(x))]
    indexer = Indexer(64, kind=kind, train_sample=400, **KIND_SETTINGS.get(kind, {}))
    with caplog.at_level(logging.INFO, logger="fid.index"):
        for start in range(0, len(x), 100):  # streamed: the trained kinds buffer 400, then train
            indexer.index_data(ids[start : start + 100], x[start : start + 100])
        assert len(indexer) == len(x)
        before = indexer.search_knn(queries, 5)
    trained = kind in ("pq", "ivf", "ivfpq", "sq8")
    assert indexer.trained_on == (400 if trained else None)
    assert (f"training the {kind} index on 400 vectors" in caplog.text) == trained
    assert [found[0] for found, _ in before] == ids[::7]  # the exact nearest neighbour first
    indexer.serialize(tmp_path)
    assert np.load(tmp_path / IDS_FILE, allow_pickle=False).dtype == np.int64  # integer ids: compact map
    loaded = Indexer.deserialize_from(tmp_path)
    assert (loaded.kind, len(loaded), loaded.trained_on) == (kind, len(x), indexer.trained_on)
    for (ids_a, sc_a), (ids_b, sc_b) in zip(before, loaded.search_knn(queries, 5)):
        assert ids_a.tolist() == ids_b.tolist() and all(isinstance(i, str) for i in ids_b.tolist())
        np.testing.assert_array_equal(sc_a, sc_b)


def test_bytes_per_passage_of_the_compact_kinds(tmp_path):
    x = unit_vectors(n=2048)
    sizes = {}
    for kind in ("flat", "sqfp16", "sq8", "pq"):
        indexer = Indexer(64, kind=kind, n_subquantizers=16, train_sample=1024)
        indexer.index_data(np.arange(len(x)), x)
        indexer.serialize(tmp_path / kind)
        sizes[kind] = (tmp_path / kind / INDEX_FILE).stat().st_size
    assert [round(sizes[k] / len(x)) for k in ("flat", "sqfp16", "sq8")] == [256, 128, 64]  # 4, 2, 1 bytes per dim
    codebooks = 256 * 64 * 4  # 256 centroids of 16 sub-vectors of 4 dims, float32
    assert 0 < sizes["pq"] - codebooks - 16 * len(x) < 200  # 16 one-byte codes per passage, a header


def test_training_sample_smaller_corpus_and_first_batch(caplog):
    x = unit_vectors(n=300)
    indexer = Indexer(64, kind="pq", n_subquantizers=8, train_sample=10_000)
    indexer.index_data(np.arange(300), x)
    assert indexer.index.ntotal == 0 and len(indexer) == 300  # still buffered: the sample is not full
    with caplog.at_level(logging.WARNING, logger="fid.index"):
        indexer.search_knn(x[:1], 1)  # the data ended: trained on all of it
    assert indexer.trained_on == 300 and indexer.index.ntotal == 300
    assert "FAISS's k-means wants >= 39 per centroid (9984 for 256 centroids)" in caplog.text

    first_batch = Indexer(64, kind="pq", n_subquantizers=8)  # no sample: the first batch, as before
    first_batch.index_data(np.arange(260), x[:260])
    first_batch.index_data(np.arange(260, 300), x[260:])
    assert first_batch.trained_on == 260 and first_batch.index.ntotal == 300

    too_few = Indexer(64, kind="ivf", n_lists=64, train_sample=100)
    too_few.index_data(np.arange(30), x[:30])
    with pytest.raises(ValueError, match="training the ivf index needs at least 64 vectors, got 30"):
        too_few.search_knn(x[:1], 1)
    with pytest.raises(ValueError, match="sample of 100 vectors is too small for the pq index: it needs at least 256"):
        Indexer(64, kind="pq", n_subquantizers=8, train_sample=100)


def test_float16_embeddings_give_the_flat_top_k_of_float32(tmp_path):
    x = unit_vectors(n=400)
    queries = unit_vectors(n=20, seed=5)
    ids = [str(i) for i in range(400)]
    write_shard(tmp_path / "f32.npz", ids, x)
    write_shard(tmp_path / "f16.npz", ids, x, dtype="float16")
    assert (tmp_path / "f16.npz").stat().st_size < 0.6 * (tmp_path / "f32.npz").stat().st_size
    ids16, x16 = read_shard(tmp_path / "f16.npz", compact=True)
    assert x16.dtype == np.float16 and ids16.dtype == np.int64  # as stored
    assert read_shard(tmp_path / "f16.npz")[1].dtype == np.float32  # the default: float32 and str ids
    results = {}
    for name, (shard_ids, emb) in {"f32": read_shard(tmp_path / "f32.npz"), "f16": (ids16, x16)}.items():
        indexer = Indexer(64)
        indexer.index_data(shard_ids, emb)
        results[name] = indexer.search_knn(queries, 10)
    for (ids_a, sc_a), (ids_b, sc_b) in zip(results["f32"], results["f16"]):
        assert ids_a.tolist() == ids_b.tolist()
        np.testing.assert_allclose(sc_a, sc_b, atol=2e-3)
    with pytest.raises(ValueError, match="beyond float16's range"):
        write_shard(tmp_path / "big.npz", ["1"], np.array([[1e5, 0.0]]), dtype="float16")


def test_id_maps_int64_when_all_are_integers_else_strings(tmp_path):
    x = unit_vectors(n=6, dim=8)
    cases = {
        "ints": (["3", "10", "2", "7", "100", "21015324"], np.int64),
        "numpy ints": (np.array([3, 10, 2, 7, 100, 21015324]), np.int64),
        "leading zero": (["3", "010", "2", "7", "100", "5"], str),  # "010" must come back as "010"
        "mixed": (["3", "10", "wiki:2", "7", "100", "5"], str),
    }
    for name, (ids, dtype) in cases.items():
        indexer = Indexer(8)
        indexer.index_data(ids[:3], x[:3])
        indexer.index_data(ids[3:], x[3:])
        assert indexer.ids.dtype.kind == np.dtype(dtype).kind, name
        indexer.serialize(tmp_path / name)
        loaded = Indexer.deserialize_from(tmp_path / name)
        for found, _ in loaded.search_knn(x, 1):
            assert found.dtype.kind == "U"
        assert [found[0] for found, _ in loaded.search_knn(x, 1)] == [str(i) for i in ids], name

    # an index saved before int64 maps: a unicode id map still loads and searches the same
    np.save(tmp_path / "ints" / IDS_FILE, np.array(cases["ints"][0]), allow_pickle=False)
    old = Indexer.deserialize_from(tmp_path / "ints")
    assert [found[0] for found, _ in old.search_knn(x, 1)] == cases["ints"][0]


def parse_index_flags(*argv) -> IndexConfig:
    options = Options()
    options.add_retrieval_options()
    options.add_index_options()
    return config_from(IndexConfig, options.parse(list(argv)))


def test_index_flags_choose_kind_signature_and_unused_flags():
    assert index_kind(parse_index_flags()) == "flat" and index_kind(parse_index_flags("--n-subquantizers", "8")) == "pq"
    opt = parse_index_flags("--index_type", "ivfpq", "--n_lists", "4", "--index_train_sample", "300")
    indexer = Indexer.from_config(768, opt)
    ivf = faiss.extract_index_ivf(indexer.index)
    assert (indexer.kind, ivf.nlist, ivf.nprobe, indexer.config["n_subquantizers"]) == ("ivfpq", 4, 16, 64)
    assert indexer.train_sample == 300
    assert unused_index_flags(opt).keys() == {"hnsw_m"}
    assert unused_index_flags(parse_index_flags("--index_type", "sqfp16")).keys() == {
        "n_lists", "n_probe", "n_subquantizers", "n_bits", "hnsw_m", "index_train_sample",
    }  # fmt: skip
    assert unused_index_flags(parse_index_flags("--index_type", "sq8")).keys() == {
        "n_lists", "n_probe", "n_subquantizers", "n_bits", "hnsw_m",
    }  # fmt: skip
    assert "only --index_type ivf or ivfpq" in unused_index_flags(parse_index_flags())["n_lists"]
    signature = index_signature(opt)
    assert signature == index_signature(parse_index_flags(*opt_argv(opt), "--n_probe", "64"))  # a search setting
    assert signature != index_signature(parse_index_flags(*opt_argv(opt), "--n_lists", "8"))
    assert index_signature(parse_index_flags()) == {
        "kind": "flat",
        "n_subquantizers": 0,
        "n_bits": 8,
    }  # as saved before


@pytest.mark.parametrize(
    "kind, flags, advice",
    [
        ("pq", {"n_subquantizers": 4, "n_bits": 8}, "raise --index_train_sample, or lower --n-bits)"),
        ("ivf", {"n_lists": 20}, "raise --index_train_sample, or lower --n_lists)"),
        ("ivfpq", {"n_lists": 20, "n_subquantizers": 4, "n_bits": 8}, "or lower --n_lists / --n-bits)"),
        ("ivfpq", {"n_lists": 4, "n_subquantizers": 4, "n_bits": 8}, "raise --index_train_sample, or lower --n-bits)"),
    ],
)
def test_a_small_training_sample_is_one_warning_naming_the_flags_of_the_kind(capfd, caplog, kind, flags, advice):
    """FAISS's k-means warns on stderr once per quantizer (4 pq sub-quantizers here, 64 for
    DPR's 768 dims); the index says it once, with the flags that this kind reads."""
    x = np.random.default_rng(0).standard_normal((300, 16), dtype=np.float32)
    indexer = Indexer(16, kind=kind, train_sample=300, **flags)
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="fid.index"):
        indexer.index_data(np.arange(300), x)
    assert "WARNING clustering" not in capfd.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].endswith(advice), warnings
    if kind == "pq":
        assert "--n_lists" not in warnings[0]
    # the ivf lists' k-means (when short of 39 x n_lists), and one per pq sub-quantizer
    quantizers = (kind != "pq" and 39 * flags["n_lists"] > 300) + 4 * (kind != "ivf")
    assert f"FAISS's k-means warned {quantizers} time(s)" in caplog.text
    assert indexer.trained_on == 300 and len(indexer.search_knn(x[:2], 3)) == 2
    corpus = Indexer(16, kind="ivf", n_lists=20, train_sample=1000)  # the whole corpus is the sample
    caplog.clear()
    corpus.index_data(np.arange(300), x)
    corpus.finish()
    assert "lower --n_lists: the corpus has only 300 vectors" in caplog.text


def opt_argv(opt) -> list[str]:
    return ["--index_type", opt.index_type, "--n_lists", str(opt.n_lists), "--index_train_sample", "300"]


def test_misused_index_flags_are_clear_errors_with_exit_2(capsys):
    with pytest.raises(ValueError, match="ivfpq needs --n-subquantizers > 0 dividing dim=768"):
        Indexer.from_config(768, parse_index_flags("--index_type", "ivfpq", "--n-subquantizers", "10"))
    with pytest.raises(SystemExit) as e:  # what a script that builds it does (src/cli.py)
        cli(lambda: Indexer.from_config(100, parse_index_flags("--index_type", "ivfpq")))
    assert e.value.code == 2
    assert "ivfpq needs --n-subquantizers > 0 dividing dim=100" in capsys.readouterr().err
    for argv in (["--index_type", "ivfpq2"], ["--index_train_sample", "0"], ["--n_lists", "0"]):
        with pytest.raises(SystemExit) as e:
            parse_index_flags(*argv)
        assert e.value.code == 2


def test_shards_of_a_process_alone_and_under_torchrun():
    assert shards_of_process(None, None) == ([0], 1)
    assert shards_of_process(3, 5) == ([3], 5)
    assert [shards_of_process(None, None, rank, 2) for rank in (0, 1)] == [([0], 2), ([1], 2)]
    assert [shards_of_process(None, 5, rank, 2)[0] for rank in (0, 1)] == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError, match="shard_id"):
        shards_of_process(5, 5)
    with pytest.raises(ValueError, match="under torchrun rank r of 2 embeds"):
        shards_of_process(0, 2, 0, 2)
    with pytest.raises(ValueError, match="--num_shards 2 is fewer than the 4 processes"):
        shards_of_process(None, 2, 0, 4)


def test_check_shard_reads_the_array_headers(tmp_path):
    good = tmp_path / "good.npz"
    write_shard(good, ["1", "2"], np.ones((2, 4), np.float32), dtype="float16")
    check_shard(good)
    bad = tmp_path / "bad.npz"
    np.savez(bad, ids=np.array(["1", "2", "3"]), embeddings=np.ones((2, 4), np.float32))
    with pytest.raises(EmbeddingFileError, match=r"bad.npz: expected ids \(n,\).*found ids <U1 \(3,\)"):
        check_shard(bad)
    np.savez(bad, ids=np.array(["1"]), embeddings=np.array([["a", "b"]]))
    with pytest.raises(EmbeddingFileError, match="float embeddings"):
        check_shard(bad)
