"""Registry-driven tests of every model-zoo variant (after timm's tests/test_models.py)."""

import json

import pytest
import torch

from model_zoo import create_model, list_models, model_defaults

MODELS = list_models("vit_*")


def test_variants_registered():
    assert {"vit_soft_tiny", "vit_soft_norm_tiny", "vit_softmax_tiny"} <= set(MODELS)
    assert {"vit_soft_wide", "vit_softmax_wide"} <= set(MODELS)


def test_wide_variants_are_192_wide_and_gemm_heavy():
    for name in ("vit_soft_wide", "vit_softmax_wide"):
        model = create_model(name)
        assert model.num_features == 192
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert linear / sum(p.numel() for p in model.parameters()) > 0.9


@pytest.mark.parametrize("name", MODELS)
def test_forward_shapes(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
    assert logits.shape == (2, 10)
    assert feats.shape == pre.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(feats), logits)
    # tiny: the 64-wide defaults; wide: the 192-wide int8 benchmark models
    assert sum(p.numel() for p in model.parameters()) < (1_500_000 if name.endswith("_wide") else 300_000)


@pytest.mark.parametrize("name", MODELS)
def test_backward_finite(name):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 3, 9]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", MODELS)
def test_config_round_trip(name):
    torch.manual_seed(0)
    model = create_model(name)
    cfg = json.loads(json.dumps(model.kiln_config))  # the config must survive JSON
    rebuilt = create_model(cfg["architecture"], **cfg["args"])
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
    assert cfg["args"] == model_defaults(name)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("img_size, patch_size", [(20, 4), (24, 8), (36, 4)])
def test_other_token_grids(name, img_size, patch_size):
    """5x5, 3x3 and 9x9 grids: not divisible by the landmark ratio 2."""
    model = create_model(name, img_size=img_size, patch_size=patch_size, depth=1)
    out = model(torch.rand(2, 1, img_size, img_size))
    assert out.shape == (2, 10)
    out.sum().backward()


def test_bad_options_raise():
    from model_zoo.vit import VisionTransformer

    with pytest.raises(ValueError, match="valid"):
        VisionTransformer(attn_type="linformer")
    with pytest.raises(ValueError, match="divisible"):
        create_model("vit_soft_tiny", img_size=30)
    with pytest.raises(ValueError, match="expected input"):
        create_model("vit_soft_tiny")(torch.rand(1, 3, 32, 32))
