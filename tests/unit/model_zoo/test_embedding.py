"""Registry-driven tests of the retrieval embedding variants: shapes, gradients, orthogonality, ONNX."""

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from export.onnx import export_onnx, max_abs_diff
from model_zoo import create_model, list_models
from model_zoo.embedding import BasisTransform, BT2BasisChange, OrthogonalClassifierHead, rebase_orthogonal
from model_zoo.xbt import tokenize

IMAGE_MODELS = list_models("embed_*")
TINY = {"widths": (4, 8), "embed_dim": 12, "compat_dim": 8}
TINY_OLD = {"widths": (4, 8), "embed_dim": 8}
TINY_BT2 = {"widths": (4, 8), "new_dim": 12, "compat_dim": 8, "extra_dim": 2}
ORTHOGONAL = ("embed_bt2_cnn_base", "embed_bt2_ortho_cnn_base", "embed_oca_cnn_base")
DUAL_TINY = {"vocab": ["a", "digit", "seven", "7"], "widths": (4, 8), "embed_dim": 8, "text_width": 8}


def _tiny(name: str) -> dict:
    return {"embed_cnn_small": TINY_OLD, "embed_bt2_ortho_cnn_base": TINY_BT2}.get(name, TINY)


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_variants_registered():
    expected = {
        "embed_cnn_small",
        "embed_cnn_base",
        "embed_bt2_cnn_base",
        "embed_bt2_ortho_cnn_base",
        "embed_oca_cnn_base",
    }
    assert expected <= set(IMAGE_MODELS)
    assert {"xbt_dual_small", "xbt_minilm_text"} <= set(list_models("xbt_*"))


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_normalised_embedding(name, batch):
    torch.manual_seed(0)
    model = create_model(name, **_tiny(name)).eval()
    with torch.no_grad():
        z = model(_images(batch))
        feats = model.forward_features(_images(batch))
        logits = model.forward_head(feats)
    assert z.shape == (batch, model.embed_dim)
    assert torch.allclose(z.norm(dim=-1), torch.ones(batch), atol=1e-5)
    assert logits.shape == (batch, model.num_classes)
    assert feats.shape == (batch, model.backbone.num_features)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, **_tiny(name))
    x = _images(4)
    logits = model.forward_head(model.forward_features(x))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    # BT²'s extra dimensions and change of basis act only on the embedding, not on the logits
    (loss + model(x)[:, : model.compat_dim or None].sum()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("make", [BasisTransform, OrthogonalClassifierHead])
@pytest.mark.parametrize("seed", range(5))
def test_orthogonal_layers_stay_orthogonal_under_training(make, seed):
    """Large steps (lr 0.5 on a sum of squared logits) with the trainer's update: step, then rebase."""
    torch.manual_seed(seed)
    module = make(12) if make is BasisTransform else make(12, 10)
    linear = module.linear if isinstance(module, BasisTransform) else module.rotation
    assert parametrize.is_parametrized(linear)
    original = linear.parametrizations.weight.original
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        opt.zero_grad()
        module(x).pow(2).sum().backward()
        opt.step()
        rebase_orthogonal(module)
    assert linear.parametrizations.weight.original is original  # rebased in place: the optimiser keeps it
    w = linear.weight.detach()
    assert torch.allclose(w @ w.T, torch.eye(12), atol=1e-4)  # float32 matrix exponential
    # a rotation: norms and inner products are kept
    assert torch.allclose(linear(x).norm(dim=-1), x.norm(dim=-1), atol=1e-4)


def test_rebase_keeps_the_weight_and_resets_the_generator():
    torch.manual_seed(0)
    head = OrthogonalClassifierHead(12, 10)
    with torch.no_grad():
        head.rotation.parametrizations.weight.original.normal_(std=3.0)  # ‖A‖_F ≫ 1
    before = head.rotation.weight.detach().clone()
    assert rebase_orthogonal(head) == 1
    assert torch.allclose(head.rotation.weight, before, atol=1e-5)
    x = head.rotation.parametrizations.weight.original.detach().tril()
    assert torch.count_nonzero(x - x.mT) == 0  # A = 0: the rotation now lives in the base
    assert rebase_orthogonal(head) == 0  # a small generator is left alone


@pytest.mark.parametrize("name", ORTHOGONAL)
def test_baked_orthogonal_weights_rebuild_without_parametrization(name):
    """An artifact saves plain layers (orthogonal_param=False) that reproduce the trained model exactly."""
    torch.manual_seed(0)
    model = create_model(name, **_tiny(name)).eval()
    x = _images(3)
    with torch.no_grad():
        before = model(x)
    for m in model.modules():
        if parametrize.is_parametrized(m):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    plain = create_model(name, **_tiny(name), orthogonal_param=False).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(plain(x), before, atol=1e-6)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_onnx_parity(name, tmp_path):
    torch.manual_seed(0)
    args = dict(_tiny(name))
    if name in ORTHOGONAL:
        args["orthogonal_param"] = False  # the exported form (the trainer bakes the weights in)
    model = create_model(name, **args).eval()
    path = export_onnx(model, _images(2), tmp_path / "m.onnx", input_name="images", output_name="embedding")
    assert max_abs_diff(model, path, _images(5, seed=1).numpy()) < 1e-5


def test_dual_encoder_towers_share_one_space(tmp_path):
    torch.manual_seed(0)
    model = create_model("xbt_dual_small", **DUAL_TINY).eval()
    with torch.no_grad():
        img = model(_images(3))
        txt = model.encode_text(["a digit seven", "7", "unknown words only"])["embedding"]
    assert img.shape == txt.shape == (3, 8)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    path = export_onnx(model, _images(2), tmp_path / "d.onnx", input_name="images", output_name="embedding")
    assert max_abs_diff(model, path, _images(4, seed=2).numpy()) < 1e-5


def test_tokenize_pads_and_marks_unknown_words():
    ids = tokenize(["A digit, SEVEN!", "zebra 7 7 7"], ["a", "digit", "seven", "7"], max_len=3)
    assert ids.tolist() == [[2, 3, 4], [1, 5, 5]]
    assert tokenize([""], ["a"], max_len=2).tolist() == [[0, 0]]


def test_projection_only_model_has_no_minilm_parameters():
    model = create_model("xbt_minilm_text", load_encoder=False, hidden=16)
    assert set(model.state_dict()) == {k for k in model.state_dict() if k.startswith("projection.")}
    native = torch.nn.functional.normalize(torch.randn(4, 384), dim=-1)
    same, projected = model(native)
    assert torch.allclose(same, native, atol=1e-6) and projected.shape == (4, 32)
    assert np.allclose(projected.norm(dim=-1).detach().numpy(), 1.0, atol=1e-5)


def test_bt2_losses_act_before_the_change_of_basis():
    """BT² (official ResNet_ortho): logits come from f, and the served embedding is an orthogonal change
    of basis of [extra; C·f] — so its norm is √(1 + C²) and f is recoverable from it exactly."""
    torch.manual_seed(0)
    model = create_model("embed_bt2_ortho_cnn_base", **TINY_BT2, c=2.0).eval()
    x = _images(5)
    with torch.no_grad():
        f, z = model.bt2_features(x)
        feats = model.forward_features(x)
        _, extra = model.new_feature(feats)
        assert torch.allclose(model.forward_head(feats), model.head(f))
        assert torch.allclose(model.embedding(x), z)
        assert z.shape == (5, 12 + 2) and model.embed_dim == 14 and model.compat_dim == 8
        assert torch.allclose(z.norm(dim=-1), torch.full((5,), 5.0**0.5), atol=1e-5)
        # undo the basis change: B = diag(Q, I) · diag(I, P) is orthogonal, so Bᵀ z = [extra; C·f]
        p, q = model.basis.p.weight, model.basis.q.weight
        u = torch.cat([z[:, :8] @ q, z[:, 8:]], dim=1)
        assert torch.allclose(u[:, :2], extra, atol=1e-5)
        assert torch.allclose(u[:, 2:] @ p, 2.0 * f, atol=1e-5)


def test_bt2_ablation_without_the_change_of_basis():
    model = create_model("embed_bt2_ortho_cnn_base", **TINY_BT2, transform="none").eval()
    assert not any(isinstance(m, torch.nn.Linear) for m in model.basis.modules())
    with torch.no_grad():
        f, z = model.bt2_features(_images(3))
    assert torch.allclose(z[:, 2:], 2.0 * f)  # [extra; C·f] as is: the compatible part holds f's coordinates
    with pytest.raises(ValueError, match="transform"):
        create_model("embed_bt2_ortho_cnn_base", **TINY_BT2, transform="rotate")


@pytest.mark.parametrize("extra_dim", [0, 8, 9])
def test_bt2_rejects_dimensions_that_leave_f_out_of_the_compatible_part(extra_dim):
    with pytest.raises(ValueError, match="extra_dim"):
        BT2BasisChange(new_dim=12, old_dim=8, extra_dim=extra_dim)
