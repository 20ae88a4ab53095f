"""The image-generation task: class-conditional diffusion behind ``/generate``, ``/invert``, ``/reconstruct``.

The exported graph is the denoiser alone (sample, timestep, label → noise); the samplers
(``model_zoo.schedulers``) run here, as generator loops that ask for ε one step at a time. Every ε goes
through the model's adaptive batcher, so concurrent requests share denoiser batches **step by step**:
a request joins the running batch at whatever step it is on and leaves when its loop ends, rows carry
their own time step, and a client that disconnects stops asking (its rows leave the next batch).
``KILN_GENERATION_BATCHING=request`` runs one request's loop at a time instead (the baseline that
``kiln bench diffusion`` compares against).

Pixels at the edge: images in [0, 1] with white ink on black (the training digits' convention; the
model works in [-1, 1]). ``/generate`` returns PNGs; ``/reconstruct`` returns floats too, since an 8-bit
PNG could not carry BDIA's exact round trip.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.imaging import resize_bilinear
from model_zoo.schedulers import SAMPLERS, BDIASampler, NoiseSchedule, create_sampler
from model_zoo.schedulers.hallucination import filter_lowest, hallucination_score
from model_zoo.schedulers.loop import arun_sampler, invert_steps, reconstruct_steps, sample_steps
from serving import metrics, sse
from serving.agent.tools import Tool
from serving.batching import request_timeout
from serving.images import decode_images
from serving.model import LoadedModel
from serving.repository import InferenceError, ModelRepository, StreamResponse
from serving.routes import observed, task_model

log = logging.getLogger("kiln.serving")

STEP_BATCH_ROWS = 256  # one denoiser batch: e.g. 16 concurrent requests × 8 images × 2 (guidance rows)
MAX_IMAGES = 64  # per request
MAX_WORK = 16 * 1000  # images × steps per request (before guidance doubling), bounded so a request ends
HALLUCINATION_WINDOW = 10  # the paper's K: variance of x̂0 over the last 10 steps
# BDIA's inverse divides by γ once per step, so float32 rounding grows like (1/γ)^(steps−1) on the way to
# the latent. Past this factor the round trip cannot come back within 1e-3 per pixel: /invert refuses.
MAX_INVERSION_AMPLIFICATION = 1e3


class ClientGone(Exception):
    """The client disconnected; the sampling loop stops and frees its batch slots."""


@dataclass
class StepEvent:
    """One sampler step ended (a streamed generation's progress): its number (1-based) of ``steps``,
    its nominal time step ``t``, and on preview steps PNGs of x̂0 (the predicted clean sample) of every
    drawn sample, white ink on black."""

    step: int
    steps: int
    t: int
    preview: list[bytes] | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"step": self.step, "steps": self.steps, "t": self.t}
        if self.preview is not None:
            body["preview"] = [base64.b64encode(png).decode() for png in self.preview]
        return body


class Generator(LoadedModel):
    task = "image-generation"

    def __init__(self, art, config):
        batching = config.settings_for(art.name).batch_max_size > 1
        super().__init__(art, config, batch_max_size=STEP_BATCH_ROWS if batching else 1)
        m = art.manifest
        self.schedule = NoiseSchedule(**m["schedule"])
        self.null_label = m["null_label"]
        self.num_classes = len(self.labels)
        self.image_size = tuple(m["image"]["size"])
        self._exclusive = asyncio.Lock() if config.generation_batching == "request" else None

    # --- the denoiser, one step of one request ------------------------------------------------------

    def _denoiser(
        self, backend: str, sampler: str, disconnected: Callable[[], Awaitable[bool]] | None
    ) -> Callable[..., Awaitable[torch.Tensor]]:
        steps = metrics.DENOISER_STEPS.labels(self.name, self.version, backend, sampler)

        async def eps(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            if disconnected is not None and await disconnected():
                raise ClientGone
            rows = x.shape[0]
            if labels is None:
                labels = torch.full((rows,), self.null_label, dtype=torch.long)
            out = await self.infer(
                {
                    "sample": x.numpy().astype(np.float32, copy=False),
                    "timestep": t.numpy().astype(np.int64, copy=False),
                    "label": labels.numpy().astype(np.int64, copy=False),
                },
                backend,
            )
            steps.inc()
            return torch.from_numpy(out["noise"])

        return eps

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        """The denoiser's declared ranges: a time step in [0, T) and a label in [0, null label] (the
        null label is classifier-free guidance's unconditional row). Out of range, the graph's embedding
        lookups would fail the whole batch the request shares with others."""
        super().check_inputs(inputs)
        steps = self.schedule.num_train_timesteps
        for name, high in (("timestep", steps - 1), ("label", self.null_label)):
            values = inputs.get(name)
            if values is None or values.size == 0:
                continue
            if values.dtype.kind not in "iu":
                raise InferenceError(400, f"input {name!r} must be integers, got {values.dtype}")
            low_seen, high_seen = int(values.min()), int(values.max())
            if low_seen < 0 or high_seen > high:
                bad = low_seen if low_seen < 0 else high_seen
                what = " (the last is the null label: unconditional)" if name == "label" else ""
                raise InferenceError(
                    400, f"input {name!r} of model {self.name!r} must lie in [0, {high}]{what}; got {bad}"
                )

    def work_rows(self, images: int, steps: int, label: int | None, guidance: float) -> int:
        """Denoiser rows a sampling loop asks for: images × steps, doubled by classifier-free guidance."""
        return images * (steps + 1) * (2 if label is not None and guidance != 1.0 else 1)

    async def _run(self, loop, denoise, backend: str, rows: int) -> Any:
        # Admission control: the request is admitted once against the denoiser batcher's bounds, by its
        # work (``rows``, with what the sampling loops in progress still have to run, must fit in half the
        # deadline at the measured rate: serving.batching.ADMISSION_HEADROOM); its steps are then never
        # refused half-way, and the deadline ends it with a 504 before the gateway's timeout. While it
        # runs it counts as in flight, so a reload or unload of the model waits for it.
        deadline = self.settings.generation_deadline_s
        with self.batchers[backend].session(rows, budget_s=deadline), self.busy(), request_timeout(deadline):
            if self._exclusive is None:
                return await arun_sampler(loop, denoise)
            async with self._exclusive:
                return await arun_sampler(loop, denoise)

    def _labels(self, label: int | str | None, n: int) -> torch.Tensor | None:
        if label is None:
            return None
        if isinstance(label, str):  # a class name: the model's labels (a user's folder names)
            if label not in self.labels:
                raise InferenceError(400, f"label {label!r} is not a class of {self.name}: {self.labels}")
            label = self.labels.index(label)
        if not 0 <= label < self.num_classes:
            raise InferenceError(400, f"label must be in [0, {self.num_classes - 1}] or null, got {label}")
        return torch.full((n,), label, dtype=torch.long)

    # --- the task's operations --------------------------------------------------------------------

    async def open_stream(
        self, parameters: dict[str, Any], backend: str | None
    ) -> AsyncIterator[StreamResponse]:
        """The decoupled (streaming) slot of the protocol front-ends: see :func:`open_oip_stream`."""
        return await open_oip_stream(self, parameters, backend)

    async def generate(
        self,
        *,
        n: int,
        label: int | str | None,
        steps: int,
        sampler: str,
        seed: int,
        guidance: float,
        eta: float,
        gamma: float,
        backend: str,
        filter_hallucinations: bool,
        oversample: float,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        on_step: Callable[[StepEvent], None] | None = None,
        preview_every: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` images (n, H, W) in [-1, 1] and their hallucination scores.

        ``on_step`` hears of every step as it ends (a :class:`StepEvent`), with PNGs of x̂0 of every
        drawn sample each ``preview_every`` steps; the images are the same with or without it.
        """
        drawn = int(np.ceil(n * oversample)) if filter_hallucinations else n
        options = {"ddim": {"eta": eta}, "time-shift": {"eta": eta}, "bdia": {"gamma": gamma}}.get(
            sampler, {}
        )
        scheduler = create_sampler(sampler, self.schedule, **options)
        rng = torch.Generator().manual_seed(seed)
        noise = torch.randn((drawn, 1, *self.image_size), generator=rng)

        def step_ended(index: int, x0: torch.Tensor) -> None:
            # the nominal time step: time shift evaluates each sample at its own, near this one
            timesteps = getattr(scheduler, "nominal_timesteps", None)
            if timesteps is None:
                timesteps = scheduler.timesteps
            step = index + 1
            preview = None
            if preview_every is not None and step % preview_every == 0:
                preview = [_png_bytes((img + 1.0) / 2.0) for img in x0[:, 0].clamp(-1, 1).numpy()]
            on_step(StepEvent(step=step, steps=len(timesteps), t=int(timesteps[index]), preview=preview))

        loop = sample_steps(
            scheduler,
            noise,
            self._labels(label, drawn),
            guidance,
            self.null_label,
            keep_x0=HALLUCINATION_WINDOW,
            num_inference_steps=steps,
            generator=rng,
            on_step=None if on_step is None else step_ended,
        )
        rows = self.work_rows(drawn, steps, label, guidance)
        result = await self._run(loop, self._denoiser(backend, sampler, disconnected), backend, rows)
        scores = hallucination_score(result.x0_history, HALLUCINATION_WINDOW)
        images = result.images
        if filter_hallucinations:
            keep = filter_lowest(scores, n)
            images, scores = images[keep], scores[keep]
            metrics.HALLUCINATION_REJECTIONS.labels(self.name, self.version, backend).inc(drawn - n)
        metrics.GENERATED_IMAGES.labels(self.name, self.version, backend, sampler).inc(n)
        return images[:, 0].clamp(-1, 1).numpy(), scores.numpy()

    async def invert(
        self, image: np.ndarray, *, label: int | None, steps: int, gamma: float, guidance: float, backend: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """BDIA encode: an (H, W) image in [0, 1] → its two latent states (latent, previous), each (h, w)."""
        x0 = torch.from_numpy(resize_bilinear(image, self.image_size) * 2.0 - 1.0)[None, None]
        loop = invert_steps(
            BDIASampler(self.schedule, gamma=gamma),
            x0,
            self._labels(label, 1),
            guidance,
            self.null_label,
            num_inference_steps=steps,
        )
        rows = self.work_rows(1, steps, label, guidance)
        pair = await self._run(loop, self._denoiser(backend, "bdia", None), backend, rows)
        return pair.latent[0, 0].numpy(), pair.previous[0, 0].numpy()

    async def reconstruct(
        self,
        latent: np.ndarray,
        previous: np.ndarray,
        *,
        label: int | str | None,
        steps: int,
        gamma: float,
        guidance: float,
        backend: str,
    ) -> np.ndarray:
        """BDIA decode of (latent, previous) → the (h, w) image in [0, 1]."""
        loop = reconstruct_steps(
            BDIASampler(self.schedule, gamma=gamma),
            torch.from_numpy(latent)[None, None],
            torch.from_numpy(previous)[None, None],
            self._labels(label, 1),
            guidance,
            self.null_label,
            num_inference_steps=steps,
        )
        rows = self.work_rows(1, steps, label, guidance)
        result = await self._run(loop, self._denoiser(backend, "bdia", None), backend, rows)
        return ((result.images[0, 0] + 1.0) / 2.0).numpy()


# --- HTTP ---------------------------------------------------------------------------------------------

Sampler = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]


# A class index or a class name (the manifest's labels: the folder names of a model trained on your images).
LabelRef = Annotated[int, Field(ge=0)] | str


class _Target(BaseModel):
    model: str = Field("diffusion-digits", description="A loaded image-generation model.")
    version: str = Field("", description="A loaded version; default the newest.")
    backend: str = Field(
        "", description="Runtime for the denoiser (onnxruntime, onnxruntime-int8, pytorch...)."
    )


class GenerateRequest(_Target):
    n: int = Field(ge=1, le=MAX_IMAGES, description="How many images.")
    label: LabelRef | None = Field(
        None, description="Class to generate, by index or name (digits: 0-9); null = unconditional."
    )
    steps: int = Field(20, ge=2, le=1000, description="Sampler steps.")
    sampler: Sampler = Field("ddim", description="ddpm (ancestral), ddim, time-shift (DDIM) or bdia (DDIM).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed + settings → same images.")
    guidance: float = Field(2.0, ge=0.0, le=20.0, description="Classifier-free guidance scale; 1 = none.")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM stochasticity (ddim, time-shift).")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="BDIA's γ (bdia).")
    filter_hallucinations: bool = Field(
        False, description="Oversample and keep the n images with the lowest hallucination score."
    )
    oversample: float = Field(2.0, ge=1.0, le=4.0, description="Draw n × oversample when filtering.")


class _StreamOptions(BaseModel):
    preview_every: int | None = Field(
        None,
        ge=1,
        description="When streaming: a PNG preview of x̂0 (the predicted clean image) of every drawn sample "
        "each this many steps; null = no previews.",
    )


class StreamedGenerateRequest(GenerateRequest, _StreamOptions):
    """``/generate``'s body: the ``generate`` tool's request, plus streaming."""

    stream: bool = Field(
        False,
        description="Answer text/event-stream: a `step` event per sampler step, then a `result` event "
        "whose data is the non-streamed answer.",
    )


class _OIPGenerateRequest(GenerateRequest, _StreamOptions):
    """A generation over the Open Inference Protocol: the settings come as request parameters (gRPC) or
    fields (HTTP generate extension); model, version and backend come from the protocol."""

    model_config = ConfigDict(extra="forbid")


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNGs, white ink on black.")
    hallucination_scores: list[float] = Field(description="Variance of x̂0 over the last 10 steps.")
    model: str
    version: str
    backend: str
    sampler: str
    steps: int
    seed: int
    label: int | str | None


class _BDIASettings(_Target):
    label: LabelRef | None = Field(
        None, description="Class (index or name) the image is inverted under; null = unconditional."
    )
    steps: int = Field(50, ge=2, le=1000, description="BDIA steps (the same for invert and reconstruct).")
    gamma: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="BDIA's γ (the same for invert and reconstruct). Inversion amplifies rounding by "
        "(1/γ)^(steps−1): γ = 1 is stable at any step count, smaller γ only for few steps.",
    )
    guidance: float = Field(1.0, ge=0.0, le=20.0, description="Guidance scale (the same for both).")


class InvertRequest(_BDIASettings):
    image: list[Any] | str = Field(
        description="Nested list H×W in [0, 1] (white ink = 1) or a base64 PNG/JPEG; "
        "resized to the model's size."
    )


class InvertResponse(BaseModel):
    latent: list[list[float]] = Field(description="BDIA's state at the noise end.")
    previous: list[list[float]] = Field(description="BDIA's second state, one step cleaner.")
    model: str
    version: str
    label: int | str | None
    steps: int
    gamma: float
    guidance: float
    input_size: list[int] = Field(description="[H, W] of the image as sent.")
    size: list[int] = Field(description="[h, w] it was resized to (bilinear): the model's image size.")
    image: list[list[float]] = Field(
        description="The image as inverted (resized, in [0, 1]): what /reconstruct gives back."
    )


class ReconstructRequest(_BDIASettings):
    latent: list[list[float]]
    previous: list[list[float]]


class ReconstructResponse(BaseModel):
    image: list[list[float]] = Field(description="H×W in [0, 1], white ink on black.")
    png: str = Field(description="The same image as a base64 PNG (8-bit).")
    model: str
    version: str


def _png_bytes(image01: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image01, 0, 1) * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _png(image01: np.ndarray) -> str:
    return base64.b64encode(_png_bytes(image01)).decode()


def _state(values: list[list[float]], field: str, size: tuple[int, int]) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float32)
    except ValueError:
        raise InferenceError(
            400, f"`{field}` must be a rectangular {size[0]}×{size[1]} nested list"
        ) from None
    if arr.shape != size:
        raise InferenceError(400, f"`{field}` must be {size[0]}×{size[1]}, got {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise InferenceError(400, f"`{field}` contains NaN or Inf")
    return arr


def _target(repo: ModelRepository, req: _Target, labels: dict) -> tuple[Generator, str]:
    served = task_model(repo, Generator, req.model, req.version)
    backend = served.resolve_backend(req.backend or None)
    labels.update(model=served.name, version=served.version, backend=backend)
    return served, backend


async def generate_images(
    repo: ModelRepository,
    req: GenerateRequest,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
    *,
    on_step: Callable[[StepEvent], None] | None = None,
    preview_every: int | None = None,
) -> GenerateResponse:
    """Sample digits (the ``/generate`` route and the ``generate`` tool both run this)."""
    with observed() as labels:
        served, backend = _target(repo, req, labels)
        return await _generate(
            served, backend, req, disconnected=disconnected, on_step=on_step, preview_every=preview_every
        )


async def _generate(
    served: Generator,
    backend: str,
    req: GenerateRequest,
    *,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    preview_every: int | None = None,
) -> GenerateResponse:
    drawn = req.n * (req.oversample if req.filter_hallucinations else 1)
    if drawn * req.steps > MAX_WORK:
        raise InferenceError(
            400,
            f"n × steps{' × oversample' if req.filter_hallucinations else ''} = "
            f"{drawn * req.steps:g} is over the per-request limit of {MAX_WORK}; "
            "ask for fewer images or steps",
        )
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    try:
        images, scores = await served.generate(
            n=req.n,
            label=req.label,
            steps=req.steps,
            sampler=req.sampler,
            seed=seed,
            guidance=req.guidance,
            eta=req.eta,
            gamma=req.gamma,
            backend=backend,
            filter_hallucinations=req.filter_hallucinations,
            oversample=req.oversample,
            disconnected=disconnected,
            on_step=on_step,
            preview_every=preview_every,
        )
    except ClientGone:
        raise InferenceError(499, "client closed the request") from None
    return GenerateResponse(
        images=[_png((img + 1.0) / 2.0) for img in images],
        hallucination_scores=[float(s) for s in scores],
        model=served.name,
        version=served.version,
        backend=backend,
        sampler=req.sampler,
        steps=req.steps,
        seed=seed,
        label=req.label,
    )


class GenerationStream:
    """A generation running in its own task, read as its :class:`StepEvent` s and then its answer.

    :meth:`open` starts it and waits for its first step, so a request refused before sampling began
    (bad settings, admission control's 429, an unknown backend) raises there, before anything was sent;
    iterating yields the steps and then the :class:`GenerateResponse`, and raises what failed after.
    Leaving the iteration early (the client went away) cancels the task: its queued denoiser rows leave
    the batch and its step-level batching session ends (:meth:`serving.batching.AdaptiveBatcher.session`).
    """

    def __init__(self, run: Callable[[Callable[[StepEvent], None]], Awaitable[GenerateResponse]]):
        self._events: asyncio.Queue[StepEvent | GenerateResponse | BaseException] = asyncio.Queue()
        self._first: StepEvent | GenerateResponse | BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._main(run))

    async def _main(self, run: Callable[[Callable[[StepEvent], None]], Awaitable[GenerateResponse]]) -> None:
        try:
            self._events.put_nowait(await run(self._events.put_nowait))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, who reports it
            self._events.put_nowait(exc)

    @classmethod
    async def open(
        cls, run: Callable[[Callable[[StepEvent], None]], Awaitable[GenerateResponse]]
    ) -> GenerationStream:
        """Start ``run(on_step)`` and wait for its first step; raises what failed before it."""
        stream = cls(run)
        try:
            first = await stream._events.get()
        except BaseException:  # cancelled: the client went away before the first step
            stream.close()
            raise
        if isinstance(first, BaseException):
            raise first
        stream._first = first
        return stream

    async def __aiter__(self) -> AsyncIterator[StepEvent | GenerateResponse]:
        try:
            item = self._first
            while True:
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerateResponse):
                    return
                item = await self._events.get()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the generation if it still runs (its rows leave the denoiser batches)."""
        if not self._task.done():
            self._task.cancel()


async def _sse(stream: GenerationStream) -> AsyncIterator[bytes]:
    """``/generate``'s event stream: ``step`` events, then ``result`` (the non-streamed body) or
    ``error`` (``{"error", "status"}``: what an unstreamed request would have been answered)."""
    try:
        async for item in stream:
            if isinstance(item, StepEvent):
                yield sse.encode_event(json.dumps(item.as_json(), separators=(",", ":")), event="step")
            else:  # the same bytes FastAPI answers the unstreamed request with (its response_model dump)
                yield sse.encode_event(item.model_dump_json(), event="result")
    except InferenceError as exc:
        yield sse.encode_event(json.dumps({"error": exc.message, "status": exc.status}), event="error")
    except Exception as exc:  # noqa: BLE001 - the stream has started: the error goes in it
        log.exception("streamed generation failed")
        message = f"internal server error: {type(exc).__name__}: {exc}"
        yield sse.encode_event(json.dumps({"error": message, "status": 500}), event="error")


async def open_oip_stream(
    served: Generator, parameters: dict[str, Any], backend: str | None
) -> AsyncIterator[StreamResponse]:
    """A generation over the Open Inference Protocol's streaming (gRPC ``ModelStreamInfer``, HTTP
    ``generate_stream``): validates ``parameters`` (the :class:`GenerateRequest` fields and
    ``preview_every``) and waits for the first step, raising :class:`InferenceError` before the stream
    starts; then one response per step (parameters ``step``, ``steps``, ``t``; output ``preview``, PNG
    BYTES, on preview steps) and a final one (outputs ``images``, PNG BYTES, and ``hallucination_scores``;
    parameters ``seed``, ``sampler``, ``steps``, ``backend``, ``label`` when conditional)."""
    for reserved in ("model", "version", "backend"):
        if reserved in parameters:
            raise InferenceError(
                400,
                f"generation parameter {reserved!r} is not allowed: the model and version are the request's, "
                "the backend is the request parameter 'backend'",
            )
    try:
        req = _OIPGenerateRequest(model=served.name, version=served.version, **parameters)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'parameters'}: {err['msg']}" for err in exc.errors()
        )
        raise InferenceError(400, f"invalid generation parameters: {problems}") from None
    resolved = served.resolve_backend(backend)
    stream = await GenerationStream.open(
        lambda on_step: _generate(served, resolved, req, on_step=on_step, preview_every=req.preview_every)
    )
    return _oip_responses(stream)


async def _oip_responses(stream: GenerationStream) -> AsyncIterator[StreamResponse]:
    async for item in stream:
        if isinstance(item, StepEvent):
            outputs = {} if item.preview is None else {"preview": np.array(item.preview, dtype=object)}
            yield StreamResponse(outputs, {"step": item.step, "steps": item.steps, "t": item.t}, final=False)
            continue
        parameters: dict[str, Any] = {
            "seed": item.seed, "sampler": item.sampler, "steps": item.steps, "backend": item.backend,
        }  # fmt: skip
        if item.label is not None:
            parameters["label"] = item.label
        outputs = {
            "images": np.array([base64.b64decode(png) for png in item.images], dtype=object),
            "hallucination_scores": np.array(item.hallucination_scores, dtype=np.float32),
        }
        yield StreamResponse(outputs, parameters, final=True)


def router(repo: ModelRepository) -> APIRouter:
    api = APIRouter(tags=["generation"])

    @api.post(
        "/generate",
        response_model=GenerateResponse,
        responses={
            200: {
                "content": {
                    sse.MEDIA_TYPE: {
                        "schema": {"type": "string"},
                        "description": "With stream: `step` events, then `result` (this body) or `error`.",
                    }
                }
            }
        },
    )
    async def generate(
        req: StreamedGenerateRequest, request: Request
    ) -> GenerateResponse | StreamingResponse:
        """Sample digits with a diffusion sampler; optionally filter hallucinations by oversampling, or
        stream the steps with previews (``stream``)."""
        if req.preview_every is not None and not req.stream:
            raise InferenceError(400, "preview_every: only applies to a streamed request (stream: true)")
        if not req.stream:
            return await generate_images(repo, req, request.is_disconnected)
        stream = await GenerationStream.open(
            lambda on_step: generate_images(
                repo, req, request.is_disconnected, on_step=on_step, preview_every=req.preview_every
            )
        )
        return StreamingResponse(_sse(stream), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)

    @api.post("/invert", response_model=InvertResponse)
    async def invert(req: InvertRequest) -> InvertResponse:
        """BDIA exact inversion: an image → the two latent states that /reconstruct turns back into it."""
        with observed() as labels:
            served, backend = _target(repo, req, labels)
            try:
                amplification = (1.0 / req.gamma) ** (req.steps - 1)
            except OverflowError:  # past float range (found by the schemathesis fuzz): over any limit
                amplification = float("inf")
            if amplification > MAX_INVERSION_AMPLIFICATION:
                lowest = MAX_INVERSION_AMPLIFICATION ** (-1.0 / (req.steps - 1))
                raise InferenceError(
                    400,
                    f"gamma={req.gamma:g} with {req.steps} steps amplifies rounding errors by "
                    f"{amplification:.3g}× on the way to the latent, so /reconstruct could not give the "
                    f"image back; use gamma >= {lowest:.3f} for {req.steps} steps (1.0 is stable) "
                    "or fewer steps",
                )
            (pixels,) = await decode_images([req.image], served.settings.max_image_pixels, "image")
            latent, previous = await served.invert(
                pixels,
                label=req.label,
                steps=req.steps,
                gamma=req.gamma,
                guidance=req.guidance,
                backend=backend,
            )
        return InvertResponse(
            latent=latent.tolist(),
            previous=previous.tolist(),
            model=served.name,
            version=served.version,
            label=req.label,
            steps=req.steps,
            gamma=req.gamma,
            guidance=req.guidance,
            input_size=list(pixels.shape),
            size=list(served.image_size),
            image=resize_bilinear(pixels, served.image_size).tolist(),
        )

    @api.post("/reconstruct", response_model=ReconstructResponse)
    async def reconstruct(req: ReconstructRequest) -> ReconstructResponse:
        """BDIA decode: the two latent states from /invert → the image (same label, steps, γ, guidance)."""
        with observed() as labels:
            served, backend = _target(repo, req, labels)
            image = await served.reconstruct(
                _state(req.latent, "latent", served.image_size),
                _state(req.previous, "previous", served.image_size),
                label=req.label,
                steps=req.steps,
                gamma=req.gamma,
                guidance=req.guidance,
                backend=backend,
            )
        return ReconstructResponse(
            image=image.tolist(), png=_png(image), model=served.name, version=served.version
        )

    return api


def tools(repo: ModelRepository) -> list[Tool]:
    """The task's tools slot: ``/generate`` for the agent and MCP clients (same request model)."""

    async def handler(req: GenerateRequest) -> GenerateResponse:
        return await generate_images(repo, req)

    return [
        Tool(
            name="generate",
            description="Generate n 16×16 handwritten digit images (optionally of one class `label`) with "
            "Kiln's diffusion model; returns base64 PNGs and a hallucination score per image.",
            request_model=GenerateRequest,
            handler=handler,
        )
    ]
