"""Every command-line flag, grouped as in the original FiD (docs/scripts.md).

Scripts pick the groups they need; `cli.save_options` writes the parsed options as plain
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
from typing import Any

from src.argparsing import HelpFormatter, first_paragraph, positive_float, positive_int, shared
from src.corpus.embeddings import EMBEDDING_DTYPES
from src.corpus.faiss_index import DEFAULT_SUBQUANTIZERS
from src.corpus.faiss_index import DEFAULTS as INDEX_DEFAULTS
from src.corpus.faiss_index import KINDS as INDEX_KINDS
from src.devices import PRECISIONS
from src.distributed import DEFAULT_TIMEOUT_MINUTES
from src.reader.scores import SCORE_KINDS
from src.retriever.losses import LOSSES


class Options:
    def __init__(self, description: str | None = None):
        self.parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
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
            help="pretrained weights of a fresh run: hub name or local dir (unset: t5-<model_size> for the "
            "reader, bert-base-uncased for the retriever)",
        )
        g.add_argument(
            "--tokenizer_name_or_path",
            type=str,
            default=None,
            help="tokenizer, hub name or local dir (unset: the model directory when it holds a tokenizer)",
        )
        g.add_argument("--per_gpu_batch_size", type=positive_int, default=1, help="batch size per GPU/process")
        g.add_argument("--maxload", type=int, default=-1, help="read at most this many examples (-1: all)")
        g.add_argument("--local_rank", type=int, default=-1, help="set by old launchers; torchrun uses LOCAL_RANK")
        g.add_argument(
            "--main_port",
            type=int,
            default=-1,
            help="rendezvous port of the process group under srun; -1: derived from SLURM_JOB_ID, so two jobs "
            "sharing a node do not collide (torchrun sets its own)",
        )
        g.add_argument(
            "--dist_timeout_minutes",
            type=positive_float,
            default=DEFAULT_TIMEOUT_MINUTES,
            help="a collective of the process group (gradient all-reduce, the ranks' agreements) in which a rank "
            "waits longer than this fails the run; waits on one rank's long work alone (writing a checkpoint or "
            "dataset_wscores.json, an extra embedding shard) go through a gloo group with a 24-hour timeout",
        )
        g.add_argument(
            "--no_tf32",
            action="store_true",
            help="full float32 matmuls on CUDA (default: TF32 for fp32 matmuls, as fast as bf16 on A100/H100, "
            "10-bit mantissa products)",
        )
        g.add_argument("--seed", type=int, default=0, help="random seed")
        g.add_argument("--eval_freq", type=positive_int, default=500, help="evaluate every this many steps")
        g.add_argument("--save_freq", type=positive_int, default=5000, help="save step-N every this many steps")
        g.add_argument("--eval_print_freq", type=int, default=1000, help="log evaluation progress this often")
        g.add_argument(
            "--precision",
            choices=list(PRECISIONS),
            default="fp32",
            help="dtype of torch.autocast around the model on --device, the same in every script: fp32 (no "
            "autocast), bf16 or fp16 (weights stay fp32; training in fp16 on GPU also scales the loss; T5's "
            "feed-forward output runs in float32). bf16 is RECOMMENDED for T5 v1.1 / Flan-T5 / t5-large and up "
            "(their activations overflow fp16); bf16 works on CPUs too; fp16 is meant for GPUs. A run whose loss "
            "is not finite for several optimizer steps in a row stops",
        )
        g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
        g.add_argument(
            "--device",
            type=str,
            default=None,
            help="cpu, cuda (each process: GPU LOCAL_RANK mod the GPUs it sees) or cuda:N (this GPU) "
            "(unset: cuda when available)",
        )

    def add_reader_options(self) -> None:
        g = self.parser.add_argument_group("reader")
        shared(g, "train_data")
        shared(g, "eval_data")
        g.add_argument("--model_size", type=str, default="base", help="t5 size: small, base, large, ...")
        g.add_argument("--use_checkpoint", action="store_true", help="activation checkpointing in the encoder")
        g.add_argument("--text_maxlength", type=positive_int, default=200, help="max tokens of question + passage")
        g.add_argument("--answer_maxlength", type=int, default=-1, help="max target tokens (-1: no truncation)")
        shared(g, "no_title")
        shared(g, "n_context")
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
            "(without it: length-bucketed encoder, cross-attention over real tokens only; same outputs up to "
            "float rounding, faster; docs/speed.md)",
        )

    def add_retriever_options(self) -> None:
        g = self.parser.add_argument_group("retriever")
        shared(g, "train_data", help="dataset_wscores.json-style file")
        shared(g, "eval_data", help="dataset_wscores.json-style file")
        g.add_argument("--indexing_dimension", type=positive_int, default=768, help="size of the projected embeddings")
        g.add_argument("--no_projection", action="store_true", help="no projection: dim = encoder hidden size")
        shared(g, "question_maxlength")
        shared(g, "passage_maxlength")
        g.add_argument("--no_question_mask", action="store_true", help="mean-pool questions over padding too")
        g.add_argument("--no_passage_mask", action="store_true", help="mean-pool passages over padding too")
        shared(g, "extract_cls", help="pool with the first token (--pooling cls, the original's flag)")
        shared(
            g,
            "no_title",
            help="leave passage titles out of the input: the paper's passage template without its title part "
            "('context: {text}'); a --passage_template of your own then has no {title}",
        )
        _add_recipe(g)
        shared(g, "n_context")
        g.add_argument(
            "--grad_cache_chunk_size",
            type=positive_int,
            default=None,
            help="GradCache: embed questions and passages this many at a time without activations, compute the "
            "loss on the embeddings, then replay each chunk with its embeddings' gradient: the same gradients at "
            "the activation memory of one chunk, so much larger batches (README 'GradCache')",
        )
        g.add_argument(
            "--query_side_retriever_training",
            action="store_true",
            help="train the question side only (Atlas): passages are embedded by a frozen copy of the starting "
            "encoder, saved with the model, so an index built before training stays valid",
        )
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
            + "; ".join(f"{name}: {first_paragraph(fn.__doc__)}" for name, fn in LOSSES.items()),
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
            help="--scheduler linear: total steps of the schedule, where the lr reaches 0 (unset: --total_steps)",
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
        g.add_argument(
            "--optim", type=str, default="adam", choices=["adam", "adamw"], help="optimizer (adamw: --weight_decay)"
        )
        g.add_argument(
            "--scheduler",
            type=str,
            default="fixed",
            choices=["fixed", "linear"],
            help="learning rate schedule: fixed (constant --lr) or linear (--warmup_steps up, then down to 0)",
        )
        g.add_argument("--weight_decay", type=float, default=0.1, help="--optim adamw's weight decay (adam has none)")
        g.add_argument("--fixed_lr", action="store_true", help="linear scheduler: flat after warmup")

    def add_eval_options(self) -> None:
        g = self.parser.add_argument_group("evaluation")
        g.add_argument("--write_results", action="store_true", help="write final_output.txt (id<TAB>answer)")
        g.add_argument(
            "--write_crossattention_scores",
            action="store_true",
            help="write dataset_wscores.json: the eval file with the reader's score (--score_kind) in the first "
            "--n_context ctxs of each example, the ones it read; later ctxs keep theirs as retriever_score",
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
        shared(g, "passages")
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
        shared(g, "passage_maxlength", help=MODEL_SAYS + "max passage tokens")
        self._add_corpus_precision(g)
        shared(g, "no_title", help=MODEL_SAYS + "leave passage titles out of the input")
        _add_recipe(self.parser.add_argument_group(RECIPE_CHECK), add_extract_cls=True)

    def add_retrieval_options(self) -> None:
        """passage_retrieval.py"""
        g = self.parser.add_argument_group("retrieval")
        g.add_argument("--data", "--data_path", dest="data", type=str, default=None, help="question file")
        shared(g, "passages")
        g.add_argument("--passages_embeddings", type=str, default=None, help="glob of embedding shards")
        g.add_argument("--output_path", type=str, default=None, help="retrieved question file")
        g.add_argument("--n-docs", dest="n_docs", type=positive_int, default=100, help="passages per question")
        g.add_argument("--validation_workers", type=int, default=32, help="processes computing hasanswer")
        g.add_argument("--save_or_load_index", action="store_true", help="save the index, or load a saved one")
        self._add_corpus_precision(g)
        shared(g, "passage_maxlength")
        shared(g, "question_maxlength", help=MODEL_SAYS + "max question tokens")
        _add_recipe(self.parser.add_argument_group(RECIPE_CHECK), add_extract_cls=True)
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


MODEL_SAYS = "a retriever saved with its recipe keeps its own value (a warning if this differs); "
RECIPE_CHECK = (
    "retriever recipe (read from the model: nothing to repeat; a flag given here that contradicts the model stops)"
)


def _add_recipe(group, add_extract_cls: bool = False) -> None:
    """The retriever's text recipe, saved in its config (src/retriever/model.py): set when
    train_retriever.py builds a retriever; in the corpus scripts only checked against the model
    (they add --extract_cls, which the retriever group has already)."""
    if add_extract_cls:
        shared(group, "extract_cls")
    group.add_argument(
        "--pooling",
        choices=["mean", "cls"],
        default=None,
        help="token states -> one vector: mean over the tokens (the paper, Contriever, E5) or the first token "
        "(cls: BGE; --extract_cls is the original's spelling). Default: mean, or cls with --extract_cls",
    )
    group.add_argument(
        "--normalize", action="store_true", help="unit-length embeddings: the inner product is cosine similarity"
    )
    group.add_argument(
        "--similarity_scale",
        type=float,
        default=None,
        help="score = scale x <e_q, e_p> (default: the paper's 1/sqrt(dim)); with --normalize, the inverse "
        "temperature of the cosine (e.g. 20 = temperature 0.05)",
    )
    group.add_argument(
        "--question_template",
        default="question: {question}",
        help="how a question reads to the retriever (field {question}); E5: 'query: {question}'",
    )
    group.add_argument(
        "--passage_template",
        default=None,
        help="how a passage reads to the retriever (fields {title}, {text}); default the paper's "
        "'title: {title} context: {text}' ('context: {text}' with --no_title); E5: 'passage: {title} {text}'",
    )


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
