"""ModelRepository: isolation (failed models), strict readiness, and model control (load beside, switch,
reload, unload with drain) over test-double models."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from serving.repository import InferenceError, ModelRepository

_clock = itertools.count()


class Double:
    """Test double for a served model: records whether it was closed; ``in_flight`` set by the test."""

    def __init__(self, name: str, version: str):
        self.name, self.version = name, version
        self.in_flight = 0
        self.closed = False
        self.loaded_at = next(_clock)

    def ready(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


def _loader(store: dict[str, str]):
    """A loader over a fake store: name → latest version; ``broken`` always fails."""

    def load(tag: str) -> Double:
        name, _, version = tag.partition(":")
        if name == "broken":
            raise RuntimeError("model.onnx: protobuf parsing failed")
        return Double(name, version or store[name])

    return load


def test_failed_model_is_unavailable_with_its_reason_and_the_server_not_ready():
    repo = ModelRepository()
    repo.add(Double("good", "1"))
    assert repo.ready()
    repo.fail("bad", "7", "RuntimeError: corrupt graph")
    assert not repo.ready() and "'bad' is UNAVAILABLE: RuntimeError: corrupt graph" in repo.not_ready_reason()
    rows = {(e.name, e.version): (e.state, e.reason) for e in repo.index()}
    assert rows == {
        ("good", "1"): ("READY", ""),
        ("bad", "7"): ("UNAVAILABLE", "RuntimeError: corrupt graph"),
    }
    with pytest.raises(InferenceError) as err:
        repo.get("bad")
    assert err.value.status == 503 and "corrupt graph" in err.value.message
    assert repo.get("good").version == "1"
    with pytest.raises(InferenceError) as err:
        repo.get("nope")
    assert err.value.status == 404
    assert ModelRepository().not_ready_reason() == "no model is loaded"


def test_load_beside_switches_the_default_then_unload_the_old_version():
    store = {"m": "2"}
    repo = ModelRepository(loader=_loader(store))
    old = Double("m", "1")
    repo.add(old)

    async def control():
        new = await repo.load("m")  # the store's latest: version 2
        assert repo.get("m") is new and repo.get("m", "1") is old and not old.closed
        old.in_flight = 1  # a request still inside the old version: the unload waits for it

        async def finish():
            await asyncio.sleep(0.05)
            assert not old.closed
            old.in_flight = 0

        gone, _ = await asyncio.gather(repo.unload("m", "1"), finish())
        return new, gone

    new, gone = asyncio.run(control())
    assert gone == ["1"] and old.closed and not new.closed
    assert repo.get("m") is new
    with pytest.raises(InferenceError) as err:
        repo.get("m", "1")
    assert err.value.status == 503 and "unloaded" in err.value.message
    assert {(e.version, e.state, e.reason) for e in repo.index()} == {
        ("1", "UNAVAILABLE", "unloaded"),
        ("2", "READY", ""),
    }


def test_reload_replaces_the_loaded_copy_and_closes_the_old_one():
    repo = ModelRepository(loader=_loader({"m": "1"}))
    first = Double("m", "1")
    repo.add(first)
    second = asyncio.run(repo.load("m"))
    assert second is not first and first.closed and repo.get("m") is second


def test_failed_control_load_is_reported_but_does_not_unready_the_server():
    repo = ModelRepository(loader=_loader({}))
    repo.add(Double("good", "1"))
    with pytest.raises(InferenceError) as err:
        asyncio.run(repo.load("broken"))
    assert err.value.status == 400 and "protobuf parsing failed" in err.value.message
    assert repo.failed["broken"].reason.endswith("protobuf parsing failed")
    assert repo.ready()  # an operator's failed load does not take the replica out of rotation


def test_configured_model_that_failed_blocks_readiness_until_unloaded():
    repo = ModelRepository(loader=_loader({}))
    repo.add(Double("good", "1"))
    repo.fail("broken", "", "RuntimeError: model.onnx: protobuf parsing failed")  # at start-up
    with pytest.raises(InferenceError):
        asyncio.run(repo.load("broken"))  # retried by an operator, fails again
    assert not repo.ready()
    asyncio.run(repo.unload("broken"))  # the operator gives up on it: the server is ready again
    assert repo.ready() and [e.reason for e in repo.index() if e.name == "broken"] == ["unloaded"]


def test_unload_of_unknown_model_is_404():
    repo = ModelRepository()
    with pytest.raises(InferenceError) as err:
        asyncio.run(repo.unload("nope"))
    assert err.value.status == 404
