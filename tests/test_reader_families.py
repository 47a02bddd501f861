"""The reader families: T5 (original), T5 v1.1 / LM-adapted / Flan-T5, mT5 and UMT5 as FiD
readers, on tiny random models built from configs. Packed = padded, scores = a reference
computed with the family's plain transformers class, and train → test → reload → resume
through the scripts."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from src.errors import InputError
from src.reader.model import FAMILIES, load_reader_model
from src.reader.scores import SCORE_KINDS, generate_with_scores
from src.toy.tiny_models import READER_FAMILIES, save_tiny_t5, tiny_reader_config

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
VOCAB = 40
EOS = 1
PLAIN = {
    "t5": transformers.T5ForConditionalGeneration,
    "t5_v1_1": transformers.T5ForConditionalGeneration,
    "mt5": transformers.MT5ForConditionalGeneration,
    "umt5": transformers.UMT5ForConditionalGeneration,
}
LABELS = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, -100], [10, EOS, -100, -100]])


def tiny_reader(family: str, seed: int = 0):
    """A FiD reader of `family` with random weights; v1.1-style families get an output
    embedding of their own (different from the input one, as in released checkpoints)."""
    torch.manual_seed(seed)
    config = tiny_reader_config(family, VOCAB, relative_attention_num_buckets=8, relative_attention_max_distance=16)
    model = FAMILIES[config.model_type](config)
    if family != "t5":
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.2)
    return model.eval()


def ragged(B: int = 3, N: int = 4, L: int = 11, seed: int = 1):
    """(B, N, L) right-padded passages of varied lengths, one missing passage, one question with fewer ctxs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L + 1, (B, N), generator=g)
    lengths[0, 0], lengths[0, 1] = L, 1
    lengths[1, 2] = 0
    lengths[2, 3:] = 0
    mask = (torch.arange(L)[None, None, :] < lengths[..., None]).long()
    return torch.randint(3, VOCAB, (B, N, L), generator=g) * mask, mask


def plain_twin(model, family: str):
    """The family's plain transformers class with the reader's weights."""
    plain = PLAIN[family](model.config).eval()
    if model.variant.untied_lm_head:  # transformers 5 builds it tied: untie before loading
        plain.lm_head.weight = torch.nn.Parameter(torch.empty_like(plain.shared.weight))
    plain.load_state_dict(model.state_dict())
    return plain


@pytest.mark.parametrize("family", READER_FAMILIES)
def test_architecture_of_each_family(family):
    model = tiny_reader(family)
    assert model.config.model_type == {"t5_v1_1": "t5"}.get(family, family)
    assert model.variant.untied_lm_head == (family != "t5")
    assert (model.lm_head.weight is model.shared.weight) == (family == "t5")
    gated = family != "t5"
    assert hasattr(model.encoder.block[0].layer[-1].DenseReluDense, "wi_0") == gated
    tables = [n for n, _ in model.named_parameters() if n.endswith("relative_attention_bias.weight") and "encoder" in n]
    assert len(tables) == (2 if family == "umt5" else 1)  # UMT5: one table per layer
    # The decoder output is rescaled by d_model^-0.5 only with tied embeddings (original T5).
    plain = plain_twin(model, family)
    ids, mask = ragged()
    ours = model(input_ids=ids[:, :1], attention_mask=mask[:, :1], labels=LABELS).logits
    ref = plain(input_ids=ids[:, 0], attention_mask=mask[:, 0], labels=LABELS).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", READER_FAMILIES)
def test_packed_equals_padded_for_answers_and_every_score_kind(family):
    model = tiny_reader(family, seed=2)
    ids, mask = ragged(seed=3)
    out = {}
    for name, settings in {"padded": (False, 8), "packed": (True, 8), "one_bucket": (True, 1)}.items():
        model.packing, model.max_buckets = settings
        out[name] = {
            kind: generate_with_scores(model, ids, mask, score_kind=kind, max_length=6, labels=LABELS)
            for kind in SCORE_KINDS
        }
    for name in ("packed", "one_bucket"):
        for kind in SCORE_KINDS:
            answers, scores = out[name][kind]
            assert torch.equal(answers, out["padded"][kind][0]), (name, kind)
            torch.testing.assert_close(scores, out["padded"][kind][1], atol=1e-5, rtol=1e-5)
            assert (scores[1, 2] == 0) and (scores[2, 3:] == 0).all()  # missing passages score 0
    # Training: loss and gradients of the packed path equal the padded path's.
    grads = {}
    for packed in (False, True):
        model.packing = packed
        model.zero_grad()
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=LABELS).loss.backward()
        grads[packed] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-5, rtol=1e-4)


def reference_scores(plain, ids, mask, labels):
    """xattn, xattn_softmax and pdist from the plain transformers model: every passage
    encoded alone by its encoder, concatenated; q·kᵀ of the first decoder step recomputed
    from each cross-attention sublayer's input, the probabilities from the model's own
    `output_attentions`, pdist from the plain model reading one passage at a time."""
    B, N, L = ids.shape
    H = plain.config.num_heads
    with torch.no_grad():
        states = torch.stack(
            [plain.encoder(input_ids=ids[:, n], attention_mask=mask[:, n]).last_hidden_state for n in range(N)], 1
        ).reshape(B, N * L, -1)
        inputs = {}

        def keep_input(i, module, args, kwargs, output):  # returns None: the output is left alone
            inputs.setdefault(i, args[0])

        hooks = [
            block.layer[1].register_forward_hook(functools.partial(keep_input, i), with_kwargs=True)
            for i, block in enumerate(plain.decoder.block)
        ]
        start = torch.full((B, 1), plain.config.decoder_start_token_id)
        out = plain(
            encoder_outputs=(states,),
            attention_mask=mask.reshape(B, -1),
            decoder_input_ids=start,
            output_attentions=True,
            use_cache=False,
        )
        for h in hooks:
            h.remove()
        logits = torch.zeros(B, N * L, dtype=torch.float64)
        for i, block in enumerate(plain.decoder.block):
            xattn = block.layer[1]
            q = xattn.EncDecAttention.q(xattn.layer_norm(inputs[i][:, 0])).double().reshape(B, H, -1)
            k = xattn.EncDecAttention.k(states).double().reshape(B, N * L, H, -1)
            logits += torch.einsum("bhd,bjhd->bhj", q, k).mean(1)
        probabilities = torch.stack([a[:, :, 0] for a in out.cross_attentions]).mean((0, 2))  # (B, N·L)
        n_tokens = (labels != -100).sum(-1)
        pdist = torch.zeros(B, N)
        for n in range(N):
            lp = plain(input_ids=ids[:, n], attention_mask=mask[:, n], labels=labels).logits.log_softmax(-1)
            token = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
            pdist[:, n] = token.sum(-1) / n_tokens
    m = mask.double()

    def per_passage(token):
        return ((token.reshape(B, N, L).double() * m).sum(-1) / m.sum(-1).clamp(min=1)).float()

    missing = ~mask.bool().any(-1)
    return {
        "xattn": per_passage(logits / len(plain.decoder.block)),
        "xattn_softmax": per_passage(probabilities),
        "pdist": pdist.masked_fill(missing, 0.0),
    }


@pytest.mark.parametrize("family", READER_FAMILIES)
def test_scores_equal_the_plain_transformers_reference(family):
    model = tiny_reader(family, seed=4)
    plain = plain_twin(model, family)
    plain.set_attn_implementation("eager")  # output_attentions
    ids, mask = ragged(seed=5)
    reference = reference_scores(plain, ids, mask, LABELS)
    for kind, expected in reference.items():
        answers, scores = generate_with_scores(model, ids, mask, score_kind=kind, max_length=6, labels=LABELS)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4, msg=kind)
    # Answers: the plain model generating from the same concatenated encoder states.
    model.packing = False
    enc, layout = model.encode_passages(ids, mask)
    ref = plain.generate(encoder_outputs=enc, attention_mask=layout.mask, max_length=6, do_sample=False)
    assert torch.equal(model.generate(ids, mask, max_length=6), ref)


def test_save_keeps_the_family_and_its_own_output_embedding(tmp_path):
    for family in READER_FAMILIES:
        model = tiny_reader(family)
        model.save_pretrained(tmp_path / family)
        again = load_reader_model(tmp_path / family)
        assert type(again) is type(model) and again.config.model_type == model.config.model_type
        assert (again.lm_head.weight is again.shared.weight) == (family == "t5")
        for name, tensor in model.state_dict().items():
            assert torch.equal(again.state_dict()[name], tensor), (family, name)
    # A fresh v1.1 model (output embedding still equal to the input one) stays untied on reload.
    fresh = FAMILIES["mt5"](tiny_reader_config("mt5", VOCAB))
    assert fresh.lm_head.weight is not fresh.shared.weight
    fresh.save_pretrained(tmp_path / "fresh")
    again = load_reader_model(tmp_path / "fresh")
    assert again.lm_head.weight is not again.shared.weight


@pytest.mark.parametrize(
    "config", [transformers.BartConfig(vocab_size=40, d_model=16), transformers.GPT2Config(vocab_size=40, n_embd=16)]
)
def test_other_model_types_are_refused_naming_what_is_supported(tmp_path, config):
    config.save_pretrained(tmp_path)
    with pytest.raises(InputError, match=rf"{config.model_type} model.*t5.*mt5.*umt5"):
        load_reader_model(tmp_path)


# ---------------------------------------------------------------------------
# Through the scripts: train → test (scores) → reload → resume
# ---------------------------------------------------------------------------

NAMES = "anna boris clara dmitri".split()
COLORS = "red blue green yellow".split()


def examples(n: int) -> list[dict]:
    out = []
    for i in range(n):
        name, color = NAMES[i % 4], COLORS[(i * 3) % 4]
        ctxs = [{"title": name, "text": f"{name} likes {color} .", "score": 1.0}]
        ctxs += [{"title": "x", "text": f"{NAMES[(i + 1) % 4]} likes {COLORS[i % 4]} .", "score": 0.5}] * (i % 2)
        out.append({"id": f"q{i}", "question": f"what does {name} like ?", "answers": [color], "ctxs": ctxs})
    return out


def run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5_v1_1", "mt5", "umt5"])
def test_train_test_scores_reload_and_resume_through_the_scripts(tmp_path, family):
    texts = [" ".join(NAMES + COLORS), "question: title: context: what does like ? . x"]
    model_dir = save_tiny_t5(tmp_path / "model", texts, family=family, d_model=16, layers=1, dropout_rate=0.0)
    (tmp_path / "train.json").write_text(json.dumps(examples(8)))
    (tmp_path / "dev.json").write_text(json.dumps(examples(3)))
    common = ["--n_context", "2", "--text_maxlength", "12", "--per_gpu_batch_size", "2", "--device", "cpu"]
    train = [
        "--train_data", str(tmp_path / "train.json"), "--eval_data", str(tmp_path / "dev.json"),
        "--model_name_or_path", str(model_dir), "--checkpoint_dir", str(tmp_path / "runs"),
        "--eval_freq", "2", "--save_freq", "100", "--lr", "3e-3", "--accumulation_steps", "2", "--dropout", "0.1",
        *common,
    ]  # fmt: skip
    run("train_reader.py", [*train, "--name", "straight", "--total_steps", "6"])
    run("train_reader.py", [*train, "--name", "resumed", "--total_steps", "4"])
    proc = run("train_reader.py", [*train, "--name", "resumed", "--total_steps", "6"])
    assert "resuming" in proc.stdout + proc.stderr
    straight = load_file(tmp_path / "runs/straight/checkpoint/latest/model.safetensors")
    resumed = load_file(tmp_path / "runs/resumed/checkpoint/latest/model.safetensors")
    assert "lm_head.weight" in straight  # its own output embedding, saved
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6

    best = tmp_path / "runs/straight/checkpoint/best_dev"
    run("test_reader.py", [
        "--model_path", str(best), "--eval_data", str(tmp_path / "dev.json"), "--checkpoint_dir", str(tmp_path / "runs"),
        "--name", "scores", "--write_crossattention_scores", "--write_results", *common,
    ])  # fmt: skip
    scored = json.loads((tmp_path / "runs/scores/dataset_wscores.json").read_text())
    assert [ex["id"] for ex in scored] == ["q0", "q1", "q2"]
    assert all(isinstance(c["score"], float) for ex in scored for c in ex["ctxs"])
    reloaded = load_reader_model(best)
    assert reloaded.config.model_type == {"t5_v1_1": "t5"}.get(family, family)
    assert type(reloaded) is FAMILIES[reloaded.config.model_type]
