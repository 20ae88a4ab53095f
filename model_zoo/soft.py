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

:func:`kernel_attention` is the formulation written out plainly (the reference the tests hold the
module to); :meth:`SoftAttention.forward` computes the same numbers arranged for speed on CPU (one GEMM
per ``O(N m)`` step, no permuted copies, few fresh allocations) -- its docstring gives the measurements.
"""

from __future__ import annotations

import contextlib
import math
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
# Lower clamp of Gaussian-kernel exponents (see _exp_of_exponent): the first float at or above
# log(smallest normal), so exp never returns a subnormal.
_EXP_FLOOR = {torch.float32: -87.33, torch.float64: -708.39}


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
    """``iters`` Newton-Schulz steps of the paper, ``V_{k+1} = 2 V_k - V_k (A V_k)``, from ``V_0 = v``.

    The matrices are flattened to one batch (both heads, every image), so each step is two batched
    GEMMs: ``T = A V`` (``bmm``) and ``2 V - V T`` as one ``baddbmm`` (``beta=2, alpha=-1``) instead of
    a matmul, a scale and a subtraction. Outside autograd and export the steps ping-pong between
    preallocated buffers (``out=``); the arithmetic is the same kernel either way, so both forms give
    bit-identical results. At 64 landmarks x 2 heads this took 20 steps from 0.50 ms to 0.37 ms (one
    thread, interleaved) -- the ~46 small bmm calls of the issue's profile.
    """
    m = a.shape[-1]
    batch = a.shape[:-2]
    # Contiguous in both forms, so the GEMMs see the same layouts and round identically. V0 is the
    # caller's fresh temporary; the buffered form below reuses it.
    a3, v = a.reshape(-1, m, m).contiguous(), v.reshape(-1, m, m).contiguous()
    if _EXPORTABLE or (torch.is_grad_enabled() and (a3.requires_grad or v.requires_grad)):
        for _ in range(iters):  # a fixed count, so it unrolls in the exported graph
            v = torch.baddbmm(v, v, torch.bmm(a3, v), beta=2, alpha=-1)
        return v.reshape(*batch, m, m)
    t, nxt = torch.empty_like(v), torch.empty_like(v)
    for _ in range(iters):
        torch.bmm(a3, v, out=t)
        torch.baddbmm(v, v, t, beta=2, alpha=-1, out=nxt)
        v, nxt = nxt, v
    return v.reshape(*batch, m, m)


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
    # Index of the first candidate that passes, the last if none does: a Where and a ReduceMin in ONNX
    # (a CumSum over the pass flags, the previous form, cost onnxruntime 0.4 ms of a 6.7 ms layer).
    index = torch.arange(_MAX_HALVINGS + 1, device=a.device)
    first = torch.where(norms <= _RESIDUAL_THRESHOLD, index, _MAX_HALVINGS).amin(-1, keepdim=True)
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


def _exp_of_exponent(e: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``exp(e)`` for a Gaussian-kernel exponent ``e = -||a - b||^2 / 2``, clamped to ``[log(tiny), 0]``.

    The upper clamp is :func:`gaussian_kernel`'s ``sq.clamp(min=0)`` (cancellation). The lower one keeps
    ``exp`` on its fast path: torch's vectorised float32 ``exp`` falls back to a slow path for arguments
    below ``log(FLT_MIN) ~ -87.34`` (subnormal or zero results; 25 ms instead of 0.18 ms for 524k entries
    in torch 2.13 on this CPU), and the result changes by less than ``FLT_MIN`` (1.2e-38).
    """
    floor = _EXP_FLOOR.get(e.dtype, -math.inf)
    if in_place:
        return e.clamp_(floor, 0.0).exp_()
    return e.clamp(floor, 0.0).exp()


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
        """``x: (B, N, C)`` with ``N = H * W`` -> ``(B, N, C)``.

        The paper's computation, arranged so that every ``O(N)`` step is one large GEMM or one pass over
        memory, in the ``(B, N, C)`` layout the linear layers produce, with as few large temporaries as
        possible (on this VM a fresh page costs ~2.4 us to fault in: at 4096 tokens the previous form
        spent about half its time in the kernel). Per step, one thread, interleaved against the
        previous form (dim 64, 2 heads, 64 landmarks):

        * landmarks: the convolution with kernel = stride = ratio is a patchify; one matmul of the
          ``(B h m, r r d)`` patches by the reshaped kernel replaces ``Conv2d`` on a permuted copy of Q
          (0.65 -> 0.22 ms at 4096 tokens, 13.7 -> 0.87 ms at 16384);
        * ``K(Q, Q~)``: the paper's ``exp(-||q - q~||^2 / 2)`` as ``exp(q.q~ - |q|^2/2 - |q~|^2/2)``; the two
          norm terms fill the ``(B h, N, m)`` result and one ``baddbmm_`` adds ``q.q~`` into it, reading
          the heads of Q in place (strided); under autograd / export, one GEMM of augmented operands
          ``[q, -|q|^2/2, 1] . [q~, 1, -|q~|^2/2]^T`` instead. Then one clamp and an in-place ``exp``;
        * the exponent is floored at ``log(float32 tiny)``: torch's vectorised ``exp`` drops to a slow
          path for arguments whose result is subnormal, and far-apart token / landmark pairs (long
          sequences, random weights) land there -- 25 ms instead of 0.18 ms for 2 x 4096 x 64 entries.
          An entry changes by less than 1.2e-38 (see ``_exp_of_exponent``);
        * bracketing ``K(Q, Q~) . (pinv . (K(Q~, Q) . V))``: the ``N m^2`` product of ``K(Q, Q~)`` with the
          ``m x m`` inverse becomes an ``m^2 d`` one (a quarter of the layer's FLOPs at 64 landmarks);
        * the depthwise convolution on V runs channels-last on the ``(B, H, W, C)`` view of V, with the
          per-head kernel repeated over the head's channels: no permuted copies, and oneDNN's
          channels-last depthwise kernel (11.3 -> 0.17 ms at 4096 tokens, bit-identical); at batch 1
          the attention is then accumulated into the conv's output (``baddbmm_`` on its strided heads);
        * the Newton steps are batched ``baddbmm`` calls on preallocated buffers (see
          ``_newton_iterations``).

        The whole layer, one thread, CPU time, median of interleaved rounds: 4096 tokens 18.8 -> 6.1 ms
        (SDPA 46 ms), 16384 tokens 101 -> 26 ms (SDPA 728 ms); the vit-soft block (64 tokens, ratio 2)
        at batch 32, forward + backward, 25.6 -> 11.9 ms.

        Same parameters and the same numbers as the reference formulation (:func:`kernel_attention`
        with ``Conv2d`` landmarks), to float32 rounding; ``tests/unit/model_zoo/test_soft_fast.py``
        checks outputs and gradients against it.
        """
        B, N, C = x.shape
        if N != H * W:
            raise ValueError(f"got {N} tokens for an {H}x{W} grid")
        h, d = self.num_heads, self.head_dim
        in_place = not torch.is_grad_enabled() and not _EXPORTABLE
        q = self.q(x)
        q = q.mul_(self.scale) if in_place else q * self.scale  # (B, N, C) = (B, H, W, h, d)
        v = self.v(x)

        lm = self._landmarks(q, B, H, W)  # Q~: (B h, m, d)
        qh = q.view(B, N, h, d).transpose(1, 2).reshape(B * h, N, d)  # a view when B == 1
        # Gaussian kernel of the paper, S(q, k) = exp(-||q - k||^2 / 2), expanded as
        # exp(q.k - |q|^2 / 2 - |k|^2 / 2): the norms fill the (B h, N, m) result, one GEMM adds q.k.
        half_q = torch.linalg.vector_norm(q.view(B, N, h, d), dim=-1).transpose(1, 2).reshape(B * h, N, 1)
        half_q = half_q.square().mul(-0.5)  # -|q|^2 / 2: (B h, N, 1)
        half_lm = lm.pow(2).sum(-1, keepdim=True).mul(-0.5)  # -|q~|^2 / 2: (B h, m, 1)
        if in_place:  # the norms fill the (B h, N, m) result, one GEMM adds q.q~ into it
            e = torch.add(half_q, half_lm.transpose(-1, -2)).baddbmm_(qh, lm.transpose(-1, -2))
        else:  # autograd / export: one GEMM of the augmented operands [q, -|q|^2/2, 1] . [q~, 1, -|q~|^2/2]
            q_aug = torch.cat([qh, half_q, torch.ones_like(half_q)], -1)
            lm_aug = torch.cat([lm, torch.ones_like(half_lm), half_lm], -1)
            e = q_aug @ lm_aug.transpose(-1, -2)
        k_nm = _exp_of_exponent(e, in_place)  # K(Q, Q~): (B h, N, m)
        k_mm = gaussian_kernel(lm, lm)  # K(Q~, Q~): (B h, m, m)
        k_inv = newton_pinv(k_mm, self.newton_iters)
        if self.sym_norm:
            dn = k_mm.sum(-1).rsqrt()  # SOFT-Norm: D^-1/2 . pinv . D^-1/2, D = row sums of K(Q~, Q~)
            k_inv = dn.unsqueeze(-1) * k_inv * dn.unsqueeze(-2)
        vh = v.view(B, N, h, d).transpose(1, 2).reshape(B * h, N, d)  # a view when B == 1
        # S V ~= K(Q, Q~) . pinv(K(Q~, Q~)) . K(Q~, Q) . V, bracketed right to left: no N x N, no N x m x m.
        z = k_inv @ (k_nm.transpose(-1, -2) @ vh)  # (B h, m, d)
        if self.v_conv is None:
            out = (k_nm @ z).view(B, h, N, d).transpose(1, 2).reshape(B, N, C)
        else:
            vc = self._v_conv(v, B, H, W).reshape(B, N, C)  # (B, N, h d), contiguous
            if in_place and B == 1:  # accumulate the attention into the conv output, heads strided
                vc.view(N, h, d).transpose(0, 1).baddbmm_(k_nm, z)
                out = vc
            else:
                out = vc + (k_nm @ z).view(B, h, N, d).transpose(1, 2).reshape(B, N, C)
        if in_place:  # Q is dead: the projection writes into its memory instead of fresh pages
            proj = torch.addmm(self.proj.bias, out.view(B * N, C), self.proj.weight.t(), out=q.view(B * N, C))
            return self.proj_drop(proj.view(B, N, C))
        return self.proj_drop(self.proj(out))

    def _landmarks(self, q: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
        """Landmarks ``Q~ = GELU(LayerNorm(Conv_{r x r, stride r}(Q)))`` per head: ``(B h, m, d)``.

        The convolution with kernel = stride = r is a patchify followed by one GEMM: the ``(B h m, r r d)``
        patches (one copy of Q) times the kernel reshaped to ``(r r d, d)``.

        The exportable form keeps ``Conv2d`` (on the per-head grid, as before): a GEMM by a reshaped
        constant is a weight-bearing ``MatMul`` that int8-static quantisation (``export/quantize.py``)
        would then quantise, changing the int8 graphs of the SOFT models; onnxruntime runs the ``Conv`` as
        fast as the GEMM at 4096 tokens (6.15 vs 6.23 ms per layer, one thread, interleaved) and 10%
        slower at 16384 (25.6 vs 22.9 ms).
        """
        h, d, r = self.num_heads, self.head_dim, self.landmark_ratio
        pad_h, pad_w = -H % r, -W % r
        if _EXPORTABLE:  # see the docstring
            grid = q.view(B, H, W, h, d).permute(0, 3, 4, 1, 2).reshape(B * h, d, H, W)
            lm = self.landmark(F.pad(grid, (0, pad_w, 0, pad_h))).flatten(2).transpose(1, 2)
            return self.landmark_act(self.landmark_norm(lm))
        grid = q.view(B, H, W, h * d)
        if pad_h or pad_w:  # zero padding at the bottom / right, as Conv2d on the padded grid
            grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
        gh, gw = (H + pad_h) // r, (W + pad_w) // r
        # (B, gh, r, gw, r, h, d) -> (B, h, gh, gw, r, r, d): a row per landmark, patch in (ki, kj, c) order
        patches = (
            grid.reshape(B, gh, r, gw, r, h, d)
            .permute(0, 5, 1, 3, 2, 4, 6)
            .reshape(B * h, gh * gw, r * r * d)
        )
        weight = self.landmark.weight.permute(2, 3, 1, 0).reshape(
            r * r * d, d
        )  # (out, in, ki, kj) -> (ki kj in, out)
        return self.landmark_act(self.landmark_norm(patches @ weight))

    def _v_conv(self, v: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
        """Depthwise conv on V (per head, shared over its channels), run channels-last: ``(B, H, W, C)``."""
        conv = self.v_conv
        d = self.head_dim
        h, k = conv.weight.shape[0], conv.weight.shape[-1]
        # (h, 1, k, k) -> (h d, 1, k, k): channel c uses head c // d's kernel
        weight = conv.weight.expand(h, d, k, k).reshape(h * d, 1, k, k)
        grid = v.view(B, H, W, -1).permute(0, 3, 1, 2)  # (B, C, H, W) view in channels-last layout
        out = F.conv2d(grid, weight, padding=conv.padding, groups=grid.shape[1])
        return out.permute(0, 2, 3, 1)


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
