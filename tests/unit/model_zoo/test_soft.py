"""SOFT attention: Newton-Raphson pseudo-inverse, its gradient, the low-rank attention, the export form."""

import pytest
import torch

from model_zoo.soft import (
    SoftAttention,
    SoftmaxAttention,
    exportable,
    gaussian_kernel,
    is_exportable,
    kernel_attention,
    newton_pinv,
)


def _kernel_matrices(spread: float, n: int = 32, dim: int = 8, batch: int = 4) -> torch.Tensor:
    """SPD Gaussian-kernel matrices of random points; a smaller spread gives a worse condition number."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, dim, generator=g, dtype=torch.float64) * spread
    return gaussian_kernel(x, x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm(dim=(-2, -1)) / b.norm(dim=(-2, -1))).max().item()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_newton_pinv_well_conditioned(dtype, tol):
    a = _kernel_matrices(spread=1.0)  # condition number ~4
    assert torch.linalg.cond(a).max() < 10
    v = newton_pinv(a.to(dtype), iters=20).double()
    assert _rel(v, torch.linalg.pinv(a)) < tol


def test_newton_pinv_ill_conditioned():
    """20 steps do not invert the small singular values of an ill-conditioned kernel matrix.

    Newton-Schulz needs about log2(cond^2) steps before it converges quadratically, and the residual test
    halves alpha about 7 times on these dense kernel matrices (each halving costs about one step), so at
    cond ~1e3 the result is far from pinv(A) in norm (dominated by the un-inverted small singular
    values), yet still satisfies the first Penrose condition A V A = A to about 2%; 40 steps converge.
    """
    a = _kernel_matrices(spread=0.3)
    assert torch.linalg.cond(a).min() > 1e3
    pinv = torch.linalg.pinv(a)
    v20 = newton_pinv(a, iters=20)
    assert _rel(v20, pinv) > 0.5  # honest: not converged
    assert _rel(a @ v20 @ a, a) < 0.03
    assert _rel(newton_pinv(a, iters=40), pinv) < 1e-10


def test_newton_pinv_near_identity_converges():
    # A = I is where alpha = 2 / (max row sum)^2 would give V1 = 0; see _initial_alpha.
    a = torch.eye(6).expand(2, 6, 6) + 1e-4
    v = newton_pinv(a, iters=20)
    torch.testing.assert_close(v, torch.linalg.inv(a), atol=1e-5, rtol=1e-5)


def test_newton_pinv_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        newton_pinv(torch.ones(3, 4))


def test_newton_pinv_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    a = gaussian_kernel(x, x).requires_grad_()  # SPD, condition number a few units
    assert torch.autograd.gradcheck(lambda m: newton_pinv(m, 20), (a,), eps=1e-6, atol=1e-6)


def test_newton_pinv_backward_is_analytic_pinv_gradient():
    """For a rank-deficient A the backward equals torch's pinv derivative at the same point."""
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    eig = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    a = (u @ torch.diag(eig) @ u.T).requires_grad_()  # symmetric PSD of rank 3
    grad_out = torch.randn(5, 5, generator=g, dtype=torch.float64)
    (ref,) = torch.autograd.grad(torch.linalg.pinv(a), a, grad_out)
    a2 = a.detach().clone().requires_grad_()
    # 20 steps: converged on the range; far more would start to invert the ~1e-16 round-off eigenvalues.
    (got,) = torch.autograd.grad(newton_pinv(a2, iters=20), a2, grad_out)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_exportable_form_matches_eager():
    a = _kernel_matrices(spread=0.5).float()
    eager = newton_pinv(a, 20)
    with exportable():
        assert is_exportable()
        static = newton_pinv(a, 20)
    assert not is_exportable()
    torch.testing.assert_close(static, eager, atol=0, rtol=0)


@pytest.mark.parametrize("sym_norm", [False, True])
def test_module_exportable_matches_eager(sym_norm):
    torch.manual_seed(0)
    attn = SoftAttention(32, num_heads=2, landmark_ratio=2, sym_norm=sym_norm).eval()
    x = torch.randn(3, 7 * 5, 32)
    with torch.no_grad():
        eager = attn(x, 7, 5)
        with exportable():
            static = attn(x, 7, 5)
    torch.testing.assert_close(static, eager, atol=1e-6, rtol=1e-6)


def test_landmarks_equal_tokens_gives_full_gaussian_attention():
    """With Q~ = Q the low-rank form is exact: K(Q,Q) pinv(K(Q,Q)) K(Q,Q) V = S V."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 16, 8, generator=g, dtype=torch.float64) * 8**-0.25
    v = torch.randn(2, 2, 16, 8, generator=g, dtype=torch.float64)
    s = torch.exp(-0.5 * torch.cdist(q, q) ** 2)  # exact N x N softmax-free attention matrix
    torch.testing.assert_close(kernel_attention(q, q, v, newton_iters=20), s @ v, atol=1e-9, rtol=1e-9)
    # SOFT-Norm with Q~ = Q: S D^-1/2 S^-1 D^-1/2 S V.
    d = s.sum(-1).rsqrt()
    ref = s @ (d.unsqueeze(-1) * torch.linalg.inv(s) * d.unsqueeze(-2)) @ s @ v
    torch.testing.assert_close(kernel_attention(q, q, v, 20, sym_norm=True), ref, atol=1e-9, rtol=1e-9)


def test_gaussian_kernel_matches_definition():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g)
    ref = torch.exp(-0.5 * ((a[:, None] - b[None]) ** 2).sum(-1))
    torch.testing.assert_close(gaussian_kernel(a, b), ref)


@pytest.mark.parametrize("H, W, ratio", [(8, 8, 2), (7, 5, 2), (5, 5, 3), (1, 9, 2), (4, 4, 1), (3, 3, 4)])
@pytest.mark.parametrize("sym_norm", [False, True])
def test_soft_attention_shapes(H, W, ratio, sym_norm):
    torch.manual_seed(0)
    attn = SoftAttention(16, num_heads=2, landmark_ratio=ratio, sym_norm=sym_norm)
    x = torch.randn(2, H * W, 16, requires_grad=True)
    out = attn(x, H, W)
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


def test_attention_modules_share_signature():
    x = torch.randn(1, 12, 16)
    for attn in (SoftAttention(16, 2), SoftmaxAttention(16, 2)):
        assert attn(x, 3, 4).shape == x.shape


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="divisible"):
        SoftAttention(10, num_heads=3)
    with pytest.raises(ValueError, match="landmark_ratio"):
        SoftAttention(8, num_heads=2, landmark_ratio=0)
    with pytest.raises(ValueError, match="tokens"):
        SoftAttention(8, num_heads=2)(torch.randn(1, 10, 8), 3, 3)
