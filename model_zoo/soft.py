"""SOFT: softmax-free linear attention, and the softmax attention it replaces.

Paper: Lu et al., "SOFT: Softmax-free Transformer with Linear Complexity", NeurIPS 2021
(official code: github.com/fudan-zvg/SOFT). What is taken from it:

* Gaussian-kernel self-attention ``S(q, k) = exp(-||q - k||^2 / 2)`` with keys tied to queries (only
  ``W_q`` and ``W_v``); queries are scaled by ``d^-1/4`` so the exponent plays the role of ``q.k / sqrt(d)``.
* The Nystrom-like low-rank form ``S ~= K(Q, Q~) . pinv(K(Q~, Q~)) . K(Q~, Q) . V`` with ``m`` landmarks
  ``Q~`` from a strided convolution (kernel = stride = ratio) + LayerNorm + GELU over the token grid:
  ``O(N m)`` time and memory instead of ``O(N^2)``.
* The Moore-Penrose inverse by Newton-Raphson (Newton-Schulz) iterations in the forward pass, with the
  analytic gradient of the pseudo-inverse in the backward pass.
* A depthwise 3x3 convolution on V added to the output, and the symmetric normalisation of SOFT-Norm
  (``D^-1/2 . pinv . D^-1/2`` with ``D`` the row sums of ``K(Q~, Q~)``).

The official kernels are CUDA-only; everything here is plain tensor ops, and the one data-dependent
piece (choosing the Newton step size) has an export-friendly form selected by :func:`set_exportable` /
:func:`exportable`, after timm's ``set_layer_config(exportable=True)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SoftAttention",
    "SoftmaxAttention",
    "exportable",
    "gaussian_kernel",
    "is_exportable",
    "kernel_attention",
    "newton_pinv",
    "set_exportable",
]

_EXPORTABLE = False

# Newton step-size search, after the official SOFT-Norm code: at most this many halvings of alpha, and
# accept alpha once the max-column-sum norm of the residual I - A V0 is at most this threshold.
_MAX_HALVINGS = 10
_RESIDUAL_THRESHOLD = 1.01


def set_exportable(flag: bool) -> None:
    """Select the ONNX-exportable form (no data-dependent Python control flow, no custom autograd)."""
    global _EXPORTABLE
    _EXPORTABLE = bool(flag)


def is_exportable() -> bool:
    """Whether the exportable form is selected."""
    return _EXPORTABLE


@contextlib.contextmanager
def exportable(flag: bool = True) -> Iterator[None]:
    """Context manager that selects the exportable form and restores the previous setting on exit."""
    previous = _EXPORTABLE
    set_exportable(flag)
    try:
        yield
    finally:
        set_exportable(previous)


# --------------------------------------------------------------------------------------------------
# Moore-Penrose inverse by Newton-Raphson
# --------------------------------------------------------------------------------------------------


def _initial_alpha(a: torch.Tensor) -> torch.Tensor:
    """Largest step size tried for ``V0 = alpha A^T``, one per matrix in the batch.

    The paper writes ``alpha = 2 / (max row sum)^2``. For a symmetric non-negative A whose rows sum to
    about its largest eigenvalue (a Gaussian kernel of well separated landmarks is close to I), that puts
    an eigenvalue of ``I - alpha A A^T`` at -1, where Newton stalls (A = I gives V1 = 0) -- and the
    paper's residual test (<= 1.01) accepts it. We start one halving lower, at the classical
    ``1 / (||A||_1 ||A||_inf)`` (Pan & Schreiber 1991), which is <= 1 / sigma_max^2 and so always
    converges; for symmetric A it equals ``1 / (max row sum)^2``.
    """
    norm_inf = a.abs().sum(-1).amax(-1)  # max row sum
    norm_1 = a.abs().sum(-2).amax(-1)  # max column sum
    return 1.0 / (norm_1 * norm_inf)


def _residual_norm(alpha: torch.Tensor, aat: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """Max-column-sum norm of ``I - A V0`` for ``V0 = alpha A^T``; ``alpha`` broadcasts over ``aat``."""
    return (eye - alpha[..., None, None] * aat).abs().sum(-2).amax(-1)


def _newton_iterations(a: torch.Tensor, v: torch.Tensor, iters: int) -> torch.Tensor:
    # Newton-Schulz update of the paper: V_{k+1} = 2 V_k - V_k A V_k (a fixed count, so it unrolls).
    for _ in range(iters):
        v = 2 * v - v @ (a @ v)
    return v


def _newton_pinv_eager(a: torch.Tensor, iters: int) -> torch.Tensor:
    """Reference form: halve alpha in a data-dependent loop, per matrix, until the residual test holds."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    aat = a @ a.transpose(-1, -2)
    alpha = _initial_alpha(a)
    for _ in range(_MAX_HALVINGS):
        failing = _residual_norm(alpha, aat, eye) > _RESIDUAL_THRESHOLD
        if not bool(failing.any()):
            break
        alpha = torch.where(failing, alpha * 0.5, alpha)
    return _newton_iterations(a, alpha[..., None, None] * a.transpose(-1, -2), iters)


def _newton_pinv_exportable(a: torch.Tensor, iters: int) -> torch.Tensor:
    """Same numbers as :func:`_newton_pinv_eager` without data-dependent control flow.

    All ``_MAX_HALVINGS + 1`` candidates ``alpha 2^-k`` are tested at once and the first that passes is
    taken (the last if none does), exactly what the eager loop stops at.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    aat = a @ a.transpose(-1, -2)
    scales = 0.5 ** torch.arange(_MAX_HALVINGS + 1, dtype=a.dtype, device=a.device)  # exact powers of 2
    alphas = _initial_alpha(a)[..., None] * scales  # (..., K + 1)
    norms = _residual_norm(alphas, aat[..., None, :, :], eye)  # (..., K + 1)
    passed = (norms <= _RESIDUAL_THRESHOLD).to(torch.int64)
    # Number of leading failures = index of the first candidate that passes (ONNX has CumSum, no CumProd).
    first = (passed.cumsum(-1) == 0).to(torch.int64).sum(-1, keepdim=True).clamp(max=_MAX_HALVINGS)
    alpha = alphas.gather(-1, first).squeeze(-1)
    return _newton_iterations(a, alpha[..., None, None] * a.transpose(-1, -2), iters)


class _NewtonPinv(torch.autograd.Function):
    """Newton-Raphson pseudo-inverse; backward is the analytic derivative of pinv, not of the iterations."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, iters: int) -> torch.Tensor:
        with torch.no_grad():
            v = _newton_pinv_eager(a, iters)
        ctx.save_for_backward(a, v)
        return v

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        a, v = ctx.saved_tensors
        vt, gt = v.transpose(-1, -2), grad.transpose(-1, -2)
        # Golub & Pereyra (1973): dA+ = -A+ dA A+ + A+ A+^T dA^T (I - A A+) + (I - A+ A) dA^T A+^T A+.
        # Its adjoint; for invertible A only the first term survives: -V^T G V^T as in the paper.
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        grad_a = -vt @ grad @ vt
        grad_a = grad_a + (eye - a @ v) @ gt @ (v @ vt)
        grad_a = grad_a + (vt @ v) @ gt @ (eye - v @ a)
        return grad_a, None


def newton_pinv(a: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Moore-Penrose inverse of a batch of square matrices by Newton-Raphson iterations.

    ``V0 = alpha A^T`` from ``alpha = 1 / (||A||_1 ||A||_inf)`` (the paper's ``2 / (max row sum)^2``
    halved once, see ``_initial_alpha``), halving alpha (at most 10 times) until the max-column-sum norm
    ``||I - A V0||_1 <= 1.01``, then ``V <- 2V - V A V`` for ``iters`` steps. Converges quadratically
    once the residual is small; with condition number kappa it needs about ``log2(kappa^2)`` steps before
    that, so for ill-conditioned A the small singular values are not inverted in 20 steps (the result is
    then a regularised inverse).

    In the default form the backward pass is the analytic pinv gradient; in the exportable form (see
    :func:`set_exportable`) autograd differentiates the unrolled iterations instead.

    Args:
        a: ``(..., m, m)`` matrices.
        iters: number of Newton steps (20 in the paper's configs).

    Returns:
        ``(..., m, m)`` approximate pseudo-inverses.
    """
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"newton_pinv expects (..., m, m) square matrices, got shape {tuple(a.shape)}")
    if _EXPORTABLE:
        return _newton_pinv_exportable(a, iters)
    return _NewtonPinv.apply(a, iters)


# --------------------------------------------------------------------------------------------------
# Gaussian-kernel attention
# --------------------------------------------------------------------------------------------------


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``exp(-||a_i - b_j||^2 / 2)`` for ``a: (..., n, d)``, ``b: (..., m, d)`` -> ``(..., n, m)``."""
    # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b, clamped at 0 against cancellation.
    sq = a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(-2) - 2 * a @ b.transpose(-1, -2)
    return torch.exp(-0.5 * sq.clamp(min=0))


def kernel_attention(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    v: torch.Tensor,
    newton_iters: int = 20,
    sym_norm: bool = False,
) -> torch.Tensor:
    """Low-rank softmax-free attention ``K(Q, Q~) . pinv(K(Q~, Q~)) . K(Q~, Q) . V``.

    Args:
        q: ``(..., N, d)`` scaled queries (keys are tied to them).
        landmarks: ``(..., m, d)`` landmark queries ``Q~``.
        v: ``(..., N, d_v)`` values.
        newton_iters: Newton-Raphson steps for the pseudo-inverse.
        sym_norm: SOFT-Norm: ``D^-1/2 . pinv . D^-1/2`` with ``D`` the row sums of ``K(Q~, Q~)``.

    Returns:
        ``(..., N, d_v)``; with ``landmarks == q`` this is the full Gaussian-kernel attention ``S V``.
    """
    k_nm = gaussian_kernel(q, landmarks)  # K(Q, Q~): (..., N, m)
    k_mm = gaussian_kernel(landmarks, landmarks)  # K(Q~, Q~): (..., m, m)
    k_inv = newton_pinv(k_mm, newton_iters)
    if sym_norm:
        # SOFT-Norm, as in the official code: scale the pseudo-inverse's rows and columns by D^-1/2.
        d = k_mm.sum(-1).rsqrt()
        k_inv = d.unsqueeze(-1) * k_inv * d.unsqueeze(-2)
    # Bracketed so no N x N matrix appears: (N x m)(m x m) times (m x N)(N x d_v).
    return (k_nm @ k_inv) @ (k_nm.transpose(-1, -2) @ v)


class SoftAttention(nn.Module):
    """SOFT self-attention over tokens on an ``H x W`` grid.

    Args:
        dim: token width.
        num_heads: attention heads; ``dim`` must divide by it.
        landmark_ratio: kernel and stride of the landmark convolution; a grid not divisible by it is
            zero-padded at the bottom/right, so ``m = ceil(H / r) * ceil(W / r)``.
        newton_iters: Newton-Raphson steps for the pseudo-inverse.
        sym_norm: SOFT-Norm symmetric normalisation.
        qv_bias: biases on ``W_q`` and ``W_v``.
        conv_size: kernel of the depthwise convolution on V (0 disables it).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 2,
        landmark_ratio: int = 2,
        newton_iters: int = 20,
        sym_norm: bool = False,
        qv_bias: bool = True,
        conv_size: int = 3,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if landmark_ratio < 1:
            raise ValueError(f"landmark_ratio must be >= 1, got {landmark_ratio}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.landmark_ratio = landmark_ratio
        self.newton_iters = newton_iters
        self.sym_norm = sym_norm
        self.scale = self.head_dim**-0.25  # exp(-|q - k|^2 / 2) of d^-1/4-scaled q mimics q.k / sqrt(d)
        self.q = nn.Linear(dim, dim, bias=qv_bias)  # keys are tied to queries: no W_k
        self.v = nn.Linear(dim, dim, bias=qv_bias)
        # Landmarks: one conv over each head's channels, shared by the heads, as in the official code.
        self.landmark = nn.Conv2d(
            self.head_dim, self.head_dim, kernel_size=landmark_ratio, stride=landmark_ratio, bias=False
        )
        self.landmark_norm = nn.LayerNorm(self.head_dim)
        self.landmark_act = nn.GELU()
        # Depthwise conv on V: one 3x3 kernel per head, shared over its channels (official code's layout).
        self.v_conv = (
            nn.Conv2d(num_heads, num_heads, conv_size, padding=conv_size // 2, groups=num_heads, bias=False)
            if conv_size
            else None
        )
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """``x: (B, N, C)`` with ``N = H * W`` -> ``(B, N, C)``."""
        B, N, C = x.shape
        if N != H * W:
            raise ValueError(f"got {N} tokens for an {H}x{W} grid")
        h, d, r = self.num_heads, self.head_dim, self.landmark_ratio
        q = self.q(x).reshape(B, N, h, d).transpose(1, 2) * self.scale  # (B, h, N, d)
        v = self.v(x).reshape(B, N, h, d).transpose(1, 2)

        grid = q.reshape(B * h, H, W, d).permute(0, 3, 1, 2)  # (B h, d, H, W)
        pad_h, pad_w = -H % r, -W % r
        if pad_h or pad_w:
            grid = F.pad(grid, (0, pad_w, 0, pad_h))
        lm = self.landmark(grid).flatten(2).transpose(1, 2)  # (B h, m, d)
        lm = self.landmark_act(self.landmark_norm(lm)).reshape(B, h, -1, d)

        out = kernel_attention(q, lm, v, self.newton_iters, self.sym_norm)  # (B, h, N, d)
        if self.v_conv is not None:
            vg = v.reshape(B, h, H, W, d).permute(0, 4, 1, 2, 3).reshape(B * d, h, H, W)
            vg = self.v_conv(vg).reshape(B, d, h, N).permute(0, 2, 3, 1)
            out = out + vg
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class SoftmaxAttention(nn.Module):
    """Standard multi-head softmax self-attention, with SOFT's call signature (``H``, ``W`` unused).

    Args:
        dim: token width.
        num_heads: attention heads; ``dim`` must divide by it.
        qkv_bias: biases on the q, k, v projections.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int = 2, qkv_bias: bool = True, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """``x: (B, N, C)`` -> ``(B, N, C)``; the grid size is accepted for interface parity only."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))
