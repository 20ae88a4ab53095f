"""BDIA-DDIM (Zhang, Lewis & Kleijn, ECCV 2024, "Exact Diffusion Inversion via Bi-directional Integration
Approximation"; official code guoqiang-zhang-x/BDIA): DDIM made time-reversible, so image → latent → image
is exact up to floating point with one network evaluation per step.

Notation. Sampling runs over states s_0 (noise end, time τ_0) … s_n (the image), τ_0 > … > τ_{n-1} the
DDIM time steps and τ_n the final level (ᾱ = 1). The paper indexes the same chain downwards: z_i is the
state at t_i, z_{i+1} the noisier and z_{i-1} the cleaner neighbour. ε_i = ε_θ(z_i, t_i), and

    D(z_i; t_i→t_j) = √ᾱ_j · (z_i − √(1−ᾱ_i) ε_i)/√ᾱ_i + √(1−ᾱ_j) ε_i     (DDIM eq. (12), η = 0)
    Δ(t_i→t_j | z_i) = D(z_i; t_i→t_j) − z_i                              (an integration approximation)

Derivation. Over two intervals the ODE gives z_{i-1} = z_{i+1} + ∫_{t_{i+1}}^{t_i} d + ∫_{t_i}^{t_{i-1}} d.
The second integral is approximated forwards from z_i: Δ(t_i→t_{i-1} | z_i). For the first one there are
two estimates: the states themselves, z_i − z_{i+1}, and the backward approximation from z_i,
−Δ(t_i→t_{i+1} | z_i). BDIA takes the convex combination (1 − γ)·(z_i − z_{i+1}) + γ·(−Δ(t_i→t_{i+1}|z_i)):

    z_{i-1} = z_{i+1} + (1−γ)(z_i − z_{i+1}) − γ Δ(t_i→t_{i+1}|z_i) + Δ(t_i→t_{i-1}|z_i)
            = γ (z_{i+1} − Δ(t_i→t_{i+1}|z_i)) + (1 − γ) z_i + Δ(t_i→t_{i-1}|z_i)     (PAPERS.md's form)
            = D(z_i; t_i→t_{i-1}) + γ (z_{i+1} − D(z_i; t_i→t_{i+1}))                (expand Δ = D − z_i)

γ = 0 is plain DDIM; γ = 1 is the symmetric (leapfrog-like) scheme. The update is linear in z_{i+1} with
coefficient γ and needs ε only at z_i, so for γ > 0

    z_{i+1} = D(z_i; t_i→t_{i+1}) + (z_{i-1} − D(z_i; t_i→t_{i-1})) / γ

recovers the noisier state from (z_i, z_{i-1}) with the same single evaluation ε(z_i, t_i): that is the exact
inverse. Kiln computes both directions in this last form (one DDIM map each way, no cancellation of z_i).
The published README writes the combination with γ on z_i instead (its γ is Kiln's 1 − γ); Kiln follows
PAPERS.md's form, where γ weighs the backward estimate, and the tests pin the round trip.

The paper's first step has only z_{i+1} = x_T: it is plain DDIM. So sampling from noise is
    s_1 = D(s_0; τ_0→τ_1),   s_{k+1} = D(s_k; τ_k→τ_{k+1}) + γ (s_{k-1} − D(s_k; τ_k→τ_{k-1})),  k = 1…n-1.

Encode (image → latent), and why the latent is a pair. Running the inverse recursion needs two adjacent
states. Kiln starts it from (s_n, s_{n-1}) = (x0, z) where z is one plain DDIM inversion step of x0
(ε(x0, τ_{n-1}), from ᾱ = 1 to ᾱ_{τ_{n-1}}). *Any* z would do for exactness: the inverse step at k = n-1
computes s_{n-2} precisely so that the decoder's last step maps (s_{n-2}, s_{n-1}) onto x0 bit for bit (up to
rounding); the DDIM choice just keeps z on the trajectory. The recursion then runs k = n-1 … 1 and ends at
(s_0, s_1) = (``latent``, ``previous``). Decoding does *not* replay the plain DDIM first step: solving
s_1 = D(s_0; τ_0→τ_1) for s_0 is implicit in ε and has no exact one-evaluation solution, and the encoded
pair in general does not satisfy it. Instead the decoder is seeded with both states
(:meth:`BDIASampler.start_from_pair`) and runs the BDIA steps k = 1 … n-1. Encoding costs n evaluations,
decoding n − 1.

Stability, and the default γ = 1. Backwards the recursion has a parasitic mode that grows like 1/γ per step
(forwards it decays like γ): the characteristic roots of z_{i-1} = γ z_{i+1} + f(z_i) with f' ≈ 1 − γ are 1
and −γ forwards, 1 and −1/γ backwards. Every step's truncation error excites that mode, so for γ < 1 the
encoded pair grows like (1/γ)^n and decoding it loses about (1/γ)^n · machine-ε: measured with a random
conv net ε, γ = 0.5 round-trips to ~1e-13 at 20 steps but ~1e-4 at 50 (latent ~1e11) in float64, and only
to ~2e-4 at 20 steps in float32. γ = 1 keeps the pair bounded (the mode neither grows nor decays) and
round-trips to ~1e-15 (float64) / ~1e-6 (float32) at any step count tested, so it is the default: Kiln
serves BDIA for exact inversion. For sampling from noise alone the paper prefers γ ≈ 0.5 at few steps
(γ ≈ 1 at ~100 steps, 0.92–1.0 for editing).

In a diffusers pipeline the sampler keeps the previous state itself, so the plain ``step`` contract works
(``DDIMPipeline``: assign ``pipe.scheduler = sampler`` after construction, its constructor converts
schedulers to diffusers' DDIM).
"""

from __future__ import annotations

import torch

from model_zoo.schedulers.ddim import (
    DDIMSampler,
    SamplerOutput,
    TimestepLike,
    alpha_at,
    as_timestep_tensor,
    ddim_transfer,
)
from model_zoo.schedulers.schedule import NoiseSchedule


class BDIASampler(DDIMSampler):
    """BDIA-DDIM with mixing weight γ; deterministic, exactly invertible for γ > 0.

    Args:
        schedule: the noise schedule the denoiser was trained on.
        gamma: weight of the backward integration estimate, in (0, 1]. 1 (default) keeps inversion exact at
            any step count; below 1 the encoded latent grows like (1/γ)^steps (module docstring). The
            paper samples from noise with γ ≈ 0.5 at few steps.
        set_alpha_to_one: as :class:`DDIMSampler`.
    """

    def __init__(self, schedule: NoiseSchedule, gamma: float = 1.0, set_alpha_to_one: bool = True):
        super().__init__(schedule, eta=0.0, clip_sample=False, set_alpha_to_one=set_alpha_to_one)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1] (0 is plain DDIM, not invertible), got {gamma}")
        self.gamma = gamma
        self._previous: torch.Tensor | None = None  # s_{k-1}, the noisier neighbour of the next input
        self._previous_index = -1  # k - 1

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        self._previous, self._previous_index = None, -1

    def start_from_pair(self, latent: torch.Tensor, previous: torch.Tensor) -> None:
        """Seed decoding with an encoded pair: then call ``step`` from ``timesteps[1]`` with ``previous``."""
        if latent.shape != previous.shape:
            raise ValueError(f"latent {tuple(latent.shape)} and previous {tuple(previous.shape)} differ")
        self._require_timesteps()
        self._previous, self._previous_index = latent, 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SamplerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One BDIA step s_k → s_{k+1} at ``timestep`` = τ_k; plain DDIM at k = 0.

        ``eta``, ``use_clipped_model_output`` and ``generator`` exist for diffusers' pipelines, which pass
        them; BDIA is deterministic, so η must be 0 and the others are unused.
        """
        if eta:
            raise ValueError(f"BDIA is deterministic: eta must be 0, got {eta}")
        k = self._index_of(timestep, sample)
        t = self.timesteps[k].to(sample.device)
        if k == 0:
            out = self._step_to(
                model_output, t, self.previous_timestep(t), sample, 0.0, False, None, None, True
            )
        else:
            if self._previous_index != k - 1 or self._previous is None:
                raise ValueError(
                    f"BDIA step {k} needs the state of step {k - 1}: run the steps in order from the first, "
                    "or call start_from_pair(latent, previous) before the step at timesteps[1]"
                )
            toward_clean, toward_noise, x0 = self._both_ways(model_output, k, sample)
            # BDIA-DDIM: z_{i-1} = D(z_i; t_i→t_{i-1}) + γ (z_{i+1} − D(z_i; t_i→t_{i+1}))
            out = SamplerOutput(toward_clean + self.gamma * (self._previous - toward_noise), x0)
        self._previous, self._previous_index = sample, k
        return out if return_dict else (out.prev_sample, out.pred_original_sample)

    def invert_step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        prev_sample: torch.Tensor,
    ) -> torch.Tensor:
        """Exact inverse of a BDIA step: from s_k (``sample``, at τ_k, k >= 1) and s_{k+1} (``prev_sample``,
        what ``step`` at τ_k returned) recover s_{k-1}, the noisier state. ``model_output`` = ε(s_k, τ_k).
        """
        k = self._index_of(timestep, sample)
        if k == 0:
            raise ValueError("the first BDIA step is plain DDIM; invert from timesteps[1] (see encode)")
        toward_clean, toward_noise, _ = self._both_ways(model_output, k, sample)
        # the BDIA update solved for z_{i+1}: D(z_i; t_i→t_{i+1}) + (z_{i-1} − D(z_i; t_i→t_{i-1})) / γ
        return toward_noise + (prev_sample - toward_clean) / self.gamma

    def _both_ways(
        self, eps: torch.Tensor, k: int, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """D(s_k; τ_k→τ_{k+1}), D(s_k; τ_k→τ_{k-1}) and x̂0, all from the one ε(s_k, τ_k)."""
        ts = self.timesteps.to(sample.device)
        t_clean = ts[k + 1] if k + 1 < len(ts) else torch.tensor(-1, device=sample.device)
        alpha = alpha_at(self.alphas_cumprod, self.final_alpha_cumprod, ts[k], sample)
        alpha_clean = alpha_at(self.alphas_cumprod, self.final_alpha_cumprod, t_clean, sample)
        alpha_noise = alpha_at(self.alphas_cumprod, self.final_alpha_cumprod, ts[k - 1], sample)
        # Δ(t_i→t_{i-1} | z_i) + z_i: the forward DDIM step (eq. (12) of DDIM, η = 0)
        toward_clean, x0 = ddim_transfer(sample, eps, alpha, alpha_clean)
        # Δ(t_i→t_{i+1} | z_i) + z_i: the backward DDIM step from the same ε
        toward_noise, _ = ddim_transfer(sample, eps, alpha, alpha_noise)
        return toward_clean, toward_noise, x0

    def _index_of(self, timestep: TimestepLike, sample: torch.Tensor) -> int:
        t = as_timestep_tensor(timestep, sample)
        if t.ndim == 1:
            if not bool((t == t[0]).all()):
                raise ValueError("BDIA steps the whole batch at one time step; got per-sample time steps")
            t = t[0]
        matches = (self.timesteps.to(sample.device) == t).nonzero()
        if len(matches) != 1:
            raise ValueError(f"timestep {int(t)} is not one of this sampler's time steps")
        return int(matches[0])
