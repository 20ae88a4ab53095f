"""Peer: LitServe with batching over the same onnxruntime session.

``python -m benchmarks.peers.litserve_server '{...}'``: ``LitAPI(max_batch_size, batch_timeout)`` with
Kiln's batch size and window, one inference worker on the CPU and one API server process (LitServe
moves requests between them over a multiprocessing queue). LitServe parses the JSON body itself.
"""

from __future__ import annotations

import json
import sys

import litserve as ls
import numpy as np
from litserve import server as ls_server

from benchmarks.peers._oip import response, session


class OnnxAPI(ls.LitAPI):
    def __init__(self, onnx: str, model: str, threads: int, **kwargs):
        super().__init__(**kwargs)
        self.onnx, self.model, self.threads = onnx, model, threads

    def setup(self, device):
        self.sess = session(self.onnx, self.threads)
        self.input_name = self.sess.get_inputs()[0].name
        self.output_name = self.sess.get_outputs()[0].name

    def decode_request(self, request):
        tensor = request["inputs"][0]
        return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])

    def batch(self, inputs):
        return np.concatenate(inputs)

    def predict(self, x):
        (logits,) = self.sess.run([self.output_name], {self.input_name: x})
        return logits

    def unbatch(self, output):
        return [output[i : i + 1] for i in range(len(output))]

    def encode_response(self, output):
        return response(self.model, self.output_name, output)


def main() -> None:
    c = json.loads(sys.argv[1])
    api = OnnxAPI(
        c["onnx"],
        c["model"],
        c["threads"],
        max_batch_size=c["max_batch_size"],
        batch_timeout=c["batch_window_ms"] / 1000,
        api_path=f"/v2/models/{c['model']}/infer",
    )
    # LitServe 0.2.19 turns its MCP endpoint on when the `mcp` package is importable (Kiln depends on it)
    # but its connector needs `fastmcp` too, and fails with NameError: MCPServer without it. This peer
    # serves no MCP tools, so the endpoint stays off.
    ls_server._MCP_AVAILABLE = False
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(
        host="127.0.0.1", port=c["port"], num_api_servers=1, log_level="warning", generate_client_file=False
    )


if __name__ == "__main__":
    main()
