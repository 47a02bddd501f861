"""The retriever of paper [2]: one BERT-like encoder for questions and passages,
score(q, p) = ⟨e_q, e_p⟩ / √d. Its losses live in losses.py; its training, evaluation
and loading in retriever.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import transformers
from torch import nn

from src.distributed import gather_with_local_grad


class RetrieverConfig(transformers.PretrainedConfig):
    """Configuration of the bi-encoder retriever: the encoder's own config plus how
    token states become one vector (paper [2], §3).

    `encoder` is any BERT-like config (saved inline in config.json, so a saved retriever
    reloads without the original encoder directory). `indexing_dimension` is the size
    of the embeddings that go into the index: the projection's output size, or the
    encoder's hidden size when `projection` is off (kept in sync by `Retriever`).
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


class Retriever(transformers.PreTrainedModel):
    """One encoder shared by questions and passages; score(q, p) = ⟨e_q, e_p⟩ / √d.

    Embedding of a text (B, L) → encoder states (B, L, hidden) → [Linear(hidden → d) +
    LayerNorm, unless `config.projection` is off] → pooling: the first token when
    `extract_cls`, else the mean over tokens (over non-padding tokens when the mask is
    applied) → (B, d).

    Build one with `Retriever.from_encoder("bert-base-uncased", ...)` (or any local
    BERT-like directory), reload a trained one with `Retriever.from_pretrained(dir)`.
    """

    config_class = RetrieverConfig
    # Not an attribute name: no prefix games when loading, the keys are ours as saved.
    base_model_prefix = "retriever"

    def __init__(self, config: RetrieverConfig, encoder: transformers.PreTrainedModel | None = None):
        super().__init__(config)
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
        self.post_init()

    # -- construction --------------------------------------------------------

    @classmethod
    def from_encoder(
        cls,
        model_name_or_path: str = "bert-base-uncased",
        indexing_dimension: int = 768,
        projection: bool = True,
        extract_cls: bool = False,
        apply_question_mask: bool = True,
        apply_passage_mask: bool = True,
    ) -> Retriever:
        """A fresh retriever around a pretrained encoder (hub name or local directory).

        The projection (if any) starts random; with `projection=False` the embedding
        size is the encoder's hidden size and `indexing_dimension` is ignored.
        """
        encoder_config = transformers.AutoConfig.from_pretrained(model_name_or_path)
        if isinstance(encoder_config, RetrieverConfig):
            raise ValueError(
                f"{model_name_or_path} is a saved retriever, not an encoder: load it with Retriever.from_pretrained "
                "(or --model_path)"
            )
        if getattr(encoder_config, "is_encoder_decoder", False):
            raise ValueError(
                f"{model_name_or_path}: a {encoder_config.model_type} encoder-decoder model, not an encoder "
                "(BERT-like) for the retriever"
            )
        retriever_config = RetrieverConfig(
            encoder=encoder_config,
            indexing_dimension=indexing_dimension if projection else encoder_config.hidden_size,
            projection=projection,
            extract_cls=extract_cls,
            apply_question_mask=apply_question_mask,
            apply_passage_mask=apply_passage_mask,
        )
        # Load the encoder with the (shared) sub-config only now: building the
        # RetrieverConfig resets its attention implementation, loading sets it again.
        encoder = transformers.AutoModel.from_pretrained(
            model_name_or_path, config=retriever_config.encoder, dtype=torch.float32
        )
        return cls(retriever_config, encoder=encoder)

    # -- embeddings ------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.config.indexing_dimension

    def embed_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, apply_mask: bool = True, extract_cls: bool = False
    ) -> torch.Tensor:
        """(B, L) token ids → (B, d) embeddings.

        `apply_mask=False` is the original's `--no_*_mask`: the encoder then attends to
        padding as well and the mean runs over all L positions.
        """
        states = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask if apply_mask else None
        ).last_hidden_state  # (B, L, hidden)
        if extract_cls:
            # Projection and LayerNorm act per token: pooling first gives the same vector.
            return self._project(states[:, 0])  # (B, d)
        states = self._project(states)  # (B, L, d)
        if not apply_mask:
            return states.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
        # clamp: an all-padding row (a missing passage) gives 0, not NaN.
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, d)

    def _project(self, states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(states)) if self.config.projection else states

    def embed_questions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, Lq) → (B, d), with the question-side flags of the config."""
        return self.embed_text(input_ids, attention_mask, self.config.apply_question_mask, self.config.extract_cls)

    def embed_passages(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, Lp) → (B, d), with the passage-side flags of the config (what the index holds)."""
        return self.embed_text(input_ids, attention_mask, self.config.apply_passage_mask, self.config.extract_cls)

    # -- scores and loss ---------------------------------------------------------

    def forward(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        passage_ids: torch.Tensor,
        passage_mask: torch.Tensor,
        in_batch_negatives: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (B, N) of each question's N passages, and with `in_batch_negatives` the
        scores (B, B·N) of every passage of the batch that may serve as question b's
        negative (−inf elsewhere: its own passages, and copies of them).

        question_ids/mask: (B, Lq); passage_ids/mask: (B, N, Lp). A passage whose mask
        is all zeros (fewer ctxs than N) gets score −inf: no weight in any softmax.
        """
        B, N, Lp = passage_ids.shape
        question = self.embed_questions(question_ids, question_mask)  # (B, d)
        passages, missing = self._embed_present(passage_ids.reshape(B * N, Lp), passage_mask.reshape(B * N, Lp))
        scale = math.sqrt(question.size(-1))
        # Every question against every passage of the batch; its own are the diagonal blocks.
        local_scores = (question @ passages.T).float() / scale  # (B, B·N)
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
        all_scores = local_scores if all_passages is passages else (question @ all_passages.T).float() / scale
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
        return json.loads(config_file.read_text()).get("model_type") == RetrieverConfig.model_type
    except (OSError, json.JSONDecodeError):
        return False


transformers.AutoConfig.register(RetrieverConfig.model_type, RetrieverConfig, exist_ok=True)
transformers.AutoModel.register(RetrieverConfig, Retriever, exist_ok=True)
