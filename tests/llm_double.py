"""A test double for a hosted LLM: a real HTTP server (uvicorn, in a thread) speaking OpenAI's
chat-completions protocol with scripted, deterministic replies.

No LLM weights can be fetched here, so the agent's tests point Kiln at this server. It speaks the wire
protocol the official ``openai`` client uses — JSON completions, Server-Sent-Event streaming with a final
usage chunk, tool calls — and answers only what a test scripted:

    double.script(r"Hypothesis: .*Paris", '{"relation": "contradiction", "reason": "..."}')
    double.script(r"digit", {"tool_calls": [{"name": "classify", "arguments": {...}}]}, "It is a 7.")

A rule matches when its pattern is found in the conversation (every message's text, joined); its replies
are used one per request, in order, then the rule is spent. Rules are tried in the order scripted. A
request that no rule matches gets HTTP 500 naming the conversation, so a test fails loudly. A reply may be
a string (the content), a dict with ``content`` / ``tool_calls``, ``{"status": 503}`` for an HTTP error,
and any rule may carry ``delay`` seconds (for timeouts).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from serverproc import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class _Rule:
    pattern: re.Pattern
    replies: list[Any]
    delay: float = 0.0


@dataclass
class LLMDouble:
    """The scripted chat-completions server; ``url`` is its OpenAI base URL (``.../v1``)."""

    port: int = field(default_factory=free_port)
    rules: list[_Rule] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, pattern: str, *replies: Any, delay: float = 0.0) -> None:
        with self.lock:
            self.rules.append(_Rule(re.compile(pattern, re.S | re.I), list(replies), delay))

    def reset(self) -> None:
        with self.lock:
            self.rules.clear()
            self.requests.clear()

    def pending(self) -> list[str]:
        """Patterns of rules with replies left (a test that scripted more than was asked)."""
        with self.lock:
            return [r.pattern.pattern for r in self.rules if r.replies]

    def _next(self, conversation: str) -> tuple[Any, float] | None:
        with self.lock:
            for rule in self.rules:
                if rule.replies and rule.pattern.search(conversation):
                    return rule.replies.pop(0), rule.delay
        return None

    # --- the protocol ---------------------------------------------------------------------------------

    async def _completions(self, request: Request) -> Response:
        body = await request.json()
        with self.lock:
            self.requests.append(body)
        conversation = "\n".join(_text(m) for m in body.get("messages", []))
        found = self._next(conversation)
        if found is None:
            return JSONResponse(
                {"error": {"message": f"llm double: no scripted reply for: {conversation[-600:]}"}},
                status_code=500,
            )
        reply, delay = found
        if delay:
            await asyncio.sleep(delay)
        if isinstance(reply, dict) and "status" in reply:
            return JSONResponse({"error": {"message": "scripted failure"}}, status_code=reply["status"])
        content, calls = (
            (reply, []) if isinstance(reply, str) else (reply.get("content"), reply.get("tool_calls", []))
        )
        tool_calls = [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {
                    "name": c["name"],
                    "arguments": c["arguments"]
                    if isinstance(c["arguments"], str)
                    else json.dumps(c["arguments"]),
                },
            }
            for i, c in enumerate(calls)
        ]
        usage = {
            "prompt_tokens": len(conversation) // 4,
            "completion_tokens": len(content or "") // 4 + 1,
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        finish = "tool_calls" if tool_calls else "stop"
        model = body.get("model", "double")
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if tool_calls:
                message["tool_calls"] = tool_calls
            return JSONResponse(
                {
                    "id": "chatcmpl-double",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                }
            )

        def chunk(delta: dict | None, finish_reason: str | None = None, with_usage: bool = False) -> bytes:
            data = {
                "id": "chatcmpl-double",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": []
                if delta is None
                else [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            if with_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n".encode()

        async def stream():
            yield chunk({"role": "assistant", "content": ""})
            text = content or ""
            for i in range(0, len(text), 12):  # the text in pieces, as a real server streams tokens
                yield chunk({"content": text[i : i + 12]})
                await asyncio.sleep(0)
            for i, call in enumerate(tool_calls):
                yield chunk({"tool_calls": [{"index": i, **call}]})
            yield chunk({}, finish)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield chunk(None, with_usage=True)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> LLMDouble:
        app = Starlette(routes=[Route("/v1/chat/completions", self._completions, methods=["POST"])])
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self._thread = threading.Thread(target=self._server.run, name="llm-double", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the LLM double did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    calls = " ".join(
        f"{c['function']['name']}({c['function']['arguments']})" for c in message.get("tool_calls") or []
    )
    return f"{message.get('role')}: {content or ''} {calls}".strip()
