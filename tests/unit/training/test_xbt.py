"""XBT: caption generator, offline MiniLM, the old dual encoder and the projection's two training stages."""

import re

import numpy as np
import pytest
import torch

from kiln.artifacts import load_torch_model
from model_zoo.xbt import load_minilm
from training.captions import EVAL_TEMPLATES, NUMBER_WORDS, TRAIN_TEMPLATES, captions, corpus, vocabulary
from training.trainer import train
from training.xbt import TINY_RECIPES


@pytest.fixture(scope="module")
def trained():
    return {name: train(name, recipe=r, progress=False).artifact for name, r in TINY_RECIPES.items()}


def test_captions_name_their_digit_in_varied_phrasings():
    texts, labels = corpus(30, seed=0)
    assert len(texts) == 300 and len(set(texts)) > 150
    for text, y in zip(texts, labels, strict=True):
        words = re.findall(r"[a-z0-9]+", text)
        assert NUMBER_WORDS[y] in words or str(y) in words, text
        others = {NUMBER_WORDS[d] for d in range(10) if d != y} | {str(d) for d in range(10) if d != y}
        assert not others & set(words), text
    # both forms of the number, and most templates, appear
    assert any("seven" in t for t in texts) and any(re.search(r"\b7\b", t) for t in texts)
    shapes = {re.sub(r"\b(" + "|".join(NUMBER_WORDS) + r"|\d)\b", "N", t) for t in texts}
    assert len(shapes) > 50
    assert captions(np.array([7, 7]), seed=3) == captions(np.array([7, 7]), seed=3)
    with pytest.raises(ValueError, match="0..9"):
        captions(np.array([10]), seed=0)


def test_vocabulary_covers_training_captions_and_eval_phrasings_are_new():
    vocab = set(vocabulary())
    texts, _ = corpus(20, seed=1)
    assert {w for t in texts for w in re.findall(r"[a-z0-9]+", t)} <= vocab
    assert not set(EVAL_TEMPLATES) & set(TRAIN_TEMPLATES)


def test_minilm_loads_offline_and_understands_digits(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model = load_minilm()
    assert not any(p.requires_grad for p in model.parameters())
    texts = ["a handwritten seven", "the digit 7", "the digit 2"]
    emb = model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    assert emb.shape == (3, 384)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])


def test_dual_encoder_artifact(trained):
    m = trained["tiny-xbt-old"].manifest
    assert m["embedding"]["modality"] == "image+text" and m["embedding"]["dim"] == 16
    assert m["args"]["vocab"] == vocabulary()
    model = load_torch_model(trained["tiny-xbt-old"])
    with torch.inference_mode():
        out = model.encode_text(["a handwritten seven"])["embedding"]
    assert out.shape == (1, 16)


def test_projection_training_reduces_its_losses(trained):
    art = trained["tiny-xbt-new-text"]
    t = art.manifest["training"]
    text, pairs = t["text_loss_history"], t["pair_loss_history"]
    assert len(text) == TINY_RECIPES["tiny-xbt-new-text"].epochs
    assert text[-1] < 0.5 * text[0], text  # text-only stage: cosine regression onto the old text tower
    assert min(pairs[1:]) < pairs[0], pairs  # image–text pair stage
    # the projection maps into the old space far better than MiniLM's raw coordinates do
    m = art.manifest["metrics"]
    assert m["val_new_old_projection_r1"] > m["val_new_old_no_projection_r1"] + 10, m


def test_text_model_contract(trained):
    art = trained["tiny-xbt-new-text"]
    m = art.manifest
    old = trained["tiny-xbt-old"]
    (entry,) = m["embedding"]["compatible"]
    assert entry == {
        "space": "tiny-xbt-old", "model": "tiny-xbt-old", "version": old.version,
        "method": "xbt", "how": "projection", "dims": 16,
    }  # fmt: skip
    assert m["embedding"]["modality"] == "text" and m["embedding"]["dim"] == 384
    assert [o["name"] for o in m["outputs"]] == ["embedding", "embedding_tiny-xbt-old"]
    assert m["inputs"][0]["datatype"] == "BYTES"
    model = load_torch_model(art)
    with torch.inference_mode():
        out = model.encode_text(["the digit 3", "a messy eight"])
    assert out["embedding"].shape == (2, 384) and out["embedding_tiny-xbt-old"].shape == (2, 16)


def test_text_model_exports_the_projection_graph(trained):
    """The graph after MiniLM: parity with PyTorch and the recall@1 gate on the projected output."""
    from export.pipeline import export_artifact

    art = export_artifact(trained["tiny-xbt-new-text"].tag, ["onnx"], progress=False)
    entry = art.export("onnx")
    assert entry["max_abs_diff"] < 1e-4 and entry["parity_inputs"].endswith("validation captions")
    assert entry["val_top1"] >= entry["quality_floor"]
    assert entry["val_top1"] == pytest.approx(art.manifest["metrics"]["val_new_old_projection_r1"], abs=0.01)
