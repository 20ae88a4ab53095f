"""A Triton repository directory loaded into a real ModelRepository (serving.triton.repository): start-up
isolation, the version policy, and polling (new and removed versions and models, retries after a fix,
an operator's unload respected), in process with real onnxruntime sessions."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from serving.config import ServeConfig
from serving.repository import InferenceError, ModelRepository
from serving.triton.repository import TritonRepository

CONFIG = """
max_batch_size: 4
version_policy: { latest { num_versions: 2 } }
input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""


def _graph(path: Path, scale: float) -> None:
    """y = scale * x; the scale tells the versions apart."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(np.array(scale, dtype=np.float32), "s")],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _serve_config(root: Path) -> ServeConfig:
    return ServeConfig(
        models=(),
        backend="onnxruntime",
        http_port=3000,
        grpc_port=0,
        host="127.0.0.1",
        batch_max_size=32,
        batch_window_ms=0.0,
        max_request_bytes=1 << 20,
        workers=1,
        threads=1,
        log_level="INFO",
        drain_timeout_s=1.0,
        model_repository=str(root),
    )


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "repo"
    for version in (1, 2, 3):
        _graph(root / "scale" / str(version) / "model.onnx", float(version))
    (root / "scale" / "config.pbtxt").write_text(CONFIG)
    (root / "scale" / "0").mkdir()  # not a Triton version: ignored
    (root / "scale" / "notes").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "config.pbtxt").write_text("max_batch_size: [")
    (root / ".hidden").mkdir()
    repo = ModelRepository()
    triton = TritonRepository(root, _serve_config(root))
    repo.loader = triton.load
    triton.load_all(repo)
    yield root, repo, triton
    for versions in list(repo.models.values()):
        for model in versions.values():
            model.close()


async def _y(repo: ModelRepository, version: str | None = None) -> float:
    out = await repo.get("scale", version).infer({"x": np.ones((1, 2), dtype=np.float32)})
    return float(out["y"][0, 0])


def test_start_up_serves_the_policys_versions_and_isolates_a_broken_model(served):
    root, repo, _ = served
    assert sorted(repo.models["scale"]) == ["2", "3"] and repo.default_versions["scale"] == "3"
    rows = {(e.name, e.version): e for e in repo.index()}
    assert rows[("broken", "")].state == "UNAVAILABLE" and "malformed" in rows[("broken", "")].reason
    assert ".hidden" not in {e.name for e in repo.index()}
    assert "broken" in (repo.not_ready_reason() or "")  # strict readiness, as for a model-store model
    assert asyncio.run(_y(repo)) == 3.0 and asyncio.run(_y(repo, "2")) == 2.0


def test_polling_applies_new_and_removed_versions_and_models(served):
    root, repo, triton = served

    async def scenario():
        await triton.sync(repo)  # nothing changed: nothing happens
        assert sorted(repo.models["scale"]) == ["2", "3"]

        _graph(root / "scale" / "4" / "model.onnx", 4.0)
        await triton.sync(repo)
        assert sorted(repo.models["scale"]) == ["3", "4"] and await _y(repo) == 4.0
        assert {(e.version, e.reason) for e in repo.index() if e.name == "scale" and e.state != "READY"} == {
            ("2", "unloaded")
        }

        shutil.rmtree(root / "scale" / "4")
        await triton.sync(repo)
        assert sorted(repo.models["scale"]) == ["2", "3"] and await _y(repo) == 3.0
        with pytest.raises(InferenceError) as err:
            repo.get("scale", "4")
        assert err.value.status == 503

        (root / "broken" / "config.pbtxt").write_text(CONFIG)  # fixed, but no version yet
        await triton.sync(repo)
        assert "no version directory" in repo.failed["broken"].reason
        _graph(root / "broken" / "1" / "model.onnx", 5.0)
        await triton.sync(repo)  # its files changed since it failed: loaded now, the server is ready
        assert "broken" in repo.models and repo.ready()

        _graph(root / "fresh" / "1" / "model.onnx", 6.0)  # a new model without config.pbtxt
        await triton.sync(repo)
        assert repo.get("fresh").max_batch_size == 4  # auto-completed from the graph

        await repo.unload("fresh")  # an operator's unload holds until the directory changes
        await triton.sync(repo)
        assert "fresh" not in repo.models

        shutil.rmtree(root / "scale")  # the model leaves the repository
        await triton.sync(repo)
        assert "scale" not in repo.models

    asyncio.run(scenario())


def test_a_failing_version_is_retried_once_its_files_change(served):
    root, repo, triton = served

    async def scenario():
        (root / "scale" / "4").mkdir()
        (root / "scale" / "4" / "model.onnx").write_bytes(b"half-copied")
        await triton.sync(repo)  # 4 does not load; 2 and 3 keep serving
        assert sorted(repo.models["scale"]) == ["2", "3"]
        _graph(root / "scale" / "4" / "model.onnx", 4.0)
        await triton.sync(repo)
        assert sorted(repo.models["scale"]) == ["3", "4"] and await _y(repo) == 4.0

    asyncio.run(scenario())


def test_polling_reloads_a_served_version_whose_files_changed(served):
    root, repo, triton = served

    async def scenario():
        await triton.sync(repo)  # the first scan after start-up: nothing changed
        newest = repo.get("scale", "3")
        _graph(root / "scale" / "3" / "model.onnx", 30.0)
        _graph(root / "scale" / "2" / "model.onnx", 20.0)
        await triton.sync(repo)
        assert await _y(repo) == 30.0 and await _y(repo, "2") == 20.0
        assert repo.get("scale", "3") is not newest and not newest.ready()  # the old copy was closed
        (root / "scale" / "config.pbtxt").write_text(CONFIG.replace("dims: [ 2 ] }", "dims: [ 3 ] }", 1))
        await triton.sync(repo)  # a config the graph contradicts: the served copies keep serving
        assert await _y(repo) == 30.0 and sorted(repo.models["scale"]) == ["2", "3"]

    asyncio.run(scenario())


def test_explicit_loads_by_name_and_version(served):
    _, repo, _ = served

    async def scenario():
        await repo.unload("scale")
        model = await repo.load("scale")  # the newest version the policy serves
        assert model.version == "3"
        model = await repo.load("scale", "1")  # a version outside the policy, asked for by number
        assert model.version == "1" and await _y(repo) == 1.0
        with pytest.raises(InferenceError) as err:
            await repo.load("scale", "01")
        assert err.value.status == 400 and "not a Triton version" in err.value.message

    asyncio.run(scenario())


def test_an_admin_reload_leaves_the_ready_gauge_at_one(served):
    """ModelRepository.load of a loaded version (Triton's reload): the old copy's close() zeroes
    kiln_model_ready for labels the fresh copy shares; the fresh copy marks them ready again."""
    from serving import metrics

    _, repo, _ = served
    old = repo.get("scale", "3")
    gauge = metrics.MODEL_READY.labels(model="scale", version="3", backend=old.backends[0])
    assert gauge._value.get() == 1
    fresh = asyncio.run(repo.load("scale"))
    assert fresh is not old and fresh.version == "3" and not old.ready()
    assert gauge._value.get() == 1
