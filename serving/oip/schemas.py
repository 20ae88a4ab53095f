"""Pydantic models of the Open Inference Protocol's HTTP bodies, for the OpenAPI document only.

The HTTP front-end (:mod:`serving.oip.http`) parses request bodies itself — the binary tensor data
extension puts raw bytes after the JSON header, and validation errors must name the tensor — so these
models are not used to parse. They describe the bodies in ``/docs.json`` (BentoML merges the mounted
FastAPI app's document), which clients and the schemathesis fuzz read. Field names and meanings follow
KServe's ``required_api.md`` and Triton's extensions (binary data, classification, statistics, model
repository).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Parameters = dict[str, bool | int | float | str]


class Error(BaseModel):
    error: str = Field(description="What was wrong, naming the model, tensor or field.")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(description="Protocol extensions this server implements.")


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64 or BYTES.")
    shape: list[int] = Field(description="-1 marks a dimension of any size.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ConfigTensor(BaseModel):
    model_config = ConfigDict(extra="allow")  # reshape, format, label_filename of repository models

    name: str
    data_type: str = Field(description="Triton's model_config.proto type name, e.g. TYPE_FP32.")
    dims: list[int] = Field(description="Shape without the batch dimension for batched models.")


class ModelConfig(BaseModel):
    """A Triton repository model (``kiln serve --model-repository``) answers with its whole config.pbtxt
    as Triton writes it in JSON: also ``version_policy``, ``dynamic_batching``, ``instance_group``, and
    ``reshape`` / ``format`` / ``label_filename`` on its tensors."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    platform: str
    backend: str = Field(description="The default backend (runtime).")
    backends: list[str] = Field(description="Every loaded backend; request parameter 'backend' picks one.")
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = Field(
        None, description="'binary_data_size': bytes of this tensor in the binary section of the body."
    )
    data: list[Any] | None = Field(
        None, description="Elements, flat or nested, row-major; left out when sent as binary data."
    )


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = Field(
        None,
        description="'binary_data' (bool): return this output as binary data; 'classification' (int k): "
        "return the top k classes as BYTES 'score:index[:label]' (classification extension).",
    )


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: Parameters | None = Field(
        None,
        description="'backend' (string): the runtime to use; 'timeout' (int, microseconds): give up after "
        "it; 'binary_data_output' (bool): every output as binary data.",
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class GenerateParameters(BaseModel):
    backend: str | None = Field(None, description="The runtime (default: the model's first).")
    timeout: int | None = Field(None, ge=0, description="The request's timeout in microseconds (0 = none).")


class GenerateRequest(BaseModel):
    """Triton's generate extension: the body's fields are the model's generation settings."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "description": "The fields are the generation's settings: for diffusion-digits, /generate's (n, "
            "label, steps, sampler, seed, guidance, eta, gamma, filter_hallucinations, oversample) without "
            "model, version and backend, and preview_every for generate_stream.",
            "examples": [{"n": 2, "label": 4, "steps": 10, "seed": 3}],
        },
    )
    parameters: GenerateParameters | None = None


class GenerateResponse(BaseModel):
    """One generate response (generate_stream: each server-sent event's data): the model, the response's
    parameters (a step's step, steps, t; the final one's seed, sampler, steps, backend, label) and its
    outputs by name (a step's preview, the final images and hallucination_scores; PNGs as base64)."""

    model_config = ConfigDict(extra="allow")
    model_name: str
    model_version: str


class RepositoryIndexRequest(BaseModel):
    ready: bool | None = Field(None, description="Only models that are ready.")


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY or UNAVAILABLE.")
    reason: str = Field(description="Why the model is UNAVAILABLE (load error, 'unloaded').")


class ModelControlRequest(BaseModel):
    parameters: dict[str, str | bool] | None = Field(
        None,
        description="'version': the model-store version to load (default: the latest) or the loaded "
        "version to unload (default: every version).",
    )


class LoadResponse(BaseModel):
    name: str
    version: str
    state: str


class UnloadResponse(BaseModel):
    name: str
    unloaded_versions: list[str]


class StatisticDuration(BaseModel):
    count: int
    ns: int


class InferStatistics(BaseModel):
    success: StatisticDuration
    fail: StatisticDuration
    queue: StatisticDuration
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration
    cache_hit: StatisticDuration
    cache_miss: StatisticDuration


class BatchStatistics(BaseModel):
    batch_size: int
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration


class ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="Milliseconds since the epoch of the last request.")
    inference_count: int = Field(description="Samples inferred (rows of the batch dimension).")
    execution_count: int = Field(description="Runtime executions (batches).")
    inference_stats: InferStatistics
    batch_stats: list[BatchStatistics]


class ModelStatisticsResponse(BaseModel):
    model_stats: list[ModelStatistics]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined, so it can sit anywhere in an OpenAPI document."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)
