"""Tiny tokenizers and model configs built locally, for tests and the offline demo.

Nothing here touches the network: a word-level tokenizer is trained on the text you
give it and saved as an ordinary Hugging Face tokenizer directory, so every script
loads it by path exactly as it would load `t5-base` or `bert-base-uncased`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import BertConfig, MT5Config, PreTrainedTokenizerFast, T5Config, UMT5Config

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


def tiny_t5_config(vocab_size: int, d_model: int = 32, layers: int = 2, heads: int = 4, **kw) -> T5Config:
    """A T5 small enough to train in seconds on a CPU."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=kw.pop("d_ff", 2 * d_model),
        num_layers=layers,
        num_decoder_layers=kw.pop("num_decoder_layers", layers),
        num_heads=heads,
        relative_attention_num_buckets=kw.pop("relative_attention_num_buckets", 32),
        dropout_rate=kw.pop("dropout_rate", 0.0),
        feed_forward_proj=kw.pop("feed_forward_proj", "relu"),
        tie_word_embeddings=kw.pop("tie_word_embeddings", True),
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **kw,
    )


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
    return config_class(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=kw.pop("d_ff", 2 * d_model),
        num_layers=layers,
        num_decoder_layers=kw.pop("num_decoder_layers", layers),
        num_heads=heads,
        relative_attention_num_buckets=kw.pop("relative_attention_num_buckets", 32),
        dropout_rate=kw.pop("dropout_rate", 0.0),
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **{**v1_1, **kw},
    )


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
    import torch
    from transformers import AutoModelForSeq2SeqLM

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
    import torch
    from transformers import BertModel

    path = Path(path)
    tokenizer = build_word_tokenizer(texts, "bert")
    torch.manual_seed(seed)
    model = BertModel(tiny_bert_config(len(tokenizer), **config_kw))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
