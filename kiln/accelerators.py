"""What accelerators this machine offers; shared by export (engine builds) and serving (runtimes)."""

from __future__ import annotations

import importlib.util


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return bool(torch.cuda.is_available())


def tensorrt_status() -> tuple[bool, str]:
    """(available, reason): TensorRT needs the ``tensorrt`` package and a CUDA device."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the `tensorrt` package is not installed (pip install -e .[gpu])"
    if not cuda_available():
        return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return True, "tensorrt and a CUDA GPU are available"
