"""Hallucination score from the trajectory of x̂0 (Aithal, Maini, Lipton & Kolter, NeurIPS 2024,
"Understanding Hallucinations in Diffusion Models through Mode Interpolation"; official code
locuslab/diffusion-model-hallucination, ``train_toy_filter.py``).

A sample that interpolates between modes keeps changing its mind about x̂0 late in the reverse process;
an in-support sample settles. The detector: record x̂0 at every reverse step, take its variance over the
last K steps (population variance, ``np.var`` in the official code), average it over the coordinates, one
score per sample. Filter by oversampling and keeping the lowest scores.

K: the paper uses the last 10 of 1000 steps (t = 9 … 0). Kiln samples in far fewer steps, where 10 steps can
be most of the trajectory; the score takes the last min(K, steps recorded), so K is capped at the number of
sampling steps, and its scale is only comparable between runs with the same sampler and step count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_LAST_K = 10  # the paper's window: the last 10 of 1000 reverse steps


def hallucination_score(
    x0_history: Sequence[torch.Tensor] | torch.Tensor, last_k: int = DEFAULT_LAST_K
) -> torch.Tensor:
    """Variance of x̂0 over the last ``last_k`` recorded steps, averaged over coordinates.

    Args:
        x0_history: x̂0 per step in sampling order: a sequence of (N, ...) tensors or one (steps, N, ...)
            tensor (``SampleResult.x0_history`` from ``loop.py``).
        last_k: how many of the last steps to use; capped at the number recorded.

    Returns:
        A float tensor of shape (N,): higher means more likely a hallucination.
    """
    history = torch.stack(list(x0_history)) if not isinstance(x0_history, torch.Tensor) else x0_history
    if last_k < 2:
        raise ValueError(f"last_k must be >= 2 (a variance needs two steps), got {last_k}")
    if history.ndim < 2 or history.shape[0] < 2:
        raise ValueError(f"need x̂0 from at least 2 steps, got {history.shape[0] if history.ndim else 0}")
    window = history[-last_k:].flatten(start_dim=2)  # (K, N, D)
    # Aithal et al.'s detector: Var over the last K steps of x̂0, then the mean over coordinates
    return window.var(dim=0, correction=0).mean(dim=1)


def filter_lowest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` lowest scores, lowest first: the samples to keep after oversampling."""
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (one per sample), got shape {tuple(scores.shape)}")
    if not 0 <= keep <= scores.shape[0]:
        raise ValueError(f"keep must be in [0, {scores.shape[0]}], got {keep}")
    return torch.argsort(scores, stable=True)[:keep]
