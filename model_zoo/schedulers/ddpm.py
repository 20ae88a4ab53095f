"""Ancestral DDPM sampling (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models").

A thin wrapper over diffusers' ``DDPMScheduler``, which already implements the paper's sampler:
x̂0 from eq. (15), the posterior mean μ̃_t(x_t, x̂0) of eq. (7) and σ_t² = β̃_t ("fixed_small", §3.2), with
diffusers' "leading" respacing for fewer steps than training. What the wrapper adds:

- it is built from a :class:`NoiseSchedule` and uses its float64 ᾱ (diffusers keeps float32), so the
  coefficients match Kiln's DDIM; the arithmetic then runs in the sample's dtype;
- the Kiln contract: ``step`` takes the time step as an int, a 0-d tensor or a per-sample (N,) tensor
  (all equal: ancestral DDPM steps a batch at one time) and returns :class:`SamplerOutput`;
- ``clip_sample`` defaults to False like Kiln's other samplers (diffusers' default is True; pass True for
  pixel models trained on [-1, 1]).
"""

from __future__ import annotations

import diffusers
import torch

from model_zoo.schedulers.ddim import SamplerOutput, TimestepLike, as_timestep_tensor
from model_zoo.schedulers.schedule import NoiseSchedule

_VARIANCE_TYPES = ("fixed_small", "fixed_large")


class DDPMSampler:
    """Ancestral DDPM on a :class:`NoiseSchedule`, stochastic; seed it through ``step(generator=...)``.

    Args:
        schedule: the noise schedule the denoiser was trained on.
        clip_sample: clamp x̂0 to ±``clip_sample_range``.
        clip_sample_range: the clamp bound.
        variance_type: "fixed_small" (σ² = β̃_t, the posterior variance) or "fixed_large" (σ² = β_t).
    """

    init_noise_sigma = 1.0
    order = 1

    def __init__(
        self,
        schedule: NoiseSchedule,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        variance_type: str = "fixed_small",
    ):
        if variance_type not in _VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}; valid: {list(_VARIANCE_TYPES)}")
        self.schedule = schedule
        self.num_train_timesteps = schedule.num_train_timesteps
        self._inner = diffusers.DDPMScheduler(
            **schedule.diffusers_config(),
            clip_sample=clip_sample,
            clip_sample_range=clip_sample_range,
            variance_type=variance_type,
        )
        # the schedule's float64 ᾱ replaces diffusers' float32 copies (same schedule, more precise)
        self._inner.betas = schedule.betas()
        self._inner.alphas = 1.0 - self._inner.betas
        self._inner.alphas_cumprod = schedule.alphas_cumprod()
        self._inner.one = torch.tensor(1.0, dtype=torch.float64)

    @property
    def num_inference_steps(self) -> int | None:
        return self._inner.num_inference_steps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {num_inference_steps}"
            )
        self._inner.set_timesteps(num_inference_steps, device=device)

    @property
    def timesteps(self) -> torch.Tensor:
        """The train time steps of the sampling loop, descending (int64)."""
        self._require_timesteps()
        return self._inner.timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: TimestepLike | None = None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SamplerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step x_t → x_{t_prev}: posterior mean (eq. (7)) plus σ_t z, z from ``generator``."""
        self._require_timesteps()
        t = as_timestep_tensor(timestep, sample)
        if t.ndim == 1:
            if not bool((t == t[0]).all()):
                raise ValueError("DDPM steps the whole batch at one time step; got per-sample time steps")
            t = t[0]
        # diffusers' step promotes its 0-d float64 coefficients into the sample's dtype
        out = self._inner.step(model_output, int(t), sample, generator=generator)
        prev, x0 = out.prev_sample.to(sample.dtype), out.pred_original_sample.to(sample.dtype)
        return SamplerOutput(prev, x0) if return_dict else (prev, x0)

    def _require_timesteps(self) -> None:
        if self._inner.num_inference_steps is None:
            raise ValueError("call DDPMSampler.set_timesteps(num_inference_steps) first")
