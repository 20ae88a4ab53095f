"""model_zoo.performer: FAVOR+ converges to softmax attention as features grow, orthogonal random features,
redraws only while training (frozen in eval and under the export switch), the forecasters' forward
(non-crossing quantiles, σ scaling) over every registered forecaster. ONNX export parity of the
Performer (frozen projection, LSTM nodes) is checked through the export pipeline in
tests/unit/training/test_forecasting.py (one ~15 s export is enough)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_zoo import create_model, list_models
from model_zoo.performer import FavorAttention, favor_features, orthogonal_gaussian
from model_zoo.soft import exportable

FORECASTERS = list_models("*_forecaster")
TINY = {"context": 16, "horizon": 4, "dim": 16, "depth": 1, "heads": 2, "num_features": 8, "lstm_hidden": 8}


def _favor_error(m: int, seeds: int = 4) -> float:
    """Mean relative error of FAVOR+'s attention matrix D⁻¹ φ(Q)φ(K)ᵀ against softmax(QKᵀ/√d)."""
    errs = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        q, k = (torch.randn(1, 2, 32, 16, generator=g) * 0.5 for _ in range(2))
        w = orthogonal_gaussian(m, 16, torch.Generator().manual_seed(100 + seed))
        scale = 16**-0.25
        a = favor_features(q * scale, w, is_query=True) @ favor_features(k * scale, w, is_query=False).mT
        a = a / a.sum(-1, keepdim=True)
        exact = torch.softmax(q @ k.mT / 4, dim=-1)
        errs.append(((a - exact).abs().mean() / exact.mean()).item())
    return float(np.mean(errs))


def test_favor_converges_to_softmax_attention_as_features_grow():
    errors = [_favor_error(m) for m in (16, 64, 256, 1024, 4096, 16384)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    # Monte-Carlo error ~ 1/√m: 16× the features should at least halve it (ideal: a quarter)
    assert errors[-1] < 0.5 * errors[3] and errors[3] < 0.5 * errors[1], errors
    assert errors[-1] < 0.03, errors
    # and the module's attention output (values averaged by that matrix) with many features; the
    # worst entry of one draw is heavy-tailed (2-15 % of max |exact| over 40 draws), so seeded draws
    # and their median
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g) * 0.5 for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)
    worst = []
    for seed in range(8):
        torch.manual_seed(seed)
        attn = FavorAttention(32, 2, 16384)
        worst.append(((attn.attend(q, k, v) - exact).abs().max() / exact.abs().max()).item())
    assert float(np.median(worst)) < 0.1, worst


def test_softmax_kind_is_exact_attention():
    attn = FavorAttention(32, 2, 8, kind="softmax")
    q, k, v = (torch.randn(2, 2, 10, 16) for _ in range(3))
    torch.testing.assert_close(attn.attend(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_orthogonal_random_features():
    w = orthogonal_gaussian(40, 16, torch.Generator().manual_seed(0))
    assert w.shape == (40, 16)
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16), atol=1e-5, rtol=0)
    assert not torch.allclose(w.norm(dim=1), w.norm(dim=1)[0])  # χ(d)-distributed norms, not all equal


def test_projection_redrawn_in_training_frozen_in_eval_and_export():
    model = create_model("performer_bilstm_forecaster", **TINY)
    attn = model.blocks[0].attn
    x, s = torch.randn(3, 16, 18), torch.full((3, 1), 0.01)
    before = attn.projection.clone()
    model.train()
    model(x, s)
    after_train = attn.projection.clone()
    assert not torch.equal(before, after_train)
    model.eval()
    model(x, s)
    assert torch.equal(attn.projection, after_train)
    model.train()
    with exportable():
        model(x, s)
    assert torch.equal(attn.projection, after_train)
    assert "blocks.0.attn.projection" in model.state_dict()  # saved with the weights


@pytest.mark.parametrize("name", FORECASTERS)
def test_forward_gives_non_crossing_quantiles_scaled_by_sigma(name):
    torch.manual_seed(0)
    model = create_model(name, **TINY).eval()
    x = torch.randn(5, 16, 18)
    q = model(x, torch.full((5, 1), 0.01))
    assert q.shape == (5, 4, len(model.quantiles))
    assert (q.diff(dim=-1) >= 0).all()
    torch.testing.assert_close(model(x, torch.full((5, 1), 0.03)), 3 * q)  # the output is in σ units × σ
    q.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="increasing"):
        create_model("performer_bilstm_forecaster", quantiles=[0.9, 0.1])
    with pytest.raises(ValueError, match="divisible"):
        create_model("performer_bilstm_forecaster", dim=10, heads=4)
