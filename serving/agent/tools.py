"""Kiln's own capabilities as tools, for the agent (OpenAI tool calling) and for MCP clients.

A tool is the task's request model plus an async handler — the same pydantic model its HTTP route
validates with, so the JSON schema an LLM or MCP client sees is the one the route enforces. Task modules
export them through the ``tools(repo)`` slot (see ``serving/tasks/__init__.py``); :func:`call_tool`
validates arguments, runs the handler and turns every failure into a message the caller can act on.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from serving import metrics
from serving.repository import InferenceError

MAX_STRING_FOR_LLM = 160  # longer strings (base64 PNGs, pixel arrays) are elided in what the LLM reads


@dataclass(frozen=True)
class Tool:
    """One Kiln capability: ``handler(request) -> response model`` with ``request_model`` validation."""

    name: str
    description: str
    request_model: type[BaseModel]
    handler: Callable[[Any], Awaitable[BaseModel]]

    def input_schema(self) -> dict[str, Any]:
        """The request model's JSON schema (what the HTTP route validates against)."""
        return self.request_model.model_json_schema()

    def openai_spec(self) -> dict[str, Any]:
        """The tool in OpenAI's tool-calling format."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.input_schema(),
            },
        }


@dataclass
class ToolResult:
    ok: bool
    value: dict[str, Any] | None  # the response model as JSON when ok
    error: str  # what went wrong, phrased for the caller, when not ok

    def for_llm(self) -> str:
        """The result as a tool message: JSON with long strings elided, or the error."""
        if not self.ok:
            return json.dumps({"error": self.error})
        return json.dumps(compact(self.value))


def compact(value: Any) -> Any:
    """``value`` with long strings and long lists elided, so an LLM's context holds the facts, not pixels."""
    if isinstance(value, str) and len(value) > MAX_STRING_FOR_LLM:
        return f"<{len(value)} characters elided>"
    if isinstance(value, list):
        items = [compact(v) for v in value]
        if len(items) > 16 or len(json.dumps(items)) > MAX_STRING_FOR_LLM * 4:
            return f"<list of {len(value)} items elided>"
        return items
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    return value


async def call_tool(
    tools: dict[str, Tool], name: str, arguments: str | dict[str, Any], caller: str
) -> ToolResult:
    """Run tool ``name`` with ``arguments`` (JSON text or a dict); never raises for bad input."""
    tool = tools.get(name)
    if tool is None:
        return _counted(
            tools, name, caller, ToolResult(False, None, f"no tool {name!r}; available: {sorted(tools)}")
        )
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            return _counted(
                tools, name, caller, ToolResult(False, None, f"arguments are not valid JSON: {exc}")
            )
    if not isinstance(arguments, dict):
        return _counted(tools, name, caller, ToolResult(False, None, "arguments must be a JSON object"))
    try:
        request = tool.request_model.model_validate(arguments)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return _counted(tools, name, caller, ToolResult(False, None, f"invalid arguments: {problems}"))
    try:
        response = await tool.handler(request)
    except InferenceError as exc:
        return _counted(tools, name, caller, ToolResult(False, None, exc.message))
    return _counted(tools, name, caller, ToolResult(True, response.model_dump(mode="json"), ""))


def _counted(tools: dict[str, Tool], name: str, caller: str, result: ToolResult) -> ToolResult:
    # the label's values are an allow-list (the served tools' names): a client's made-up tool names
    # would otherwise each become a new time series
    known = name if name in tools else metrics.UNKNOWN_MODEL
    status = "success" if result.ok else "failure"
    metrics.TOOL_CALLS.labels(tool=known, caller=caller, status=status).inc()
    return result
