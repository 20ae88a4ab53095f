"""Noise schedules: β_t for t = 0..T-1 and the cumulative products ᾱ_t that every sampler reads.

The conventions are diffusers' (``DDPMScheduler`` / ``DDIMScheduler`` ``beta_schedule``), so a Kiln
sampler and a diffusers scheduler built from the same :class:`NoiseSchedule` see the same ᾱ_t:

- ``linear``: β linearly spaced from 1e-4 to 0.02 (Ho et al. 2020, DDPM §4);
- ``cosine``: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008, β clipped at 0.999 (Nichol & Dhariwal
  2021, eq. 17; diffusers' ``squaredcos_cap_v2``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

SCHEDULES = ("linear", "cosine")
_DIFFUSERS_NAMES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


@dataclass(frozen=True)
class NoiseSchedule:
    """A named schedule over ``num_train_timesteps`` steps; saved in the artifact as a dict."""

    kind: str = "cosine"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4  # linear only
    beta_end: float = 0.02  # linear only

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.kind!r}; valid: {list(SCHEDULES)}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    def betas(self) -> torch.Tensor:
        """β_t, float64, shape (T,)."""
        T = self.num_train_timesteps
        if self.kind == "linear":
            return torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)

        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float64
        )

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t = ∏_{s≤t} (1 − β_s), float64, shape (T,)."""
        return torch.cumprod(1.0 - self.betas(), dim=0)

    def diffusers_config(self) -> dict:
        """Keyword arguments that build a diffusers scheduler on the same ᾱ_t."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": _DIFFUSERS_NAMES[self.kind],
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    def to_dict(self) -> dict:
        return asdict(self)
