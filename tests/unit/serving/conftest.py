"""Fixtures for the Open Inference Protocol front-end tests: test-double models in a repository."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from serving.repository import InferenceError, ModelRepository, TensorSpec

WEIGHTS = np.array([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.25]], dtype=np.float32)
BIAS = np.array([0.5, -0.5], dtype=np.float32)


def linear_reference(x: np.ndarray) -> np.ndarray:
    """What :class:`LinearDouble` computes, for assertions."""
    return x.astype(np.float32) @ WEIGHTS + BIAS


class LinearDouble:
    """Test double for :class:`serving.repository.ServedModel`: a fixed numpy linear layer, no runtime.

    ``x`` (FP32, batch × 3) → ``y = x @ WEIGHTS + BIAS`` (FP32, batch × 2) and ``argmax`` (INT64, batch).
    Records the ``backend`` of each call; the ``"double"`` backend doubles ``y`` so tests can tell
    which backend ran.
    """

    platform = "numpy_test_double"
    backends = ["numpy", "double"]
    max_batch_size = 4
    inputs = [TensorSpec("x", "FP32", (-1, 3))]
    outputs = [TensorSpec("y", "FP32", (-1, 2)), TensorSpec("argmax", "INT64", (-1,))]

    def __init__(self, name: str = "linear", version: str = "1", ready: bool = True):
        self.name = name
        self.version = version
        self._ready = ready
        self.calls: list[str | None] = []

    def ready(self) -> bool:
        return self._ready

    async def infer(self, inputs: dict[str, np.ndarray], backend: str | None = None) -> dict[str, np.ndarray]:
        if backend not in (None, *self.backends):
            raise InferenceError(
                400, f"model {self.name!r} has no backend {backend!r}; loaded: {self.backends}"
            )
        self.calls.append(backend)
        y = linear_reference(inputs["x"]) * (2 if backend == "double" else 1)
        return {"y": y, "argmax": y.argmax(axis=1).astype(np.int64)}


class EchoDouble:
    """Test double for :class:`serving.repository.ServedModel`: returns each input as ``<name>_out``.

    One input per interesting datatype (BYTES, BOOL, INT8, UINT64, FP16), unbatched
    (``max_batch_size`` 0), so tests can round-trip every encoding.
    """

    name = "echo"
    version = "1"
    platform = "numpy_test_double"
    backends = ["numpy"]
    max_batch_size = 0
    inputs = [
        TensorSpec("text", "BYTES", (-1,)),
        TensorSpec("flag", "BOOL", (-1,)),
        TensorSpec("small", "INT8", (-1,)),
        TensorSpec("big", "UINT64", (-1,)),
        TensorSpec("half", "FP16", (-1,)),
    ]
    outputs = [TensorSpec(f"{s.name}_out", s.datatype, s.shape) for s in inputs]

    def ready(self) -> bool:
        return True

    async def infer(self, inputs: dict[str, np.ndarray], backend: str | None = None) -> dict[str, np.ndarray]:
        return {f"{name}_out": array for name, array in inputs.items()}


class BrokenDouble(LinearDouble):
    """Test double for :class:`serving.repository.ServedModel` whose inference raises an unexpected error."""

    async def infer(self, inputs: dict[str, np.ndarray], backend: str | None = None) -> dict[str, np.ndarray]:
        raise RuntimeError("runtime exploded")


def build_repository(with_unready: bool = True) -> ModelRepository:
    """``linear`` versions 1 and 2 (default 2), ``echo``, ``broken`` and, optionally, an unready ``cold``."""
    repo = ModelRepository()
    repo.add(LinearDouble(version="1"))
    repo.add(LinearDouble(version="2"))
    repo.add(EchoDouble())
    repo.add(BrokenDouble(name="broken"))
    if with_unready:
        repo.add(LinearDouble(name="cold", ready=False))
    return repo


@pytest.fixture
def repo() -> ModelRepository:
    return build_repository()


@pytest.fixture(scope="module")
def module_repo() -> ModelRepository:
    return build_repository()


@pytest.fixture(name="linear_reference")
def _linear_reference():
    """The function the ``linear`` test double computes."""
    return linear_reference


@pytest.fixture(scope="module")
def free_port():
    """A function returning a TCP port on 127.0.0.1 that is free right now."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick
