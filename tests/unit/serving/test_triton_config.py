"""Triton's config.pbtxt as Kiln reads it (serving.triton.config): every served field, the auto-complete
from the graph, the checks against the graph, and the refusals, each naming its field."""

from __future__ import annotations

import asyncio

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from serving.config import ServeConfig
from serving.repository import InferenceError
from serving.triton import config as tc
from serving.triton.model import load_version

FULL = """
name: "full"
platform: "onnxruntime_onnx"
max_batch_size: 16
version_policy: { latest { num_versions: 2 } }
input [
  { name: "image" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 1, 28, 28 ] reshape: { shape: [ 784 ] } },
  { name: "ids" data_type: TYPE_INT64 dims: [ -1 ] }
]
output [
  { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] label_filename: "labels.txt" },
  { name: "mask" data_type: TYPE_BOOL dims: [ -1 ] }
]
dynamic_batching {
  max_queue_delay_microseconds: 1500
  preferred_batch_size: [ 4, 8 ]
  preserve_ordering: true
  default_queue_policy { max_queue_size: 64 default_timeout_microseconds: 250000 timeout_action: REJECT }
}
instance_group [ { count: 2 kind: KIND_CPU }, { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]
"""


def _parse(text: str, name: str = "full"):
    return tc.parse_config(text, name)[0]


def _refused(text: str, *fragments: str, name: str = "m") -> str:
    with pytest.raises(tc.TritonConfigError) as err:
        tc.parse_config(text, name)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    return str(err.value)


def test_every_served_field_is_read():
    config = _parse(FULL)
    assert config.name == "full" and config.max_batch_size == 16
    inputs = tc.tensor_specs(config, "input")
    assert [(s.name, s.datatype, s.shape) for s in inputs] == [
        ("image", "FP32", (-1, 1, 28, 28)),
        ("ids", "INT64", (-1, -1)),
    ]
    outputs = tc.tensor_specs(config, "output")
    assert [(s.name, s.datatype, s.shape) for s in outputs] == [
        ("logits", "FP32", (-1, 10)),
        ("mask", "BOOL", (-1, -1)),
    ]
    assert tc.labels_file(config) == "labels.txt"
    assert tc.model_settings(config) == {
        "backend": "onnxruntime",
        "batch_max_size": 8,  # the largest preferred size
        "batch_window_ms": 1.5,
        "max_queue_size": 64,
        "max_queue_delay_ms": 250.0,
        "instances": 3,  # the groups' counts add up
    }
    assert tc.select_versions(config, [3, 1, 7, 2]) == [3, 7]


def test_backend_onnxruntime_names_the_same_platform_and_the_name_defaults_to_the_directory():
    config = _parse('backend: "onnxruntime"\nmax_batch_size: 0\n', name="dir")
    assert config.name == "dir" and config.max_batch_size == 0
    assert tc.model_settings(config) == {"backend": "onnxruntime", "batch_max_size": 1}


@pytest.mark.parametrize(
    ("triton", "oip"),
    [
        ("TYPE_FP32", "FP32"),
        ("TYPE_FP16", "FP16"),
        ("TYPE_INT64", "INT64"),
        ("TYPE_INT32", "INT32"),
        ("TYPE_INT8", "INT8"),
        ("TYPE_UINT8", "UINT8"),
        ("TYPE_BOOL", "BOOL"),
        ("TYPE_STRING", "BYTES"),
    ],
)
def test_datatypes(triton, oip):
    config = _parse(f'input [ {{ name: "x" data_type: {triton} dims: [ 3 ] }} ]', "m")
    assert tc.tensor_specs(config, "input")[0].datatype == oip


def test_without_dynamic_batching_each_request_runs_alone_and_batching_without_preferred_sizes_fills_max():
    assert tc.model_settings(_parse("max_batch_size: 8", "m"))["batch_max_size"] == 1
    settings = tc.model_settings(_parse("max_batch_size: 8\ndynamic_batching { }", "m"))
    assert settings["batch_max_size"] == 8 and settings["batch_window_ms"] == 0
    assert "max_queue_size" not in settings  # 0 (unbounded in Triton): Kiln's global bound applies


@pytest.mark.parametrize(
    ("policy", "want"),
    [
        ("", [9]),
        ("version_policy: { latest { num_versions: 2 } }", [4, 9]),
        ("version_policy: { all { } }", [1, 4, 9]),
        ("version_policy: { specific { versions: [ 1, 4, 5 ] } }", [1, 4]),
    ],
)
def test_version_policy(policy, want):
    assert tc.select_versions(_parse(policy, "m"), [9, 1, 4]) == want


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('platform: "tensorflow_savedmodel"', ["platform", "tensorflow_savedmodel", "onnxruntime_onnx"]),
        ('platform: "ensemble"', ["platform", "ensembles are not supported"]),
        ('backend: "python"', ["backend", "'python'", "executes nothing"]),
        ('backend: "pytorch"', ["backend", "'pytorch'"]),
        ("sequence_batching { }", ["sequence_batching"]),
        ("ensemble_scheduling { }", ["ensemble_scheduling"]),
        ('model_repository_agents { agents [ { name: "checksum" } ] }', ["model_repository_agents"]),
        ("model_transaction_policy { decoupled: true }", ["model_transaction_policy"]),
        ('batch_input [ { target_name: "x" } ]', ["batch_input"]),
        (
            "max_batch_size: 2\n"
            'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] allow_ragged_batch: true } ]',
            ["input[0].allow_ragged_batch"],
        ),
        (
            'output [ { name: "y" data_type: TYPE_INT32 dims: [ 1 ] is_shape_tensor: true } ]',
            ["output[0].is_shape_tensor"],
        ),
        ('input [ { name: "x" data_type: TYPE_BF16 dims: [ 1 ] } ]', ["input[0].data_type", "TYPE_BF16"]),
        ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 0 ] } ]', ["input[0].dims"]),
        ('input [ { name: "x" data_type: TYPE_FP32 } ]', ["input[0].dims is missing"]),
        ("input [ { data_type: TYPE_FP32 dims: [ 1 ] } ]", ["input[0].name is missing"]),
        (
            'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] },'
            ' { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]',
            ["input[1].name", "twice"],
        ),
        (
            'input [ { name: "x" data_type: TYPE_FP32 dims: [ 2, 3 ] reshape: { shape: [ 5 ] } } ]',
            ["input[0].reshape.shape"],
        ),
        ("max_batch_size: -1", ["max_batch_size"]),
        ("dynamic_batching { }", ["dynamic_batching", "max_batch_size"]),
        (
            "max_batch_size: 4\ndynamic_batching { preferred_batch_size: [ 8 ] }",
            ["dynamic_batching.preferred_batch_size"],
        ),
        ("max_batch_size: 4\ndynamic_batching { priority_levels: 2 }", ["dynamic_batching.priority_levels"]),
        (
            "max_batch_size: 4\ndynamic_batching { default_queue_policy { timeout_action: DELAY } }",
            ["dynamic_batching.default_queue_policy.timeout_action", "DELAY"],
        ),
        ("instance_group [ { kind: KIND_MODEL } ]", ["instance_group[0].kind", "KIND_MODEL"]),
        ("instance_group [ { count: 1 passive: true } ]", ["instance_group[0].passive"]),
        ("version_policy: { latest { num_versions: 0 } }", ["version_policy.latest.num_versions"]),
        ("version_policy: { specific { } }", ["version_policy.specific.versions"]),
        ('name: "other"', ["name", "'other'", "directory 'm'"]),
        ("max_batch_size: eight", ["malformed", "1:"]),
        ("no_such_field: 1", ["malformed", "no_such_field"]),
    ],
)
def test_what_kiln_does_not_serve_is_refused_naming_the_field(text, fragments):
    _refused(text, *fragments)


def test_fields_that_only_tune_triton_are_ignored_with_a_note():
    config, notes = tc.parse_config(
        "optimization { graph { level: 1 } }\n"
        'model_warmup [ { name: "w" } ]\nparameters { key: "k" value { } }',
        "m",
    )
    assert config.name == "m"
    assert sorted(n.split()[0] for n in notes) == ["model_warmup", "optimization", "parameters"]


def _graph(inputs, outputs) -> tc.Graph:
    return tc.Graph(
        tuple(tc.GraphTensor(n, d, s) for n, d, s in inputs),
        tuple(tc.GraphTensor(n, d, s) for n, d, s in outputs),
    )


BATCHED = _graph([("x", "FP32", (-1, 3, 4))], [("y", "FP32", (-1, 2))])


def test_auto_complete_fills_inputs_outputs_and_batching_from_the_graph():
    config, notes = tc.complete_config(_parse("", "m"), BATCHED, "model.onnx")
    assert config.max_batch_size == tc.DEFAULT_MAX_BATCH_SIZE and config.HasField("dynamic_batching")
    assert config.backend == "onnxruntime" and config.version_policy.latest.num_versions == 1
    assert [(s.name, s.shape) for s in tc.tensor_specs(config, "input")] == [("x", (-1, 3, 4))]
    assert [(s.name, s.shape) for s in tc.tensor_specs(config, "output")] == [("y", (-1, 2))]
    assert len(notes) == 3
    # a listed max_batch_size 0 with listed outputs: no batch dimension, the inputs come from the graph
    config, _ = tc.complete_config(
        _parse('output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, 2 ] } ]', "m"), BATCHED, "model.onnx"
    )
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [-1, 3, 4]
    # batched config, inputs only: the outputs come from the graph without the batch dimension
    config, _ = tc.complete_config(
        _parse('max_batch_size: 4\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 3, 4 ] } ]', "m"),
        BATCHED,
        "m.onnx",
    )
    assert list(config.output[0].dims) == [2]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            'max_batch_size: 4\ninput [ { name: "x" data_type: TYPE_INT64 dims: [ 3, 4 ] } ]',
            "data_type TYPE_INT64",
        ),
        (
            'max_batch_size: 4\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 3, 5 ] } ]',
            "dimension 2 is 5",
        ),
        (
            'max_batch_size: 4\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 12 ] } ]',
            "graph shape [-1, 12]",
        ),
        (
            'max_batch_size: 0\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 3, 4 ] } ]',
            "max_batch_size 0",
        ),
        (
            'max_batch_size: 4\ninput [ { name: "z" data_type: TYPE_FP32 dims: [ 3, 4 ] } ]',
            "has inputs ['x']",
        ),
        (
            'max_batch_size: 4\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 3, 4 ] } ]\n'
            'output [ { name: "nope" data_type: TYPE_FP32 dims: [ 2 ] } ]',
            "output[0] 'nope' is not an output",
        ),
        (
            "max_batch_size: 4\n"
            'input [ { name: "x" data_type: TYPE_FP32 dims: [ 12 ] reshape: { shape: [ 3, 4 ] } } ]\n'
            'output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]',
            "dimension 1 is 3",
        ),
    ],
)
def test_a_config_the_graph_contradicts_is_refused(text, fragment):
    with pytest.raises(tc.TritonConfigError) as err:
        tc.complete_config(_parse(text, "m"), BATCHED, "model.onnx")
    assert fragment in str(err.value), str(err.value)


def test_batching_needs_a_dynamic_first_dimension_in_the_graph():
    fixed = _graph([("x", "FP32", (1, 4))], [("y", "FP32", (1, 2))])
    with pytest.raises(tc.TritonConfigError, match="dynamic first dimension"):
        tc.complete_config(_parse("max_batch_size: 2", "m"), fixed, "model.onnx")
    config, _ = tc.complete_config(_parse("", "m"), fixed, "model.onnx")  # auto-complete: not batched
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 4]


def test_config_json_is_tritons_json_with_numbers_and_enum_names():
    out = tc.config_json(_parse(FULL))
    assert out["dynamic_batching"]["max_queue_delay_microseconds"] == 1500
    assert out["dynamic_batching"]["default_queue_policy"] == {
        "max_queue_size": 64,
        "default_timeout_microseconds": 250000,
    }
    assert out["input"][0] == {
        "name": "image",
        "data_type": "TYPE_FP32",
        "format": "FORMAT_NCHW",
        "dims": [1, 28, 28],
        "reshape": {"shape": [784]},
    }
    assert out["instance_group"][1] == {"count": 1, "kind": "KIND_GPU", "gpus": [0]}
    assert out["version_policy"] == {"latest": {"num_versions": 2}}


def test_read_graph_reads_inputs_outputs_and_dynamic_dimensions(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "g",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["batch", 2])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["batch", 2])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    assert tc.read_graph(tmp_path / "m.onnx") == _graph([("s", "BYTES", (-1, 2))], [("t", "BYTES", (-1, 2))])
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07 not a graph")
    with pytest.raises(tc.TritonConfigError, match="not a readable ONNX model"):
        tc.read_graph(tmp_path / "bad.onnx")


def _serve_config() -> ServeConfig:
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
    )


def test_a_loaded_version_reshapes_decodes_strings_and_serves_unbatched_tensors(tmp_path):
    """onnxruntime behind TritonModel: reshape both ways, BYTES as text, a model with no batch dimension."""
    model_dir = tmp_path / "echo"
    (model_dir / "1").mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"]), helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("s", TensorProto.STRING, ["batch", 2]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6]),
        ],
        [
            helper.make_tensor_value_info("t", TensorProto.STRING, ["batch", 2]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6]),
        ],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(model_dir / "1" / "model.onnx"),
    )
    (model_dir / "config.pbtxt").write_text(
        "max_batch_size: 4\n"
        'input [ { name: "s" data_type: TYPE_STRING dims: [ 2 ] },'
        ' { name: "x" data_type: TYPE_FP32 dims: [ 2, 3 ] reshape: { shape: [ 6 ] } } ]\n'
        'output [ { name: "t" data_type: TYPE_STRING dims: [ 2 ] },'
        ' { name: "y" data_type: TYPE_FP32 dims: [ 3, 2 ] reshape: { shape: [ 6 ] } } ]\n'
    )
    model = load_version(model_dir, 1, _serve_config())
    try:
        assert model.max_batch_size == 4 and model.settings.batch_max_size == 1
        assert [s.shape for s in model.inputs] == [(-1, 2), (-1, 2, 3)]
        x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
        strings = np.array([[b"a", b"b"], ["\u00e9".encode(), b"d"]], dtype=object)
        out = asyncio.run(model.infer({"s": strings, "x": x}))
        assert out["y"].shape == (2, 3, 2) and np.array_equal(out["y"].reshape(2, 6), x.reshape(2, 6))
        assert out["t"].tolist() == [["a", "b"], ["\u00e9", "d"]]
        with pytest.raises(InferenceError) as err:
            asyncio.run(model.infer({"s": np.array([[b"\xff", b"x"]], dtype=object), "x": x[:1]}))
        assert err.value.status == 400 and "UTF-8" in err.value.message
    finally:
        model.close()
