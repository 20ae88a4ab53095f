"""Peer: Ray Serve with ``@serve.batch`` over the same onnxruntime session (optional: the ``ray`` extra).

``python -m benchmarks.peers.ray_server '{...}'`` starts a local Ray cluster (``num_cpus`` = the
thread budget, no dashboard), one replica whose ``__call__`` parses the JSON body and awaits a
``@serve.batch`` method (Kiln's batch size and window), behind Ray's HTTP proxy on the given port.
The batch runs on the replica's event loop, as in Ray Serve's batching guide.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

import numpy as np
import ray
from ray import serve
from starlette.requests import Request

from benchmarks.peers._oip import response, session


def main() -> None:
    c = json.loads(sys.argv[1])

    @serve.deployment(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
    class OnnxModel:
        def __init__(self) -> None:
            self.sess = session(c["onnx"], c["threads"])
            self.input_name = self.sess.get_inputs()[0].name
            self.output_name = self.sess.get_outputs()[0].name

        @serve.batch(max_batch_size=c["max_batch_size"], batch_wait_timeout_s=c["batch_window_ms"] / 1000)
        async def predict(self, xs: list[np.ndarray]) -> list[np.ndarray]:
            (logits,) = self.sess.run([self.output_name], {self.input_name: np.concatenate(xs)})
            return [logits[i : i + 1] for i in range(len(xs))]

        async def __call__(self, request: Request) -> dict:
            tensor = (await request.json())["inputs"][0]
            x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
            return response(c["model"], self.output_name, await self.predict(x))

    ray.init(num_cpus=c["threads"], include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": c["port"]})
    serve.run(OnnxModel.bind(), route_prefix=f"/v2/models/{c['model']}/infer")
    stop = threading.Event()  # set by SIGTERM / SIGINT (Python runs signal handlers on this thread)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
