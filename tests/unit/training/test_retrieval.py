"""Backward-compatible training on tiny configs: artifacts, losses, the compatibility property, export."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln.artifacts import load_torch_model
from training.retrieval import (
    TINY_RECIPES,
    bt2_losses,
    compatibility_table,
    oca_losses,
    retrieval_metrics,
)
from training.trainer import train


@pytest.fixture(scope="module")
def trained():
    """The tiny old model, independent new model, BCT, BT² and OCA (each a few seconds)."""
    return {name: train(name, recipe=r, progress=False).artifact for name, r in TINY_RECIPES.items()}


def test_retrieval_metrics_by_hand():
    g = np.eye(3, dtype=np.float32)  # three gallery items on the axes, labels 0, 1, 1
    q = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.9]], dtype=np.float32)
    m = retrieval_metrics(q, np.array([1, 1]), g, np.array([0, 1, 1]))
    # query 0 ranks (0, 1, 2): miss then hits at ranks 2 and 3 → AP = (1/2 + 2/3) / 2
    # query 1 ranks (2, 1, 0): hits at ranks 1 and 2 → AP = 1
    assert m["top1"] == pytest.approx(50.0)
    assert m["top5"] == pytest.approx(100.0)
    assert m["map"] == pytest.approx(100 * ((1 / 2 + 2 / 3) / 2 + 1) / 2)
    with pytest.raises(ValueError, match="dim"):
        retrieval_metrics(q[:, :2], np.array([1, 1]), g, np.array([0, 1, 1]))


def test_bt2_losses_vanish_when_aligned():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(6, 12), dim=-1)
    z = torch.randn(6, 14)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    pseudo = torch.randn(10, 8) * 0.5
    logits = torch.randn(6, 10)
    terms = bt2_losses(f, z, logits, y, f_ref=2 * f, z_old=z[:, :8], pseudo_classifier=pseudo, d_old=8)
    assert set(terms) == {"ce", "independent", "old_classifier", "old_feature"}
    assert terms["independent"].item() == pytest.approx(0.0, abs=1e-6)  # cosine ignores scale
    assert terms["old_feature"].item() == pytest.approx(0.0, abs=1e-6)
    far = bt2_losses(f, z, logits, y, f_ref=-f, z_old=-z[:, :8], pseudo_classifier=pseudo, d_old=8)
    assert far["independent"].item() == pytest.approx(2.0, abs=1e-5)
    assert far["old_feature"].item() == pytest.approx(2.0, abs=1e-5)
    # the old-classifier term: unscaled logits of the normalised compatible part against the class means
    zc = F.normalize(z[:, :8], dim=-1)
    assert terms["old_classifier"].item() == pytest.approx(F.cross_entropy(zc @ pseudo.T, y).item(), abs=1e-6)
    # the independent term reads f (before the change of basis), never z
    assert bt2_losses(f, -z, logits, y, 2 * f, z[:, :8], pseudo, 8)["independent"].item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_oca_prototype_terms():
    protos = torch.eye(10, 8)[:, :8]  # class c's old prototype: axis c (classes 8, 9: zero rows)
    protos = F.normalize(protos + 1e-3, dim=-1)
    y = torch.tensor([0, 3, 5])
    on_proto = torch.cat([protos[y] * 5, torch.randn(3, 4)], dim=1)  # compatible part on its prototype
    terms = oca_losses(on_proto, torch.randn(3, 10), y, protos, d_old=8, scale=16.0)
    assert terms["prototype_cos"].item() == pytest.approx(0.0, abs=1e-5)
    off = torch.cat([protos[(y + 1) % 8] * 5, torch.randn(3, 4)], dim=1)
    worse = oca_losses(off, torch.randn(3, 10), y, protos, d_old=8, scale=16.0)
    assert worse["prototype_cos"] > 0.9 and worse["prototype_ce"] > terms["prototype_ce"] + 5


def test_artifacts_record_compatibility(trained):
    old = trained["tiny-embed-old"].manifest
    assert old["task"] == "embedding" and old["embedding"]["compatible"] == []
    assert old["embedding"]["space"] == "tiny-embed-old" and old["labels"] == ["0", "1", "2", "3", "4"]
    assert old["inputs"][0]["name"] == "images" and old["outputs"][0]["name"] == "embedding"
    for method in ("bct", "bt2", "oca"):
        m = trained[f"tiny-embed-new-{method}"].manifest
        (entry,) = m["embedding"]["compatible"]
        assert entry == {
            "space": "tiny-embed-old",
            "model": "tiny-embed-old",
            "version": trained["tiny-embed-old"].version,
            "method": method,
            "how": "subspace",
            "dims": 8,
        }
        # BCT: the old size; OCA: old + extra (12); BT²: the 12-d new feature + 2 extra dimensions
        assert m["embedding"]["dim"] == {"bct": 8, "oca": 12, "bt2": 14}[method]
    assert trained["tiny-embed-new-independent"].manifest["embedding"]["compatible"] == []


@pytest.mark.parametrize("name", ["tiny-embed-new-bt2", "tiny-embed-new-oca"])
def test_saved_orthogonal_layers_are_orthogonal(trained, name):
    art = trained[name]
    assert art.manifest["args"]["orthogonal_param"] is False
    model = load_torch_model(art)
    layers = [model.basis.p, model.basis.q] if name.endswith("bt2") else [model.head.rotation]
    for layer in layers:
        w = layer.weight.detach()
        assert torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=1e-4)


def test_compatible_training_beats_independent_on_new_old(trained):
    """The property the methods exist for, on the validation split: new queries against the old gallery
    retrieve far better after compatible training than with an independently trained new model."""
    old = load_torch_model(trained["tiny-embed-old"])
    indep = compatibility_table(old, load_torch_model(trained["tiny-embed-new-independent"]), 8, "val")
    for method in ("bt2", "oca"):
        table = compatibility_table(old, load_torch_model(trained[f"tiny-embed-new-{method}"]), 8, "val")
        # measured with seeds 0-2: independent 1-10, BT² 39-47, OCA 49-53
        assert table["new/old"]["top1"] > indep["new/old"]["top1"] + 10, (method, table, indep)
        assert table["new/old"]["map"] > indep["new/old"]["map"], (method, table, indep)


def test_export_parity_and_quality_gate(trained):
    from export.pipeline import export_artifact

    art = export_artifact(trained["tiny-embed-new-bt2"].tag, ["onnx"], progress=False)
    entry = art.export("onnx")
    assert entry["max_abs_diff"] < 1e-4
    assert entry["val_top1"] >= entry["quality_floor"]
    assert entry["val_new_old_top1"] == pytest.approx(art.manifest["metrics"]["val_new_old_top1"], abs=0.01)
