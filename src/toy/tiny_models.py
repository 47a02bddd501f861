"""Tiny tokenizers and model configs built locally, for tests and the offline demo.

Nothing here touches the network: a word-level tokenizer is trained on the text you
give it and saved as an ordinary Hugging Face tokenizer directory, so every script
loads it by path exactly as it would load `t5-base` or `bert-base-uncased`. Also here: the
hand-set word-matching prior the toy demo's reader starts from (`word_matching_prior`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForSeq2SeqLM,
    BertConfig,
    BertModel,
    MT5Config,
    PreTrainedTokenizerFast,
    T5Config,
    UMT5Config,
)

T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _word_vocab(texts: Iterable[str], specials: list[str], min_freq: int, max_size: int | None) -> dict[str, int]:
    pre = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(text.lower()))
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word, count in counts.most_common(max_size):
        if count >= min_freq and word not in vocab:
            vocab[word] = len(vocab)
    return vocab


def build_word_tokenizer(
    texts: Iterable[str],
    kind: str = "t5",
    min_freq: int = 1,
    max_size: int | None = None,
    extra_words: Iterable[str] = (),
) -> PreTrainedTokenizerFast:
    """A lowercasing word-level tokenizer over `texts`.

    kind="t5": `<pad>`=0, `</s>`=1, `<unk>`=2 and `</s>` appended to every encoded text,
    as a modern T5 tokenizer does. kind="bert": `[CLS] … [SEP]` around every text.
    """
    specials = T5_SPECIALS if kind == "t5" else BERT_SPECIALS
    vocab = _word_vocab(list(texts) + list(extra_words), specials, min_freq, max_size)
    unk = specials[2] if kind == "t5" else "[UNK]"
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
        )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def _t5_family_kwargs(vocab_size: int, d_model: int, layers: int, heads: int, kw: dict) -> dict:
    """The config fields every tiny T5-family reader shares (`kw` wins)."""
    return {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "d_kv": d_model // heads,
        "d_ff": 2 * d_model,
        "num_layers": layers,
        "num_decoder_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": 32,
        "dropout_rate": 0.0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        **kw,
    }


def tiny_t5_config(vocab_size: int, d_model: int = 32, layers: int = 2, heads: int = 4, **kw) -> T5Config:
    """A T5 small enough to train in seconds on a CPU."""
    defaults = {"feed_forward_proj": "relu", "tie_word_embeddings": True}
    return T5Config(**_t5_family_kwargs(vocab_size, d_model, layers, heads, {**defaults, **kw}))


# The reader families (src/reader/model.py FAMILIES), as tiny configs: what differs from
# the original T5 is the feed-forward (gated GELU), the output embedding (its own, no
# rescaling) and, for UMT5, a relative position table in every layer.
READER_FAMILIES = ("t5", "t5_v1_1", "mt5", "umt5")


def tiny_reader_config(family: str, vocab_size: int, d_model: int = 32, layers: int = 2, heads: int = 4, **kw):
    """A tiny config of one reader family: t5 (original), t5_v1_1 (also LM-adapted and
    Flan-T5: the same architecture), mt5 or umt5."""
    if family == "t5":
        return tiny_t5_config(vocab_size, d_model, layers, heads, **kw)
    v1_1 = {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    if family == "t5_v1_1":
        return tiny_t5_config(vocab_size, d_model, layers, heads, **{**v1_1, **kw})
    config_class = {"mt5": MT5Config, "umt5": UMT5Config}[family]
    return config_class(**_t5_family_kwargs(vocab_size, d_model, layers, heads, {**v1_1, **kw}))


def tiny_bert_config(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, **kw) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=kw.pop("intermediate_size", 2 * hidden),
        max_position_embeddings=kw.pop("max_position_embeddings", 512),
        hidden_dropout_prob=kw.pop("hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=kw.pop("attention_probs_dropout_prob", 0.0),
        pad_token_id=0,
        **kw,
    )


def save_tiny_t5(path: str | Path, texts: Iterable[str], seed: int = 0, family: str = "t5", **config_kw) -> Path:
    """Tokenizer + randomly initialised T5 (or another reader family, as the plain
    transformers class) saved as one model directory."""
    path = Path(path)
    tokenizer = build_word_tokenizer(texts, "t5")
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(tiny_reader_config(family, len(tokenizer), **config_kw))
    if family != "t5":  # its own output embedding, as the released checkpoints have
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_bert(path: str | Path, texts: Iterable[str], seed: int = 0, **config_kw) -> Path:
    """Tokenizer + randomly initialised BERT saved as one model directory."""
    path = Path(path)
    tokenizer = build_word_tokenizer(texts, "bert")
    torch.manual_seed(seed)
    model = BertModel(tiny_bert_config(len(tokenizer), **config_kw))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------
# The toy reader's starting point: a word-matching prior (toy/world.py's build_reader)
# ---------------------------------------------------------------------------

# Stop words for the prior: words in more than this share of passages never "match".
STOPWORD_DF = 0.25


def word_matching_prior(model, tokenizer, passages: list[dict], sink_word: str = "question", seed: int = 0) -> None:
    """Set a from-scratch T5's weights so that it starts out reading like BM25 + copy.

    A tiny T5 trained from scratch on 2 CPU cores needs far more steps than a demo has
    to discover how to compare a question with a passage (pretraining gives that to the
    papers' t5-base; a plain tiny T5 here stays at EM ≈ 0 after minutes). So the initial
    weights carry it, built from the corpus only (document frequencies; no question
    file is read). Reserved embedding dimensions (the last 7 of d_model; the others are
    an ordinary random embedding, "content"):

      COLON  8 on ":"                  -- the attention sink of layer 1
      WT     idf weight of the word    -- names matter more than template words
      STOPC  8 on frequent words       -- these go to the sink instead of matching
      ONE    1 on every other word
      SINK   8 on `sink_word`          -- "question", first token of every reader input
      MARK   written by layer 0: the idf of the word's equal elsewhere in the input
      REL    written by layer 1: ∝ Σ MARK over the input = question/passage overlap

    Encoder layer 0, head 0: q = k = identity on content, so a word's logit with an
    equal word is ≈ |e|² (large) and with another word ≈ 0 (noise); attending to oneself
    is blocked by the relative-position bias at distance 0, and the sink takes the
    attention of a word with no equal. The value is the attended word's idf, written to
    MARK: a question word present in the passage (and vice versa) gets its idf.
    Encoder layer 1, head 0: attention mostly on the two ":" (logit s0 ≫ log length),
    uniform and small elsewhere, so the output is ∝ the SUM of MARK → REL.
    Decoder layer 0, cross-attention head 0, first step: key = γ·REL + δ·(WT − MARK), so
    it attends to the rare, unmatched words of the most relevant passage; value/output
    copy the attended word's content, and the tied LM head turns it back into the word.
    The step after an answer word (ONE = 1) favours `</s>`.
    Everything else keeps T5's random initialisation, and all of it is trained.
    """
    d = _PriorDims(model.config.d_model, model.config.d_kv)
    stop, idf, in_corpus = _stop_words_and_idf(tokenizer, passages, model.config.vocab_size)
    with torch.no_grad():
        _wire_embedding(model.shared.weight, d, tokenizer, stop, idf, in_corpus, sink_word, seed)
        _wire_encoder(model, d)
        _zero_other_branches(model, d.dk)
        _wire_decoder(model, d)


class _PriorDims:
    """The reserved embedding dimensions of `word_matching_prior` (the last 7 of d_model)."""

    def __init__(self, d_model: int, d_kv: int):
        self.COLON, self.WT, self.STOPC, self.ONE, self.SINK, self.MARK, self.REL = range(d_model - 7, d_model)
        self.C, self.dk = d_model - 7, d_kv  # content dimensions [0, C); head width
        if d_kv < self.C + 1:
            raise ValueError(f"word_matching_prior needs d_kv > d_model - 7 (got d_kv={d_kv}, d_model={d_model})")


def _stop_words_and_idf(tokenizer, passages: list[dict], vocab: int):
    """(stop-word mask, idf / log n, in-corpus mask), each (vocab,), from document frequencies."""
    df = Counter()
    for p in passages:
        df.update(set(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(p["text"]))))
    n = len(passages)
    stop = torch.tensor([df[i] / n > STOPWORD_DF for i in range(vocab)])
    stop[tokenizer.all_special_ids] = True
    for word in (":", "?", ".", ",", "question", "context", "title"):
        stop[tokenizer.convert_tokens_to_ids(word)] = True
    idf = torch.tensor([math.log(n / max(df[i], 1)) for i in range(vocab)]) / math.log(n)
    return stop, idf, [df[i] > 0 for i in range(vocab)]


def _wire_embedding(E, d: _PriorDims, tokenizer, stop, idf, in_corpus, sink_word: str, seed: int) -> None:
    """The shared (vocab, d_model) embedding, tied with the LM head: random content of equal
    norms, and the reserved dimensions."""
    C = d.C
    g = torch.Generator().manual_seed(seed)
    E.zero_()
    content = torch.randn(E.shape[0], C, generator=g)
    E[:, :C] = content * (C**0.5 / content.norm(dim=1, keepdim=True))  # equal norms: stable RMSNorm
    E[stop, :C] *= 0.05
    E[stop, d.STOPC] = (C + 1) ** 0.5  # the norm of a content word: same RMSNorm scale
    E[~stop, d.ONE] = 1.0
    E[:, d.WT] = idf.clamp(max=1.0)
    E[stop, d.WT] = 0.0
    E[[i for i, seen in enumerate(in_corpus) if not seen], d.WT] = 0.0  # question-only words are never answers
    sink = tokenizer.convert_tokens_to_ids(sink_word)
    E[sink] = 0.0
    E[sink, d.SINK] = 8.0
    E[tokenizer.convert_tokens_to_ids(":"), d.COLON] = 8.0
    E[tokenizer.eos_token_id, :C] = 0.0
    E[tokenizer.eos_token_id, d.ONE] = 100.0  # after an answer word (ONE = 1): stop


def _wire_encoder(model, d: _PriorDims, s0: float = 5.0) -> None:
    """Head 0 of encoder layers 0 (MARK: the idf of a word's equal) and 1 (REL ∝ Σ MARK);
    `s0`: layer 1's sink logit, e^5 ≫ input length, so attention to words stays ≈ constant."""
    C, dk = d.C, d.dk
    # Encoder layer 0, head 0 (rows [0, dk) of q/k/v, columns [0, dk) of o).
    att = model.encoder.block[0].layer[0].SelfAttention
    for lin in (att.q, att.k, att.v):
        lin.weight[:dk].zero_()
    att.q.weight[:C, :C] = torch.eye(C)
    att.k.weight[:C, :C] = torch.eye(C)
    sink_logit = 0.5 * C / 8  # half an equal word's logit (|e|² ≈ C after RMSNorm)
    att.q.weight[dk - 1, d.ONE] = sink_logit
    att.q.weight[dk - 1, d.STOPC] = sink_logit
    att.k.weight[dk - 1, d.SINK] = 1.0
    att.v.weight[0, d.WT] = 1.0
    att.o.weight[:, :dk].zero_()
    att.o.weight[d.MARK, 0] = 1.0
    bias = att.relative_attention_bias.weight  # (buckets, heads); shared by all encoder layers
    bias[:, 0] = 0.0
    bias[0, 0] = -1e3  # bucket 0 = distance 0: no attention to oneself

    # Encoder layer 1, head 0: ∝ Σ MARK.
    att = model.encoder.block[1].layer[0].SelfAttention
    for lin in (att.q, att.k, att.v):
        lin.weight[:dk].zero_()
    att.q.weight[0, d.ONE] = 1.0
    att.q.weight[0, d.STOPC] = 1.0 / 8
    att.q.weight[0, d.SINK] = 1.0 / 8
    att.q.weight[0, d.COLON] = 1.0 / 8
    att.k.weight[0, d.COLON] = s0 / 8
    att.v.weight[0, d.MARK] = 1.0
    att.o.weight[:, :dk].zero_()
    att.o.weight[d.REL, 0] = 100.0  # attention weights are ≈ 1/(2e^s0): scale back up


def _zero_other_branches(model, dk: int) -> None:
    """Every other residual branch starts at zero (output projections of the other heads,
    feed-forward outputs), as in zero-init residual schemes: the wired circuit is not
    drowned in random noise at step 0, and all of them still learn."""
    for stack in (model.encoder, model.decoder):
        for block in stack.block:
            for layer in block.layer[:-1]:
                att = layer.SelfAttention if hasattr(layer, "SelfAttention") else layer.EncDecAttention
                att.o.weight[:, dk:] = 0.0
            block.layer[-1].DenseReluDense.wo.weight.zero_()
    for block in model.decoder.block:
        for layer in block.layer[:-1]:
            att = layer.SelfAttention if hasattr(layer, "SelfAttention") else layer.EncDecAttention
            if att is not model.decoder.block[0].layer[1].EncDecAttention:
                att.o.weight.zero_()


def _wire_decoder(model, d: _PriorDims, gamma: float = 4.0, delta: float = 1.5) -> None:
    """Decoder layer 0, cross-attention head 0: find the answer word and copy it (`gamma`:
    weight of passage relevance, `delta`: of the rare unmatched word in it)."""
    C, dk = d.C, d.dk
    x = model.decoder.block[0].layer[1].EncDecAttention
    for lin in (x.q, x.k, x.v):
        lin.weight[:dk].zero_()
    x.q.weight[0, d.STOPC] = 1.0  # the decoder start token <pad> is a "stop" word
    x.k.weight[0, d.REL] = gamma
    x.k.weight[0, d.WT] = delta
    x.k.weight[0, d.MARK] = -delta
    x.v.weight[:C, :C] = torch.eye(C)
    x.o.weight[:, :dk].zero_()
    x.o.weight[:C, :C] = torch.eye(C)
    # The LM head reads content (the copied word) and ONE (stop after a word).
    model.decoder.final_layer_norm.weight[C:] = 0.0
    model.decoder.final_layer_norm.weight[d.ONE] = 1.0
