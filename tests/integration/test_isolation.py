"""One request never fails another, and work is bounded before it is done (issue 16), against a real
`kiln serve` process.

The server runs the diffusion model, a text and an image embedder and the daily forecaster, with small
per-model budgets set through ``KILN_MODEL_SETTINGS`` (the per-model settings path itself): the text
model takes at most 500 characters a text, and sampling requests get a 20 s deadline. Waits are on the
server's own metrics (``kiln_denoiser_steps_total``), not on sleeps, so the order of events is known.
"""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from serverproc import metric_total, start_server, stop_server

from serving.oip.proto import grpc_predict_v2_pb2 as pb
from serving.oip.proto import grpc_predict_v2_pb2_grpc as pb_grpc

DIFFUSION = "diffusion-digits"
TEXT = "xbt-new-text"
IMAGES = "embed-old"
TOKEN = "isolation-test-token"
DEADLINE_S = 20
SETTINGS = {
    TEXT: {"max_text_chars": 500},
    DIFFUSION: {"generation_deadline_s": DEADLINE_S},
}


@pytest.fixture(scope="module")
def srv(server, kiln_home):
    """A second server on the session's store (the `server` fixture trained and exported the models)."""
    s = start_server(
        kiln_home,
        "--no-train",
        "--models",
        f"{DIFFUSION},{TEXT},{IMAGES},forecaster-goog-daily",
        "--batch-window-ms",
        "5",
        "--max-request-bytes",
        str(8 * 1024 * 1024),
        env={
            "KILN_MODEL_SETTINGS": json.dumps(SETTINGS),
            "KILN_ADMIN_TOKEN": TOKEN,
            "KILN_DEMO_GALLERIES": "",
        },
        timeout=300,
    )
    yield s
    stop_server(s.process)


def _metric(srv, name: str, **labels: str) -> float:
    return metric_total(httpx.get(f"{srv.http}/metrics", timeout=10).text, name, **labels)


def _wait_for_steps(srv, above: float, timeout: float = 60) -> None:
    """Until the denoiser has run more than ``above`` steps (a sampling loop is under way)."""
    end = time.monotonic() + timeout
    while _metric(srv, "kiln_denoiser_steps_total", model=DIFFUSION) <= above:
        assert time.monotonic() < end, "the sampling loop never started"
        time.sleep(0.05)


def _denoiser_body(rows: int, timestep: int, label: int) -> dict:
    x = np.random.default_rng(0).standard_normal((rows, 1, 16, 16)).astype(np.float32)
    return {
        "inputs": [
            {"name": "sample", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()},
            {"name": "timestep", "datatype": "INT64", "shape": [rows], "data": [timestep] * rows},
            {"name": "label", "datatype": "INT64", "shape": [rows], "data": [label] * rows},
        ]
    }


def _png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# --- one request never fails another ------------------------------------------------------------------


def test_bad_oip_diffusion_requests_do_not_fail_a_generate_sharing_their_batches(srv):
    steps_before = _metric(srv, "kiln_denoiser_steps_total", model=DIFFUSION)
    url = f"{srv.http}/v2/models/{DIFFUSION}/infer"
    with ThreadPoolExecutor(8) as pool:
        good = pool.submit(
            httpx.post,
            f"{srv.http}/generate",
            json={"n": 8, "steps": 200, "label": 3, "seed": 1},
            timeout=120,
        )
        _wait_for_steps(srv, steps_before)  # the loop is under way: the bad requests join its batches
        bad = [
            pool.submit(httpx.post, url, json=_denoiser_body(2, t, lab), timeout=60)
            for t, lab in [(5000, 0), (10, 99), (-1, 0), (10, -3)] * 4
        ]
        answers = [b.result() for b in bad]
        generated = good.result()
    assert generated.status_code == 200, generated.text
    assert len(generated.json()["images"]) == 8
    for r in answers:
        assert r.status_code == 400, r.text
        assert "must lie in [0," in r.json()["error"]
    assert "'timestep'" in answers[0].json()["error"] and "'label'" in answers[1].json()["error"]
    # in range, the same request shape is served
    ok = httpx.post(url, json=_denoiser_body(2, 999, 10), timeout=60)
    assert ok.status_code == 200, ok.text


def test_non_utf8_text_over_grpc_does_not_fail_embeddings_in_the_same_batch(srv):
    def good(i: int) -> httpx.Response:
        return httpx.post(
            f"{srv.http}/v1/embeddings", json={"model": TEXT, "input": [f"a cat number {i}"] * 8}, timeout=60
        )

    def bad() -> grpc.RpcError | pb.ModelInferResponse:
        request = pb.ModelInferRequest(
            model_name=TEXT,
            inputs=[pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[2])],
        )
        request.inputs[0].contents.bytes_contents.extend([b"fine", b"\xff\xfe not utf-8"])
        with grpc.insecure_channel(srv.grpc) as channel:
            try:
                return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
            except grpc.RpcError as exc:
                return exc

    with ThreadPoolExecutor(12) as pool:
        goods = [pool.submit(good, i) for i in range(8)]
        bads = [pool.submit(bad) for _ in range(4)]
        goods = [g.result() for g in goods]
        bads = [b.result() for b in bads]
    assert all(g.status_code == 200 for g in goods), [g.text for g in goods if g.status_code != 200]
    for b in bads:
        assert isinstance(b, grpc.RpcError) and b.code() == grpc.StatusCode.INVALID_ARGUMENT, b
        assert "not valid UTF-8" in b.details()


# --- work budgets before work ----------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/embed", "/v1/embeddings"])
def test_text_length_is_capped_per_model_before_tokenising(srv, route):
    long = "word " * 120  # 600 characters, over this model's max_text_chars of 500
    body = {"model": TEXT, "texts": ["short", long]} if route == "/embed" else {"model": TEXT, "input": long}
    r = httpx.post(f"{srv.http}{route}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert "600 characters; at most 500" in message and "max_text_chars" in message
    fits = (
        {"model": TEXT, "texts": [long[:500]]} if route == "/embed" else {"model": TEXT, "input": long[:500]}
    )
    assert httpx.post(f"{srv.http}{route}", json=fits, timeout=60).status_code == 200


def test_image_pixels_are_budgeted_from_the_headers_before_decoding(srv):
    # 20 PNGs of 1000×1000 black pixels: ~20 kB of body, 20 M pixels (80 MB as float32) once decoded,
    # over the default budget of 16 Mi pixels
    big = _png(1000, 1000)
    r = httpx.post(f"{srv.http}/embed", json={"model": IMAGES, "images": [big] * 20}, timeout=60)
    assert r.status_code == 400, r.text
    assert "max_image_pixels" in r.json()["error"]
    assert (
        httpx.post(f"{srv.http}/embed", json={"model": IMAGES, "images": [big] * 2}, timeout=60).status_code
        == 200
    )
    too_many = httpx.post(
        f"{srv.http}/embed", json={"model": IMAGES, "images": [_png(8, 8)] * 257}, timeout=60
    )
    assert too_many.status_code == 400 and "at most 256" in too_many.json()["error"]


def _bars(stamps) -> list[dict]:
    return [
        {"timestamp": t, "open": 10.0, "high": 11.0, "low": 9.0, "close": 10.5, "volume": 100.0}
        for t in stamps
    ]


def test_bars_out_of_range_or_over_the_filled_bound_are_400(srv):
    days = [int(t.timestamp()) for t in pd.bdate_range("2020-01-01", periods=300)]
    overflow = _bars([*days[:-1], 1e30])
    r = httpx.post(f"{srv.http}/forecast", json={"bars": overflow, "horizon": 3}, timeout=60)
    assert r.status_code == 400 and "out of range" in r.json()["error"], r.text
    # 24/7 daily bars in runs of 3, 40 days apart: 1800 bars given, 599 gaps of 37 missing bars to fill
    every = pd.date_range("1960-01-01", periods=1800 // 3 * 40, freq="D")
    sparse = [str(t.date()) for i, t in enumerate(every) if i % 40 < 3]
    r = httpx.post(f"{srv.http}/forecast", json={"bars": _bars(sparse), "gaps": "fill"}, timeout=60)
    assert r.status_code == 400 and "at most 20000" in r.json()["error"], r.text
    assert httpx.get(f"{srv.http}/v2/health/live", timeout=10).status_code == 200


# --- generation admitted by its work ----------------------------------------------------------------


def test_generation_is_refused_at_arrival_when_its_work_would_not_finish_by_the_deadline(srv):
    t0 = time.monotonic()
    warm = httpx.post(f"{srv.http}/generate", json={"n": 16, "steps": 50, "label": 1, "seed": 0}, timeout=120)
    warm_seconds = time.monotonic() - t0
    assert warm.status_code == 200  # measures the denoiser's rate at this request's batch size
    # A request of about a sixth of the deadline's work on this machine (whatever its speed): a few fit in
    # the half of the deadline that admission fills (serving.batching.ADMISSION_HEADROOM), sixteen do not.
    steps = max(2, min(1000, int(50 * DEADLINE_S / 6 / warm_seconds)))
    refused_before = _metric(srv, "kiln_inference_rejected_total", model=DIFFUSION, reason="work")
    body = {"n": 16, "steps": steps, "label": 2}

    def generate(i: int) -> tuple[httpx.Response, float]:
        t0 = time.monotonic()
        r = httpx.post(f"{srv.http}/generate", json={**body, "seed": i}, timeout=120)
        return r, time.monotonic() - t0

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(generate, range(16)))
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 429}, [r.text for r, _ in results if r.status_code not in (200, 429)]
    assert 200 in codes and 429 in codes, codes
    slowest_ok = max(s for (r, s) in results if r.status_code == 200)
    for r, seconds in results:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert "deadline" in r.json()["error"]
            assert seconds < slowest_ok  # refused at arrival, not after waiting
    refused = _metric(srv, "kiln_inference_rejected_total", model=DIFFUSION, reason="work") - refused_before
    assert refused == codes.count(429)


def test_a_reload_waits_for_the_sampling_loops_in_flight(srv):
    steps_before = _metric(srv, "kiln_denoiser_steps_total", model=DIFFUSION)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(
            httpx.post, f"{srv.http}/generate", json={"n": 4, "steps": 600, "seed": 3}, timeout=120
        )
        _wait_for_steps(srv, steps_before)
        reload = httpx.post(
            f"{srv.http}/v2/repository/models/{DIFFUSION}/load",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=120,
        )
        generated = running.result()
    assert reload.status_code == 200, reload.text
    assert generated.status_code == 200, generated.text
    assert len(generated.json()["images"]) == 4
    after = httpx.post(f"{srv.http}/generate", json={"n": 1, "steps": 10, "seed": 0}, timeout=60)
    assert after.status_code == 200


def test_gallery_upsert_budgets_count_and_pixels_before_decoding(server):
    """On the session's server, whose demo gallery ``digits`` is indexed by embed-old."""
    from serving.admin import scope_token

    url = f"{server.http}/galleries/digits/items"
    auth = {"Authorization": f"Bearer {scope_token('write')}"}  # gallery writes need the write scope
    big = _png(1000, 1000)  # 20 of them: 20 M pixels, over the default 16 Mi
    items = [{"id": f"isolation-big-{i}", "image": big} for i in range(20)]
    r = httpx.post(url, json={"items": items}, timeout=120, headers=auth)
    assert r.status_code == 400 and "max_image_pixels" in r.json()["error"], r.text
    many = [{"id": f"isolation-many-{i}", "image": _png(8, 8)} for i in range(1001)]
    r = httpx.post(url, json={"items": many}, timeout=120, headers=auth)
    assert r.status_code == 400 and "1001 items in one request; at most 1000" in r.json()["error"], r.text
