"""Performer (FAVOR+) encoder with a BiLSTM feed-forward block, for quantile forecasts of price series;
and the baselines that share its harness: the same network with softmax attention, and an LSTM.

Papers:

* Choromanski et al., "Rethinking Attention with Performers", ICLR 2021 (official code:
  google-research/google-research/performer). What is taken from it: FAVOR+ — softmax attention
  ``softmax(QKᵀ/√d) V`` approximated in linear time by positive random features (Lemma 1)
  ``φ(x) = exp(−‖x‖²/2) / √m · [exp(w₁ᵀx), …, exp(w_mᵀx)]`` with ``w_i ~ N(0, I_d)`` drawn as
  *orthogonal* random features (§2.4: Gaussian blocks orthogonalised by QR, rows rescaled to χ(d)
  norms), queries and keys scaled by ``d^-1/4`` so that ``E[φ(q)ᵀφ(k)] = exp(qᵀk/√d)``, and the
  attention ``D⁻¹ (φ(Q) (φ(K)ᵀ V))`` with ``D = diag(φ(Q) φ(K)ᵀ 1)`` (eq. 4 and §2.2); the projection
  is redrawn during training (the official code's ``feature_redraw``) and fixed for inference.
  Numerical stabilisation as in the official code: the largest exponent is subtracted before exp
  (per row for queries, over the whole sequence for keys), which cancels in D⁻¹.
* The crypto price-prediction paper (Performer + BiLSTM, see ``shared/PAPERS.md``): technical
  indicators in, a Performer encoder whose feed-forward block contains a BiLSTM. Its sizes were not
  published; ours are small enough to train in about a minute on two CPU cores.

Kiln's own parts: the quantile head — ``len(quantiles)`` outputs per horizon step, made monotone by
construction (the lowest plus a cumulative sum of softplus increments, so quantiles never cross), in units
of the window's volatility σ times √h (a random walk's spread as the prior), multiplied back so the
output is the h-step log-return log(C_{t+h}/C_t). Trained with the pinball loss (``training.forecasting``).

One export switch (``model_zoo.soft.exportable``, the zoo's): the random projection is a buffer, redrawn
only while training outside the exportable form; eval mode and export use the frozen buffer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo._registry import register_model
from model_zoo.soft import is_exportable

__all__ = [
    "FavorAttention",
    "QuantileForecaster",
    "favor_features",
    "lstm_forecaster",
    "orthogonal_gaussian",
    "performer_bilstm_forecaster",
    "softmax_bilstm_forecaster",
]

_EPS = 1e-6
DEFAULT_QUANTILES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(m, d) random features: orthogonal within each block of d rows, each row's norm χ(d)-distributed.

    §2.4 of the Performer paper (orthogonal random features, ORF): the rows of a QR-orthogonalised
    Gaussian matrix are exactly orthogonal; rescaling each to the norm of an independent N(0, I_d)
    vector keeps every row's marginal N(0, I_d), which is what Lemma 1's unbiasedness needs.
    """
    blocks = []
    for start in range(0, m, d):
        g = torch.randn(d, d, generator=generator)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r))  # Haar-distributed Q (Mezzadri 2007): fix QR's sign choice
        blocks.append(q.T[: min(d, m - start)])
    w = torch.cat(blocks)
    norms = torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)
    return w * norms


def favor_features(x: torch.Tensor, projection: torch.Tensor, is_query: bool) -> torch.Tensor:
    """Positive random features of Lemma 1: φ(x) = exp(wᵀx − ‖x‖²/2 − c) / √m (c: a stabiliser).

    ``x`` (..., L, d) is already scaled by d^-1/4. The stabiliser c is the row's largest exponent for
    queries and the sequence's largest for keys (official code), so it cancels in the D⁻¹ normalisation.
    """
    m = projection.shape[0]
    wx = x @ projection.T  # (..., L, m)
    sq = (x * x).sum(-1, keepdim=True) / 2
    stab = wx.amax(dim=-1, keepdim=True) if is_query else wx.amax(dim=(-2, -1), keepdim=True)
    return (torch.exp(wx - sq - stab.detach()) + _EPS) / math.sqrt(m)


class FavorAttention(nn.Module):
    """Bidirectional multi-head self-attention with FAVOR+ (or exact softmax with ``kind="softmax"``)."""

    def __init__(
        self, dim: int, heads: int, num_features: int, kind: str = "favor", redraw_interval: int = 1
    ):
        super().__init__()
        if kind not in ("favor", "softmax"):
            raise ValueError(f"unknown attention kind {kind!r}; valid: ['favor', 'softmax']")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.kind, self.heads, self.head_dim = kind, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.redraw_interval = redraw_interval
        # Frozen for inference and export; saved with the weights so serving uses the trained draw.
        self.register_buffer("projection", orthogonal_gaussian(num_features, self.head_dim))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a fresh orthogonal projection (training only)."""
        m, d = self.projection.shape
        self.projection.copy_(orthogonal_gaussian(m, d, generator))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, H, L, d) queries, keys, values → (B, H, L, d)."""
        if self.kind == "softmax":
            return F.scaled_dot_product_attention(q, k, v)
        scale = self.head_dim**-0.25  # q·k/√d = (d^-1/4 q)·(d^-1/4 k)
        qp = favor_features(q * scale, self.projection, is_query=True)  # (B, H, L, m)
        kp = favor_features(k * scale, self.projection, is_query=False)
        kv = kp.transpose(-2, -1) @ v  # (B, H, m, d): φ(K)ᵀ V, linear in L
        denom = qp @ kp.sum(dim=-2, keepdim=True).transpose(-2, -1)  # D = φ(Q) (φ(K)ᵀ 1)
        return (qp @ kv) / denom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "favor" and self.training and not is_exportable():
            if int(self.calls) % self.redraw_interval == 0:
                self.redraw()
            self.calls += 1
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return self.out(self.attend(q, k, v).transpose(1, 2).flatten(2))


class BiLSTMFeedForward(nn.Module):
    """The feed-forward block as a BiLSTM over the sequence, projected back to the model width."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.lstm(x)[0]))


class _Block(nn.Module):
    def __init__(self, dim, heads, num_features, kind, lstm_hidden, dropout, redraw_interval):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = FavorAttention(dim, heads, num_features, kind, redraw_interval)
        self.ff = BiLSTMFeedForward(dim, lstm_hidden, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.ff(self.norm2(x))


class QuantileHead(nn.Module):
    """Pre-logits (B, D) → non-crossing quantiles of the h-step log-return (B, H, Q)."""

    def __init__(self, dim: int, horizon: int, num_quantiles: int):
        super().__init__()
        self.horizon, self.num_quantiles = horizon, num_quantiles
        self.fc = nn.Linear(dim, horizon * num_quantiles)
        self.register_buffer("sqrt_h", torch.arange(1, horizon + 1, dtype=torch.float32).sqrt()[:, None])

    def forward(self, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raw = self.fc(z).unflatten(-1, (self.horizon, self.num_quantiles))
        low, steps = raw[..., :1], F.softplus(raw[..., 1:])
        q = torch.cat([low, low + torch.cumsum(steps, dim=-1)], dim=-1)  # monotone in the quantile level
        return q * (scale[:, :, None] * self.sqrt_h)  # σ units × √h → log-return


class QuantileForecaster(nn.Module):
    """(features (B, L, F), σ (B, 1)) → quantiles (B, H, Q) of log(C_{t+h}/C_t).

    ``encoder="performer"`` (FAVOR+ attention) or ``"softmax"`` (the same network with exact attention)
    stack ``depth`` blocks of attention + BiLSTM feed-forward; ``encoder="lstm"`` is a plain
    ``depth``-layer LSTM of width ``dim``. All read the last position's representation.
    """

    def __init__(
        self,
        *,
        encoder: str,
        num_inputs: int,
        context: int,
        horizon: int,
        quantiles: tuple[float, ...],
        dim: int,
        depth: int,
        heads: int,
        num_features: int,
        lstm_hidden: int,
        dropout: float,
        redraw_interval: int,
    ):
        super().__init__()
        if encoder not in ("performer", "softmax", "lstm"):
            raise ValueError(f"unknown encoder {encoder!r}; valid: ['performer', 'softmax', 'lstm']")
        qs = tuple(float(q) for q in quantiles)
        if list(qs) != sorted(set(qs)) or not all(0 < q < 1 for q in qs):
            raise ValueError(f"quantiles must be increasing and in (0, 1), got {list(qs)}")
        self.encoder, self.context, self.horizon, self.quantiles = encoder, context, horizon, qs
        self.embed = nn.Linear(num_inputs, dim)
        if encoder == "lstm":
            self.lstm = nn.LSTM(
                dim, dim, num_layers=depth, batch_first=True, dropout=dropout if depth > 1 else 0
            )
        else:
            self.pos = nn.Parameter(torch.zeros(1, context, dim))
            nn.init.trunc_normal_(self.pos, std=0.02)
            kind = "favor" if encoder == "performer" else "softmax"
            self.blocks = nn.ModuleList(
                _Block(dim, heads, num_features, kind, lstm_hidden, dropout, redraw_interval)
                for _ in range(depth)
            )
        self.norm = nn.LayerNorm(dim)
        self.head = QuantileHead(dim, horizon, len(qs))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last position's representation (B, dim): the pre-logits."""
        h = self.embed(x)
        if self.encoder == "lstm":
            h = self.lstm(h)[0]
        else:
            h = h + self.pos
            for block in self.blocks:
                h = block(h)
        return self.norm(h[:, -1])

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(features), scale)


def _forecaster(encoder: str, **kw) -> QuantileForecaster:
    kw["quantiles"] = tuple(kw["quantiles"])  # the saved config holds a JSON list
    return QuantileForecaster(encoder=encoder, **kw)


@register_model
def performer_bilstm_forecaster(
    num_inputs: int = 18,
    context: int = 48,
    horizon: int = 10,
    quantiles: tuple = DEFAULT_QUANTILES,
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
    num_features: int = 32,  # m random features per head (head dim 8): m ≥ d log d
    lstm_hidden: int = 32,
    dropout: float = 0.1,
    redraw_interval: int = 1,  # training forward passes between redraws of the projection
) -> QuantileForecaster:
    """Performer (FAVOR+) encoder, BiLSTM feed-forward, quantile head."""
    return _forecaster("performer", **locals())


@register_model
def softmax_bilstm_forecaster(
    num_inputs: int = 18,
    context: int = 48,
    horizon: int = 10,
    quantiles: tuple = DEFAULT_QUANTILES,
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
    num_features: int = 32,  # unused by softmax attention (kept so the two configs match)
    lstm_hidden: int = 32,
    dropout: float = 0.1,
    redraw_interval: int = 1,
) -> QuantileForecaster:
    """Baseline: the same network with exact softmax attention (same parameter count)."""
    return _forecaster("softmax", **locals())


@register_model
def lstm_forecaster(
    num_inputs: int = 18,
    context: int = 48,
    horizon: int = 10,
    quantiles: tuple = DEFAULT_QUANTILES,
    dim: int = 48,
    depth: int = 2,
    heads: int = 1,  # unused
    num_features: int = 0,  # unused
    lstm_hidden: int = 0,  # unused
    dropout: float = 0.1,
    redraw_interval: int = 1,  # unused
) -> QuantileForecaster:
    """Baseline: a stacked LSTM over the same inputs, same quantile head."""
    return _forecaster("lstm", **locals())
