"""Streamed generation in a real `kiln serve` process: ``/generate`` with ``stream`` read by a plain SSE
client (httpx, ``data:`` lines parsed here), OIP ``ModelStreamInfer`` read by tritonclient's gRPC stream,
Triton's generate / generate_stream over HTTP; client disconnects and step-level batching of streams.
"""

from __future__ import annotations

import base64
import io
import json
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from PIL import Image
from serverproc import metric_total

MODEL = "diffusion-digits"
SETTINGS = {"n": 2, "steps": 10, "seed": 3, "label": 4}


def _events(response: httpx.Response):
    """Server-sent events of a streamed response as (event type, data), read line by line."""
    kind, data = "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            kind = line[6:].strip()


def _stream(server, timeout=120, **body) -> list[tuple[str, str]]:
    with httpx.stream(
        "POST", f"{server.http}/generate", json={**SETTINGS, "stream": True, **body}, timeout=timeout
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(_events(r))


def _png_size(png: bytes) -> tuple[str, tuple[int, int]]:
    with Image.open(io.BytesIO(png)) as im:
        return im.mode, im.size


def _steps_total(server, **labels) -> float:
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    return metric_total(text, "kiln_denoiser_steps_total", model=MODEL, **labels)


def test_stream_sends_every_step_previews_then_the_unstreamed_body_byte_for_byte(server):
    plain = httpx.post(f"{server.http}/generate", json=SETTINGS, timeout=120)
    assert plain.status_code == 200, plain.text
    events = _stream(server, preview_every=4)
    assert [kind for kind, _ in events] == ["step"] * 10 + ["result"]
    steps = [json.loads(data) for _, data in events[:-1]]
    assert [s["step"] for s in steps] == list(range(1, 11)) and {s["steps"] for s in steps} == {10}
    ts = [s["t"] for s in steps]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == 10 and 0 <= ts[-1] < ts[0] <= 999
    assert [s["step"] for s in steps if "preview" in s] == [4, 8]
    for s in steps:
        for png in s.get("preview", []):
            assert _png_size(base64.b64decode(png)) == ("L", (16, 16))
        assert "preview" not in s or len(s["preview"]) == 2
    assert steps[3]["preview"] != steps[7]["preview"]  # x̂0 sharpens as the sampler goes
    # The final event is the unstreamed answer: the same bytes (same seed, settings, PNGs, scores).
    assert events[-1][1].encode() == plain.content


def test_stream_without_previews_and_other_samplers(server):
    for sampler in ("ddpm", "time-shift", "bdia"):
        events = _stream(server, sampler=sampler, steps=5)
        assert [kind for kind, _ in events] == ["step"] * 5 + ["result"], sampler
        assert all("preview" not in json.loads(data) for _, data in events[:-1])
        assert json.loads(events[-1][1])["sampler"] == sampler


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"stream": True, "sampler": "euler"}, "sampler"),
        ({"stream": True, "preview_every": 0}, "preview_every"),
        ({"stream": True, "preview_every": -3}, "preview_every"),
        ({"preview_every": 2}, "preview_every"),  # previews without a stream
        ({"stream": True, "n": 16, "steps": 1000, "filter_hallucinations": True}, "limit"),
        ({"stream": True, "model": "vit-soft"}, "not a image-generation model"),
    ],
)
def test_stream_bad_input_is_a_plain_json_400(server, payload, field):
    r = httpx.post(f"{server.http}/generate", json={**SETTINGS, **payload}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert re.search(field, r.json()["error"]), r.text


def test_a_disconnected_stream_stops_computing_and_other_streams_keep_running(server):
    before = _steps_total(server, sampler="ddpm")
    with httpx.stream(
        "POST",
        f"{server.http}/generate",
        json={"n": 4, "steps": 1000, "sampler": "ddpm", "seed": 0, "stream": True},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        events = _events(r)
        for _ in range(3):
            kind, _ = next(events)
            assert kind == "step"
        # another stream runs alongside, and after the first one's client has gone
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(_stream, server, sampler="ddim", steps=30)
            time.sleep(0.5)
    # the client closed the first stream here, 3+ of its 1000 steps in
    assert [kind for kind, _ in other.result()] == ["step"] * 30 + ["result"]
    time.sleep(1.0)
    first = _steps_total(server, sampler="ddpm")
    time.sleep(2.0)
    second = _steps_total(server, sampler="ddpm")
    assert 3 <= first - before < 1000
    assert second == first  # the abandoned loop stopped asking for ε: its rows left the batches
    assert httpx.post(f"{server.http}/generate", json=SETTINGS, timeout=60).status_code == 200


def test_two_concurrent_streams_share_denoiser_batches(server):
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    before_steps = metric_total(text, "kiln_denoiser_steps_total", model=MODEL, sampler="ddim")
    before_exec = metric_total(text, "kiln_inference_exec_count_total", model=MODEL, backend="onnxruntime")
    start = threading.Barrier(2)

    def one(seed):
        start.wait()
        return _stream(server, seed=seed, steps=100)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, [11, 12]))
    for events in results:
        assert [kind for kind, _ in events] == ["step"] * 100 + ["result"]
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    steps = metric_total(text, "kiln_denoiser_steps_total", model=MODEL, sampler="ddim") - before_steps
    executions = (
        metric_total(text, "kiln_inference_exec_count_total", model=MODEL, backend="onnxruntime")
        - before_exec
    )
    assert steps == 2 * 100
    assert executions < steps  # the two streams' rows ran in the same denoiser batches


# --- Open Inference Protocol ----------------------------------------------------------------------------


def _grpc_stream(server, requests: list[dict]) -> list[tuple]:
    """Send ``requests`` (async_stream_infer keyword arguments) on one tritonclient gRPC stream; returns
    every (result, error) the callback got, once each request has its final response or error."""
    received: queue.Queue = queue.Queue()
    client = tgrpc.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    try:
        for request in requests:
            client.async_stream_infer(MODEL, **request)
        got, done = [], 0
        while done < len(requests):
            result, error = received.get(timeout=120)
            got.append((result, error))
            if error is not None:
                done += 1
                continue
            final = result.get_response().parameters.get("triton_final_response")
            if final is None or final.bool_param:
                done += 1
        return got
    finally:
        client.stop_stream()
        client.close()


def test_grpc_model_stream_infer_sends_steps_then_the_images(server):
    plain = httpx.post(f"{server.http}/generate", json=SETTINGS, timeout=120).json()
    denoiser = []
    for name, arr in {
        "sample": np.zeros((1, 1, 16, 16), np.float32),
        "timestep": np.array([500], np.int64),
        "label": np.array([3], np.int64),
    }.items():
        tensor = tgrpc.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64")
        tensor.set_data_from_numpy(arr)
        denoiser.append(tensor)
    got = _grpc_stream(
        server,
        [
            # settings as request parameters; floats as strings (tritonclient sends str, bool and int)
            {
                "inputs": [],
                "request_id": "gen",
                "parameters": {**SETTINGS, "preview_every": 5, "guidance": "2.0"},
            },
            {"inputs": [], "request_id": "bad", "parameters": {**SETTINGS, "preview_every": 0}},
            {"inputs": denoiser, "request_id": "eps"},  # a denoiser request: one response, as before
        ],
    )
    errors = [error for _, error in got if error is not None]
    results = [result for result, error in got if error is None]
    assert len(errors) == 1 and "INVALID_ARGUMENT" in str(errors[0]) and "preview_every" in str(errors[0])
    generation = [r for r in results if r.get_response().id == "gen"]
    assert len(generation) == 11
    parameters = [r.get_response().parameters for r in generation]
    assert [p["step"].int64_param for p in parameters[:10]] == list(range(1, 11))
    assert [p["triton_final_response"].bool_param for p in parameters] == [False] * 10 + [True]
    for index, r in enumerate(generation[:10]):
        preview = r.as_numpy("preview")
        if index + 1 in (5, 10):
            assert preview.shape == (2,) and _png_size(preview[0]) == ("L", (16, 16))
        else:
            assert preview is None
    final = generation[-1]
    assert parameters[-1]["seed"].int64_param == 3 and parameters[-1]["label"].int64_param == 4
    images = final.as_numpy("images")
    assert [bytes(png) for png in images] == [base64.b64decode(png) for png in plain["images"]]
    np.testing.assert_array_equal(
        final.as_numpy("hallucination_scores"), np.asarray(plain["hallucination_scores"], np.float32)
    )
    eps = [r for r in results if r.get_response().id == "eps"]
    assert len(eps) == 1 and eps[0].as_numpy("noise").shape == (1, 1, 16, 16)


def test_oip_http_generate_stream_and_generate(server):
    plain = httpx.post(f"{server.http}/generate", json=SETTINGS, timeout=120).json()
    url = f"{server.http}/v2/models/{MODEL}"
    with httpx.stream(
        "POST", f"{url}/generate_stream", json={**SETTINGS, "preview_every": 5}, timeout=120
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(data) for kind, data in _events(r) if kind == "message"]
    assert len(events) == 11 and all(e["model_name"] == MODEL for e in events)
    assert [e["step"] for e in events[:10]] == list(range(1, 11))
    assert [len(e.get("preview", [])) for e in events[:10]] == [0, 0, 0, 0, 2, 0, 0, 0, 0, 2]
    final = events[-1]
    assert final["images"] == plain["images"] and final["seed"] == 3 and final["label"] == 4
    r = httpx.post(
        f"{url}/generate", json={**SETTINGS, "parameters": {"backend": "onnxruntime"}}, timeout=120
    )
    assert r.status_code == 200, r.text
    assert r.json()["images"] == plain["images"] and r.json()["backend"] == "onnxruntime"


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        (f"/v2/models/{MODEL}/generate_stream", {"n": 2, "sampler": "euler"}, "sampler"),
        (f"/v2/models/{MODEL}/generate_stream", {"n": 2, "preview_every": 0}, "preview_every"),
        (f"/v2/models/{MODEL}/generate", {"n": 2, "preview_every": 2}, "preview_every"),
        (f"/v2/models/{MODEL}/generate", {"n": 2, "stepz": 3}, "stepz"),
        (f"/v2/models/{MODEL}/generate", {"n": 2, "parameters": {"temperature": 1}}, "temperature"),
        ("/v2/models/vit-soft/generate_stream", {"n": 2}, "does not generate"),
    ],
)
def test_oip_http_generate_bad_input(server, route, body, message):
    r = httpx.post(f"{server.http}{route}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert re.search(message, r.json()["error"]), r.text


def test_a_cancelled_grpc_stream_stops_computing(server):
    received: queue.Queue = queue.Queue()
    client = tgrpc.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    before = _steps_total(server, sampler="ddpm")
    try:
        client.async_stream_infer(MODEL, [], parameters={"n": 4, "steps": 1000, "sampler": "ddpm", "seed": 0})
        for step in (1, 2, 3):
            result, error = received.get(timeout=60)
            assert error is None and result.get_response().parameters["step"].int64_param == step
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    time.sleep(1.0)
    first = _steps_total(server, sampler="ddpm")
    time.sleep(2.0)
    assert 3 <= first - before < 1000 and _steps_total(server, sampler="ddpm") == first


def test_an_error_after_the_stream_started_is_an_error_event(server):
    """The request's timeout (OIP parameter, µs) passes half-way: the steps so far, then the error."""
    body = {"n": 4, "steps": 1000, "sampler": "ddpm", "seed": 0, "parameters": {"timeout": 1_000_000}}
    with httpx.stream("POST", f"{server.http}/v2/models/{MODEL}/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(data) for _, data in _events(r)]
    assert len(events) >= 2 and all("step" in e for e in events[:-1])
    assert "timeout" in events[-1]["error"] and "images" not in events[-1]
    assert httpx.post(f"{server.http}/generate", json=SETTINGS, timeout=60).status_code == 200
