"""``kiln bench vit``'s served harness against real servers: each peer server (benchmarks/peers) starts
and answers the OIP body with Kiln's prediction, and the load generators (wrk with the Lua body script,
the gRPC client) drive Kiln and report their own CPU use.

A peer whose package is missing is skipped with the reason; wrk missing fails in CI (.ci/run installs
Debian's ``wrk``) and skips elsewhere.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from benchmarks import peers, served

MODEL = "vit-soft"


@pytest.fixture(scope="module")
def image():
    from training.data import split_inputs

    x, _ = split_inputs("test", (32, 32))
    return x[:1]


@pytest.fixture(scope="module")
def onnx(server):
    from kiln.artifacts import get_artifact

    art = get_artifact(MODEL)
    return art.file(art.export("onnx")["file"])


@pytest.fixture(scope="module")
def bodies(server, image):
    input_name, output_name = served._model_io(server, MODEL)
    body = served.json_body(input_name, image)
    binary, header_length = served.binary_body(input_name, output_name, image)
    kiln = served.predictions(f"{server.http}/v2/models/{MODEL}/infer", body)
    return body, binary, header_length, kiln


def _need_wrk():
    if shutil.which("wrk") is None:
        if os.environ.get("CI"):
            pytest.fail("wrk is missing: .ci/run installs Debian's wrk package")
        pytest.skip("wrk is not installed (apt-get install wrk)")


@pytest.mark.parametrize("name", peers.PEERS)
def test_peer_answers_with_kilns_prediction(name, server, onnx, bodies, tmp_path):
    why = peers.missing(name)
    if why:
        pytest.skip(f"peer {name}: {why}")
    body, _, _, kiln = bodies
    peer = peers.start_peer(
        name, onnx, model=MODEL, threads=1, max_batch_size=8, batch_window_ms=2, body=body, log_dir=tmp_path
    )
    try:
        logits = served.predictions(peer.url, body)
        assert logits.shape == kiln.shape == (1, 10)
        np.testing.assert_allclose(logits, kiln, atol=1e-4)
        assert logits.argmax() == kiln.argmax()
    finally:
        peers.stop_peer(peer)
    assert peer.process.poll() is not None


def test_binary_body_gets_the_same_prediction(server, bodies):
    _, binary, header_length, kiln = bodies
    logits = served.predictions(f"{server.http}/v2/models/{MODEL}/infer", binary, header_length)
    np.testing.assert_allclose(logits, kiln, atol=1e-6)


def test_wrk_drives_kiln_with_json_and_binary_bodies(server, bodies):
    _need_wrk()
    body, binary, header_length, _ = bodies
    url = f"{server.http}/v2/models/{MODEL}/infer"
    for content, length in ((body, None), (binary, header_length)):
        cell = served.wrk_cell(url, content, length, concurrency=4, duration_s=1, warmup_s=0)
        assert cell["requests"] > 0 and cell["errors"] == 0, cell
        assert cell["req_per_s"] > 0 and cell["latency_ms_p50"] > 0
        assert 0 < cell["client_cpu_share"] < 1.5  # one wrk thread


def test_wrk_counts_error_answers(server, bodies):
    _need_wrk()
    _, binary, header_length, _ = bodies
    url = f"{server.http}/v2/models/{MODEL}/infer"
    cell = served.wrk_cell(url, binary, header_length + 1, concurrency=2, duration_s=1, warmup_s=0)
    assert cell["requests"] == 0 and cell["errors"] > 0  # a wrong header length is a 400 every time


def test_grpc_client_reports_its_cpu(server):
    cell = served.grpc_cell(server, MODEL, concurrency=4, duration_s=1, warmup_s=0.2)
    assert cell["requests"] > 0 and cell["errors"] == 0
    assert 0 < cell["client_cpu_share"] < 2
