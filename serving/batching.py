"""Adaptive batching: concurrent requests to one model and backend are run as one batch.

A request joins the queue; the batch runs when it holds ``max_batch_size`` samples or when
``window_ms`` has passed since its oldest request arrived, whichever is first. The window is only
waited for when there is evidence of concurrent traffic (more than one request queued, or the previous
batch held more than one): a lone client is not made to pay the window on every request.
One batch runs at a time per model and backend, on a dedicated thread (onnxruntime and torch release
the GIL), so while a batch computes the next one fills up: under load batches grow by themselves even
with a zero window.
``max_batch_size=1`` turns batching off (each request runs alone, in arrival order).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from serving import metrics
from serving.repository import InferenceError

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    size: int
    future: asyncio.Future
    enqueued: float


class AdaptiveBatcher:
    def __init__(self, run: RunFn, *, max_batch_size: int, window_ms: float, labels: dict[str, str]):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._run = run
        self.max_batch_size = max_batch_size
        self.window = window_ms / 1000.0
        self._labels = labels
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._last_batch_requests = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{labels['model']}")

    async def submit(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one request (first axis = its batch) and wait for its slice of the batch's outputs."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._serve())
        size = len(next(iter(inputs.values())))
        pending = _Pending(inputs, size, loop.create_future(), time.perf_counter())
        self._queue.append(pending)
        self._wakeup.set()
        return await pending.future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                concurrent = len(self._queue) > 1 or self._last_batch_requests > 1
                deadline = self._queue[0].enqueued + (self.window if concurrent else 0.0)
                while self._queued_samples() < self.max_batch_size and time.perf_counter() < deadline:
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), deadline - time.perf_counter())
                    except asyncio.TimeoutError:
                        break
                    self._wakeup.clear()
                batch = [self._queue.popleft()]
                total = batch[0].size
                while self._queue and total + self._queue[0].size <= self.max_batch_size:
                    total += self._queue[0].size
                    batch.append(self._queue.popleft())
                self._last_batch_requests = len(batch)
                await self._execute(loop, batch, total)

    def _queued_samples(self) -> int:
        return sum(p.size for p in self._queue)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], total: int) -> None:
        start = time.perf_counter()
        for p in batch:
            metrics.QUEUE_SECONDS.labels(**self._labels).observe(start - p.enqueued)
        if len(batch) == 1:
            merged = batch[0].inputs
        else:
            merged = {k: np.concatenate([p.inputs[k] for p in batch]) for k in batch[0].inputs}
        try:
            outputs = await loop.run_in_executor(self._executor, self._run, merged)
        except Exception as exc:  # noqa: BLE001 - every waiting request must hear about the failure
            err = InferenceError(500, f"inference failed in {self._labels['backend']}: {exc}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        metrics.COMPUTE_SECONDS.labels(**self._labels).observe(time.perf_counter() - start)
        metrics.EXEC_COUNT.labels(**self._labels).inc()
        metrics.INFERENCE_COUNT.labels(**self._labels).inc(total)
        metrics.BATCH_SIZE.labels(**self._labels).observe(total)
        offset = 0
        for p in batch:
            if not p.future.done():  # the client may have gone away (cancelled)
                p.future.set_result({k: v[offset : offset + p.size] for k, v in outputs.items()})
            offset += p.size

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
