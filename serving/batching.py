"""Adaptive batching with admission control: a bounded queue per model and backend.

A request joins the queue; the batch runs when it holds ``max_batch_size`` samples or when
``window_ms`` has passed since its oldest request arrived, whichever is first. The window is only
waited for when there is evidence of concurrent traffic (more than one request queued, the previous
batch held more than one, or more than one sampling loop is in progress): a lone client is not made to
pay the window on every request.
``instances`` batches run at a time (Triton's ``instance_group`` count), each on its own runtime and
thread (onnxruntime and torch release the GIL), so while batches compute the next one fills up: under
load batches grow by themselves even with a zero window. ``max_batch_size=1`` turns batching off (each
request runs alone, in arrival order).

Admission control (Triton's ``max_queue_size`` and queue policy, ``model_config.proto``): a request is
refused at once with :class:`Overloaded` (HTTP 429 + ``Retry-After``, gRPC RESOURCE_EXHAUSTED) when
``max_queue_size`` requests already wait, or when the estimated time it would wait — the rows ahead of it
times the recent time per row, over the instances — is over ``max_queue_delay_ms``. The estimate is per
row, not per batch, so one slow batch of many heavy rows does not make a later one-row request look
expensive. The estimate keeps
the queue short; the bound itself is enforced when a batch forms: a request that has waited longer is
refused then (Triton's ``timeout_action: REJECT``). Requests whose client has gone (cancelled futures)
or whose own deadline (:func:`request_timeout`) has passed leave the queue without being computed.

A multi-step request (a diffusion sampler asking for ε once per step) is admitted once, by
:meth:`AdaptiveBatcher.session`, by its work: the rows it will ask for, with the rows the sessions in
progress still have to run, must finish within its deadline at the sessions' measured wall time per row
(which counts the loop's own time between its steps, not only the runtime's). Its steps then queue
without the checks, so an admitted request is never refused half-way.

Isolation: a batch whose run fails is split in halves and each half re-run (bisection, as
``torch.utils.data``-free servers such as Triton's dynamic batcher leave to the backend), so only the
request whose rows make the runtime fail gets the error; the others in the batch complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving import metrics
from serving.repository import InferenceError

log = logging.getLogger("kiln.serving")

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

# Defaults an operator would pick for CPU models whose batch computes in milliseconds: 256 waiting
# requests is 8 full batches of the default 32, and a request that would wait more than a second is
# better told at once (429) so its client can retry another replica than left to time out; one second
# also bounds how long a SIGTERM drain spends on queued work.
DEFAULT_MAX_QUEUE_SIZE = 256
DEFAULT_MAX_QUEUE_DELAY_MS = 1000.0
_EWMA = 0.2  # weight of the newest batch in the time-per-row estimate
# Sessions are admitted while their estimated work fits in this fraction of their deadline: the rate is a
# recent average, and a machine shared with other work changes speed by 2x within seconds (measured on
# the 2-core CI machine under load: three admitted sampling loops estimated at 19.6 s took 22 s).
ADMISSION_HEADROOM = 0.5

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("kiln_deadline", default=None)
_SESSION: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("kiln_session", default=None)


class Overloaded(InferenceError):
    """The model's queue is full (429); ``retry_after_s`` says when to try again."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(429, message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> str:
        """The ``Retry-After`` header value: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


class DeadlineExceeded(InferenceError):
    """The request's own timeout passed before it completed (504 / DEADLINE_EXCEEDED)."""

    def __init__(self, message: str):
        super().__init__(504, message)


@contextlib.contextmanager
def request_timeout(seconds: float | None) -> Iterator[None]:
    """Give the requests submitted inside the block (and in tasks started from it) a deadline.

    ``seconds`` from now; None leaves any outer deadline as it is. The tighter of an outer deadline and
    this one wins. A request still queued at its deadline is dropped without being computed; one still
    computing is answered with :class:`DeadlineExceeded` at the deadline (its rows finish and are
    discarded).
    """
    if seconds is None:
        yield
        return
    deadline = time.monotonic() + max(0.0, seconds)
    outer = _DEADLINE.get()
    token = _DEADLINE.set(deadline if outer is None else min(outer, deadline))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def timeout_parameter(parameters: dict[str, Any]) -> float | None:
    """Seconds from an OIP request's ``timeout`` parameter (microseconds, as Triton's clients send it).

    Raises:
        InferenceError: 400 when it is not a non-negative integer.
    """
    value = parameters.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InferenceError(
            400, f"parameter 'timeout' must be a non-negative integer of microseconds, got {value!r}"
        )
    return value / 1e6 if value else None  # 0 = no timeout, as in Triton


@dataclass(eq=False)
class _Session:
    """An admitted multi-step request: the rows it declared and has not submitted yet."""

    remaining: int


@dataclass(eq=False)
class _Pending:
    inputs: dict[str, np.ndarray]
    size: int
    future: asyncio.Future
    enqueued: float  # time.monotonic()
    deadline: float | None
    admitted: bool  # a step of an admitted session: never refused for queue time
    running: bool = False


class AdaptiveBatcher:
    def __init__(
        self,
        run: RunFn | Sequence[RunFn],
        *,
        max_batch_size: int,
        window_ms: float,
        labels: dict[str, str],
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        max_queue_delay_ms: float = DEFAULT_MAX_QUEUE_DELAY_MS,
    ):
        """
        Args:
            run: the runtime's run function, or one per instance (batches run concurrently on them).
            max_batch_size: most samples in one batch; 1 turns batching off.
            window_ms: longest wait for a batch to fill once traffic is concurrent.
            labels: model, version and backend, for the metrics.
            max_queue_size: most requests waiting; more get :class:`Overloaded`.
            max_queue_delay_ms: most time a request may wait (estimated at admission, enforced when its
                batch forms); 0 turns the time bound off.
        """
        runs = [run] if callable(run) else list(run)
        if not runs:
            raise ValueError("need at least one run function (instance)")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        if max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {max_queue_delay_ms}")
        self._idle = list(runs)
        self.instances = len(runs)
        self.max_batch_size = max_batch_size
        self.window = window_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.max_queue_delay = max_queue_delay_ms / 1000.0
        self._labels = labels
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._free: asyncio.Semaphore | None = None
        self._worker: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._started: dict[asyncio.Task, tuple[float, int]] = {}  # running batch → (start, rows)
        self._last_batch_requests = 0
        self._row_seconds: float | None = None  # EWMA of compute time per row (batch time / its rows)
        self._sessions: set[_Session] = set()
        # Sessions' wall time per row: while any session is in progress, the time between session ends
        # over the rows the sessions submitted meanwhile. Unlike the compute time per row it counts what a
        # sampling loop spends between its steps too (the sampler's own arithmetic, the event loop).
        self._session_row_seconds: float | None = None
        self._session_mark: float | None = None  # start of the current measuring window
        self._session_rows = 0  # rows submitted by sessions since the mark
        self._executor = ThreadPoolExecutor(
            max_workers=self.instances, thread_name_prefix=f"infer-{labels['model']}"
        )
        self._queue_gauge = metrics.QUEUE_SIZE.labels(**labels)

    # --- admission ------------------------------------------------------------------------------------

    @property
    def row_seconds(self) -> float | None:
        """Recent compute time per row (None before any batch ran)."""
        return self._row_seconds

    def estimated_wait(self) -> float:
        """Seconds a request joining now would wait before its batch starts (0 before any batch ran).

        The rows queued ahead of it times the recent time per row, over the instances, plus the rest of
        the running batch when every instance is busy (its rows times the time per row, less what it has
        run already).
        """
        if self._row_seconds is None:
            return 0.0
        rows = sum(p.size for p in self._queue)
        wait = rows * self._row_seconds / self.instances
        if len(self._running) >= self.instances:  # every instance busy: until the first one frees
            now = time.monotonic()
            wait += max(0.0, min(n * self._row_seconds - (now - t) for t, n in self._started.values()))
        return wait

    def _refuse(self, reason: str, message: str, retry_after_s: float | None = None) -> Overloaded:
        metrics.REJECTED.labels(**self._labels, reason=reason).inc()
        if retry_after_s is None:
            retry_after_s = max(self.estimated_wait(), (self._row_seconds or 0.0) * self.max_batch_size)
        return Overloaded(
            f"model {self._labels['model']!r} is overloaded: {message}; retry later", retry_after_s
        )

    def admit(self, *, waiting: int | None = None) -> None:
        """Raise :class:`Overloaded` if a request may not join now (``waiting``: requests ahead of it)."""
        waiting = len(self._queue) if waiting is None else waiting
        if waiting >= self.max_queue_size:
            raise self._refuse(
                "queue_full",
                f"{waiting} requests are waiting (max_queue_size {self.max_queue_size})",
            )
        if self.max_queue_delay:
            wait = self.estimated_wait()
            if wait > self.max_queue_delay:
                raise self._refuse(
                    "queue_delay",
                    f"a new request would wait about {wait * 1e3:.0f} ms "
                    f"(max_queue_delay_ms {self.max_queue_delay * 1e3:g})",
                )

    @property
    def session_rate(self) -> float | None:
        """Wall seconds per row of sessions (measured), else the compute time per row over the instances."""
        if self._session_row_seconds is not None:
            return self._session_row_seconds
        return None if self._row_seconds is None else self._row_seconds / self.instances

    def session_work_seconds(self) -> float:
        """Estimated seconds until the sessions in progress have run their remaining rows (0 before any
        batch ran)."""
        rate = self.session_rate
        return 0.0 if rate is None else sum(s.remaining for s in self._sessions) * rate

    def _measure_sessions(self) -> None:
        """Close the current measuring window of session throughput (at a session's end)."""
        now = time.monotonic()
        if self._session_mark is not None and self._session_rows:
            per_row = (now - self._session_mark) / self._session_rows
            self._session_row_seconds = (
                per_row
                if self._session_row_seconds is None
                else (_EWMA * per_row + (1 - _EWMA) * self._session_row_seconds)
            )
        self._session_mark = now if self._sessions else None
        self._session_rows = 0

    @contextlib.contextmanager
    def session(self, rows: int = 0, *, budget_s: float | None = None) -> Iterator[None]:
        """Admit one multi-step request (e.g. a sampling loop) against the bounds, once.

        Sessions in progress count as waiting requests; the steps submitted inside the block skip the
        admission checks, so a request that was admitted is never refused half-way.

        Args:
            rows: the rows the session will submit in all (e.g. images × steps × guidance rows).
            budget_s: admit only if the rows the sessions in progress still have to run plus ``rows``
                take at most :data:`ADMISSION_HEADROOM` of this at the sessions' measured wall time per
                row (before any session ended: the compute time per row); else :class:`Overloaded` with
                a ``Retry-After`` of when they would fit. A session that finds no other in progress is
                admitted whatever its estimate: it waits for no one, the rate is an average over requests
                of other sizes (a per-step cost spread over few rows overstates the cost of many), and its
                deadline bounds it.
        """
        self.admit(waiting=len(self._sessions))
        rate = self.session_rate
        if budget_s is not None and rate is not None and self._sessions:
            ahead = self.session_work_seconds()
            total = ahead + rows * rate
            if total > budget_s * ADMISSION_HEADROOM:
                raise self._refuse(
                    "work",
                    f"{len(self._sessions)} requests in progress still need about {ahead:.1f} s; with this "
                    f"one's {rows} rows it would take about {total:.1f} s, over the "
                    f"{budget_s * ADMISSION_HEADROOM:g} s admitted within its {budget_s:g} s deadline",
                    max(total - budget_s * ADMISSION_HEADROOM, rate),
                )
        session = _Session(rows)
        if not self._sessions:
            self._session_mark, self._session_rows = time.monotonic(), 0
        self._sessions.add(session)
        token = _SESSION.set(session)
        try:
            yield
        finally:
            _SESSION.reset(token)
            self._sessions.discard(session)
            self._measure_sessions()

    # --- requests -------------------------------------------------------------------------------------

    async def submit(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one request (first axis = its batch) and wait for its slice of the batch's outputs.

        Raises:
            Overloaded: the queue is full (not raised for the steps of an admitted session).
            DeadlineExceeded: the request's deadline (:func:`request_timeout`) passed first.
        """
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            self._free = asyncio.Semaphore(self.instances)
            self._worker = loop.create_task(self._serve())
        size = len(next(iter(inputs.values())))
        session = _SESSION.get()
        admitted = session is not None
        if admitted:
            session.remaining = max(0, session.remaining - size)
            self._session_rows += size
        deadline = _DEADLINE.get()
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            metrics.TIMEOUTS.labels(**self._labels).inc()
            raise DeadlineExceeded("the request's timeout passed before it was queued")
        if not admitted:
            self.admit()
        pending = _Pending(inputs, size, loop.create_future(), now, deadline, admitted)
        self._queue.append(pending)
        self._queue_gauge.inc()
        self._wakeup.set()
        try:
            if deadline is None:
                return await pending.future
            return await asyncio.wait_for(pending.future, deadline - time.monotonic())
        except asyncio.TimeoutError:
            metrics.TIMEOUTS.labels(**self._labels).inc()
            self._unqueue(pending, "timeout")
            raise DeadlineExceeded(
                f"the request's timeout passed while it was {'computing' if pending.running else 'queued'}"
            ) from None
        except asyncio.CancelledError:  # the client went away: its rows are never computed
            self._unqueue(pending, "cancelled")
            raise

    def _unqueue(self, pending: _Pending, reason: str) -> None:
        if pending.running:
            return  # already in a batch; its result is discarded
        with contextlib.suppress(ValueError):
            self._queue.remove(pending)
            self._queue_gauge.dec()
            metrics.DROPPED.labels(**self._labels, reason=reason).inc()

    # --- the worker -----------------------------------------------------------------------------------

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._free.acquire()  # an instance is free
                # More than one sampling loop in progress is concurrent traffic too: two loops whose steps
                # arrive one at a time would otherwise alternate, each step a batch of its own (measured:
                # two 100-step /generate requests, 200 steps in 200 executions), never sharing one.
                concurrent = len(self._queue) > 1 or self._last_batch_requests > 1 or len(self._sessions) > 1
                if not self._queue:
                    self._free.release()
                    break
                deadline = self._queue[0].enqueued + (self.window if concurrent else 0.0)
                while (
                    self._queued_samples() < self.max_batch_size
                    and time.monotonic() < deadline
                    and not self._every_session_queued()
                ):
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), deadline - time.monotonic())
                    except asyncio.TimeoutError:
                        break
                    self._wakeup.clear()
                batch, total = self._take_batch()
                if not batch:
                    self._free.release()
                    continue
                self._last_batch_requests = len(batch)
                task = loop.create_task(self._execute(loop, batch, total))
                self._running.add(task)
                self._started[task] = (time.monotonic(), total)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._started.pop(task, None)
        self._free.release()
        if self._queue:
            self._wakeup.set()

    def _take_batch(self) -> tuple[list[_Pending], int]:
        """Pop the next batch, leaving out requests that are gone, past their deadline or waited too long."""
        batch: list[_Pending] = []
        total = 0
        now = time.monotonic()
        while self._queue:
            p = self._queue[0]
            if not p.future.done():
                if p.deadline is not None and now >= p.deadline:
                    self._drop(p, "timeout")
                    metrics.TIMEOUTS.labels(**self._labels).inc()
                    p.future.set_exception(
                        DeadlineExceeded("the request's timeout passed while it was queued")
                    )
                    continue
                if self.max_queue_delay and not p.admitted and now - p.enqueued > self.max_queue_delay:
                    self._drop(p, None)
                    p.future.set_exception(
                        self._refuse(
                            "queue_delay",
                            f"the request waited {(now - p.enqueued) * 1e3:.0f} ms in the queue "
                            f"(max_queue_delay_ms {self.max_queue_delay * 1e3:g})",
                        )
                    )
                    continue
            else:
                self._drop(p, "cancelled")
                continue
            if batch and (total + p.size > self.max_batch_size or not _stackable(batch[0], p)):
                break  # a request whose tensors cannot be concatenated with the batch's starts the next one
            self._queue.popleft()
            self._queue_gauge.dec()
            p.running = True
            batch.append(p)
            total += p.size
        return batch, total

    def _drop(self, p: _Pending, reason: str | None) -> None:
        self._queue.popleft()
        self._queue_gauge.dec()
        if reason:
            metrics.DROPPED.labels(**self._labels, reason=reason).inc()

    def _every_session_queued(self) -> bool:
        """Every sampling loop in progress has its next step queued: no one else will join this batch
        (only sessions feed a step-batched model), so waiting out the window would only add latency."""
        if not self._sessions:
            return False
        return sum(1 for p in self._queue if p.admitted) >= len(self._sessions)

    def _queued_samples(self) -> int:
        return sum(p.size for p in self._queue)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], total: int) -> None:
        start = time.monotonic()
        for p in batch:
            metrics.QUEUE_SECONDS.labels(**self._labels).observe(start - p.enqueued)
        run = self._idle.pop()
        try:
            await self._run_group(loop, run, batch)
        finally:
            self._idle.append(run)

    async def _run_group(self, loop: asyncio.AbstractEventLoop, run: RunFn, group: list[_Pending]) -> None:
        """Run ``group`` as one batch and hand each request its rows; if the run fails, bisect: each
        half runs again on its own, down to the single request that fails (it alone gets the error)."""
        group = [p for p in group if not p.future.done()]  # gone or past its deadline: not re-run
        if not group:
            return
        total = sum(p.size for p in group)
        start = time.monotonic()
        try:
            if len(group) == 1:
                merged = group[0].inputs
            else:
                merged = {k: np.concatenate([p.inputs[k] for p in group]) for k in group[0].inputs}
            outputs = await loop.run_in_executor(self._executor, run, merged)
        except Exception as exc:  # noqa: BLE001 - every waiting request must hear about the failure
            if len(group) > 1:
                metrics.BATCH_SPLITS.labels(**self._labels).inc()
                log.warning(
                    "a batch of %d requests failed in %s (%s); re-running it in halves",
                    len(group), self._labels["backend"], exc,
                )  # fmt: skip
                half = len(group) // 2
                await self._run_group(loop, run, group[:half])
                await self._run_group(loop, run, group[half:])
                return
            err = InferenceError(500, f"inference failed in {self._labels['backend']}: {exc}")
            if not group[0].future.done():
                group[0].future.set_exception(err)
            return
        seconds = time.monotonic() - start
        if total:
            per_row = seconds / total
            self._row_seconds = (
                per_row if self._row_seconds is None else (_EWMA * per_row + (1 - _EWMA) * self._row_seconds)
            )
        metrics.COMPUTE_SECONDS.labels(**self._labels).observe(seconds)
        metrics.EXEC_COUNT.labels(**self._labels).inc()
        metrics.INFERENCE_COUNT.labels(**self._labels).inc(total)
        metrics.BATCH_SIZE.labels(**self._labels).observe(total)
        offset = 0
        for p in group:
            if not p.future.done():  # the client may have gone away, or its deadline passed
                p.future.set_result({k: v[offset : offset + p.size] for k, v in outputs.items()})
            offset += p.size

    def idle(self) -> bool:
        """Nothing queued and nothing computing."""
        return not self._queue and not self._running

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(InferenceError(503, f"model {self._labels['model']!r} was unloaded"))
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _stackable(first: _Pending, other: _Pending) -> bool:
    """Whether ``other``'s inputs concatenate with ``first``'s along the batch axis (same names, dtypes
    and per-row shapes); models with variable-size dimensions get requests that do not."""
    if first.inputs.keys() != other.inputs.keys():
        return False
    return all(
        a.shape[1:] == b.shape[1:] and a.dtype == b.dtype
        for a, b in ((first.inputs[k], other.inputs[k]) for k in first.inputs)
    )
