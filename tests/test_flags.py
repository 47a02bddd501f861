"""Every flag a script accepts does what it says there, or the script warns that it ignores
it when it is set (the original's shared option groups: e.g. test_reader.py takes
--train_data); --precision means the same in every script, --no_fp16 is --precision fp32."""

import argparse
import json
import logging
import random

import faiss
import numpy as np
import pytest
import torch

import generate_passage_embeddings
import passage_retrieval
import test_reader
import train_reader
import train_retriever
from src.cli import close_loggers, warn_ignored
from src.configs import config_from
from src.corpus.driver import RetrievalConfig, get_index
from src.corpus.embeddings import read_shard, write_shard
from src.corpus.faiss_index import IndexConfig
from src.corpus.search import embedding_files
from src.devices import precision_autocast, resolve_precision
from src.options import Options
from src.train.optim import unused_flags

WORDS = "what color does anna boris clara like red blue green yellow question title context".split()

# The audit: every flag (option dest) each script reads. The rest of what it accepts must be
# its IGNORED, and the two together must be all it accepts.
COMMON = {
    "name", "checkpoint_dir", "model_path", "model_name_or_path", "tokenizer_name_or_path", "per_gpu_batch_size",
    "maxload", "local_rank", "main_port", "seed", "eval_freq", "save_freq", "eval_print_freq", "precision",
    "num_workers", "device", "dist_timeout_minutes", "no_tf32",
}  # fmt: skip
READER = {
    "train_data", "eval_data", "model_size", "use_checkpoint", "text_maxlength", "answer_maxlength", "no_title",
    "n_context", "generation_max_length", "num_beams", "no_packing",
}  # fmt: skip
RETRIEVER = {
    "train_data", "eval_data", "indexing_dimension", "no_projection", "question_maxlength", "passage_maxlength",
    "no_question_mask", "no_passage_mask", "extract_cls", "no_title", "n_context", "temperature_gold",
    "temperature_score", "in_batch_negatives", "retriever_loss", "pooling", "normalize", "similarity_scale",
    "question_template", "passage_template", "grad_cache_chunk_size", "query_side_retriever_training",
}  # fmt: skip
# The retriever's recipe: read from the model by the corpus scripts, a flag given there is checked against it.
RECIPE = {"extract_cls", "pooling", "normalize", "similarity_scale", "question_template", "passage_template"}
OPTIM = {
    "warmup_steps", "total_steps", "scheduler_steps", "accumulation_steps", "fsdp", "dropout", "lr", "clip", "optim",
    "scheduler", "weight_decay", "fixed_lr",
}  # fmt: skip
EVAL = {"write_results", "write_crossattention_scores", "score_kind"}
CORPUS_COMMON = {
    "model_path", "tokenizer_name_or_path", "per_gpu_batch_size", "precision", "device", "local_rank", "main_port",
    "dist_timeout_minutes", "no_tf32",
} | RECIPE  # fmt: skip
USED = {
    train_reader: COMMON | READER | OPTIM,
    test_reader: COMMON - {"eval_freq", "save_freq", "seed"}
    | READER - {"train_data", "use_checkpoint", "answer_maxlength"}
    | EVAL,
    train_retriever: COMMON | RETRIEVER | OPTIM,
    generate_passage_embeddings: CORPUS_COMMON | {
        "passages", "output_path", "shard_id", "num_shards", "passage_maxlength", "no_fp16", "no_title",
        "no_sort_by_length", "embedding_dtype",
    },
    passage_retrieval: CORPUS_COMMON | {"maxload"} | {
        "data", "passages", "passages_embeddings", "output_path", "n_docs", "validation_workers", "save_or_load_index",
        "no_fp16", "question_maxlength", "indexing_batch_size", "n_subquantizers", "n_bits", "index_type", "n_lists",
        "n_probe", "allow_pickle_embeddings", "evaluate_only", "hnsw_m", "index_train_sample", "question_chunk_size",
    },
}  # fmt: skip
SCRIPTS = list(USED)


class _Parsed(Exception):
    pass


def parser_of(module, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script's main builds (stopped right at parse)."""
    seen = {}

    def parse(self, argv=None):
        seen["parser"] = self.parser
        raise _Parsed

    monkeypatch.setattr(Options, "parse", parse)
    with pytest.raises(_Parsed):
        module.main([])
    monkeypatch.undo()
    return seen["parser"]


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_every_accepted_flag_is_used_or_declared_ignored(module, monkeypatch):
    parser = parser_of(module, monkeypatch)
    accepted = {a.dest for a in parser._actions if a.dest != "help"}
    ignored = set(module.IGNORED)
    assert not ignored & USED[module], f"both used and ignored: {sorted(ignored & USED[module])}"
    assert accepted == USED[module] | ignored, (
        f"not classified: {sorted(accepted - USED[module] - ignored)}; "
        f"not accepted: {sorted((USED[module] | ignored) - accepted)}"
    )
    for action in parser._actions:  # --help says which flags do nothing here
        if action.dest in accepted:
            assert ("IGNORED by this script" in (action.help or "")) == (action.dest in ignored), action.dest


# ---------------------------------------------------------------------------
# The scripts, run in this process: what they warn about
# ---------------------------------------------------------------------------


def toy_questions(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, color = rng.choice(["anna", "boris", "clara"]), rng.choice(["red", "blue", "green", "yellow"])
        ctxs = [
            {"id": f"{i}-{j}", "title": name, "text": f"{name} like {rng.choice(['red', 'blue', color])}", "score": s}
            for j, s in enumerate([3.0, 2.0, 1.0])
        ]
        out.append({"id": f"q{i}", "question": f"what color does {name} like", "answers": [color], "ctxs": ctxs})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_fid, tiny_retriever):
    assert set(WORDS) <= set(tiny_fid.words) and set(WORDS) <= set(tiny_retriever.words)
    root = tmp_path_factory.mktemp("flags")
    t5, bert = tiny_fid.path, tiny_retriever.encoder
    (root / "train.json").write_text(json.dumps(toy_questions(8, 0)))
    (root / "dev.json").write_text(json.dumps(toy_questions(3, 1)))
    passages = [(f"p{i}", f"{n} like {c}", n) for i, (n, c) in enumerate(zip(WORDS[3:6] * 3, WORDS[7:11] * 3))]
    (root / "psgs.tsv").write_text("id\ttext\ttitle\n" + "".join(f"{i}\t{t}\t{n}\n" for i, t, n in passages))
    return {"root": root, "t5": t5, "bert": bert, "retriever": tiny_retriever.retriever}


def run_main(module, args: list[str], caplog) -> dict[str, str]:
    """Run the script's main in this process; {flag: message} of its "ignores --flag" warnings."""
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger="fid"):
            module.main([str(a) for a in args])
    finally:
        close_loggers()  # the scripts' handlers hold files and this test's streams
    warned = {}
    for record in caplog.records:
        message = record.getMessage()
        if record.levelno == logging.WARNING and " ignores --" in message:
            warned[message.split(" ignores ")[1].split(" ")[0]] = message
    return warned


def flag_args(table: list[tuple[str, str | None]]) -> list[str]:
    return [a for flag, value in table for a in ((flag,) if value is None else (flag, value))]


# (flag, value) the script ignores: each gets a warning when set ...
TRAIN_READER_IGNORED = [("--weight_decay", "0.05"), ("--warmup_steps", "3")]  # with --optim adam, --scheduler fixed
# ... and (flag, value) it uses: no warning.
TRAIN_READER_USED = [
    ("--seed", "3"), ("--lr", "1e-3"), ("--eval_freq", "2"), ("--save_freq", "2"), ("--num_workers", "0"),
    ("--precision", "bf16"), ("--dropout", "0"), ("--use_checkpoint", None), ("--answer_maxlength", "4"),
    ("--accumulation_steps", "2"),
]  # fmt: skip


def test_train_reader_warns_for_what_its_optimizer_does_not_read(world, caplog):
    root = world["root"]
    warned = run_main(train_reader, [
        "--train_data", root / "train.json", "--eval_data", root / "dev.json", "--model_name_or_path", world["t5"],
        "--checkpoint_dir", root / "runs", "--name", "train_reader", "--total_steps", "2", "--n_context", "2",
        "--text_maxlength", "12", "--per_gpu_batch_size", "2", "--device", "cpu",
        *flag_args(TRAIN_READER_IGNORED), *flag_args(TRAIN_READER_USED),
    ], caplog)  # fmt: skip
    assert set(warned) == {flag for flag, _ in TRAIN_READER_IGNORED}, warned
    assert "only --optim adamw" in warned["--weight_decay"]
    assert "only --scheduler linear" in warned["--warmup_steps"]
    assert (root / "runs" / "train_reader" / "checkpoint" / "latest").is_dir()


def test_optimisation_flags_are_read_by_the_chosen_optimizer_and_schedule():
    def parse(*argv):
        options = Options()
        options.add_optim_options()
        return options.parse(list(argv))

    assert set(unused_flags(parse())) == {"weight_decay", "warmup_steps", "scheduler_steps", "fixed_lr"}
    assert unused_flags(parse("--optim", "adamw", "--scheduler", "linear")) == {}
    assert set(unused_flags(parse("--optim", "adamw", "--scheduler", "linear", "--fixed_lr"))) == {"scheduler_steps"}


TEST_READER_IGNORED = [
    ("--train_data", "x.json"), ("--use_checkpoint", None), ("--answer_maxlength", "5"), ("--eval_freq", "7"),
    ("--save_freq", "7"), ("--seed", "5"), ("--score_kind", "xattn_softmax"),  # score_kind: no scores written
]  # fmt: skip
TEST_READER_USED = [
    ("--maxload", "2"), ("--num_beams", "2"), ("--generation_max_length", "5"), ("--precision", "bf16"),
    ("--eval_print_freq", "1"), ("--num_workers", "0"), ("--model_size", "small"), ("--write_results", None),
]  # fmt: skip


def test_test_reader_warns_for_each_ignored_flag(world, caplog):
    root = world["root"]
    warned = run_main(test_reader, [
        "--model_path", world["t5"], "--eval_data", root / "dev.json", "--checkpoint_dir", root / "runs",
        "--name", "test_reader", "--n_context", "2", "--text_maxlength", "12", "--device", "cpu",
        *flag_args(TEST_READER_IGNORED), *flag_args(TEST_READER_USED),
    ], caplog)  # fmt: skip
    assert set(warned) == {flag for flag, _ in TEST_READER_IGNORED}, warned
    assert "only matters with --write_crossattention_scores" in warned["--score_kind"]
    assert len((root / "runs" / "test_reader" / "final_output.txt").read_text().splitlines()) == 2  # --maxload


TRAIN_RETRIEVER_IGNORED = [("--fixed_lr", None), ("--scheduler_steps", "9")]  # --scheduler fixed reads neither
TRAIN_RETRIEVER_USED = [
    ("--seed", "2"), ("--optim", "adamw"), ("--weight_decay", "0.01"), ("--temperature_gold", "0.5"),
    ("--in_batch_negatives", None), ("--precision", "bf16"), ("--question_maxlength", "6"),
    ("--passage_maxlength", "10"), ("--indexing_dimension", "8"), ("--eval_print_freq", "1"),
]  # fmt: skip


def test_train_retriever_warns_for_what_its_schedule_does_not_read(world, caplog):
    root = world["root"]
    warned = run_main(train_retriever, [
        "--train_data", root / "train.json", "--eval_data", root / "dev.json", "--model_name_or_path", world["bert"],
        "--checkpoint_dir", root / "runs", "--name", "train_retriever", "--total_steps", "2", "--n_context", "3",
        "--per_gpu_batch_size", "4", "--device", "cpu",
        *flag_args(TRAIN_RETRIEVER_IGNORED), *flag_args(TRAIN_RETRIEVER_USED),
    ], caplog)  # fmt: skip
    assert set(warned) == {flag for flag, _ in TRAIN_RETRIEVER_IGNORED}, warned
    assert (root / "runs" / "train_retriever" / "checkpoint" / "latest").is_dir()


# Every common flag the corpus scripts ignore, the original's shared groups.
CORPUS_IGNORED = [
    ("--name", "x"), ("--checkpoint_dir", "elsewhere"), ("--model_name_or_path", "bert-base-uncased"),
    ("--seed", "1"), ("--eval_freq", "1"), ("--save_freq", "1"),
    ("--eval_print_freq", "1"), ("--num_workers", "2"),
]  # fmt: skip
EMBEDDING_IGNORED = [*CORPUS_IGNORED, ("--maxload", "3")]
EMBEDDING_USED = [
    ("--per_gpu_batch_size", "2"), ("--passage_maxlength", "6"), ("--no_title", None), ("--precision", "bf16"),
    ("--no_sort_by_length", None), ("--num_shards", "2"), ("--shard_id", "1"),
]  # fmt: skip
RETRIEVAL_IGNORED = [
    *CORPUS_IGNORED, ("--passage_maxlength", "6"),
    ("--n_lists", "8"), ("--n_probe", "2"), ("--n-bits", "4"),  # only IVF / PQ indexes read these; this one is flat
]  # fmt: skip
RETRIEVAL_USED = [
    ("--maxload", "2"), ("--n-docs", "3"), ("--question_maxlength", "6"), ("--precision", "bf16"),
    ("--validation_workers", "1"), ("--per_gpu_batch_size", "1"), ("--indexing_batch_size", "4"),
    ("--index_type", "flat"),
]  # fmt: skip
EVALUATE_ONLY_IGNORED = [  # --evaluate_only retrieves nothing
    ("--model_path", "retriever"), ("--passages", "psgs.tsv"), ("--n-docs", "3"), ("--no_fp16", None),
    ("--precision", "fp32"), ("--index_type", "ivf"), ("--device", "cpu"), ("--per_gpu_batch_size", "3"),
]  # fmt: skip


def test_corpus_scripts_warn_for_each_ignored_flag(world, caplog):
    root = world["root"]
    common = ["--model_path", world["retriever"], "--passages", root / "psgs.tsv", "--device", "cpu"]
    warned = run_main(generate_passage_embeddings, [
        *common, "--output_path", root / "emb" / "wiki", *flag_args(EMBEDDING_IGNORED), *flag_args(EMBEDDING_USED),
    ], caplog)  # fmt: skip
    assert set(warned) == {flag for flag, _ in EMBEDDING_IGNORED}, warned
    assert "only matters to other scripts" in warned["--name"]
    ids, emb = read_shard(root / "emb" / "wiki_01.npz")
    assert len(ids) == 5 and emb.shape == (5, 8)  # shard 1 of 2 of 9 passages: --maxload did not cut it

    # all passages, to retrieve from
    run_main(generate_passage_embeddings, [*common, "--output_path", root / "all" / "wiki"], caplog)
    out = root / "retrieved.json"
    warned = run_main(passage_retrieval, [
        *common, "--passages_embeddings", root / "all" / "wiki_*", "--data", root / "dev.json", "--output_path", out,
        *flag_args(RETRIEVAL_IGNORED), *flag_args(RETRIEVAL_USED),
    ], caplog)  # fmt: skip
    assert set(warned) == {flag for flag, _ in RETRIEVAL_IGNORED}, warned
    assert "only --index_type ivf" in warned["--n_lists"] and "only a pq index" in warned["--n-bits"]
    retrieved = json.loads(out.read_text())
    assert len(retrieved) == 2 and all(len(q["ctxs"]) == 3 for q in retrieved)  # --maxload, --n-docs
    assert "ignores --name" in (root / "retrieved.json.log").read_text()  # the warnings are in the log too

    warned = run_main(passage_retrieval, [
        "--evaluate_only", "--data", out, "--output_path", root / "evaluated.json", "--validation_workers", "1",
        *flag_args(EVALUATE_ONLY_IGNORED),
    ], caplog)  # fmt: skip
    assert set(warned) == {flag for flag, _ in EVALUATE_ONLY_IGNORED}, warned
    assert all("--evaluate_only retrieves nothing" in m for m in warned.values())


def test_warn_ignored_names_the_flag_as_typed():
    options = Options()
    options.add_retrieval_options()
    opt = options.parse(["--n-docs", "5", "--data_path", "q.json"])
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("test_flags")
    log.addHandler(Keep())
    warn_ignored(opt, options.given, ("n_docs", "data", "n_bits"), log)  # n_bits: left at its default
    assert len(records) == 2
    assert "ignores --n-docs (set to 5)" in records[0] and "ignores --data (set to 'q.json')" in records[1]


# ---------------------------------------------------------------------------
# --precision
# ---------------------------------------------------------------------------

CORPUS_PARSERS = [generate_passage_embeddings.get_options, passage_retrieval.get_options]


@pytest.mark.parametrize("get_options", CORPUS_PARSERS, ids=["embeddings", "retrieval"])
def test_corpus_precision_default_is_the_originals_and_no_fp16_is_fp32(get_options, capsys):
    opt = get_options([])
    assert opt.precision is None  # resolved on the device: fp16 on GPU, fp32 on CPU
    assert resolve_precision(opt.precision, "cuda") == "fp16"
    assert resolve_precision(opt.precision, torch.device("cuda", 1)) == "fp16"
    assert resolve_precision(opt.precision, "cpu") == "fp32"
    for precision in ("fp32", "bf16", "fp16"):
        assert resolve_precision(get_options(["--precision", precision]).precision, "cuda") == precision
        assert resolve_precision(get_options(["--precision", precision]).precision, "cpu") == precision
    assert get_options(["--no_fp16"]).precision == "fp32"
    assert get_options(["--no_fp16", "--precision", "fp32"]).precision == "fp32"
    for precision in ("fp16", "bf16"):
        with pytest.raises(SystemExit) as e:
            get_options(["--no_fp16", "--precision", precision])
        assert e.value.code == 2
        assert f"--no_fp16 means --precision fp32; it contradicts --precision {precision}" in capsys.readouterr().err


def test_precision_is_the_same_autocast_in_every_script():
    training = Options()
    training.add_reader_options()
    assert training.parse([]).precision == "fp32"  # training and test scripts: fp32 unless asked
    for get_options in CORPUS_PARSERS:
        opt = get_options(["--precision", "bf16"])
        with precision_autocast(opt.precision, "cpu"):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        opt = get_options(["--no_fp16"])
        with precision_autocast(opt.precision, "cpu"):
            assert not torch.is_autocast_enabled("cpu")


@pytest.fixture(scope="module")
def embeddings(world):
    """The passages embedded by the script with each precision setting, on CPU."""
    root = world["root"]
    out = {}
    for label, flags in {"default": [], "fp32": ["--precision", "fp32"], "no_fp16": ["--no_fp16"]}.items():
        out[label] = embed(world, root / "precision" / label, flags)
    out["bf16"] = embed(world, root / "precision" / "bf16", ["--precision", "bf16"])
    return out


def embed(world, prefix, flags) -> np.ndarray:
    generate_passage_embeddings.main([
        "--model_path", str(world["retriever"]), "--passages", str(world["root"] / "psgs.tsv"), "--device", "cpu",
        "--output_path", str(prefix), "--per_gpu_batch_size", "4", *flags,
    ])  # fmt: skip
    logging.getLogger("fid").handlers.clear()
    return read_shard(f"{prefix}_00.npz")[1]


def test_embeddings_default_is_fp32_on_cpu_and_bf16_is_close(embeddings):
    fp32 = embeddings["fp32"]
    assert np.array_equal(embeddings["default"], fp32) and np.array_equal(embeddings["no_fp16"], fp32)
    bf16 = embeddings["bf16"]
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert not np.array_equal(bf16, fp32)  # bf16 really ran
    np.testing.assert_allclose(bf16, fp32, atol=1e-2 * np.abs(fp32).max(), rtol=0)


def test_a_saved_ivf_index_follows_n_lists_and_n_probe(embeddings, tmp_path, caplog):
    """--save_or_load_index reuses a saved IVF index only if --n_lists is unchanged, and
    searches it with this run's --n_probe."""
    write_shard(tmp_path / "wiki_00.npz", [f"p{i}" for i in range(len(embeddings["fp32"]))], embeddings["fp32"])
    files = embedding_files(str(tmp_path / "wiki_*"))
    log = logging.getLogger("fid")

    def index(*flags):
        opt = passage_retrieval.get_options(["--save_or_load_index", "--index_type", "ivf", *flags])
        config = config_from(RetrievalConfig, opt, index=config_from(IndexConfig, opt))
        return faiss.extract_index_ivf(get_index(files, 8, config, log).index)

    with caplog.at_level(logging.INFO):
        assert index("--n_lists", "2", "--n_probe", "1").nlist == 2
        loaded = index("--n_lists", "2", "--n_probe", "2")
        assert "loaded ivf index" in caplog.text and (loaded.nlist, loaded.nprobe) == (2, 2)
        caplog.clear()
        assert index("--n_lists", "3").nlist == 3
        assert "rebuilding it" in caplog.text
