"""Every command-line flag, grouped as in the original FiD (README "The scripts").

Scripts pick the groups they need; `save_options` writes the parsed options as plain
JSON (never a pickled argparse object) and a readable `opt.log` marking non-defaults.
The choices of `--score_kind` and `--retriever_loss` are the names in their registries
(scores.py, losses.py). A script that accepts a shared flag it does not use names it
in its `IGNORED`: `mark_ignored` says so in its --help and `cli.warn_ignored` (through
`ignored_flags`) warns when the user sets it. `--precision` is the same everywhere
(devices.py); the corpus scripts default it to the original's fp16 on GPU / fp32 on CPU
and take `--no_fp16` for `--precision fp32`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from src.corpus.embeddings import EMBEDDING_DTYPES
from src.corpus.faiss_index import DEFAULT_SUBQUANTIZERS
from src.corpus.faiss_index import DEFAULTS as INDEX_DEFAULTS
from src.corpus.faiss_index import KINDS as INDEX_KINDS
from src.devices import PRECISIONS
from src.files import atomic_write
from src.reader.scores import SCORE_KINDS
from src.retriever.losses import LOSSES
from src.train.config import OptimConfig, TrainConfig

T = TypeVar("T")


def positive_int(text: str) -> int:
    """argparse type of counts and sizes (batch size, passages, tokens, steps): an integer >= 1.
    A bad value is an argparse error: one line naming the flag, exit code 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


class Options:
    def __init__(self, description: str | None = None):
        self.parser = argparse.ArgumentParser(
            description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        self.add_common_options()

    def add_common_options(self) -> None:
        g = self.parser.add_argument_group("common")
        g.add_argument("--name", type=str, default="experiment_name", help="name of the run directory")
        g.add_argument("--checkpoint_dir", type=str, default="./checkpoint/", help="runs are saved here")
        g.add_argument(
            "--model_path",
            type=str,
            default="none",
            help="saved model to start from (fresh optimizer); wins over --model_name_or_path and resume",
        )
        g.add_argument(
            "--model_name_or_path",
            type=str,
            default=None,
            help="pretrained weights of a fresh run: hub name or local dir (default: t5-<model_size> for the "
            "reader, bert-base-uncased for the retriever)",
        )
        g.add_argument(
            "--tokenizer_name_or_path",
            type=str,
            default=None,
            help="tokenizer (default: the model directory when it holds a tokenizer)",
        )
        g.add_argument("--per_gpu_batch_size", type=positive_int, default=1, help="batch size per GPU/process")
        g.add_argument("--maxload", type=int, default=-1, help="read at most this many examples (-1: all)")
        g.add_argument("--local_rank", type=int, default=-1, help="set by old launchers; torchrun uses LOCAL_RANK")
        g.add_argument("--main_port", type=int, default=-1, help="port of the process group under SLURM")
        g.add_argument("--seed", type=int, default=0, help="random seed")
        g.add_argument("--eval_freq", type=positive_int, default=500, help="evaluate every this many steps")
        g.add_argument("--save_freq", type=positive_int, default=5000, help="save step-N every this many steps")
        g.add_argument("--eval_print_freq", type=int, default=1000, help="log evaluation progress this often")
        g.add_argument(
            "--precision",
            choices=list(PRECISIONS),
            default="fp32",
            help="dtype of torch.autocast around the model on --device, the same in every script: fp32 (no "
            "autocast), bf16 or fp16 (weights stay fp32; training in fp16 on GPU also scales the loss). bf16 "
            "works on CPUs too; fp16 is meant for GPUs",
        )
        g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
        g.add_argument("--device", type=str, default=None, help="cuda / cpu (default: cuda when available)")

    def add_reader_options(self) -> None:
        g = self.parser.add_argument_group("reader")
        g.add_argument("--train_data", type=str, default="none", help="question file (.json or .jsonl)")
        g.add_argument("--eval_data", type=str, default="none", help="question file (.json or .jsonl)")
        g.add_argument("--model_size", type=str, default="base", help="t5 size: small, base, large, ...")
        g.add_argument("--use_checkpoint", action="store_true", help="activation checkpointing in the encoder")
        g.add_argument("--text_maxlength", type=positive_int, default=200, help="max tokens of question + passage")
        g.add_argument("--answer_maxlength", type=int, default=-1, help="max target tokens (-1: no truncation)")
        g.add_argument("--no_title", action="store_true", help="leave passage titles out of the input")
        g.add_argument("--n_context", type=positive_int, default=1, help="passages per question")
        g.add_argument(
            "--generation_max_length",
            type=positive_int,
            default=50,
            help="greedy decoding length, counting the decoder start token (the original's max_length)",
        )
        g.add_argument(
            "--num_beams", type=positive_int, default=1, help="beam search width (1: greedy, as the original)"
        )
        g.add_argument(
            "--no_packing",
            action="store_true",
            help="the original padded path: encode every passage at --text_maxlength and cross-attend to padding too "
            "(default: length-bucketed encoder, cross-attention over real tokens only; same outputs up to float "
            "rounding, faster; README 'Speed')",
        )

    def add_retriever_options(self) -> None:
        g = self.parser.add_argument_group("retriever")
        g.add_argument("--train_data", type=str, default="none", help="dataset_wscores.json-style file")
        g.add_argument("--eval_data", type=str, default="none", help="dataset_wscores.json-style file")
        g.add_argument("--indexing_dimension", type=positive_int, default=768, help="size of the projected embeddings")
        g.add_argument("--no_projection", action="store_true", help="no projection: dim = encoder hidden size")
        g.add_argument("--question_maxlength", type=positive_int, default=40, help="max question tokens")
        g.add_argument("--passage_maxlength", type=positive_int, default=200, help="max passage tokens")
        g.add_argument("--no_question_mask", action="store_true", help="mean-pool questions over padding too")
        g.add_argument("--no_passage_mask", action="store_true", help="mean-pool passages over padding too")
        g.add_argument("--extract_cls", action="store_true", help="pool with the first token instead of the mean")
        g.add_argument("--no_title", action="store_true", help="leave passage titles out of the input")
        g.add_argument("--n_context", type=positive_int, default=1, help="passages per question")
        g.add_argument("--temperature_gold", type=float, default=1.0, help="softmax temperature of gold scores")
        g.add_argument("--temperature_score", type=float, default=1.0, help="softmax temperature of predictions")
        g.add_argument(
            "--in_batch_negatives",
            action="store_true",
            help="training loss: the other questions' passages of the global batch (all processes under DDP) join each question's "
            "softmax with gold probability 0 (not in the papers; the dev loss never uses them)",
        )
        g.add_argument(
            "--retriever_loss",
            choices=list(LOSSES),
            default="kl",
            help="how the retriever learns from the reader's scores: "
            + "; ".join(f"{name}: {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in LOSSES.items()),
        )

    def add_optim_options(self) -> None:
        g = self.parser.add_argument_group("optimisation")
        g.add_argument(
            "--warmup_steps", type=int, default=1000, help="--scheduler linear: steps of the lr's rise from 0"
        )
        g.add_argument("--total_steps", type=positive_int, default=1000, help="training steps (batches)")
        g.add_argument(
            "--scheduler_steps",
            type=int,
            default=None,
            help="--scheduler linear: total steps of the schedule (default: total_steps); the lr reaches 0 there",
        )
        g.add_argument("--accumulation_steps", type=positive_int, default=1, help="batches per optimizer step")
        g.add_argument(
            "--fsdp",
            action="store_true",
            help="shard parameters, gradients and optimizer state over the processes (FSDP2, one unit per "
            'transformer block); checkpoints in shards, best_dev/step-N also consolidated (README "Sharded training")',
        )
        g.add_argument(
            "--dropout",
            type=float,
            default=0.1,
            help="every dropout of the model: hidden states, feed-forward and attention probabilities (T5's "
            "dropout_rate; BERT's hidden_dropout_prob and attention_probs_dropout_prob); saved in the checkpoint's "
            "config, so a resumed run has the same",
        )
        g.add_argument("--lr", type=float, default=1e-4, help="learning rate")
        g.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
        g.add_argument("--optim", type=str, default="adam", choices=["adam", "adamw"])
        g.add_argument("--scheduler", type=str, default="fixed", choices=["fixed", "linear"])
        g.add_argument("--weight_decay", type=float, default=0.1, help="--optim adamw's weight decay (adam has none)")
        g.add_argument("--fixed_lr", action="store_true", help="linear scheduler: flat after warmup")

    def add_eval_options(self) -> None:
        g = self.parser.add_argument_group("evaluation")
        g.add_argument("--write_results", action="store_true", help="write final_output.txt (id<TAB>answer)")
        g.add_argument(
            "--write_crossattention_scores",
            action="store_true",
            help="write dataset_wscores.json: every ctx scored by the reader's cross-attention",
        )
        g.add_argument(
            "--score_kind",
            type=str,
            default="xattn",
            choices=list(SCORE_KINDS),
            help="passage score written with --write_crossattention_scores: "
            + "; ".join(f"{k.name}: {k.help}" for k in SCORE_KINDS.values()),
        )

    def add_embedding_options(self) -> None:
        """generate_passage_embeddings.py"""
        g = self.parser.add_argument_group("passage embeddings")
        g.add_argument("--passages", type=str, default=None, help="passages .tsv (id, text, title)")
        g.add_argument("--output_path", type=str, default="wikipedia_embeddings/wiki", help="shard prefix")
        g.add_argument(
            "--shard_id",
            type=int,
            default=None,
            help="which shard to embed (unset: 0); refused under torchrun, where rank r embeds shards r, r+W, r+2W, ...",
        )
        g.add_argument(
            "--num_shards",
            type=positive_int,
            default=None,
            help="how many shards in all (unset: 1; under torchrun: one per process)",
        )
        g.add_argument(
            "--embedding_dtype",
            choices=list(EMBEDDING_DTYPES),
            default="float32",
            help="dtype of the stored embeddings: float16 halves the shards on disk and in memory (values must "
            "stay within +-65504); the index converts them to float32 batch by batch",
        )
        g.add_argument("--passage_maxlength", type=positive_int, default=200, help="max passage tokens")
        self._add_corpus_precision(g)
        g.add_argument("--no_title", action="store_true", help="leave passage titles out of the input")

    def add_retrieval_options(self) -> None:
        """passage_retrieval.py"""
        g = self.parser.add_argument_group("retrieval")
        g.add_argument("--data", "--data_path", dest="data", type=str, default=None, help="question file")
        g.add_argument("--passages", type=str, default=None, help="passages .tsv (id, text, title)")
        g.add_argument("--passages_embeddings", type=str, default=None, help="glob of embedding shards")
        g.add_argument("--output_path", type=str, default=None, help="retrieved question file")
        g.add_argument("--n-docs", dest="n_docs", type=positive_int, default=100, help="passages per question")
        g.add_argument("--validation_workers", type=int, default=32, help="processes computing hasanswer")
        g.add_argument("--save_or_load_index", action="store_true", help="save the index, or load a saved one")
        self._add_corpus_precision(g)
        g.add_argument("--passage_maxlength", type=positive_int, default=200, help="max passage tokens")
        g.add_argument("--question_maxlength", type=positive_int, default=40, help="max question tokens")
        g.add_argument("--indexing_batch_size", type=positive_int, default=50000, help="vectors added to FAISS at once")
        g.add_argument(
            "--n-subquantizers",
            dest="n_subquantizers",
            type=int,
            default=0,
            help=f"pq / ivfpq: codes per vector, each for dim / n of its dimensions; > 0 without --index_type "
            f"means pq (the original's rule); 0 with --index_type pq or ivfpq: {DEFAULT_SUBQUANTIZERS} when it "
            "divides dim",
        )
        g.add_argument("--n-bits", dest="n_bits", type=int, default=8, help="pq / ivfpq: bits per code")

    def add_index_options(self) -> None:
        """passage_retrieval.py: which FAISS index (src/corpus/faiss_index.py's KINDS) and its settings."""
        g = self.parser.add_argument_group("index")
        g.add_argument(
            "--index_type",
            choices=list(INDEX_KINDS),
            default=None,
            help="FAISS index (default: pq when --n-subquantizers > 0, else exact flat): "
            + "; ".join(f"{name}: {text}" for name, text in INDEX_KINDS.items()),
        )
        g.add_argument(
            "--n_lists", type=positive_int, default=INDEX_DEFAULTS["n_lists"], help="ivf / ivfpq: inverted lists"
        )
        g.add_argument(
            "--n_probe",
            type=positive_int,
            default=INDEX_DEFAULTS["n_probe"],
            help="ivf / ivfpq: lists searched per query (a search setting: a saved index takes this run's)",
        )
        g.add_argument(
            "--hnsw_m", type=positive_int, default=INDEX_DEFAULTS["hnsw_m"], help="hnsw: graph links per node"
        )
        g.add_argument(
            "--index_train_sample",
            type=positive_int,
            default=INDEX_DEFAULTS["index_train_sample"],
            help="pq / ivf / ivfpq / sq8: vectors the index is trained on, the first ones of the shards in corpus "
            "order (all of them if fewer; held in memory as float32 until trained). FAISS's k-means wants >= "
            "39 per centroid: 39 x n_lists (ivf), 39 x 2^n_bits (pq), the larger of the two (ivfpq); fewer "
            "gives a warning",
        )

    def _add_corpus_precision(self, group) -> None:
        """The corpus scripts' `--precision` defaults to the original's behaviour (None until
        devices.resolve_precision: fp16 on GPU, fp32 on CPU); `--no_fp16` is `--precision fp32`."""
        for action in self.parser._actions:
            if action.dest == "precision":
                action.default = None
                action.help = (
                    "dtype of torch.autocast around the encoder on --device, as in the training scripts: fp32 (no "
                    "autocast), bf16 or fp16; embeddings are float32 whatever it is. Unset (None): the original's "
                    "fp16 on GPU, fp32 on CPU. bf16 works on CPUs too"
                )
        group.add_argument(
            "--no_fp16", action="store_true", help="the original's spelling of --precision fp32 (fp32 on GPU too)"
        )

    def mark_ignored(self, names: tuple[str, ...]) -> None:
        """Flags this script accepts (shared groups, the original's command lines) but does not
        use: their help says so; `cli.warn_ignored` warns when one is set."""
        unknown = set(names) - {a.dest for a in self.parser._actions}
        if unknown:
            raise ValueError(f"no such flags to ignore: {sorted(unknown)}")
        for action in self.parser._actions:
            if action.dest in names:
                action.help = f"IGNORED by this script (it matters to other scripts; a warning if set): {action.help}"

    def set_help(self, dest: str, text: str) -> None:
        """What a shared flag means in this script, when that differs from the group's help."""
        actions = [a for a in self.parser._actions if a.dest == dest]
        if not actions:
            raise ValueError(f"no such flag: {dest}")
        for action in actions:
            action.help = text

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        """The parsed flags; `self.given` then maps each flag the user set to something other
        than its default (dest) to its spelling (`--n-docs`)."""
        opt = self.parser.parse_args(argv)
        self.defaults = {a.dest: a.default for a in self.parser._actions if a.dest != "help"}
        self.given = {
            a.dest: a.option_strings[0]
            for a in self.parser._actions
            if a.option_strings and a.dest in vars(opt) and getattr(opt, a.dest) != a.default
        }
        if getattr(opt, "no_fp16", False):
            if opt.precision not in (None, "fp32"):
                self.parser.error(f"--no_fp16 means --precision fp32; it contradicts --precision {opt.precision}")
            opt.precision = "fp32"
        return opt


def options_dict(opt: argparse.Namespace) -> dict[str, Any]:
    """The options as plain JSON-able data (what checkpoints and opt.log store)."""
    out = {}
    for key, value in vars(opt).items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = list(value)
        else:  # torch.device and the like
            out[key] = str(value)
    return out


def format_options(opt: argparse.Namespace, defaults: dict[str, Any]) -> str:
    lines = []
    for key, value in sorted(options_dict(opt).items()):
        mark = f"\t[default: {defaults[key]}]" if key in defaults and defaults[key] != value else ""
        lines.append(f"{key:>40}: {value}{mark}")
    return "\n".join(lines)


def save_options(opt: argparse.Namespace, defaults: dict[str, Any], run_dir: str | Path) -> None:
    """opt.log (readable, non-defaults marked) and options.json (plain data) in the run directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(run_dir / "opt.log") as f:
        f.write(format_options(opt, defaults) + "\n")
    with atomic_write(run_dir / "options.json") as f:
        json.dump(options_dict(opt), f, indent=1, sort_keys=True)


# -- typed configs: the one place where flags become the settings `src` code takes ---------


def config_from(cls: type[T], opt: argparse.Namespace, **overrides: Any) -> T:
    """A dataclass `cls` whose fields take the values of the flags of the same names (a field
    without a flag keeps its default; `overrides` win)."""
    values = {f.name: getattr(opt, f.name) for f in dataclasses.fields(cls) if hasattr(opt, f.name)}
    return cls(**{**values, **overrides})


def train_config(opt: argparse.Namespace) -> TrainConfig:
    return config_from(TrainConfig, opt, optim=config_from(OptimConfig, opt), options=options_dict(opt))
