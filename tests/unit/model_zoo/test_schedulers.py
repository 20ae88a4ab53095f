"""Samplers: parity with diffusers, fixed full-loop references, time shift, BDIA's exact round trip,
drop-in use in diffusers pipelines, the hallucination score and the guided sampling loop."""

from __future__ import annotations

import asyncio

import diffusers
import pytest
import torch

from model_zoo.schedulers import (
    SAMPLERS,
    BDIASampler,
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    TimeShiftSampler,
    create_sampler,
    sampler_options,
)
from model_zoo.schedulers.hallucination import filter_lowest, hallucination_score
from model_zoo.schedulers.loop import (
    arun_sampler,
    invert_steps,
    reconstruct_steps,
    run_sampler,
    sample_steps,
)

SHAPE = (2, 3, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: one intra-op thread is faster, and a loaded 2-core machine slows a second
    one's spin-waits by ~25x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _noise(dtype=torch.float64, seed: int = 0, scales=(1.0, 1.0)) -> torch.Tensor:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x * torch.tensor(scales, dtype=dtype).view(-1, 1, 1, 1)


def _toy_eps(x: torch.Tensor, t, labels=None) -> torch.Tensor:
    """diffusers' scheduler-test dummy model, per-sample t: ε = x · t / (t + 1)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x * t / (t + 1)


class _ConvEps(torch.nn.Module):
    """A non-trivial deterministic ε(x, t) in float64: √(1 − ᾱ_t)·x (the exact ε for N(0, I) data, so latents
    look like noise) plus 0.3 × a small random conv net of (x, t), non-linear in x."""

    def __init__(self, schedule: NoiseSchedule, channels: int = 3, width: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = torch.nn.Conv2d(channels + 1, width, 3, padding=1)
        self.c2 = torch.nn.Conv2d(width, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():  # unit-variance outputs: weights ~ N(0, 1/fan_in)
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        self.register_buffer("abar", schedule.alphas_cumprod())
        self.double()

    @torch.no_grad()
    def forward(self, x, t, labels=None):
        t = torch.as_tensor(t).long().expand(x.shape[0])
        tt = (t.to(x.dtype) / 1000).view(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        gaussian = (1 - self.abar[t]).sqrt().to(x.dtype).view(-1, 1, 1, 1) * x
        return gaussian + 0.3 * self.c2(torch.tanh(self.c1(torch.cat([x, tt], dim=1))))


def _tiny_unet() -> diffusers.UNet2DModel:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


# -- DDIM against diffusers -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers_step_for_step(kind, steps, eta):
    schedule = NoiseSchedule(kind)
    ours = DDIMSampler(schedule, eta=eta)
    ours.set_timesteps(steps)
    theirs = diffusers.DDIMScheduler(**schedule.diffusers_config(), clip_sample=False)
    theirs.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    # float64: diffusers on the schedule's float64 ᾱ agrees to the last bit
    exact = diffusers.DDIMScheduler(**schedule.diffusers_config(), clip_sample=False)
    exact.set_timesteps(steps)
    exact.alphas_cumprod = schedule.alphas_cumprod()
    exact.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)

    for dtype, reference in ((torch.float64, exact), (torch.float32, theirs)):
        x_ours = x_ref = _noise(dtype)
        g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        for t in ours.timesteps:
            a = ours.step(_toy_eps(x_ours, t), t, x_ours, generator=g_ours)
            b = reference.step(_toy_eps(x_ref, t), t, x_ref, eta=eta, generator=g_ref)
            assert a.prev_sample.dtype == dtype
            if dtype == torch.float64:
                torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=1e-12)
                torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=0, atol=1e-12)
            else:  # diffusers' ᾱ is a float32 cumprod, ~1e-6 relative off; x̂0 divides by √ᾱ ≈ 6e-3
                torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(
                    a.pred_original_sample, b.pred_original_sample, rtol=1e-4, atol=1e-4
                )
            x_ours, x_ref = a.prev_sample, b.prev_sample


def test_ddim_clip_sample_matches_diffusers():
    schedule = NoiseSchedule("linear")
    ours = DDIMSampler(schedule, clip_sample=True)
    theirs = diffusers.DDIMScheduler(**schedule.diffusers_config(), clip_sample=True)
    theirs.alphas_cumprod = schedule.alphas_cumprod()
    theirs.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x = _noise() * 3
    for t in ours.timesteps:
        eps = _toy_eps(x, t)
        a = ours.step(eps, t, x, use_clipped_model_output=True)
        b = theirs.step(eps, t, x, use_clipped_model_output=True)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=1e-12)
        assert a.pred_original_sample.abs().max() <= 1.0
        x = a.prev_sample


def test_ddim_timestep_forms_agree():
    """int, 0-d and per-sample (N,) time steps; mixed per-sample rows equal their own scalar steps."""
    sampler = DDIMSampler(NoiseSchedule("cosine"))
    sampler.set_timesteps(10)
    x = _noise()
    eps = _toy_eps(x, 500)
    by_int = sampler.step(eps, 500, x).prev_sample
    assert torch.equal(sampler.step(eps, torch.tensor(500), x).prev_sample, by_int)
    assert torch.equal(sampler.step(eps, torch.tensor([500, 500]), x).prev_sample, by_int)
    mixed = sampler.step(eps, torch.tensor([500, 300]), x).prev_sample
    assert torch.equal(mixed[1], sampler.step(eps, 300, x).prev_sample[1])
    with pytest.raises(ValueError, match="shape"):
        sampler.step(eps, torch.tensor([500, 500, 500]), x)


def test_ddim_inversion_is_approximate_inverse():
    """DDIM inversion then DDIM sampling returns near x0 for a smooth ε, exactly for ε = 0."""
    sampler = DDIMSampler(NoiseSchedule("cosine"))
    sampler.set_timesteps(20)
    x0 = _noise()
    z = x0
    for t in reversed(sampler.timesteps):
        z = sampler.inverse_step(torch.zeros_like(z), t, z).prev_sample
    for t in sampler.timesteps:
        z = sampler.step(torch.zeros_like(z), t, z).prev_sample
    torch.testing.assert_close(z, x0, rtol=0, atol=1e-12)


def test_ddpm_matches_diffusers():
    schedule = NoiseSchedule("linear")
    ours = DDPMSampler(schedule)
    theirs = diffusers.DDPMScheduler(**schedule.diffusers_config(), clip_sample=False)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x_ours = x_ref = _noise(torch.float32)
    g_ours, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for t in ours.timesteps:
        a = ours.step(_toy_eps(x_ours, t), torch.full((2,), int(t)), x_ours, generator=g_ours)
        b = theirs.step(_toy_eps(x_ref, t), t, x_ref, generator=g_ref)
        assert (a.prev_sample - b.prev_sample).abs().max() <= 1e-4
        x_ours, x_ref = a.prev_sample, b.prev_sample
    with pytest.raises(ValueError, match="per-sample"):
        ours.step(_toy_eps(x_ours, 0), torch.tensor([100, 0]), x_ours)


# -- fixed references for each sampler's full loop (diffusers' scheduler-test style) ---------------------
REFERENCES = {  # name, options, steps -> (sum, mean |x|) of the final sample; float64, toy ε, linear schedule
    ("ddpm", (), 10): (-6.567423906817218, 0.30197072911619177),
    ("ddim", (), 10): (-4.69119842433885, 0.2800642339446315),
    ("ddim", (("eta", 0.5),), 10): (-4.201328348910404, 0.35838592160335564),
    ("time-shift", (("window", 80), ("cutoff", 300)), 10): (-4.403488949932734, 0.2792721169118451),
    ("bdia", (("gamma", 0.5),), 10): (-6.035287658972517, 0.3603062718635364),
    ("bdia", (("gamma", 1.0),), 10): (-7.183876244407369, 0.42887693402705285),
}


@pytest.mark.parametrize("name, kwargs, steps", list(REFERENCES))
def test_full_loop_reference_values(name, kwargs, steps):
    sampler = create_sampler(name, NoiseSchedule("linear"), **dict(kwargs))
    x_T = _noise(scales=(1.0, 0.6))
    result = run_sampler(
        sample_steps(sampler, x_T, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)),
        _toy_eps,
    )
    total, mean_abs = REFERENCES[(name, kwargs, steps)]
    assert result.images.sum().item() == pytest.approx(total, rel=1e-9, abs=1e-9)
    assert result.images.abs().mean().item() == pytest.approx(mean_abs, rel=1e-9)


@pytest.mark.parametrize("name, kwargs, steps", list(REFERENCES))
def test_on_step_sees_every_step_and_changes_nothing(name, kwargs, steps):
    """The streaming hook: one call per step with that step's x̂0 (the last ones are the result's
    history), and the same images as without it."""
    x_T = _noise(scales=(1.0, 0.6))
    seen: list[tuple[int, torch.Tensor]] = []

    def loop(on_step=None):
        sampler = create_sampler(name, NoiseSchedule("linear"), **dict(kwargs))
        generator = torch.Generator().manual_seed(0)
        return sample_steps(sampler, x_T, num_inference_steps=steps, generator=generator, on_step=on_step)

    plain = run_sampler(loop(), _toy_eps)
    hooked = run_sampler(loop(lambda index, x0: seen.append((index, x0.clone()))), _toy_eps)
    assert torch.equal(hooked.images, plain.images)
    assert [index for index, _ in seen] == list(range(steps))
    for (_, x0), kept in zip(seen[-len(hooked.x0_history) :], hooked.x0_history, strict=True):
        assert torch.equal(x0, kept) and x0.shape == x_T.shape


# -- time shift -----------------------------------------------------------------------------------------
def _recorded_loop(sampler, x_T, steps, eps_fn=_toy_eps):
    seen = []

    def denoise(x, t, labels):
        seen.append(t.clone())
        return eps_fn(x, t)

    result = run_sampler(sample_steps(sampler, x_T, num_inference_steps=steps), denoise)
    return result, seen


@pytest.mark.parametrize("window", [0, 1])
def test_time_shift_window_zero_is_ddim(window):
    schedule = NoiseSchedule("cosine")
    x_T = _noise(scales=(1.0, 0.5))
    ddim, ddim_t = _recorded_loop(DDIMSampler(schedule), x_T, 10)
    shifted, shifted_t = _recorded_loop(TimeShiftSampler(schedule, window=window, cutoff=0), x_T, 10)
    assert torch.equal(shifted.images, ddim.images)
    assert all(torch.equal(a, b) for a, b in zip(shifted_t, ddim_t, strict=True))


def test_time_shift_picks_the_matching_noise_level_within_the_window():
    schedule = NoiseSchedule("cosine")
    window, cutoff = 80, 300
    sampler = TimeShiftSampler(schedule, window=window, cutoff=cutoff)
    x_T = _noise(scales=(1.0, 0.5))  # sample 1 has a quarter of the variance the schedule expects
    _, seen = _recorded_loop(sampler, x_T, 10)
    nominal = sampler.nominal_timesteps
    one_minus_abar = 1 - schedule.alphas_cumprod()
    # recompute the rule independently: step by step, with the shifted times
    x, t_used = x_T, []
    sampler.set_timesteps(10)
    for k, t in enumerate(sampler.timesteps):
        t_used.append(torch.as_tensor(t).expand(2).clone())
        x = sampler.step(_toy_eps(x, t), t, x).prev_sample
        if k + 1 < len(nominal) and int(nominal[k + 1]) > cutoff:
            lo, hi = int(nominal[k + 1]) - window // 2, int(nominal[k + 1]) + window // 2
            for row in range(2):
                var = x[row].flatten().var().item()
                best = min(range(lo, hi + 1), key=lambda s, v=var: (v - one_minus_abar[s].item()) ** 2)
                assert int(sampler.current_timesteps()[row]) == best
    for k, t in enumerate(seen):
        assert (t - nominal[k]).abs().max() <= window // 2
        if k == 0 or int(nominal[k]) <= cutoff:
            assert (t == nominal[k]).all()  # no shift at the first step, nor at or below the cutoff
    assert any(int(t[1]) != int(nominal[k]) for k, t in enumerate(seen)), (
        "the low-variance sample never moved"
    )
    assert any(int(t[1]) < int(nominal[k]) for k, t in enumerate(seen))  # less variance → earlier time


# -- BDIA -----------------------------------------------------------------------------------------------
def _ddim_inversion_error(schedule, net, x0, steps) -> float:
    sampler = DDIMSampler(schedule)
    sampler.set_timesteps(steps)
    z = x0
    for t in reversed(sampler.timesteps):
        z = sampler.inverse_step(net(z, t.expand(len(z))), t, z).prev_sample
    for t in sampler.timesteps:
        z = sampler.step(net(z, t.expand(len(z))), t, z).prev_sample
    return (z - x0).abs().max().item()


@pytest.mark.parametrize("gamma, steps", [(1.0, 20), (1.0, 50), (0.5, 10), (0.5, 20)])
def test_bdia_round_trip_is_exact_and_ddim_inversion_is_not(gamma, steps):
    schedule = NoiseSchedule("cosine")
    net = _ConvEps(schedule)
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    sampler = BDIASampler(schedule, gamma=gamma)
    pair = run_sampler(invert_steps(sampler, x0, num_inference_steps=steps), net)
    assert pair.latent.dtype == torch.float64 and pair.latent.shape == x0.shape
    back = run_sampler(reconstruct_steps(sampler, pair.latent, pair.previous, num_inference_steps=steps), net)
    bdia_err = (back.images - x0).abs().max().item()
    ddim_err = _ddim_inversion_error(schedule, net, x0, steps)
    print(f"gamma={gamma} steps={steps}: BDIA round trip {bdia_err:.2e}, DDIM inversion {ddim_err:.2e}")
    assert bdia_err <= 1e-4
    assert ddim_err >= 100 * max(bdia_err, 1e-12)


def test_bdia_inverse_latent_grows_below_gamma_one():
    """The documented limitation: backwards the parasitic mode grows like (1/γ)^steps."""
    schedule = NoiseSchedule("cosine")
    net = _ConvEps(schedule)
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    sizes = {}
    for gamma in (0.5, 1.0):
        pair = run_sampler(invert_steps(BDIASampler(schedule, gamma=gamma), x0, num_inference_steps=50), net)
        sizes[gamma] = pair.latent.abs().max().item()
    assert sizes[1.0] < 10 and sizes[0.5] > 1e6


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_bdia_sampling_follows_the_papers_update(gamma):
    """z_{i-1} = γ(z_{i+1} − Δ(t_i→t_{i+1}|z_i)) + (1 − γ) z_i + Δ(t_i→t_{i-1}|z_i), first step plain DDIM."""
    schedule = NoiseSchedule("linear")
    net = _ConvEps(schedule)
    abar = schedule.alphas_cumprod()
    sampler = BDIASampler(schedule, gamma=gamma)
    sampler.set_timesteps(12)
    times = [int(t) for t in sampler.timesteps] + [-1]

    def level(t):
        return torch.tensor(1.0, dtype=torch.float64) if t < 0 else abar[t]

    def delta(z, eps, t_from, t_to):  # DDIM from t_from to t_to using ε(z, t_from), minus z
        a, b = level(t_from), level(t_to)
        return b.sqrt() * (z - (1 - a).sqrt() * eps) / a.sqrt() + (1 - b).sqrt() * eps - z

    x_T = _noise()
    z_noisier, z = x_T, x_T + delta(x_T, net(x_T, torch.tensor([times[0]] * 2)), times[0], times[1])
    for k in range(1, len(times) - 1):
        eps = net(z, torch.tensor([times[k]] * 2))
        z_noisier, z = (
            z,
            (
                gamma * (z_noisier - delta(z, eps, times[k], times[k - 1]))
                + (1 - gamma) * z
                + delta(z, eps, times[k], times[k + 1])
            ),
        )
    ours = run_sampler(sample_steps(sampler, x_T, num_inference_steps=12), net)
    torch.testing.assert_close(ours.images, z, rtol=0, atol=1e-10)


def test_bdia_first_step_is_ddim_and_steps_must_run_in_order():
    schedule = NoiseSchedule("linear")
    bdia, ddim = BDIASampler(schedule, gamma=0.5), DDIMSampler(schedule)
    bdia.set_timesteps(10)
    ddim.set_timesteps(10)
    x = _noise()
    t0, t1 = bdia.timesteps[0], bdia.timesteps[1]
    assert torch.equal(
        bdia.step(_toy_eps(x, t0), t0, x).prev_sample, ddim.step(_toy_eps(x, t0), t0, x).prev_sample
    )
    bdia.set_timesteps(10)
    with pytest.raises(ValueError, match="start_from_pair"):
        bdia.step(_toy_eps(x, t1), t1, x)
    with pytest.raises(ValueError, match="eta"):
        bdia.step(_toy_eps(x, t0), t0, x, eta=0.5)
    with pytest.raises(ValueError, match="gamma"):
        BDIASampler(schedule, gamma=0.0)


# -- drop-in use in diffusers pipelines -----------------------------------------------------------------
def test_time_shift_drops_into_diffusers_pipelines():
    schedule, unet = NoiseSchedule("cosine"), _tiny_unet()
    seen = []
    forward = unet.forward

    def recording_forward(sample, timestep, *args, **kwargs):
        seen.append(torch.as_tensor(timestep).clone())
        return forward(sample, timestep, *args, **kwargs)

    unet.forward = recording_forward
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**schedule.diffusers_config()))
    pipe.scheduler = TimeShiftSampler(schedule, window=80, cutoff=300)  # the constructor converts to DDIM
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, num_inference_steps=10, output_type="pt").images
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    assert len(seen) == 10 and seen[0].ndim == 0 and seen[1].shape == (3,)  # per-sample after the first step
    nominal = pipe.scheduler.nominal_timesteps
    assert all((t - nominal[k]).abs().max() <= 40 for k, t in enumerate(seen))

    ddpm_pipe = diffusers.DDPMPipeline(unet=unet, scheduler=TimeShiftSampler(schedule))
    ddpm_pipe.set_progress_bar_config(disable=True)
    assert ddpm_pipe(batch_size=2, num_inference_steps=5, output_type="pt").images.shape == (2, 1, 8, 8)


def test_bdia_in_diffusers_pipeline_equals_kiln_loop():
    schedule, unet = NoiseSchedule("cosine"), _tiny_unet()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**schedule.diffusers_config()))
    pipe.scheduler = BDIASampler(schedule, gamma=0.5)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=3, num_inference_steps=10, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    x_T = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))  # the pipeline's noise

    def denoise(x, t, labels):
        with torch.no_grad():
            return unet(x, t).sample

    ours = run_sampler(sample_steps(BDIASampler(schedule, gamma=0.5), x_T, num_inference_steps=10), denoise)
    assert images.shape == (3, 1, 8, 8)
    torch.testing.assert_close(images, (ours.images / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)


# -- hallucination score --------------------------------------------------------------------------------
def test_hallucination_score_flags_oscillating_x0():
    steps = 20
    stable = [torch.full((1, 4), 0.5) + 0.001 * k for k in range(steps)]
    oscillating = [torch.full((1, 4), 0.5 if k % 2 else -0.5) for k in range(steps)]
    history = [torch.cat([s, o]) for s, o in zip(stable, oscillating, strict=True)]
    scores = hallucination_score(history, last_k=10)
    assert scores.shape == (2,) and scores[1] > 100 * scores[0]
    assert scores[1].item() == pytest.approx(0.25)  # population variance of ±0.5
    # K is capped at the steps recorded; the stacked form agrees
    assert torch.equal(
        hallucination_score(history[-3:], last_k=10), hallucination_score(torch.stack(history[-3:]))
    )
    assert filter_lowest(torch.tensor([0.3, 0.1, 0.9, 0.2]), keep=2).tolist() == [1, 3]
    with pytest.raises(ValueError):
        hallucination_score(history[:1])


# -- the guided sampling loop ---------------------------------------------------------------------------
def _labelled_eps(x, t, labels):
    """A denoiser whose ε depends on the label, so guidance changes the result."""
    return _toy_eps(x, t) + 0.1 * labels.to(x.dtype).view(-1, 1, 1, 1)


def test_guided_loop_matches_direct_guidance():
    schedule, guidance, null = NoiseSchedule("cosine"), 3.0, 10
    labels = torch.tensor([2, 7])
    x_T = _noise()
    requests = []

    def denoise(x, t, lab):
        requests.append((x.shape[0], lab.clone(), t.clone()))
        return _labelled_eps(x, t, lab)

    result = run_sampler(
        sample_steps(DDIMSampler(schedule), x_T, labels, guidance, null, keep_x0=4, num_inference_steps=8),
        denoise,
    )
    assert all(rows == 4 for rows, _, _ in requests)
    assert requests[0][1].tolist() == [2, 7, null, null] and requests[0][2].shape == (4,)
    # the same loop written out directly
    direct = DDIMSampler(schedule)
    direct.set_timesteps(8)
    x, x0s = x_T, []
    for t in direct.timesteps:
        eps_c = _labelled_eps(x, t, labels)
        eps_u = _labelled_eps(x, t, torch.full((2,), null))
        out = direct.step(eps_u + guidance * (eps_c - eps_u), t, x)
        x = out.prev_sample
        x0s.append(out.pred_original_sample)
    torch.testing.assert_close(result.images, x, rtol=0, atol=1e-12)
    assert len(result.x0_history) == 4
    torch.testing.assert_close(result.x0_history[-1], x0s[-1], rtol=0, atol=1e-12)


def test_guidance_rows():
    sampler, x_T = DDIMSampler(NoiseSchedule("cosine")), _noise()
    gen = sample_steps(sampler, x_T, None, 3.0, 10, num_inference_steps=2)
    assert next(gen).labels.tolist() == [10, 10]  # unconditional: null rows only
    gen = sample_steps(sampler, x_T, torch.tensor([1, 2]), 1.0, 10, num_inference_steps=2)
    assert next(gen).labels.tolist() == [1, 2]  # g = 1: conditional rows only
    assert next(sample_steps(sampler, x_T, num_inference_steps=2)).labels is None  # label-free model
    with pytest.raises(ValueError, match="num_classes_null_label"):
        next(sample_steps(sampler, x_T, torch.tensor([1, 2]), 2.0, num_inference_steps=2))
    gen = sample_steps(sampler, x_T, num_inference_steps=2)
    next(gen)
    with pytest.raises(ValueError, match="shape"):
        gen.send(torch.zeros(1, 3, 8, 8))


def test_loop_runs_from_asyncio():
    sampler = create_sampler("ddim", NoiseSchedule("cosine"))

    async def denoise(x, t, labels):
        await asyncio.sleep(0)
        return _toy_eps(x, t)

    result = asyncio.run(arun_sampler(sample_steps(sampler, _noise(), num_inference_steps=5), denoise))
    expected = run_sampler(sample_steps(sampler, _noise(), num_inference_steps=5), _toy_eps)
    assert torch.equal(result.images, expected.images)


# -- registry -------------------------------------------------------------------------------------------
def test_create_sampler_names_and_errors():
    assert set(SAMPLERS) == {"ddpm", "ddim", "time-shift", "bdia"}
    for name in SAMPLERS:
        assert isinstance(create_sampler(name, NoiseSchedule()), SAMPLERS[name])
    assert "gamma" in sampler_options("bdia") and "window" in sampler_options("time-shift")
    with pytest.raises(ValueError, match="valid: .*bdia.*ddim"):
        create_sampler("euler", NoiseSchedule())
    with pytest.raises(ValueError, match="unknown option.*gamma"):
        create_sampler("ddim", NoiseSchedule(), gamma=0.5)


@pytest.mark.parametrize("steps", [50, 100])
def test_time_shift_keeps_time_falling_with_many_steps(steps):
    """With a stride below the window the search would reach back to t = T − 1 (ᾱ ≈ 2e-9): it must not."""
    from model_zoo.schedulers import NoiseSchedule, create_sampler
    from model_zoo.schedulers.loop import run_sampler, sample_steps

    sampler = create_sampler("time-shift", NoiseSchedule("cosine"), window=80, cutoff=300)
    seen: list[torch.Tensor] = []

    def eps(x, t, labels):
        seen.append(t.clone())
        return 0.9 * x / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-6)  # a crude, shape-blind denoiser

    x_T = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    result = run_sampler(sample_steps(sampler, x_T, num_inference_steps=steps), eps)
    assert torch.isfinite(result.images).all()
    times = torch.stack(seen)  # (steps, rows)
    assert (times[1:] < times[:-1]).all()  # every sample's time step strictly decreases
