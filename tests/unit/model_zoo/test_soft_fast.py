"""SOFT's fast forward against the reference formulation, to float32 tolerance, outputs and gradients.

The reference is the paper's computation written out the plain way (and the way this module computed it
before the fast path): ``Conv2d`` landmarks on the per-head token grid, :func:`kernel_attention`
(``gaussian_kernel`` + ``newton_pinv`` + ``(K_nm pinv)(K_nm^T V)``), the depthwise ``Conv2d`` on V in
the ``(B d, h, H, W)`` layout, with the module's own parameters.
"""

import pytest
import torch
import torch.nn.functional as F

from model_zoo.soft import SoftAttention, exportable, gaussian_kernel, kernel_attention, newton_pinv


def reference_forward(attn: SoftAttention, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    B, N, C = x.shape
    h, d, r = attn.num_heads, attn.head_dim, attn.landmark_ratio
    q = attn.q(x).reshape(B, N, h, d).transpose(1, 2) * attn.scale  # (B, h, N, d)
    v = attn.v(x).reshape(B, N, h, d).transpose(1, 2)
    grid = q.reshape(B * h, H, W, d).permute(0, 3, 1, 2)
    grid = F.pad(grid, (0, -W % r, 0, -H % r))
    lm = attn.landmark(grid).flatten(2).transpose(1, 2)
    lm = attn.landmark_act(attn.landmark_norm(lm)).reshape(B, h, -1, d)
    out = kernel_attention(q, lm, v, attn.newton_iters, attn.sym_norm)
    if attn.v_conv is not None:
        vg = v.reshape(B, h, H, W, d).permute(0, 4, 1, 2, 3).reshape(B * d, h, H, W)
        out = out + attn.v_conv(vg).reshape(B, d, h, N).permute(0, 2, 3, 1)
    return attn.proj(out.transpose(1, 2).reshape(B, N, C))


CASES = [  # (batch, H, W, landmark ratio, sym_norm, conv_size)
    (1, 16, 16, 2, False, 3),  # batch 1: the strided in-place accumulation into the conv output
    (3, 8, 8, 2, False, 3),  # the trained models' grid and ratio
    (2, 8, 8, 2, True, 3),  # SOFT-Norm
    (2, 7, 5, 2, False, 3),  # padding on both sides
    (1, 9, 9, 4, True, 5),  # padding, wider V conv
    (2, 4, 4, 1, False, 0),  # ratio 1 (landmarks = tokens), no V conv
    (1, 6, 6, 3, False, 0),
]


def _pair(dim: int, heads: int, ratio: int, sym_norm: bool, conv_size: int) -> SoftAttention:
    torch.manual_seed(0)
    attn = SoftAttention(dim, heads, landmark_ratio=ratio, sym_norm=sym_norm, conv_size=conv_size)
    with torch.no_grad():  # non-zero biases and a non-trivial V conv, so every term is exercised
        for p in attn.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return attn


@pytest.mark.parametrize("B, H, W, ratio, sym_norm, conv_size", CASES)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "exportable"])
def test_fast_forward_matches_reference(B, H, W, ratio, sym_norm, conv_size, mode):
    attn = _pair(32, 2, ratio, sym_norm, conv_size).eval()
    x = torch.randn(B, H * W, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference_forward(attn, x, H, W)
    if mode == "inference_mode":
        with torch.inference_mode():
            got = attn(x, H, W)
    elif mode == "exportable":
        with exportable(), torch.no_grad():
            got = attn(x, H, W)
    else:
        with torch.no_grad():
            got = attn(x, H, W)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("B, H, W, ratio, sym_norm, conv_size", CASES)
def test_fast_gradients_match_reference(B, H, W, ratio, sym_norm, conv_size):
    """Training runs the fast path with autograd: input and parameter gradients as the reference's."""
    attn = _pair(32, 2, ratio, sym_norm, conv_size).train()
    x = torch.randn(B, H * W, 32, generator=torch.Generator().manual_seed(2))
    grad_out = torch.randn(B, H * W, 32, generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (attn, lambda t, h, w: reference_forward(attn, t, h, w)):
        attn.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi, H, W)
        (out * grad_out).sum().backward()
        grads.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in attn.named_parameters()}))
    (out_f, gx_f, gp_f), (out_r, gx_r, gp_r) = grads
    torch.testing.assert_close(out_f, out_r, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(gx_f, gx_r, atol=1e-5, rtol=1e-4)
    for name, g in gp_r.items():
        scale = g.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(gp_f[name] / scale, g / scale, atol=2e-5, rtol=0, msg=name)


def test_fast_forward_float64_is_the_reference_to_round_off():
    attn = _pair(16, 2, 2, False, 3).double().eval()
    x = torch.randn(2, 36, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, 6, 6), reference_forward(attn, x, 6, 6), atol=1e-12, rtol=1e-12)


def test_far_apart_pairs_are_floored_not_slowed():
    """Exponents far below log(FLT_MIN) (kernel entries that are 0 or subnormal in float32) come out
    within FLT_MIN of the exact kernel: the floor only keeps exp off its slow path."""
    attn = _pair(32, 2, 4, False, 3).eval()
    with torch.no_grad():
        attn.q.weight.mul_(40.0)  # tokens and landmarks ~100s apart: exp(-|q - q~|^2 / 2) underflows
    x = torch.randn(1, 256, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        q = attn.q(x) * attn.scale
        assert (q.pow(2).sum(-1) / 2 > 200).float().mean() > 0.9  # most exponents far below -87
        torch.testing.assert_close(attn(x, 16, 16), reference_forward(attn, x, 16, 16), atol=1e-6, rtol=1e-5)


def test_buffered_newton_is_bit_identical_to_the_autograd_form():
    g = torch.Generator().manual_seed(6)
    pts = torch.randn(3, 2, 16, 8, generator=g)
    a = gaussian_kernel(pts, pts)
    with torch.no_grad():
        buffered = newton_pinv(a, 20)  # ping-pong buffers
    a_req = a.clone().requires_grad_()
    with exportable():
        unrolled = newton_pinv(a_req, 20)  # out-of-place steps, autograd through them
    torch.testing.assert_close(unrolled.detach(), buffered, atol=0, rtol=0)
    assert torch.isfinite(torch.autograd.grad(unrolled.sum(), a_req)[0]).all()


def test_newton_pinv_keeps_batch_shape_and_input():
    a = torch.eye(5, dtype=torch.float64).expand(2, 3, 5, 5) * 2.0
    before = a.clone()
    v = newton_pinv(a, 20)
    assert v.shape == (2, 3, 5, 5)
    torch.testing.assert_close(v, torch.eye(5, dtype=torch.float64).expand(2, 3, 5, 5) / 2.0)
    torch.testing.assert_close(a, before, atol=0, rtol=0)
