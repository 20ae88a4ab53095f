"""Time-Shift DDIM (Li, Qu, Yao, Sun & Moens, ICLR 2024, "Alleviating Exposure Bias in Diffusion Models
through Sampling with Shifted Time Steps"; official code Mingxiao-Li/TS-DPM).

Exposure bias: during sampling x_t drifts from the marginal the network was trained on at time t. The
paper's remedy (its "Time-Shift Sampler" algorithm) keeps the nominal schedule but, after each step,
hands the network and the next update the train time step whose noise level best fits the state:

    σ² = Var(x_{t_k})                                 per sample, over all of its pixels
    t_s = argmin_{τ ∈ W} | σ² − (1 − ᾱ_τ) |          W: train steps around the nominal t_k
    ε = ε_θ(x_{t_k}, t_s);  x_{t_{k+1}} = DDIM(x_{t_k}, ε, from t_s to the nominal t_{k+1})

and only while the nominal t_k is above a cutoff (late steps are left alone; the estimate is poor there).

What was taken from the official code (``sampler/pnm_solver.py: apply_time_shift``, and the ADM
variant tingyu215/TS-DPM-ADM ``get_next_time_window``):

- the variance is ``torch.var`` of each sample flattened over C·H·W, unbiased (N − 1), compared with
  1 − ᾱ_τ by squared distance; ties go to the smaller τ (``argmin``'s first index);
- ``window`` is counted in train time steps and is the *full* width: the search runs over
  [t_k − window // 2, t_k + window // 2] clipped to [0, T − 1] (the code's ``window_shift = window // 2``),
  so ``window`` 0 or 1 is plain DDIM;
- the shift applies only while the nominal step is strictly above ``cutoff`` and never at the first step
  (x_T is the pure noise the first nominal step was trained for);
- defaults ``window=80, cutoff=300``: the authors' DDIM setting with few steps (TS-DPM-ADM README, cosine
  schedule, 1000 train steps); F-PNDM used window 5 / cutoff 550. Both are sensitive.

Where Kiln follows the paper rather than the code: the official DDIM/PNDM loops evaluate the network at
the nominal time and move the *target* time of the update instead; Kiln uses the shifted time for both the
network evaluation and the start of the next DDIM update, as in the paper's algorithm.

Drop-in use with an unmodified diffusers pipeline (``for t in scheduler.timesteps: unet(x, t);
scheduler.step(...)``): :attr:`TimeShiftSampler.timesteps` is a lazy iterable that yields, at each step, the
time step(s) to evaluate at now: the nominal 0-d tensor before a shift is known, afterwards the per-sample
(N,) tensor chosen by the last ``step`` (``UNet2DModel`` takes per-sample time steps). ``DDIMPipeline``
replaces any scheduler passed to its constructor by a diffusers ``DDIMScheduler``, so assign it after
construction (``pipe.scheduler = sampler``); ``DDPMPipeline`` takes it directly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from model_zoo.schedulers.ddim import DDIMSampler, SamplerOutput, TimestepLike, as_timestep_tensor
from model_zoo.schedulers.schedule import NoiseSchedule


class _ShiftedTimesteps:
    """The loop's time steps, read lazily from the sampler's state (see the module docstring)."""

    def __init__(self, sampler: TimeShiftSampler):
        self._sampler = sampler

    def __len__(self) -> int:
        return len(self._sampler.nominal_timesteps)

    def __iter__(self) -> Iterator[torch.Tensor]:
        sampler = self._sampler
        sampler._restart()  # a new loop over the time steps starts a new trajectory
        for k in range(len(self)):
            if sampler._step_index != k:
                raise RuntimeError(
                    f"time-shift: step() was called {sampler._step_index} times before time step {k}; "
                    "call step() exactly once per yielded time step"
                )
            yield sampler.current_timesteps()


class TimeShiftSampler(DDIMSampler):
    """DDIM whose network time steps follow the per-sample variance of x_t (TS-DDIM).

    Args:
        schedule: the noise schedule the denoiser was trained on.
        window: full width of the search window in train time steps (half-width ``window // 2``).
        cutoff: shift only while the nominal time step is above this train step.
        eta, clip_sample, clip_sample_range, set_alpha_to_one: as :class:`DDIMSampler`.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        window: int = 80,
        cutoff: int = 300,
        eta: float = 0.0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
    ):
        super().__init__(schedule, eta, clip_sample, clip_sample_range, set_alpha_to_one)
        if window < 0:
            raise ValueError(f"window must be >= 0 train steps, got {window}")
        self.window = window
        self.cutoff = cutoff
        self._step_index = 0
        self._shifted: torch.Tensor | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        self._restart()

    @property
    def nominal_timesteps(self) -> torch.Tensor:
        """The unshifted DDIM time steps (descending, int64)."""
        return self._require_timesteps()

    @property
    def timesteps(self) -> _ShiftedTimesteps:
        """Iterable over the loop: yields the time step(s) to evaluate the network at, step by step."""
        self._require_timesteps()
        return _ShiftedTimesteps(self)

    def current_timesteps(self) -> torch.Tensor:
        """The time step(s) for the next network evaluation: shifted (N,) or the nominal 0-d tensor."""
        nominal = self.nominal_timesteps
        if self._step_index >= len(nominal):
            raise ValueError("time-shift: the trajectory is finished; call set_timesteps to start another")
        return self._shifted if self._shifted is not None else nominal[self._step_index]

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
        """One DDIM step from ``timestep`` (what the network saw) to the next *nominal* time step.

        Then picks the per-sample time step for the next evaluation from the new state's variance.
        Arguments as :meth:`DDIMSampler.step`.
        """
        nominal = self.nominal_timesteps
        k = self._step_index
        if k >= len(nominal):
            raise ValueError("time-shift: the trajectory is finished; call set_timesteps to start another")
        t = as_timestep_tensor(timestep, sample)
        t_next = int(nominal[k + 1]) if k + 1 < len(nominal) else -1
        out = self._step_to(
            model_output,
            t,
            torch.tensor(t_next, device=sample.device),
            sample,
            eta,
            use_clipped_model_output,
            generator,
            variance_noise,
            True,
        )
        self._step_index = k + 1
        shifting = t_next > self.cutoff and self.window // 2 > 0  # window 0 or 1: plain DDIM
        # The shifted step stays strictly between its neighbours on the nominal grid, so time keeps falling:
        # with many steps the window would otherwise reach back past where the sample came from (up to
        # t = T − 1, whose ᾱ ≈ 2e-9 under the cosine schedule turns x̂0 into ±inf).
        upper = t.expand(sample.shape[0]) - 1  # below the step each sample was just evaluated at
        lower = int(nominal[k + 2]) + 1 if k + 2 < len(nominal) else 0
        self._shifted = self.shifted_timesteps(out.prev_sample, t_next, lower, upper) if shifting else None
        return out if return_dict else (out.prev_sample, out.pred_original_sample)

    def shifted_timesteps(
        self, sample: torch.Tensor, nominal_t: int, lower: int = 0, upper: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-sample train step in [t ± window // 2], at least ``lower`` and at most ``upper`` (per sample),
        whose 1 − ᾱ is closest to Var(sample); shape (N,). ``nominal_t`` itself must be allowed."""
        half = self.window // 2
        lo = max(0, lower, nominal_t - half)
        hi = max(lo, min(self.num_train_timesteps - 1, nominal_t + half))
        candidates = torch.arange(lo, hi + 1, device=sample.device)
        noise_level = 1 - self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)[candidates]
        # the per-sample variance of x_t over all its pixels (official code: unbiased torch.var)
        variance = sample.reshape(sample.shape[0], -1).var(dim=1)
        # TS-DPM's time-shift rule: the train time step whose 1 − ᾱ best matches the variance
        distance = (variance[:, None] - noise_level[None, :]) ** 2
        if upper is not None:
            distance = distance.masked_fill(candidates[None, :] > upper.reshape(-1, 1), float("inf"))
        return candidates[distance.argmin(dim=1)]

    def _restart(self) -> None:
        self._step_index = 0
        self._shifted = None
