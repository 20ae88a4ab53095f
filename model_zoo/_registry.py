"""Model registry and factory, after timm's ``timm/models/_registry.py``.

Every model variant is a function decorated with :func:`register_model` that returns an ``nn.Module``.
:func:`create_model` calls it with the variant's defaults merged with overrides and records the fully
resolved constructor arguments on the module (``model.kiln_config``), so that an artifact can carry the
config next to the weights and serving can rebuild the model without any training code.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "model_defaults", "is_model"]

_MODEL_FNS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name.

    The function's keyword arguments and their defaults are the variant's config; every argument must
    have a JSON-serialisable default so the config can be saved with the weights.
    """
    name = fn.__name__
    if name in _MODEL_FNS:
        raise ValueError(f"model {name!r} is already registered")
    for pname, param in inspect.signature(fn).parameters.items():
        if param.default is inspect.Parameter.empty:
            raise TypeError(f"{name}: argument {pname!r} needs a default so the variant is self-describing")
    _MODEL_FNS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered variants matching a shell-style pattern."""
    return sorted(n for n in _MODEL_FNS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _MODEL_FNS


def model_defaults(name: str) -> dict[str, Any]:
    """The variant's default constructor arguments."""
    fn = _get(name)
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()}


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered variant; ``overrides`` replace its default arguments.

    Raises:
        ValueError: unknown variant name or unknown argument (the message lists the valid ones).
    """
    defaults = model_defaults(name)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"{name}: unknown argument(s) {unknown}; valid: {sorted(defaults)}")
    config = {**defaults, **overrides}
    model = _MODEL_FNS[name](**config)
    model.kiln_config = {"architecture": name, "args": config}
    return model


def _get(name: str) -> Callable[..., nn.Module]:
    try:
        return _MODEL_FNS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {list_models()}") from None
