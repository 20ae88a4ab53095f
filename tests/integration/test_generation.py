"""The diffusion family in a real `kiln serve` process: /generate, /invert, /reconstruct, step-level
batching, the denoiser over the Open Inference Protocol (unmodified tritonclient), metrics, bad input.

The served denoiser is compared with onnxruntime run in this process on the artifact's graph.
"""

from __future__ import annotations

import base64
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image
from serverproc import metric_total

from export.diffusion import onnx_denoiser, sample_digits
from kiln.artifacts import get_artifact
from kiln.imaging import resize_bilinear
from training.data import digits_splits

MODEL = "diffusion-digits"


def _png_array(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.mode == "L"
        return np.asarray(im, dtype=np.float32) / 255.0


def _generate(server, timeout=120, **body):
    return httpx.post(
        f"{server.http}/generate", json={"n": 2, "steps": 10, "seed": 0, **body}, timeout=timeout
    )


def test_generate_matches_in_process_sampling_with_white_ink_on_black(server):
    r = _generate(server, n=4, label=7)
    assert r.status_code == 200, r.text
    body = r.json()
    art = get_artifact(MODEL)
    assert body["model"] == MODEL and body["version"] == art.version
    assert body["sampler"] == "ddim" and body["steps"] == 10 and body["seed"] == 0 and body["label"] == 7
    assert len(body["images"]) == 4 and len(body["hallucination_scores"]) == 4
    # The same seed, sampler and graph in this process: model space [-1, 1] with ink = +1, so a PNG pixel
    # is (x + 1) / 2 — white ink on black, like the training digits.
    expected, _ = sample_digits(
        art, onnx_denoiser(art.file(art.export("onnx")["file"])), labels=np.full(4, 7), steps=10, seed=0
    )
    for b64, image in zip(body["images"], expected, strict=True):
        assert np.abs(_png_array(b64) - (image + 1) / 2).max() <= 1 / 255 + 1e-4


def test_same_seed_same_images_other_seed_other_images(server):
    a = _generate(server, label=3).json()["images"]
    b = _generate(server, label=3).json()["images"]
    c = _generate(server, label=3, seed=1).json()["images"]
    assert a == b and a != c


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "time-shift", "bdia"])
def test_every_sampler_generates(server, sampler):
    r = _generate(server, sampler=sampler, label=1, eta=0.0, gamma=0.5)
    assert r.status_code == 200, r.text
    assert r.json()["sampler"] == sampler and len(r.json()["images"]) == 2


def test_unconditional_and_filtered_generation(server):
    before = httpx.get(f"{server.http}/metrics", timeout=10).text
    r = _generate(server, n=3, label=None, filter_hallucinations=True, oversample=2.0)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 3 and r.json()["label"] is None
    after = httpx.get(f"{server.http}/metrics", timeout=10).text
    rejected = metric_total(after, "kiln_hallucination_rejections_total", model=MODEL) - metric_total(
        before, "kiln_hallucination_rejections_total", model=MODEL
    )
    assert rejected == 3  # 6 drawn, the 3 highest-scoring dropped


def test_invert_then_reconstruct_reproduces_the_image_over_http(server):
    digit = resize_bilinear(digits_splits()["test"].images[0], (16, 16))
    settings = {"label": int(digits_splits()["test"].labels[0]), "steps": 50, "gamma": 1.0}
    r = httpx.post(f"{server.http}/invert", json={"image": digit.tolist(), **settings}, timeout=120)
    assert r.status_code == 200, r.text
    pair = r.json()
    assert np.asarray(pair["latent"]).shape == (16, 16) and np.asarray(pair["previous"]).shape == (16, 16)
    r = httpx.post(
        f"{server.http}/reconstruct",
        json={"latent": pair["latent"], "previous": pair["previous"], **settings},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    back = np.asarray(r.json()["image"])
    assert np.abs(back - digit).max() <= 1e-3
    assert np.abs(_png_array(r.json()["png"]) - digit).max() <= 1 / 255 + 1e-3


def test_invert_says_how_it_resized_the_image_and_reconstruct_gives_that_back(server):
    digit = [
        [0, 0, 1, 1, 0, 0],
        [0, 1, 0, 0, 1, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 0],
    ]
    settings = {"label": 2, "steps": 20, "gamma": 1.0}
    r = httpx.post(f"{server.http}/invert", json={"image": digit, **settings}, timeout=120)
    assert r.status_code == 200, r.text
    pair = r.json()
    assert pair["input_size"] == [5, 6] and pair["size"] == [16, 16]
    resized = np.asarray(pair["image"])
    assert np.allclose(resized, resize_bilinear(np.asarray(digit, dtype=np.float32), (16, 16)), atol=1e-6)
    r = httpx.post(
        f"{server.http}/reconstruct",
        json={"latent": pair["latent"], "previous": pair["previous"], **settings},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert np.abs(np.asarray(r.json()["image"]) - resized).max() <= 1e-3


def test_concurrent_generate_requests_share_denoiser_batches(server):
    before = httpx.get(f"{server.http}/metrics", timeout=10).text
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda s: _generate(server, seed=s, steps=20).status_code, range(6)))
    assert codes == [200] * 6
    after = httpx.get(f"{server.http}/metrics", timeout=10).text

    def delta(name, **labels):
        return metric_total(after, name, model=MODEL, **labels) - metric_total(
            before, name, model=MODEL, **labels
        )

    steps = delta("kiln_denoiser_steps_total")
    executions = delta("kiln_inference_exec_count_total", backend="onnxruntime")
    assert steps == 6 * 20
    assert executions < steps  # rows of different requests ran in the same denoiser batch


def test_a_client_that_disconnects_frees_its_slots(server):
    with pytest.raises(httpx.TimeoutException):
        _generate(server, n=16, steps=1000, sampler="ddpm", timeout=1.0)
    time.sleep(1.5)
    first = metric_total(
        httpx.get(f"{server.http}/metrics", timeout=10).text, "kiln_denoiser_steps_total", model=MODEL
    )
    time.sleep(1.5)
    second = metric_total(
        httpx.get(f"{server.http}/metrics", timeout=10).text, "kiln_denoiser_steps_total", model=MODEL
    )
    assert second == first  # the abandoned loop stopped asking for ε
    assert _generate(server).status_code == 200


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"n": 0}, 400, "n"),
        ({"n": 1000}, 400, "n"),
        ({"steps": 1}, 400, "steps"),
        ({"guidance": -1}, 400, "guidance"),
        ({"eta": 2}, 400, "eta"),
        ({"gamma": 0}, 400, "gamma"),
        ({"label": 10}, 400, "label"),
        ({"label": -1}, 400, "label"),
        ({"sampler": "euler"}, 400, "sampler"),
        ({"backend": "tensorflow"}, 400, "no backend 'tensorflow'"),
        ({"n": 16, "steps": 1000, "filter_hallucinations": True}, 400, "limit"),
        ({"model": "nope"}, 404, "unknown model 'nope'"),
        ({"model": "vit-soft"}, 400, "not a image-generation model"),
    ],
)
def test_generate_bad_input(server, payload, status, message):
    r = _generate(server, **payload)
    assert r.status_code == status, r.text
    assert re.search(message, r.json()["error"]), r.text
    assert _generate(server).status_code == 200


@pytest.mark.parametrize(
    ("route", "payload", "message"),
    [
        ("/invert", {"image": "not base64!"}, "base64"),
        ("/invert", {"image": [[0.0, 2.0]]}, r"\[0, 1\]"),
        ("/invert", {}, "image"),
        ("/invert", {"image": [[0.5]], "gamma": 0.5, "steps": 50}, "amplifies"),
        ("/reconstruct", {"latent": [[0.0]], "previous": [[0.0]]}, "16×16"),
        ("/reconstruct", {"latent": [[0.0] * 16] * 16}, "previous"),
    ],
)
def test_invert_reconstruct_bad_input(server, route, payload, message):
    r = httpx.post(f"{server.http}{route}", json=payload, timeout=30)
    assert r.status_code == 400, r.text
    assert re.search(message, r.json()["error"]), r.text


def _denoiser_inputs(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((n, 1, 16, 16)).astype(np.float32),
        "timestep": np.array([999, 500, 3][:n], dtype=np.int64),
        "label": np.array([7, 10, 2][:n], dtype=np.int64),
    }


def _reference(inputs):
    art = get_artifact(MODEL)
    sess = ort.InferenceSession(str(art.file(art.export("onnx")["file"])), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0]


def test_denoiser_over_oip_http_and_grpc_matches_in_process(server):
    inputs = _denoiser_inputs()
    expected = _reference(inputs)
    http = thttp.InferenceServerClient(server.http_hostport)
    meta = http.get_model_metadata(MODEL)
    assert [i["name"] for i in meta["inputs"]] == ["sample", "timestep", "label"]
    h_in = []
    for name, arr in inputs.items():
        t = thttp.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64")
        t.set_data_from_numpy(arr, binary_data=True)
        h_in.append(t)
    np.testing.assert_allclose(http.infer(MODEL, h_in).as_numpy("noise"), expected, atol=1e-5)
    grpc = tgrpc.InferenceServerClient(server.grpc)
    g_in = []
    for name, arr in inputs.items():
        t = tgrpc.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64")
        t.set_data_from_numpy(arr)
        g_in.append(t)
    np.testing.assert_allclose(grpc.infer(MODEL, g_in).as_numpy("noise"), expected, atol=1e-5)


def test_generation_metrics_and_openapi(server):
    _generate(server, sampler="ddim")
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    assert metric_total(text, "kiln_generated_images_total", model=MODEL, sampler="ddim") >= 2
    assert metric_total(text, "kiln_inference_batch_size_count", model=MODEL) > 0
    assert (
        metric_total(text, "kiln_inference_requests_total", model=MODEL, protocol="http", status="success")
        > 0
    )
    spec = httpx.get(f"{server.http}/docs.json", timeout=10).json()
    for path in ("/generate", "/invert", "/reconstruct", "/classify"):
        assert "post" in spec["paths"][path], path
        assert "requestBody" in spec["paths"][path]["post"], path


def test_label_by_class_name(server):
    """`label` names a class of the model's labels (a user's folder names; the digits' are "0".."9")."""
    by_name = _generate(server, label="3")
    assert by_name.status_code == 200, by_name.text
    assert by_name.json()["label"] == "3"
    assert by_name.json()["images"] == _generate(server, label=3).json()["images"]
    r = _generate(server, label="cat")
    assert r.status_code == 400 and "label 'cat' is not a class of diffusion-digits" in r.json()["error"]
