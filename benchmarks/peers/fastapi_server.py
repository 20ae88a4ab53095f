"""Peer: a hand-written FastAPI + onnxruntime server (no batching), the way the FastAPI docs write one.

``python -m benchmarks.peers.fastapi_server '{"onnx": ..., "model": ..., "port": ..., "threads": ...}'``:
one uvicorn worker; the request body is validated by pydantic models; the endpoint is a plain ``def``,
so FastAPI runs each request's ``session.run`` in its thread pool (onnxruntime releases the GIL).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from benchmarks.peers._oip import response, session


class InputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferRequest(BaseModel):
    inputs: list[InputTensor]


def create_app(onnx: str, model: str, threads: int) -> FastAPI:
    sess = session(onnx, threads)
    input_name, output_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    app = FastAPI()

    @app.post(f"/v2/models/{model}/infer")
    def infer(request: InferRequest) -> dict:
        tensor = request.inputs[0]
        if tensor.name != input_name or tensor.datatype != "FP32":
            raise HTTPException(400, f"expected one FP32 input {input_name!r}")
        x = np.asarray(tensor.data, dtype=np.float32).reshape(tensor.shape)
        (logits,) = sess.run([output_name], {input_name: x})
        return response(model, output_name, logits)

    return app


def main() -> None:
    config = json.loads(sys.argv[1])
    app = create_app(config["onnx"], config["model"], config["threads"])
    uvicorn.run(app, host="127.0.0.1", port=config["port"], workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
