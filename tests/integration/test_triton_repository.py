"""A Triton model repository served unchanged by a real `kiln serve --model-repository`, called with
unmodified `tritonclient.http` and `tritonclient.grpc`; outputs compared to onnxruntime in this process.

The repository is built here: a classifier graph (two versions, a label file, ``reshape``, dynamic
batching with a preferred size and a queue bound, two instances), a graph without a batch dimension
(``max_batch_size: 0``), and broken models (malformed config, an ensemble, a graph that contradicts its
config, no version directory, an unreadable label file) that must be UNAVAILABLE with their reasons
while the others serve. A second server polls its repository: a version directory that appears is
served, one that goes is unloaded.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from serverproc import metric_total, start_server, stop_server

TOKEN = "triton-repository-test-token"
LABELS = ["zero", "one", "two"]

CLASSIFIER_CONFIG = """
name: "classifier"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { all { } }
input [ { name: "image" data_type: TYPE_FP32 dims: [ 2, 2 ] reshape: { shape: [ 4 ] } } ]
output [ { name: "probs" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]
dynamic_batching {
  max_queue_delay_microseconds: 2000
  preferred_batch_size: [ 4 ]
  default_queue_policy { max_queue_size: 32 }
}
instance_group [ { count: 2 kind: KIND_CPU } ]
"""

HALVE_CONFIG = """
backend: "onnxruntime"
max_batch_size: 0
input [ { name: "values" data_type: TYPE_INT32 dims: [ -1 ] } ]
output [ { name: "half" data_type: TYPE_FP32 dims: [ -1 ] } ]
"""

BROKEN = {  # model → (config.pbtxt, what its UNAVAILABLE reason must say)
    "malformed": ('max_batch_size: "eight"\n', "malformed"),
    "ensemble": ('platform: "ensemble"\nmax_batch_size: 1\n', "ensemble"),
    "python": ('backend: "python"\n', "executes nothing"),
    "contradicts": (
        CLASSIFIER_CONFIG.replace('"classifier"', '"contradicts"').replace(
            "dims: [ 2, 2 ] reshape: { shape: [ 4 ] }", "dims: [ 5 ]"
        ),
        "but 4 in model.onnx",
    ),
    "noversion": ('platform: "onnxruntime_onnx"\n', "no version directory"),
    "nolabels": (
        CLASSIFIER_CONFIG.replace('"classifier"', '"nolabels"').replace("labels.txt", "gone.txt"),
        "gone.txt",
    ),
}


def _save(path: Path, graph: onnx.GraphProto) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _classifier_graph(seed: int) -> onnx.GraphProto:
    """softmax(x W + b) over flattened 2x2 images; ``batch`` is a dynamic first dimension."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["image", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    return helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )


def _halve_graph() -> onnx.GraphProto:
    nodes = [
        helper.make_node("Cast", ["values"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["as_float", "c"], ["half"]),
    ]
    return helper.make_graph(
        nodes,
        "halve",
        [helper.make_tensor_value_info("values", TensorProto.INT32, ["n"])],
        [helper.make_tensor_value_info("half", TensorProto.FLOAT, ["n"])],
        [numpy_helper.from_array(np.array(0.5, dtype=np.float32), "c")],
    )


def _build_repository(root: Path) -> None:
    for version in (1, 2):
        _save(root / "classifier" / str(version) / "model.onnx", _classifier_graph(seed=version))
    (root / "classifier" / "config.pbtxt").write_text(CLASSIFIER_CONFIG)
    (root / "classifier" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    _save(root / "halve" / "1" / "model.onnx", _halve_graph())
    (root / "halve" / "config.pbtxt").write_text(HALVE_CONFIG)
    for name, (config, _) in BROKEN.items():
        (root / name).mkdir()
        (root / name / "config.pbtxt").write_text(config)
        if name != "noversion":
            _save(root / name / "1" / "model.onnx", _classifier_graph(seed=0))
        if name == "contradicts":
            (root / name / "labels.txt").write_text("\n".join(LABELS))


def _reference(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("triton-repository")
    _build_repository(root)
    return root


@pytest.fixture(scope="module")
def triton_server(repository, tmp_path_factory):
    home = tmp_path_factory.mktemp("triton-home")  # an empty model store: only the repository serves
    srv = start_server(
        home,
        "--no-train",
        "--model-repository",
        str(repository),
        env={"KILN_ADMIN_TOKEN": TOKEN, "KILN_MODELS": ""},
        ready_path="/v2/health/live",  # not ready: the broken models are configured and UNAVAILABLE
        timeout=300,
    )
    yield srv
    stop_server(srv.process)


def test_broken_models_are_unavailable_with_reasons_and_the_others_serve(triton_server):
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    index = thttp.InferenceServerClient(triton_server.http_hostport).get_model_repository_index()
    rows = {(row["name"], row.get("version", "")): row for row in index}
    assert rows[("classifier", "1")]["state"] == rows[("classifier", "2")]["state"] == "READY"
    assert rows[("halve", "1")]["state"] == "READY"
    by_name = {row["name"]: row for row in index}
    for name, (_, why) in BROKEN.items():
        assert by_name[name]["state"] == "UNAVAILABLE", by_name[name]
        assert why in by_name[name]["reason"], by_name[name]
    assert "dimension 1 is 5" in by_name["contradicts"]["reason"]
    assert "platform" in by_name["ensemble"]["reason"] and "backend" in by_name["python"]["reason"]
    grpc_index = tgrpc.InferenceServerClient(triton_server.grpc).get_model_repository_index(as_json=True)
    grpc_rows = {m["name"]: m for m in grpc_index["models"]}
    assert (
        grpc_rows["malformed"]["state"] == "UNAVAILABLE" and "malformed" in grpc_rows["malformed"]["reason"]
    )
    # strict readiness: configured models failed, so the server is not ready; each good model is
    ready = httpx.get(f"{triton_server.http}/v2/health/ready")
    assert ready.status_code == 503 and "malformed" in ready.text
    assert httpx.get(f"{triton_server.http}/v2/models/classifier/ready").status_code == 200
    assert httpx.get(f"{triton_server.http}/v2/models/malformed/ready").status_code == 503
    assert "UNAVAILABLE" in triton_server.log() and "ensembles are not supported" in triton_server.log()


def test_metadata_and_config_agree_with_the_repository_on_both_protocols(triton_server):
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    http = thttp.InferenceServerClient(triton_server.http_hostport)
    meta = http.get_model_metadata("classifier")
    assert meta["versions"] == ["1", "2"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 2, 2]}]
    assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 3]}]
    config = http.get_model_config("classifier")
    assert config["max_batch_size"] == 8 and config["backend"] == "onnxruntime"
    assert config["input"] == [
        {"name": "image", "data_type": "TYPE_FP32", "dims": [2, 2], "reshape": {"shape": [4]}}
    ]
    assert config["output"][0]["label_filename"] == "labels.txt" and config["output"][0]["dims"] == [3]
    assert config["dynamic_batching"] == {
        "max_queue_delay_microseconds": 2000,
        "preferred_batch_size": [4],
        "default_queue_policy": {"max_queue_size": 32},
    }
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert config["version_policy"] == {"all": {}}

    grpc_config = tgrpc.InferenceServerClient(triton_server.grpc).get_model_config("classifier").config
    assert grpc_config.max_batch_size == 8 and grpc_config.platform == "onnxruntime_onnx"
    assert list(grpc_config.input[0].dims) == [2, 2] and list(grpc_config.input[0].reshape.shape) == [4]
    assert grpc_config.output[0].label_filename == "labels.txt"
    assert grpc_config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(grpc_config.dynamic_batching.preferred_batch_size) == [4]
    assert grpc_config.dynamic_batching.default_queue_policy.max_queue_size == 32
    assert grpc_config.instance_group[0].count == 2
    assert grpc_config.version_policy.HasField("all")

    halve = http.get_model_config("halve")
    assert halve["max_batch_size"] == 0 and halve["input"][0]["dims"] == [-1]
    assert http.get_model_metadata("halve")["inputs"][0]["shape"] == [-1]


def test_infer_matches_onnxruntime_on_both_protocols_every_version(triton_server, repository):
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    images = np.random.default_rng(3).random((5, 2, 2), dtype=np.float32)
    for version in ("1", "2"):
        (want,) = _reference(
            repository / "classifier" / version / "model.onnx", {"image": images.reshape(5, 4)}
        )
        for module, url in ((thttp, triton_server.http_hostport), (tgrpc, triton_server.grpc)):
            client = module.InferenceServerClient(url)
            tensor = module.InferInput("image", [5, 2, 2], "FP32")
            tensor.set_data_from_numpy(images)
            result = client.infer("classifier", [tensor], model_version=version)
            np.testing.assert_allclose(result.as_numpy("probs"), want, rtol=1e-5, atol=1e-6)
    # no version: the highest one (Triton's default)
    client = thttp.InferenceServerClient(triton_server.http_hostport)
    tensor = thttp.InferInput("image", [5, 2, 2], "FP32")
    tensor.set_data_from_numpy(images)
    (want,) = _reference(repository / "classifier" / "2" / "model.onnx", {"image": images.reshape(5, 4)})
    np.testing.assert_allclose(client.infer("classifier", [tensor]).as_numpy("probs"), want, rtol=1e-5)

    values = np.arange(-3, 6, dtype=np.int32)  # no batch dimension: the whole tensor is one request
    (half,) = _reference(repository / "halve" / "1" / "model.onnx", {"values": values})
    for module, url in ((thttp, triton_server.http_hostport), (tgrpc, triton_server.grpc)):
        tensor = module.InferInput("values", [9], "INT32")
        tensor.set_data_from_numpy(values)
        result = module.InferenceServerClient(url).infer("halve", [tensor])
        np.testing.assert_array_equal(result.as_numpy("half"), half)


def test_bad_requests_are_refused_naming_the_problem(triton_server):
    base = f"{triton_server.http}/v2/models/classifier/infer"
    too_big = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [9, 2, 2], "data": [0.0] * 36}]}
    answer = httpx.post(base, json=too_big)
    assert answer.status_code == 400 and "max_batch_size" in answer.json()["error"]
    wrong = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 4], "data": [0.0] * 4}]}
    answer = httpx.post(base, json=wrong)
    assert answer.status_code == 400 and "image" in answer.json()["error"]
    answer = httpx.post(f"{triton_server.http}/v2/models/malformed/infer", json=wrong)
    assert answer.status_code == 503 and "malformed" in answer.json()["error"]


def test_classification_extension_uses_the_label_file(triton_server, repository):
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    images = np.random.default_rng(4).random((2, 2, 2), dtype=np.float32)
    (probs,) = _reference(repository / "classifier" / "2" / "model.onnx", {"image": images.reshape(2, 4)})
    for module, url in ((thttp, triton_server.http_hostport), (tgrpc, triton_server.grpc)):
        tensor = module.InferInput("image", [2, 2, 2], "FP32")
        tensor.set_data_from_numpy(images)
        output = module.InferRequestedOutput("probs", class_count=2)
        top = (
            module.InferenceServerClient(url)
            .infer("classifier", [tensor], outputs=[output])
            .as_numpy("probs")
        )
        assert top.shape == (2, 2)
        for row in range(2):
            best = np.argsort(-probs[row])[:2]
            for j, index in enumerate(best):
                score, got_index, label = top[row, j].decode().split(":")
                assert int(got_index) == index and label == LABELS[index]
                assert float(score) == pytest.approx(probs[row, index], rel=1e-4)


def test_dynamic_batching_statistics_and_metrics(triton_server):
    import tritonclient.http as thttp

    def one(i: int) -> None:
        client = thttp.InferenceServerClient(triton_server.http_hostport)
        tensor = thttp.InferInput("image", [1, 2, 2], "FP32")
        tensor.set_data_from_numpy(np.full((1, 2, 2), i / 32, dtype=np.float32))
        client.infer("classifier", [tensor], model_version="1")

    client = thttp.InferenceServerClient(triton_server.http_hostport)
    before = client.get_inference_statistics("classifier", "1")["model_stats"][0]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(32)))
    stats = client.get_inference_statistics("classifier", "1")["model_stats"][0]
    assert stats["name"] == "classifier" and stats["version"] == "1"
    assert stats["inference_count"] - before["inference_count"] == 32
    assert stats["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 32
    # batches close at the preferred size 4 (max_batch_size 8 only bounds one request)
    sizes = {b["batch_size"] for b in stats["batch_stats"]}
    assert sizes and max(sizes - {5}) <= 4, sizes  # 5: the 5-row requests of the other tests run alone
    metrics = httpx.get(f"{triton_server.http}/metrics").text
    assert metric_total(metrics, "kiln_inference_count_total", model="classifier", version="1") >= 32
    assert (
        metric_total(metrics, "kiln_model_ready", model="classifier", version="2", backend="onnxruntime") == 1
    )


def test_explicit_model_control_unloads_and_loads_a_repository_model(triton_server):
    import tritonclient.http as thttp

    client = thttp.InferenceServerClient(triton_server.http_hostport)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    refused = httpx.post(f"{triton_server.http}/v2/repository/models/halve/unload")
    assert refused.status_code == 401
    client.unload_model("halve", headers=headers)
    rows = {r["name"]: r for r in client.get_model_repository_index()}
    assert rows["halve"]["state"] == "UNAVAILABLE" and rows["halve"]["reason"] == "unloaded"
    client.load_model("halve", headers=headers)
    assert client.is_model_ready("halve")
    tensor = thttp.InferInput("values", [2], "INT32")
    tensor.set_data_from_numpy(np.array([4, 8], dtype=np.int32))
    np.testing.assert_array_equal(client.infer("halve", [tensor]).as_numpy("half"), [2.0, 4.0])
    # a load of a model Kiln refuses fails naming why, and the server keeps serving
    answer = httpx.post(f"{triton_server.http}/v2/repository/models/ensemble/load", headers=headers)
    assert answer.status_code == 400 and "ensemble" in answer.json()["error"]


def _wait(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_polling_serves_a_new_version_and_unloads_a_removed_one(tmp_path):
    import tritonclient.http as thttp

    root = tmp_path / "repository"
    _save(root / "poller" / "1" / "model.onnx", _classifier_graph(seed=1))
    (root / "poller" / "config.pbtxt").write_text(
        CLASSIFIER_CONFIG.replace('"classifier"', '"poller"').replace("version_policy: { all { } }", "")
    )
    (root / "poller" / "labels.txt").write_text("\n".join(LABELS))
    (tmp_path / "home").mkdir()
    srv = start_server(
        tmp_path / "home",
        "--no-train",
        "--model-repository",
        str(root),
        "--repository-poll-s",
        "0.5",
        env={"KILN_MODELS": ""},
        timeout=300,
    )
    try:
        client = thttp.InferenceServerClient(srv.http_hostport)
        assert client.get_model_metadata("poller")["versions"] == ["1"]
        images = np.random.default_rng(5).random((3, 2, 2), dtype=np.float32)

        def infer(version: str = "") -> np.ndarray:
            tensor = thttp.InferInput("image", [3, 2, 2], "FP32")
            tensor.set_data_from_numpy(images)
            return client.infer("poller", [tensor], model_version=version).as_numpy("probs")

        _save(root / "poller" / "2" / "model.onnx", _classifier_graph(seed=2))  # a new version appears
        _wait(lambda: client.get_model_metadata("poller")["versions"] == ["2"], "version 2 to replace 1")
        (want,) = _reference(root / "poller" / "2" / "model.onnx", {"image": images.reshape(3, 4)})
        np.testing.assert_allclose(infer(), want, rtol=1e-5)  # latest { num_versions: 1 }: 2 only
        rows = {(r["name"], r["version"]): r for r in client.get_model_repository_index()}
        assert (
            rows[("poller", "1")]["state"] == "UNAVAILABLE" and rows[("poller", "1")]["reason"] == "unloaded"
        )

        _save(root / "late" / "1" / "model.onnx", _halve_graph())  # a new model without config.pbtxt
        _wait(lambda: client.is_model_ready("late"), "the new model late to be ready")
        late = client.get_model_config("late")  # auto-completed: a rank-1 graph has no batch dimension
        assert late["max_batch_size"] == 0 and late["input"][0]["dims"] == [-1]

        shutil.rmtree(root / "poller" / "2")  # the served version goes: 1 is the newest again
        _wait(lambda: client.get_model_metadata("poller")["versions"] == ["1"], "version 1 to come back")
        (want,) = _reference(root / "poller" / "1" / "model.onnx", {"image": images.reshape(3, 4)})
        np.testing.assert_allclose(infer(), want, rtol=1e-5)
        assert httpx.post(
            f"{srv.http}/v2/models/poller/versions/2/infer",
            json={"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 2, 2], "data": [0.0] * 4}]},
        ).status_code in (404, 503)
        assert "left the repository" in srv.log() and "appeared in the repository" in srv.log()
    finally:
        stop_server(srv.process)
