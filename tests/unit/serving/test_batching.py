import asyncio

import numpy as np
import pytest

from serving.batching import AdaptiveBatcher
from serving.repository import InferenceError

LABELS = {"model": "unit-batcher", "version": "1", "backend": "numpy"}


class Recorder:
    """Runs y = 2x and records each executed batch size."""

    def __init__(self, fail: bool = False):
        self.batches: list[int] = []
        self.fail = fail

    def __call__(self, inputs):
        if self.fail:
            raise RuntimeError("boom")
        x = inputs["x"]
        self.batches.append(len(x))
        return {"y": 2 * x}


async def _fire(batcher, n_requests, rows=1):
    reqs = [np.full((rows, 3), i, dtype=np.float32) for i in range(n_requests)]
    outs = await asyncio.gather(*(batcher.submit({"x": r}) for r in reqs))
    return reqs, outs


def test_concurrent_requests_are_batched_and_split_back():
    rec = Recorder()
    batcher = AdaptiveBatcher(rec, max_batch_size=8, window_ms=20, labels=LABELS)
    reqs, outs = asyncio.run(_fire(batcher, 20))
    for r, o in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(o["y"], 2 * r)  # each request gets its own rows back
    assert sum(rec.batches) == 20
    assert max(rec.batches) == 8 and len(rec.batches) < 20
    batcher.close()


def test_batch_never_exceeds_max_with_multi_row_requests():
    rec = Recorder()
    batcher = AdaptiveBatcher(rec, max_batch_size=8, window_ms=20, labels=LABELS)
    _, outs = asyncio.run(_fire(batcher, 9, rows=3))
    assert all(b <= 8 for b in rec.batches) and sum(rec.batches) == 27
    assert all(o["y"].shape == (3, 3) for o in outs)
    batcher.close()


def test_batching_off_runs_each_request_alone():
    rec = Recorder()
    batcher = AdaptiveBatcher(rec, max_batch_size=1, window_ms=5, labels=LABELS)
    asyncio.run(_fire(batcher, 6))
    assert rec.batches == [1] * 6
    batcher.close()


def test_failure_reaches_every_request_in_the_batch_and_batcher_survives():
    rec = Recorder(fail=True)
    batcher = AdaptiveBatcher(rec, max_batch_size=4, window_ms=10, labels=LABELS)

    async def scenario():
        results = await asyncio.gather(
            *(batcher.submit({"x": np.ones((1, 3), np.float32)}) for _ in range(4)), return_exceptions=True
        )
        assert all(isinstance(r, InferenceError) and r.status == 500 and "boom" in r.message for r in results)
        rec.fail = False
        out = await batcher.submit({"x": np.ones((1, 3), np.float32)})
        np.testing.assert_array_equal(out["y"], 2 * np.ones((1, 3)))

    asyncio.run(scenario())
    batcher.close()


def test_rejects_nonpositive_max():
    with pytest.raises(ValueError):
        AdaptiveBatcher(Recorder(), max_batch_size=0, window_ms=1, labels=LABELS)


def test_a_lone_client_does_not_wait_for_the_window():
    rec = Recorder()
    batcher = AdaptiveBatcher(rec, max_batch_size=8, window_ms=2000, labels=LABELS)

    async def sequential():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(3):
            await batcher.submit({"x": np.full((1, 3), i, np.float32)})
        return loop.time() - t0

    elapsed = asyncio.run(sequential())
    assert rec.batches == [1, 1, 1]
    assert elapsed < 2.0  # a 2 s window was never waited for: no concurrent traffic to batch with
    batcher.close()


def test_two_sampling_loops_share_batches_instead_of_alternating():
    """Two sessions whose steps come one at a time join each other's batches. Each loop awaits between
    its steps (a streamed step's event being sent, a disconnect check), so when one's batch ends the
    other's step is the only one queued; before, it ran alone at once, and the two loops alternated
    for good: every step a batch of one (80 batches here)."""
    import time

    class Slow(Recorder):
        def __call__(self, inputs):
            time.sleep(0.003)  # the runtime, in the batcher's thread
            return super().__call__(inputs)

    rec = Slow()
    batcher = AdaptiveBatcher(rec, max_batch_size=8, window_ms=50, labels=LABELS)

    async def loop(i, steps=40):
        await asyncio.sleep(0.03 * i)  # the second starts a few steps after the first
        with batcher.session(steps):
            for _ in range(steps):
                await batcher.submit({"x": np.full((1, 3), i, dtype=np.float32)})
                await asyncio.sleep(0.001)  # what the loop awaits before asking for its next step

    async def main():
        await asyncio.gather(loop(0), loop(1))

    asyncio.run(main())
    assert sum(rec.batches) == 80
    # in step once both run: one batch of both loops per step (about 45 batches in all)
    assert len(rec.batches) <= 60, rec.batches
