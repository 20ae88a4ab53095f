"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"), ε-prediction, with η.

What it takes from the paper:

- eq. (12): x_{t-1} = √ᾱ_{t-1} · x̂0 + √(1 − ᾱ_{t-1} − σ_t²) · ε + σ_t · z, with the predicted
  x̂0 = (x_t − √(1 − ᾱ_t) · ε) / √ᾱ_t;
- eq. (16): σ_t(η) = η · √((1 − ᾱ_{t-1}) / (1 − ᾱ_t)) · √(1 − ᾱ_t / ᾱ_{t-1}); η = 0 is the
  deterministic sampler, η = 1 the DDPM posterior;
- §4.3 / eq. (13): with η = 0 the update is an Euler step of an ODE, so it can be run backwards
  (x0 → x_T) by evaluating ε at the current state: :meth:`DDIMSampler.inverse_step`. That inversion
  is approximate (ε(x_{t-1}, t) stands in for ε(x_t, t)); BDIA (``bdia.py``) makes it exact.

The contract and the numbers are diffusers' ``DDIMScheduler`` with its defaults, so the two agree step
for step: "leading" spacing (t_k = k · ⌊T/n⌋, descending, ``steps_offset`` 0), the previous time step
of t is t − ⌊T/n⌋, and below 0 the final ᾱ is 1 (``set_alpha_to_one=True``) or ᾱ_0. Unlike diffusers,
``clip_sample`` defaults to False: clipping x̂0 breaks the invertibility BDIA and inversion rely on.

All arithmetic runs in the dtype of the sample: ᾱ is kept in float64 and cast at each step, so a
float64 exactness test is float64 throughout and float32 serving is float32 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_zoo.schedulers.schedule import NoiseSchedule

TimestepLike = int | torch.Tensor


@dataclass
class SamplerOutput:
    """What every Kiln sampler's ``step`` returns (diffusers' ``DDIMSchedulerOutput`` fields)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def leading_timesteps(num_train_timesteps: int, num_inference_steps: int) -> torch.Tensor:
    """Diffusers' "leading" spacing: k · ⌊T/n⌋ for k = n-1, ..., 0 (int64, descending)."""
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, {num_train_timesteps}] (the schedule's train steps), "
            f"got {num_inference_steps}"
        )
    step_ratio = num_train_timesteps // num_inference_steps
    return (torch.arange(num_inference_steps, dtype=torch.int64) * step_ratio).flip(0)


def as_timestep_tensor(timestep: TimestepLike, sample: torch.Tensor) -> torch.Tensor:
    """A python int, a 0-d tensor or a per-sample (N,) tensor, as an int64 tensor on the sample's device."""
    t = torch.as_tensor(timestep, device=sample.device)
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"timesteps must be whole train steps, got {t}")
    t = t.long()
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != sample.shape[0]):
        raise ValueError(
            f"timestep must be an int, a 0-d tensor or shape ({sample.shape[0]},) for a batch of "
            f"{sample.shape[0]}; got shape {tuple(t.shape)}"
        )
    return t


def alpha_at(
    alphas_cumprod: torch.Tensor, final_alpha: float, t: torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """ᾱ_t in the sample's dtype, shaped to broadcast against it; t < 0 reads the final ᾱ.

    ``t`` is 0-d (one time for the batch) or (N,) (one per sample).
    """
    table = alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
    if t.ndim == 0 and int(t) >= table.shape[0]:
        raise ValueError(f"timestep {int(t)} is outside the schedule's {table.shape[0]} train steps")
    if t.ndim == 1 and int(t.max()) >= table.shape[0]:
        raise ValueError(f"timestep {int(t.max())} is outside the schedule's {table.shape[0]} train steps")
    final = torch.tensor(final_alpha, device=sample.device, dtype=sample.dtype)
    alpha = torch.where(t >= 0, table[t.clamp(min=0)], final)
    if alpha.ndim == 1:
        alpha = alpha.view(-1, *([1] * (sample.ndim - 1)))
    return alpha


def ddim_transfer(
    sample: torch.Tensor, eps: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic (η = 0) DDIM map from level ᾱ_from to level ᾱ_to, either direction.

    Returns (the moved sample, x̂0). Both directions are the same formula: downwards it is the sampling
    step, upwards the inversion step.
    """
    # eq. (12) of DDIM: predicted x0
    x0 = (sample - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    # eq. (12) of DDIM with σ = 0: "predicted x0" term + "direction pointing to x_t" term
    return alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps, x0


class DDIMSampler:
    """Kiln's DDIM on a :class:`NoiseSchedule`, with diffusers' scheduler contract.

    Args:
        schedule: the noise schedule the denoiser was trained on.
        eta: η of eq. (16); 0 is deterministic. ``step(eta=...)`` overrides it for one step (diffusers'
            pipelines pass their own ``eta``).
        clip_sample: clamp x̂0 to ±``clip_sample_range`` (diffusers' default is True; Kiln's is False).
        clip_sample_range: the clamp bound.
        set_alpha_to_one: the ᾱ after the last step: 1 if True, else ᾱ_0 (diffusers' option).
    """

    init_noise_sigma = 1.0  # x_T ~ N(0, I); diffusers' pipelines scale the initial noise by this
    order = 1

    def __init__(
        self,
        schedule: NoiseSchedule,
        eta: float = 0.0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
    ):
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.schedule = schedule
        self.num_train_timesteps = schedule.num_train_timesteps
        self.alphas_cumprod = schedule.alphas_cumprod()  # float64, cast per step
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.eta = eta
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.num_inference_steps: int | None = None
        self._timesteps: torch.Tensor | None = None

    # -- the diffusers contract ---------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self.num_inference_steps = num_inference_steps
        self._timesteps = leading_timesteps(self.num_train_timesteps, num_inference_steps).to(device)

    @property
    def timesteps(self) -> torch.Tensor:
        """The train time steps of the sampling loop, descending (int64)."""
        return self._require_timesteps()

    def scale_model_input(self, sample: torch.Tensor, timestep: TimestepLike | None = None) -> torch.Tensor:
        return sample  # DDIM feeds x_t to the denoiser unscaled

    def previous_timestep(self, timestep: TimestepLike) -> TimestepLike:
        """t − ⌊T/n⌋; negative after the last step (then the final ᾱ applies)."""
        self._require_timesteps()
        return timestep - self.num_train_timesteps // self.num_inference_steps

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        eta: float | None = None,
        use_clipped_model_output: bool | None = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SamplerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from ``timestep`` (int, 0-d or per-sample (N,)) to the previous time step.

        Args:
            model_output: ε predicted at (sample, timestep).
            timestep: the time step the denoiser saw.
            sample: x_t.
            eta: η for this step; None uses the sampler's.
            use_clipped_model_output: recompute ε from the clipped x̂0 (diffusers' option).
            generator: draws the η > 0 noise (diffusers draws it the same way, so seeds agree).
            variance_noise: the η > 0 noise itself, instead of drawing it.
            return_dict: False returns (prev_sample, pred_original_sample).
        """
        t = as_timestep_tensor(timestep, sample)
        return self._step_to(
            model_output,
            t,
            self.previous_timestep(t),
            sample,
            eta,
            use_clipped_model_output,
            generator,
            variance_noise,
            return_dict,
        )

    def inverse_step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SamplerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One deterministic DDIM inversion step: ``sample`` at the previous level of ``timestep`` → level t.

        Iterate ``for t in reversed(sampler.timesteps)`` from x0, with ``model_output`` = ε(sample, t): the
        usual approximation ε(x_{t-1}, t) ≈ ε(x_t, t), so decoding the result with :meth:`step` only
        approximately returns to x0 (the error BDIA removes).
        """
        t = as_timestep_tensor(timestep, sample)
        alpha_t = alpha_at(self.alphas_cumprod, self.final_alpha_cumprod, t, sample)
        alpha_from = alpha_at(
            self.alphas_cumprod, self.final_alpha_cumprod, self.previous_timestep(t), sample
        )
        # eq. (13) of DDIM read upwards: the η = 0 ODE step from ᾱ_{t-1} to ᾱ_t
        moved, x0 = ddim_transfer(sample, model_output, alpha_from, alpha_t)
        return SamplerOutput(moved, x0) if return_dict else (moved, x0)

    # -- shared with the DDIM variants (time shift, BDIA) ---------------------------------------------
    def _require_timesteps(self) -> torch.Tensor:
        if self._timesteps is None:
            raise ValueError(f"call {type(self).__name__}.set_timesteps(num_inference_steps) first")
        return self._timesteps

    def _step_to(
        self,
        model_output: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor,
        sample: torch.Tensor,
        eta: float | None,
        use_clipped_model_output: bool | None,
        generator: torch.Generator | None,
        variance_noise: torch.Tensor | None,
        return_dict: bool,
    ) -> SamplerOutput | tuple[torch.Tensor, torch.Tensor]:
        """The DDIM update from time t to time t_prev (each 0-d or per-sample)."""
        eta = self.eta if eta is None else eta
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        alpha_t = alpha_at(self.alphas_cumprod, self.final_alpha_cumprod, t, sample)
        alpha_prev = alpha_at(self.alphas_cumprod, self.final_alpha_cumprod, t_prev, sample)
        eps = model_output
        # eq. (12) of DDIM: predicted x0
        x0 = (sample - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            if use_clipped_model_output:
                eps = (sample - alpha_t.sqrt() * x0) / (1 - alpha_t).sqrt()
        # eq. (16) of DDIM: σ_t(η)
        sigma = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()
        # eq. (12) of DDIM: √ᾱ_{t-1} x̂0 + √(1 − ᾱ_{t-1} − σ²) ε (+ σ z below)
        prev = alpha_prev.sqrt() * x0 + (1 - alpha_prev - sigma**2).sqrt() * eps
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is None:
                rand_device = generator.device if generator is not None else sample.device
                variance_noise = torch.randn(
                    model_output.shape, generator=generator, device=rand_device, dtype=model_output.dtype
                ).to(sample.device)
            prev = prev + sigma * variance_noise
        return SamplerOutput(prev, x0) if return_dict else (prev, x0)
