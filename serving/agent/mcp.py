"""Kiln's tools over the Model Context Protocol: streamable HTTP, mounted at ``/mcp`` by the service.

Built on the ``mcp`` SDK's low-level :class:`mcp.server.lowlevel.Server`, so each tool's ``inputSchema``
is exactly its request model's JSON schema (the one its HTTP route validates with) rather than one
inferred from a Python signature. Stateless mode with JSON responses: every request stands alone, so
any BentoML worker can answer it. The session manager's lifespan is the returned Starlette app's; BentoML
enters the lifespan of every mounted Starlette app when the service starts.
"""

from __future__ import annotations

import json
from typing import Any

import mcp_types as types
from mcp.server.lowlevel import Server
from starlette.applications import Starlette

from kiln import __version__
from serving.agent.tools import Tool, call_tool


def create_mcp_app(tools: list[Tool], host: str = "127.0.0.1") -> Starlette:
    """A Starlette app serving ``tools`` over MCP streamable HTTP at its root path."""
    by_name = {t.name: t for t in tools}

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=[
                types.Tool(name=t.name, description=t.description, input_schema=t.input_schema())
                for t in tools
            ]
        )

    async def call(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        result = await call_tool(by_name, params.name, params.arguments or {}, caller="mcp")
        if not result.ok:
            return types.CallToolResult(content=[types.TextContent(text=result.error)], is_error=True)
        return types.CallToolResult(
            content=[types.TextContent(text=json.dumps(result.value))], structured_content=result.value
        )

    server = Server(
        "kiln",
        version=__version__,
        instructions="Kiln's models as tools: classify and generate handwritten digits, and more.",
        on_list_tools=list_tools,
        on_call_tool=call,
    )
    # host: DNS-rebinding protection (Host/Origin must be loopback) is on when Kiln binds loopback only
    return server.streamable_http_app(
        streamable_http_path="/", stateless_http=True, json_response=True, host=host
    )
