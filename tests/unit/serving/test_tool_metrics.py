"""Tool-call metrics: the ``tool`` label takes only served tools' names; anything a client makes up is
``_unknown_``, so MCP callers cannot mint time series."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY
from pydantic import BaseModel

from serving.agent.tools import Tool, call_tool


class _Echo(BaseModel):
    text: str


class _Out(BaseModel):
    text: str


async def _handler(req: _Echo) -> _Out:
    return _Out(text=req.text)


def _count(tool: str) -> float:
    value = REGISTRY.get_sample_value(
        "kiln_tool_calls_total", {"tool": tool, "caller": "mcp", "status": "failure"}
    )
    return value or 0.0


def test_unknown_tool_names_are_not_label_values():
    tools = {"echo": Tool(name="echo", description="echo", request_model=_Echo, handler=_handler)}
    before = _count("_unknown_")
    for name in ("nope", "x" * 20, "drop table", "echo2"):
        result = asyncio.run(call_tool(tools, name, {}, caller="mcp"))
        assert not result.ok and "no tool" in result.error
        assert (
            REGISTRY.get_sample_value(
                "kiln_tool_calls_total", {"tool": name, "caller": "mcp", "status": "failure"}
            )
            is None
        )
    assert _count("_unknown_") == before + 4
    assert asyncio.run(call_tool(tools, "echo", {"text": "hi"}, caller="mcp")).ok
    assert asyncio.run(call_tool(tools, "echo", {}, caller="mcp")).ok is False  # known name, bad arguments
    assert _count("echo") >= 1
