"""The retriever of paper [2]: one BERT-like encoder for questions and passages,
score(q, p) = ⟨e_q, e_p⟩ / √d by default, with its text recipe saved in its config. Its
losses live in losses.py; its training, evaluation and loading in task.py."""

from __future__ import annotations

import copy
import json
import math
import string
from pathlib import Path

import torch
import transformers
from torch import nn

from src.data.datasets import TextRecipe
from src.distributed import gather_with_local_grad
from src.errors import InputError, ModelPathError
from src.modeling import loading

PAPER_QUESTION_TEMPLATE = "question: {question}"
PAPER_PASSAGE_TEMPLATE = "title: {title} context: {text}"
NO_TITLE_PASSAGE_TEMPLATE = "context: {text}"  # the original's --no_title
POOLINGS = ("mean", "cls")


class RetrieverConfig(transformers.PretrainedConfig):
    """Configuration of the bi-encoder retriever: the encoder's own config plus its text
    recipe, how a text becomes one vector and two vectors one score (paper [2], §3).

    `encoder` is any BERT-like config (saved inline in config.json, so a saved retriever
    reloads without the original encoder directory). `indexing_dimension` is the size
    of the embeddings that go into the index: the projection's output size, or the
    encoder's hidden size when `projection` is off (kept in sync by `Retriever`).

    The recipe, read by every script that embeds (README "Retriever recipes"):
    `question_template` / `passage_template` (str.format fields {question}; {title}, {text}),
    `question_maxlength` / `passage_maxlength` (tokens), `pooling` ("mean" over tokens, or
    "cls": the first token; `extract_cls` is the original's spelling, kept in sync),
    `normalize` (unit vectors: cosine similarity) and `similarity_scale` (score = scale ·
    ⟨e_q, e_p⟩; None: the paper's 1/√d). `recipe_saved` is False for a retriever saved
    before the recipe was part of the config: it loads with the paper's recipe, and the
    corpus scripts' --no_title and max lengths still apply to it, as they did.
    `frozen_passage_side`: query-side training (Atlas): passages go through a frozen copy
    of the encoder and projection (`passage_side.*` weights), questions through the
    trained ones.
    """

    model_type = "fid_retriever"
    sub_configs_defaults = {
        "encoder": transformers.configuration_utils.SubConfigSpec(
            config_class=transformers.AutoConfig, model_type="bert"
        )
    }

    encoder: transformers.PretrainedConfig | dict | None = None
    indexing_dimension: int = 768
    apply_question_mask: bool = True
    apply_passage_mask: bool = True
    extract_cls: bool = False
    projection: bool = True
    pooling: str | None = None  # None (an old config): from extract_cls
    normalize: bool = False
    similarity_scale: float | None = None
    question_template: str = PAPER_QUESTION_TEMPLATE
    passage_template: str = PAPER_PASSAGE_TEMPLATE
    question_maxlength: int = 40
    passage_maxlength: int = 200
    recipe_saved: bool = False
    frozen_passage_side: bool = False


def check_template(template: str, required: tuple[str, ...], allowed: tuple[str, ...], flag: str) -> str:
    """`template` if it is a str.format template with the `required` fields and only `allowed`
    ones, else InputError naming the flag."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise InputError(f"{flag} {template!r}: not a format template ({e}); write braces as {{{{ }}}}") from None
    unknown = sorted(set(fields) - set(allowed))
    missing = [name for name in required if name not in fields]
    if unknown or missing:
        raise InputError(
            f"{flag} {template!r}: "
            + (f"unknown field(s) {', '.join('{' + f + '}' for f in unknown)}; " if unknown else "")
            + (f"missing {', '.join('{' + f + '}' for f in missing)}; " if missing else "")
            + f"its fields are {', '.join('{' + f + '}' for f in allowed)}"
        )
    return template


def passage_template_for(template: str | None, no_title: bool) -> str:
    """The passage template of --passage_template / --no_title: the paper's by default; with
    --no_title the paper's without its title part ("context: {text}"), and a template of your
    own must then have no {title}."""
    if template is None:
        return NO_TITLE_PASSAGE_TEMPLATE if no_title else PAPER_PASSAGE_TEMPLATE
    check_template(template, ("text",), ("title", "text"), "--passage_template")
    if no_title and "{title}" in template:
        raise InputError(f"--no_title drops the title, but --passage_template {template!r} has a {{title}}")
    return template


class Retriever(transformers.PreTrainedModel):
    """One encoder shared by questions and passages; score(q, p) = scale · ⟨e_q, e_p⟩
    (the paper's scale: 1/√d).

    Embedding of a text (B, L) → encoder states (B, L, hidden) → [Linear(hidden → d) +
    LayerNorm, unless `config.projection` is off] → pooling: the first token ("cls"), else
    the mean over tokens (over non-padding tokens when the mask is applied) → (B, d) →
    unit length with `config.normalize`.

    Build one with `Retriever.from_encoder("bert-base-uncased", ...)` (or any local
    BERT-like directory: BERT, RoBERTa/XLM-R, MiniLM, Contriever, E5, BGE), reload a
    trained one with `Retriever.from_pretrained(dir)`. The text recipe (templates, max
    lengths) is the config's: `format_question`, `format_passage`.
    """

    config_class = RetrieverConfig
    # Not an attribute name: no prefix games when loading, the keys are ours as saved.
    base_model_prefix = "retriever"

    def __init__(self, config: RetrieverConfig, encoder: transformers.PreTrainedModel | None = None):
        super().__init__(config)
        if config.pooling is None:  # a config saved before `pooling`: the original's flag
            config.pooling = "cls" if config.extract_cls else "mean"
        if config.pooling not in POOLINGS:
            raise InputError(f"retriever pooling {config.pooling!r}: expected one of {', '.join(POOLINGS)}")
        config.extract_cls = config.pooling == "cls"
        # `encoder` lets `from_encoder` hand over pretrained weights without first
        # building (and randomly initialising) a second copy of the encoder.
        self.encoder = encoder if encoder is not None else transformers.AutoModel.from_config(config.encoder)
        config.encoder = self.encoder.config  # one config object, saved inside ours
        # The pooler (BERT's tanh head on [CLS]) is never used: drop it, or DDP finds
        # parameters without gradients and stops.
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        hidden = self.encoder.config.hidden_size
        if config.projection:
            self.proj = nn.Linear(hidden, config.indexing_dimension)
            self.norm = nn.LayerNorm(config.indexing_dimension)
        else:
            config.indexing_dimension = hidden
        self.passage_side: nn.ModuleDict | None = None
        if config.frozen_passage_side:
            self.passage_side = self._tower_copy()
        self.post_init()

    # -- construction --------------------------------------------------------

    @classmethod
    def from_encoder(cls, model_name_or_path: str = "bert-base-uncased", **recipe) -> Retriever:
        """A fresh retriever around a pretrained encoder (hub name or local directory);
        `recipe`: RetrieverConfig fields (indexing_dimension, projection, pooling, normalize,
        templates, max lengths, masks; extract_cls=True means pooling "cls").

        The projection (if any) starts random; with `projection=False` the embedding
        size is the encoder's hidden size and `indexing_dimension` is ignored.
        """
        with loading(model_name_or_path, "retriever encoder"):
            encoder_config = transformers.AutoConfig.from_pretrained(model_name_or_path)
        if isinstance(encoder_config, RetrieverConfig):
            raise ModelPathError(
                f"{model_name_or_path} is a saved retriever, not an encoder: load it with Retriever.from_pretrained "
                "(or --model_path)"
            )
        if getattr(encoder_config, "is_encoder_decoder", False):
            raise ModelPathError(
                f"{model_name_or_path}: a {encoder_config.model_type} encoder-decoder model, not an encoder "
                "(BERT-like) for the retriever"
            )
        if recipe.pop("extract_cls", False):
            if recipe.get("pooling", "cls") != "cls":
                raise InputError(f"--extract_cls is --pooling cls; it contradicts --pooling {recipe['pooling']}")
            recipe["pooling"] = "cls"
        recipe.setdefault("pooling", "mean")
        check_template(recipe.get("question_template", PAPER_QUESTION_TEMPLATE), ("question",), ("question",),
                       "--question_template")  # fmt: skip
        check_template(recipe.get("passage_template", PAPER_PASSAGE_TEMPLATE), ("text",), ("title", "text"),
                       "--passage_template")  # fmt: skip
        if not recipe.get("projection", True):
            recipe["indexing_dimension"] = encoder_config.hidden_size
        retriever_config = RetrieverConfig(encoder=encoder_config, recipe_saved=True, **recipe)
        # Load the encoder with the (shared) sub-config only now: building the
        # RetrieverConfig resets its attention implementation, loading sets it again.
        with loading(model_name_or_path, "retriever encoder"):
            encoder = transformers.AutoModel.from_pretrained(
                model_name_or_path, config=retriever_config.encoder, dtype=torch.float32
            )
        return cls(retriever_config, encoder=encoder)

    def _tower_copy(self) -> nn.ModuleDict:
        """A frozen copy of what embeds a text (encoder, projection), in eval mode."""
        parts = {"encoder": self.encoder}
        if self.config.projection:
            parts.update(proj=self.proj, norm=self.norm)
        tower = nn.ModuleDict({name: copy.deepcopy(module) for name, module in parts.items()})
        tower.requires_grad_(False)
        return tower.eval()

    def freeze_passage_side(self) -> bool:
        """Query-side training (Atlas's `--query_side_retriever_training`): from now on passages
        are embedded by a frozen copy of the encoder as it is now, so an index built with it
        stays valid while the question side trains. A retriever that has one keeps it (the
        index of the first round stays valid for every later one). Returns whether a copy
        was made now."""
        if self.passage_side is not None:
            return False
        self.passage_side = self._tower_copy()
        self.config.frozen_passage_side = True
        return True

    def train(self, mode: bool = True):
        super().train(mode)
        if self.passage_side is not None:
            self.passage_side.eval()  # frozen: the index's embeddings, never dropout
        return self

    # -- the text recipe -------------------------------------------------------

    @property
    def text_recipe(self) -> TextRecipe:
        return TextRecipe(self.config.question_template, self.config.passage_template)

    def format_question(self, question: str) -> str:
        return self.text_recipe.format_question(question)

    def format_passage(self, title: str, text: str) -> str:
        return self.text_recipe.format_passage(title, text)

    @property
    def no_title(self) -> bool:
        return "{title}" not in self.config.passage_template

    @property
    def scale(self) -> float:
        """Factor of the inner product in the score: `similarity_scale`, else 1/√d."""
        s = self.config.similarity_scale
        return 1.0 / math.sqrt(self.config.indexing_dimension) if s is None else float(s)

    # -- embeddings ------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.config.indexing_dimension

    def embed_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        apply_mask: bool = True,
        extract_cls: bool | None = None,
        tower: nn.Module | None = None,
    ) -> torch.Tensor:
        """(B, L) token ids → (B, d) embeddings, with the config's pooling (unless
        `extract_cls` says) and normalisation. `tower`: the frozen passage side, else the
        trained encoder and projection.

        `apply_mask=False` is the original's `--no_*_mask`: the encoder then attends to
        padding as well and the mean runs over all L positions.
        """
        encoder = self.encoder if tower is None else tower["encoder"]
        cls_pooling = self.config.pooling == "cls" if extract_cls is None else extract_cls
        # No token_type_ids: every encoder then uses its type 0 (RoBERTa/XLM-R have only one).
        states = encoder(
            input_ids=input_ids, attention_mask=attention_mask if apply_mask else None
        ).last_hidden_state  # (B, L, hidden)
        if cls_pooling:
            # Projection and LayerNorm act per token: pooling first gives the same vector.
            pooled = self._project(states[:, 0], tower)  # (B, d)
        else:
            states = self._project(states, tower)  # (B, L, d)
            if not apply_mask:
                pooled = states.mean(dim=1)
            else:
                mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
                # clamp: an all-padding row (a missing passage) gives 0, not NaN.
                pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, d)
        if self.config.normalize:
            # eps: a missing passage's zero vector stays zero (score 0, then masked to −inf).
            pooled = nn.functional.normalize(pooled, dim=-1, eps=1e-12)
        return pooled

    def _project(self, states: torch.Tensor, tower: nn.Module | None = None) -> torch.Tensor:
        if not self.config.projection:
            return states
        proj, norm = (self.proj, self.norm) if tower is None else (tower["proj"], tower["norm"])
        return norm(proj(states))

    def embed_questions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, Lq) → (B, d), with the question-side flags of the config."""
        return self.embed_text(input_ids, attention_mask, self.config.apply_question_mask)

    def embed_passages(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, Lp) → (B, d), with the passage-side flags of the config (what the index holds);
        through the frozen copy under query-side training (no gradient)."""
        if self.passage_side is None:
            return self.embed_text(input_ids, attention_mask, self.config.apply_passage_mask)
        with torch.no_grad():
            return self.embed_text(input_ids, attention_mask, self.config.apply_passage_mask, tower=self.passage_side)

    # -- scores and loss ---------------------------------------------------------

    def forward(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        passage_ids: torch.Tensor | None = None,
        passage_mask: torch.Tensor | None = None,
        in_batch_negatives: bool = False,
        embed: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (B, N) of each question's N passages, and with `in_batch_negatives` the
        scores (B, B·N) of every passage of the batch that may serve as question b's
        negative (−inf elsewhere: its own passages, and copies of them).

        question_ids/mask: (B, Lq); passage_ids/mask: (B, N, Lp). A passage whose mask
        is all zeros (fewer ctxs than N) gets score −inf: no weight in any softmax.
        `embed="questions"` / `"passages"`: only the embeddings (B, d) of the texts
        (question_ids, question_mask), through this forward so that a DDP wrapper sees it
        (GradCache's chunks, grad_cache.py).
        """
        if embed is not None:
            if embed == "questions":
                return self.embed_questions(question_ids, question_mask)
            return self._embed_present(question_ids, question_mask)[0]
        B, N, Lp = passage_ids.shape
        question = self.embed_questions(question_ids, question_mask)  # (B, d)
        # (B·N, d); a missing passage is never a fully masked row in the encoder (_embed_present)
        passages, _ = self._embed_present(passage_ids.reshape(B * N, Lp), passage_mask.reshape(B * N, Lp))
        return self.scores(question, passages, passage_ids, passage_mask, in_batch_negatives)

    def scores(
        self,
        question: torch.Tensor,
        passages: torch.Tensor,
        passage_ids: torch.Tensor,
        passage_mask: torch.Tensor,
        in_batch_negatives: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward`'s scores from the embeddings question (B, d) and passages (B·N, d)."""
        B, N, Lp = passage_ids.shape
        missing = passage_mask.reshape(B * N, Lp).sum(-1) == 0  # (B·N,)
        scale = self.scale
        # Every question against every passage of the batch; its own are the diagonal blocks.
        local_scores = (question @ passages.T).float() * scale  # (B, B·N)
        local_scores = local_scores.masked_fill(missing, -math.inf)
        own = torch.arange(B, device=local_scores.device)
        scores = local_scores.view(B, B, N)[own, own]  # (B, N)
        if not in_batch_negatives:
            return scores, None
        # Every question against every passage of the global batch: under DDP the other
        # ranks' passages join (their embeddings carry no gradient here; each rank's own
        # get theirs through its own loss, as DDP averages the gradients).
        fingerprints = passage_fingerprints(passage_ids, passage_mask)  # (B·N,)
        all_passages = gather_with_local_grad(passages)  # (W·B·N, d)
        all_missing = gather_with_local_grad(missing)
        all_fingerprints = gather_with_local_grad(fingerprints)
        all_scores = local_scores if all_passages is passages else (question @ all_passages.T).float() * scale
        # Not a negative of question b: its own passages, copies of them anywhere in the
        # global batch (the same passage retrieved for two questions), missing passages.
        own_fingerprints = fingerprints.view(B, N)
        excluded = (own_fingerprints[:, :, None] == all_fingerprints[None, None, :]).any(dim=1)  # (B, W·B·N)
        excluded |= all_missing[None, :]
        return scores, all_scores.masked_fill(excluded, -math.inf)

    def _embed_present(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B·N, Lp) passages → embeddings (B·N, d) and `missing` (B·N,): a missing passage
        (all padding) never reaches the encoder as a fully masked row, which some CUDA
        attention kernels turn into NaN that would flow into the gradients through q·pᵀ
        although its score is −inf. Its row reads one padding token instead, and its
        embedding is zero with no gradient: scores and gradients of the others unchanged."""
        missing = mask.sum(-1) == 0  # (B·N,)
        substitute = mask.clone()
        substitute[:, 0] |= missing.to(mask.dtype)
        passages = self.embed_passages(ids, substitute)  # (B·N, d)
        return torch.where(missing[:, None], torch.zeros_like(passages), passages), missing


def passage_fingerprints(passage_ids: torch.Tensor, passage_mask: torch.Tensor) -> torch.Tensor:
    """(B·N,) int64 hash of each passage's real tokens: equal texts, equal fingerprints,
    whatever the padded length (integer arithmetic, exact on every device; wraps mod 2⁶⁴)."""
    B, N, Lp = passage_ids.shape
    tokens = (passage_ids * passage_mask).reshape(B * N, Lp).long()
    positions = torch.arange(1, Lp + 1, device=tokens.device, dtype=torch.long)
    weights = positions * 0x9E3779B97F4A7C1 + 0x632BE59BD9B4E01  # distinct odd-ish weight per position
    return ((tokens + 1) * weights * passage_mask.reshape(B * N, Lp)).sum(-1) * 31 + passage_mask.reshape(
        B * N, Lp
    ).sum(-1)


def is_saved_retriever(path: str | Path) -> bool:
    """Whether `path` is a directory written by `Retriever.save_pretrained`."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == RetrieverConfig.model_type


transformers.AutoConfig.register(RetrieverConfig.model_type, RetrieverConfig, exist_ok=True)
transformers.AutoModel.register(RetrieverConfig, Retriever, exist_ok=True)
