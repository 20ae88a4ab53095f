"""Export spec of the image-generation task: the denoiser (sample, timestep, label → noise).

- Parity: 64 validation-split digits, forward-noised at time steps spread over [0, T), a quarter of them
  with the null label, must give the same ε in onnxruntime as in PyTorch.
- Calibration (PTQ4DM, Shang et al. 2023): three sets of (x_t, t, label) rows, 1024 each by default,
  asked for by the quantizers of ``export.quantize``:
  ``ndtc`` — Normally Distributed Time-step Calibration: the step of the sampling trajectory is drawn
  from N(0.4, 0.4) as a fraction of the steps counted from the noise end (the authors' code), and x_t is
  the state the fp32 sampler reached there, starting from pure noise (not forward-noised data);
  ``uniform`` — the same trajectories, steps drawn uniformly; ``forward-noise`` — training images
  forward-noised at uniform t. Trajectories: DDIM, 50 steps, guidance 2, random labels, as served; the
  calibration rows carry the label or, for half of them, the null label, as guided sampling evaluates
  both.
- Quality of every ONNX graph: FID-digits and conditional accuracy (``export.fid_digits``, in the
  features of the ``vit-soft`` classifier) of 20 samples per class drawn through that graph with DDIM,
  20 steps, guidance 2, seed 0. Without a ``vit-soft`` in the store the quality is recorded as missing,
  with the reason; so it is for a model trained on a user's images (``kiln train ... --data DIR``), which
  FID-digits can not score: its fp32 graph serves on its parity check, its derived graphs are discarded.
- Quality gate of every derived graph (int8, TensorRT) against the fp32 graph, same samples and seed:
  FID-digits at most ``MAX_FID_INCREASE`` worse (relative) and conditional accuracy at most
  ``MAX_ACCURACY_LOSS`` lower. Without the FID classifier the gate cannot be checked, and the graph is
  discarded rather than served unmeasured.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.fid_digits import FidDigits
from export.gates import QualityGate
from export.quantize import CalibrationReader
from export.sessions import open_session
from kiln.artifacts import Artifact, ArtifactError
from model_zoo.schedulers import NoiseSchedule, create_sampler
from model_zoo.schedulers.loop import run_sampler, sample_steps
from training.data import recorded_image_data

PARITY_SAMPLES = 64
CALIBRATION_SAMPLES = 1024
CALIBRATION_TRAJECTORIES = 128  # fp32 sampler runs the calibration states are drawn from
CALIBRATION_STEPS = 50
NDTC_MEAN, NDTC_STD = 0.4, 0.4  # PTQ4DM's normal over the trajectory, fractions from the noise end
QUALITY_PER_CLASS = 20  # 200 samples: enough to rank graphs at equal settings, cheap enough for every export
QUALITY_STEPS = 20
GUIDANCE = 2.0
FID_CLASSIFIER = "vit-soft"
# PTQ4DM's 8-bit graphs sit within 6% of fp32 FID-digits at 500 samples (BENCHMARKS.md); at the export's
# 200 paired samples 20% leaves room for sampling noise and still rejects a broken quantization.
MAX_FID_INCREASE = 0.20
MAX_ACCURACY_LOSS = 0.05  # conditional accuracy, 10 of the 200 samples


def onnx_denoiser(graph: Path | str, threads: int | None = None):
    """``eps(x, t, labels) -> ε`` over an exported denoiser, for the sampling loops: an ONNX graph in
    onnxruntime (CPU), or a TensorRT engine (``export.sessions.open_session``)."""
    session = open_session(graph, threads)

    def eps(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = session.run(
            None,
            {
                "sample": x.numpy().astype(np.float32),
                "timestep": t.numpy().astype(np.int64),
                "label": labels.numpy().astype(np.int64),
            },
        )[0]
        return torch.from_numpy(out)

    return eps


def sample_digits(
    art: Artifact,
    denoise,
    *,
    labels: np.ndarray,
    sampler: str = "ddim",
    steps: int = QUALITY_STEPS,
    guidance: float = GUIDANCE,
    seed: int = 0,
    batch: int = 250,
    **options: Any,
) -> tuple[np.ndarray, float]:
    """Generate one image per label (N, 16, 16) in [-1, 1] with ``denoise``; returns (images, seconds)."""
    schedule = NoiseSchedule(**art.manifest["schedule"])
    size = tuple(art.manifest["image"]["size"])
    rng = torch.Generator().manual_seed(seed)
    out, t0 = [], time.perf_counter()
    for i in range(0, len(labels), batch):
        y = torch.as_tensor(labels[i : i + batch], dtype=torch.long)
        noise = torch.randn((len(y), 1, *size), generator=rng)
        scheduler = create_sampler(sampler, schedule, **options)
        loop = sample_steps(
            scheduler,
            noise,
            y,
            guidance,
            art.manifest["null_label"],
            num_inference_steps=steps,
            generator=rng,
        )
        out.append(run_sampler(loop, denoise).images[:, 0].clamp(-1, 1).numpy())
    return np.concatenate(out), time.perf_counter() - t0


def _real_images(art: Artifact, split: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The artifact's own split (digits, or the user's folder it recorded) as (N, h, w) in [-1, 1]."""
    x, y = recorded_image_data(art.manifest, size).inputs[split]
    return x[:, 0] * 2.0 - 1.0, y


class DiffusionExport:
    task = "image-generation"
    formats = ("onnx", "int8-ptq4dm", "int8-uniform", "int8-noised", "fp16-trt", "int8-trt")
    default_formats = ("onnx", "int8-ptq4dm")
    int8_format = "int8-ptq4dm"
    quality_gates = (
        QualityGate("fid_digits", MAX_FID_INCREASE, higher_is_better=False, relative=True),
        QualityGate("conditional_accuracy", MAX_ACCURACY_LOSS),
    )
    calibration_samples = CALIBRATION_SAMPLES
    quality_per_class = QUALITY_PER_CLASS

    def __init__(self) -> None:
        self._trajectory_cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _forward_noised(self, art: Artifact, split: str, n: int, seed: int) -> dict[str, np.ndarray]:
        size = tuple(art.manifest["image"]["size"])
        images, labels = _real_images(art, split, size)
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(images), size=n, replace=n > len(images))
        abar = NoiseSchedule(**art.manifest["schedule"]).alphas_cumprod().numpy()
        t = rng.integers(0, len(abar), size=n)
        eps = rng.standard_normal((n, 1, *size))
        x0 = images[idx][:, None]
        a = abar[t][:, None, None, None]
        # forward process, DDPM eq. (4): x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε
        x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
        y = np.where(rng.random(n) < 0.25, art.manifest["null_label"], labels[idx])
        return {"sample": x_t.astype(np.float32), "timestep": t.astype(np.int64), "label": y.astype(np.int64)}

    def example_inputs(self, art: Artifact) -> dict[str, np.ndarray]:
        return self._forward_noised(art, "val", 2, seed=0)

    def parity_inputs(self, art: Artifact) -> tuple[dict[str, np.ndarray], str]:
        rows = self._forward_noised(art, "val", PARITY_SAMPLES, seed=1)
        return rows, f"{PARITY_SAMPLES} forward-noised validation-split digits (t uniform, 1/4 null label)"

    def calibration(self, art: Artifact, name: str) -> CalibrationReader:
        n = self.calibration_samples
        if name == "forward-noise":
            return CalibrationReader(self._forward_noised(art, "train", n, seed=2))
        if name not in ("ndtc", "uniform"):
            raise ValueError(f"unknown calibration set {name!r}; valid: ['ndtc', 'uniform', 'forward-noise']")
        states, timesteps, labels = self._trajectories(art)
        rng = np.random.default_rng(3)
        steps = states.shape[0]
        if name == "ndtc":
            frac = np.clip(rng.normal(NDTC_MEAN, NDTC_STD, size=n), 0.0, 1.0 - 1e-9)
            step = (frac * steps).astype(np.int64)  # counted from the noise end: step 0 is pure noise
        else:
            step = rng.integers(0, steps, size=n)
        traj = rng.integers(0, states.shape[1], size=n)
        null = rng.random(n) < 0.5
        y = np.where(null, art.manifest["null_label"], labels[traj])
        return CalibrationReader(
            {
                "sample": states[step, traj].astype(np.float32),
                "timestep": timesteps[step].astype(np.int64),
                "label": y.astype(np.int64),
            }
        )

    def _trajectories(self, art: Artifact) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """fp32 DDIM runs from noise: states (steps, runs, 1, H, W), time steps (steps,), labels (runs,)."""
        if art.tag in self._trajectory_cache:
            return self._trajectory_cache[art.tag]
        denoise = onnx_denoiser(art.file(art.export("onnx")["file"]))
        schedule = NoiseSchedule(**art.manifest["schedule"])
        size = tuple(art.manifest["image"]["size"])
        rng = torch.Generator().manual_seed(4)
        labels = torch.randint(0, len(art.manifest["labels"]), (CALIBRATION_TRAJECTORIES,), generator=rng)
        x = torch.randn((CALIBRATION_TRAJECTORIES, 1, *size), generator=rng)
        scheduler = create_sampler("ddim", schedule)
        loop = sample_steps(
            scheduler, x, labels, GUIDANCE, art.manifest["null_label"], num_inference_steps=CALIBRATION_STEPS
        )
        states, times = [], []
        request = next(loop)
        try:
            while True:
                n = CALIBRATION_TRAJECTORIES
                states.append(request.x[:n].numpy())  # the state the denoiser is asked about at this step
                times.append(int(request.t[0]))
                request = loop.send(denoise(*request))
        except StopIteration:
            pass
        result = (np.stack(states), np.asarray(times), labels.numpy())
        self._trajectory_cache[art.tag] = result
        return result

    def quality(self, art: Artifact, graph: Path) -> dict[str, Any]:
        data = art.manifest.get("data") or {"kind": "digits"}
        if data["kind"] != "digits":  # FID-digits' classifier knows digits, not the user's classes
            return {
                "fid_digits": None,
                "quality_note": f"not measured: FID-digits scores digits, and {art.name} was trained on "
                f"{data['root']}; the fp32 graph serves on its parity check, derived graphs are not served",
            }
        try:
            fid = FidDigits(FID_CLASSIFIER)
        except (ArtifactError, ValueError) as exc:
            return {"fid_digits": None, "quality_note": f"not measured: {exc}"}
        labels = np.repeat(np.arange(len(art.manifest["labels"])), self.quality_per_class)
        images, seconds = sample_digits(art, onnx_denoiser(graph), labels=labels)
        return {
            "fid_digits": fid.fid(images),
            "conditional_accuracy": fid.conditional_accuracy(images, labels),
            "fid_classifier": fid.classifier,
            "quality_samples": f"{len(labels)} (DDIM {QUALITY_STEPS} steps, guidance {GUIDANCE}, seed 0)",
            "quality_seconds": round(seconds, 1),
        }
