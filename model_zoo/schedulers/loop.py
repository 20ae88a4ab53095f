"""Sampling loops as generators: the loop owns the sampler, the caller owns the denoiser.

Each loop is a generator that yields a :class:`DenoiseRequest` ``(x, t, labels)`` whenever it needs ε and
receives ε through ``.send()``; its return value (``StopIteration.value``) is the result. The same loop
then runs synchronously (:func:`run_sampler`), from asyncio (:func:`arun_sampler`, or a server that batches
requests of many loops into one network call per step), without the loop knowing which.

Classifier-free guidance (Ho & Salimans 2022, eq. (6) with w = g − 1): ε̃ = ε_u + g · (ε_c − ε_u), where
ε_u is the prediction for the null label ``num_classes_null_label`` (by convention the number of classes:
the extra class the model was trained with label dropout on). The rows a request carries:

- ``labels`` None: unconditional, N rows of the null label (or ``labels`` None in the request when
  ``num_classes_null_label`` is None too: a model without labels); ε̃ = ε;
- ``labels`` given and g == 1: ε̃ = ε_c exactly, so only the N conditional rows are asked for;
- otherwise 2N rows: the N conditional rows, then the same N inputs with the null label.

``t`` in a request is per row, shape (rows,): samplers such as time shift evaluate each sample at its own
time step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from model_zoo.schedulers.bdia import BDIASampler

DEFAULT_KEEP_X0 = 10  # the hallucination score's window (hallucination.py)


class DenoiseRequest(NamedTuple):
    """What a loop asks the denoiser for: ε at rows ``x`` (R, ...), times ``t`` (R,), ``labels`` (R,)."""

    x: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor | None


@dataclass
class SampleResult:
    """Final images (N, ...) and x̂0 of the last ``keep_x0`` steps, oldest first."""

    images: torch.Tensor
    x0_history: list[torch.Tensor] = field(default_factory=list)


@dataclass
class BDIALatent:
    """BDIA's latent: the state at the noise end (``latent``) and its neighbour one step cleaner."""

    latent: torch.Tensor
    previous: torch.Tensor


SamplerLoop = Generator[DenoiseRequest, torch.Tensor, Any]


def sample_steps(
    scheduler: Any,
    x_T: torch.Tensor,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    num_classes_null_label: int | None = None,
    keep_x0: int = DEFAULT_KEEP_X0,
    *,
    num_inference_steps: int | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> Generator[DenoiseRequest, torch.Tensor, SampleResult]:
    """Sample from noise ``x_T`` with any Kiln sampler; returns a :class:`SampleResult`.

    Args:
        scheduler: a Kiln sampler; ``set_timesteps`` is called when ``num_inference_steps`` is given,
            otherwise it must have been called.
        x_T: initial noise (N, ...).
        labels: class labels (N,), or None for unconditional sampling.
        guidance: classifier-free guidance scale g.
        num_classes_null_label: the null (unconditional) label.
        keep_x0: how many of the last x̂0 to return (for the hallucination score).
        num_inference_steps: sets the sampler's steps first.
        generator: seeds stochastic samplers (DDPM, DDIM with η > 0).
        on_step: called after each step with its index (0-based) and that step's x̂0 (N, ...), as
            diffusers' pipelines call ``callback(i, t, latents)``: progress and previews for a server
            that streams them. It only reads; the samples are the same with or without it.
    """
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    history: deque[torch.Tensor] = deque(maxlen=keep_x0)
    x = x_T
    for index, t in enumerate(scheduler.timesteps):
        eps = yield from _guided_eps(x, t, labels, guidance, num_classes_null_label)
        out = scheduler.step(eps, t, x, generator=generator)
        x = out.prev_sample
        history.append(out.pred_original_sample)
        if on_step is not None:
            on_step(index, out.pred_original_sample)
    return SampleResult(x, list(history))


def invert_steps(
    scheduler: BDIASampler,
    x0: torch.Tensor,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    num_classes_null_label: int | None = None,
    *,
    num_inference_steps: int | None = None,
) -> Generator[DenoiseRequest, torch.Tensor, BDIALatent]:
    """BDIA encode, image → latent pair; decoding the pair with the same sampler, labels and guidance
    (:func:`reconstruct_steps`) returns ``x0`` up to floating point. n network evaluations for n steps.

    The design (see ``bdia.py``): one plain DDIM inversion step x0 → s_{n-1}, then the exact inverse of
    the BDIA update for k = n-1 … 1, ending at (s_0, s_1) = (latent, previous).
    """
    _require_bdia(scheduler)
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    ts = scheduler.timesteps
    # s_n = x0; s_{n-1}: one DDIM inversion step (ε at x0, evaluated at τ_{n-1})
    eps = yield from _guided_eps(x0, ts[-1], labels, guidance, num_classes_null_label)
    cleaner, state = x0, scheduler.inverse_step(eps, ts[-1], x0).prev_sample
    for k in range(len(ts) - 1, 0, -1):
        eps = yield from _guided_eps(state, ts[k], labels, guidance, num_classes_null_label)
        cleaner, state = state, scheduler.invert_step(eps, ts[k], state, cleaner)
    if not bool(torch.isfinite(state).all()):
        raise ValueError(
            f"BDIA inversion overflowed (gamma={scheduler.gamma}, {len(ts)} steps): the backward recursion "
            "grows like (1/gamma)^steps; use gamma closer to 1 or fewer steps"
        )
    return BDIALatent(latent=state, previous=cleaner)


def reconstruct_steps(
    scheduler: BDIASampler,
    latent: torch.Tensor,
    previous: torch.Tensor,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    num_classes_null_label: int | None = None,
    keep_x0: int = DEFAULT_KEEP_X0,
    *,
    num_inference_steps: int | None = None,
) -> Generator[DenoiseRequest, torch.Tensor, SampleResult]:
    """BDIA decode of a latent pair from :func:`invert_steps` (n − 1 evaluations); returns a SampleResult."""
    _require_bdia(scheduler)
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    scheduler.start_from_pair(latent, previous)
    history: deque[torch.Tensor] = deque(maxlen=keep_x0)
    x = previous
    for t in scheduler.timesteps[1:]:
        eps = yield from _guided_eps(x, t, labels, guidance, num_classes_null_label)
        out = scheduler.step(eps, t, x)
        x = out.prev_sample
        history.append(out.pred_original_sample)
    return SampleResult(x, list(history))


def run_sampler(gen: SamplerLoop, denoise_fn: Callable[..., torch.Tensor]) -> Any:
    """Drive a loop synchronously: ``denoise_fn(x, t, labels) -> ε``; returns the loop's result."""
    try:
        request = next(gen)
        while True:
            request = gen.send(denoise_fn(*request))
    except StopIteration as stop:
        return stop.value


async def arun_sampler(gen: SamplerLoop, denoise_fn: Callable[..., Awaitable[torch.Tensor]]) -> Any:
    """Drive a loop from asyncio: ``await denoise_fn(x, t, labels) -> ε`` (e.g. a step-level batcher)."""
    try:
        request = next(gen)
        while True:
            request = gen.send(await denoise_fn(*request))
    except StopIteration as stop:
        return stop.value


def _guided_eps(
    x: torch.Tensor,
    t: torch.Tensor | int,
    labels: torch.Tensor | None,
    guidance: float,
    null_label: int | None,
) -> Generator[DenoiseRequest, torch.Tensor, torch.Tensor]:
    """Ask for ε at (x, t) under the guidance rules of the module docstring; return the guided ε."""
    n = x.shape[0]
    t_rows = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(n)
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if labels is None:
        null = None if null_label is None else torch.full((n,), null_label, dtype=torch.long, device=x.device)
        return (yield from _ask(DenoiseRequest(x, t_rows, null), n))
    if guidance == 1.0:
        return (yield from _ask(DenoiseRequest(x, t_rows, labels), n))
    if null_label is None:
        raise ValueError(f"guidance {guidance} != 1 needs num_classes_null_label (the null label)")
    null = torch.full_like(labels, null_label)
    eps = yield from _ask(
        DenoiseRequest(torch.cat([x, x]), torch.cat([t_rows, t_rows]), torch.cat([labels, null])), 2 * n
    )
    eps_cond, eps_uncond = eps[:n], eps[n:]
    # classifier-free guidance: ε̃ = ε_u + g (ε_c − ε_u)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def _ask(request: DenoiseRequest, rows: int) -> Generator[DenoiseRequest, torch.Tensor, torch.Tensor]:
    eps = yield request
    if eps is None or eps.shape != request.x.shape:
        got = None if eps is None else tuple(eps.shape)
        raise ValueError(
            f"the denoiser must send ε of shape {tuple(request.x.shape)} ({rows} rows), got {got}"
        )
    return eps


def _require_bdia(scheduler: Any) -> None:
    if not isinstance(scheduler, BDIASampler):
        raise ValueError(f"exact inversion needs the 'bdia' sampler, got {type(scheduler).__name__}")
