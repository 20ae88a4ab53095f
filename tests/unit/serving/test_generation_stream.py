"""GenerationStream and /generate's event stream, around a sampling run that is a plain coroutine here
(the real one, against a real server, is in tests/integration/test_generation_stream.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from serving.repository import InferenceError
from serving.tasks.generation import GenerateResponse, GenerationStream, StepEvent, _sse

ANSWER = GenerateResponse(
    images=["iVBO"], hallucination_scores=[0.5], model="m", version="1", backend="onnxruntime",
    sampler="ddim", steps=3, seed=7, label=None,
)  # fmt: skip


def _run(fail_at: int | None = None, error: Exception | None = None, steps: int = 3):
    async def run(on_step):
        for step in range(1, steps + 1):
            await asyncio.sleep(0)
            if step == fail_at:
                raise error
            on_step(StepEvent(step=step, steps=steps, t=1000 - step, preview=[b"png"] if step == 2 else None))
        return ANSWER

    return run


def _parse(chunks: list[bytes]) -> list[tuple[str, dict]]:
    events = []
    for chunk in chunks:
        kind, data = chunk.decode().rstrip("\n").split("\n")
        events.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


async def _collect(stream):
    return [chunk async for chunk in _sse(stream)]


def test_steps_then_the_answer_as_sse():
    async def main():
        return await _collect(await GenerationStream.open(_run()))

    events = _parse(asyncio.run(main()))
    assert [kind for kind, _ in events] == ["step", "step", "step", "result"]
    assert events[1][1] == {"step": 2, "steps": 3, "t": 998, "preview": ["cG5n"]}  # base64 of b"png"
    assert "preview" not in events[0][1]
    assert events[-1][1] == json.loads(ANSWER.model_dump_json())


def test_a_failure_before_the_first_step_raises_from_open():
    async def main():
        await GenerationStream.open(_run(fail_at=1, error=InferenceError(429, "overloaded")))

    with pytest.raises(InferenceError, match="overloaded"):
        asyncio.run(main())


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (InferenceError(504, "the request's timeout passed"), 504, "timeout"),
        (RuntimeError("bug"), 500, "bug"),
    ],
)
def test_a_failure_after_the_first_step_is_an_error_event(error, status, message):
    async def main():
        return await _collect(await GenerationStream.open(_run(fail_at=3, error=error)))

    events = _parse(asyncio.run(main()))
    assert [kind for kind, _ in events] == ["step", "step", "error"]
    assert events[-1][1]["status"] == status and message in events[-1][1]["error"]


def test_leaving_the_stream_early_cancels_the_run():
    async def main():
        stream = await GenerationStream.open(_run(steps=1000))
        events = aiter(stream)
        await anext(events)
        await events.aclose()  # what the server does when the client goes away
        with contextlib.suppress(asyncio.CancelledError):
            await stream._task
        return stream._task

    task = asyncio.run(main())
    assert task.cancelled()
