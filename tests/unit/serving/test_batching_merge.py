"""A batch only holds requests whose tensors concatenate: mismatched per-row shapes or dtypes (a model
with variable-size dimensions) go to separate batches instead of failing the whole batch."""

import asyncio

import numpy as np

from serving.batching import AdaptiveBatcher

LABELS = {"model": "unit-merge", "version": "1", "backend": "numpy"}


def test_requests_that_cannot_be_concatenated_run_in_separate_batches():
    batches: list[list[int]] = []

    def run(inputs):
        batches.append(list(inputs["x"].shape))
        return {"y": inputs["x"].sum(axis=tuple(range(1, inputs["x"].ndim)))}

    async def fire():
        batcher = AdaptiveBatcher(run, max_batch_size=16, window_ms=50, labels=LABELS)
        requests = [
            np.ones((1, 3), np.float32),
            np.ones((2, 5), np.float32),  # another row shape
            np.ones((1, 3), np.float64),  # another dtype
            np.ones((1, 3), np.float32),
        ]
        try:
            return requests, await asyncio.gather(*(batcher.submit({"x": r}) for r in requests))
        finally:
            batcher.close()

    requests, outputs = asyncio.run(fire())
    for request, output in zip(requests, outputs, strict=True):
        np.testing.assert_array_equal(output["y"], request.sum(axis=1))  # nobody got an error
    assert sum(b[0] for b in batches) == 5 and len(batches) >= 3
