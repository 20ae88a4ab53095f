"""Samplers of the diffusion family, apart from the model (diffusers' layout: one file per sampler).

Every sampler follows diffusers' scheduler contract (``set_timesteps(n)``, ``timesteps``,
``step(model_output, timestep, sample, ...) -> SamplerOutput`` with ``prev_sample`` and
``pred_original_sample``), predicts ε, and computes in the sample's dtype. ``SAMPLERS`` maps the served
names to the classes; :func:`create_sampler` builds one on a :class:`NoiseSchedule`. The loops that drive
them against a denoiser are in ``loop.py``, the hallucination score in ``hallucination.py``.
"""

from __future__ import annotations

import inspect

from model_zoo.schedulers.bdia import BDIASampler
from model_zoo.schedulers.ddim import DDIMSampler, SamplerOutput
from model_zoo.schedulers.ddpm import DDPMSampler
from model_zoo.schedulers.schedule import SCHEDULES, NoiseSchedule
from model_zoo.schedulers.time_shift import TimeShiftSampler

SAMPLERS: dict[str, type] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "time-shift": TimeShiftSampler,
    "bdia": BDIASampler,
}


def sampler_options(name: str) -> list[str]:
    """The keyword arguments ``create_sampler(name, ...)`` accepts besides the schedule."""
    cls = _sampler_class(name)
    params = list(inspect.signature(cls.__init__).parameters)
    return [p for p in params if p not in ("self", "schedule")]


def create_sampler(name: str, schedule: NoiseSchedule, **kwargs):
    """Build sampler ``name`` on ``schedule``; unknown names or options raise ValueError naming the valid."""
    cls = _sampler_class(name)
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    valid = sampler_options(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for sampler {name!r}; valid: {valid}")
    return cls(schedule, **kwargs)


def _sampler_class(name: str) -> type:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}")
    return SAMPLERS[name]


__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "BDIASampler",
    "DDIMSampler",
    "DDPMSampler",
    "NoiseSchedule",
    "SamplerOutput",
    "TimeShiftSampler",
    "create_sampler",
    "sampler_options",
]
