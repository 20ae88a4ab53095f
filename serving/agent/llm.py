"""The LLM behind the agent: any server that speaks OpenAI's chat-completions API (vLLM, llama.cpp's
server, Ollama, hosted services), through the official ``openai`` client.

Configured by environment variables (read once, at start-up):

- ``KILN_LLM_BASE_URL`` — e.g. ``http://localhost:8000/v1``; unset = no LLM (the agent routes answer 503),
- ``KILN_LLM_MODEL`` — the model name the server expects (required with a base URL),
- ``KILN_LLM_API_KEY`` — sent as the bearer token (default ``"none"``: local servers ignore it),
- ``KILN_LLM_TIMEOUT`` — seconds per call attempt (default 60),
- ``KILN_LLM_MAX_RETRIES`` — retries of failed calls (default 2). The ``openai`` client retries connection
  errors, timeouts, 408/409/429 and 5xx with exponential backoff and jitter (honouring ``Retry-After``).

Every call counts its outcome, wall time and the prompt/completion tokens the server reports in
``kiln_llm_*`` Prometheus metrics. Streaming calls ask for usage in the last chunk
(``stream_options.include_usage``), which vLLM, llama.cpp and OpenAI send.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import openai

from serving import metrics

HOW_TO_CONFIGURE = (
    "no LLM is configured: start Kiln with KILN_LLM_BASE_URL (an OpenAI-compatible chat-completions "
    "endpoint, e.g. http://localhost:8000/v1 for vLLM or http://localhost:11434/v1 for Ollama) and "
    "KILN_LLM_MODEL (the model name it serves); KILN_LLM_API_KEY if it needs one"
)


class LLMConfigError(ValueError):
    """A bad ``KILN_LLM_*`` setting; raised at start-up with what to change."""


class LLMError(Exception):
    """A call to the LLM failed after its retries: ``status`` is what the agent answers (502, 504)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class LLMConfig:
    base_url: str
    model: str
    api_key: str = "none"
    timeout: float = 60.0
    max_retries: int = 2
    max_tokens: int = 1024  # completion tokens per call (ServeConfig.agent_max_tokens)

    @classmethod
    def from_env(cls) -> LLMConfig | None:
        """The configured LLM, or None when ``KILN_LLM_BASE_URL`` is unset."""
        base_url = os.environ.get("KILN_LLM_BASE_URL", "").strip()
        if not base_url:
            return None
        if not base_url.startswith(("http://", "https://")):
            raise LLMConfigError(f"KILN_LLM_BASE_URL={base_url!r} must be an http:// or https:// URL")
        model = os.environ.get("KILN_LLM_MODEL", "").strip()
        if not model:
            raise LLMConfigError("KILN_LLM_BASE_URL is set but KILN_LLM_MODEL is not: name the model to use")
        try:
            timeout = float(os.environ.get("KILN_LLM_TIMEOUT", "60"))
            retries = int(os.environ.get("KILN_LLM_MAX_RETRIES", "2"))
        except ValueError as exc:
            raise LLMConfigError(f"KILN_LLM_TIMEOUT / KILN_LLM_MAX_RETRIES: {exc}") from None
        if timeout <= 0 or retries < 0:
            raise LLMConfigError("KILN_LLM_TIMEOUT must be > 0 and KILN_LLM_MAX_RETRIES >= 0")
        return cls(base_url, model, os.environ.get("KILN_LLM_API_KEY", "") or "none", timeout, retries)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text as the LLM wrote it (may be malformed: the caller validates)


@dataclass
class Reply:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    finish_reason: str = ""

    def assistant_message(self) -> dict[str, Any]:
        """The reply as an assistant message to append to the conversation."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        return msg


class LLM:
    """One configured chat-completions endpoint."""

    def __init__(self, config: LLMConfig):
        self.config = config
        self.client = openai.AsyncOpenAI(
            base_url=config.base_url,
            api_key=config.api_key,
            timeout=config.timeout,
            max_retries=config.max_retries,
        )

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        on_delta: Callable[[str], Awaitable[None]] | None = None,
        temperature: float = 0.0,
    ) -> Reply:
        """One completion; streamed (``on_delta`` gets each text piece as it arrives) when given a callback.

        Raises :class:`LLMError` (504 on timeout, 502 otherwise) once the client's retries are spent.
        """
        kwargs: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": self.config.max_tokens,  # a bound on every call's work, whatever the prompt asks
        }
        if tools:
            kwargs["tools"] = tools
        start, ok = time.perf_counter(), False
        try:
            if on_delta is None:
                reply = _from_completion(await self.client.chat.completions.create(**kwargs))
            else:
                reply = await self._stream(kwargs, on_delta)
            ok = True
        except openai.APITimeoutError:
            raise LLMError(
                504,
                f"the LLM at {self.config.base_url} did not answer within {self.config.timeout:g}s "
                f"({self.config.max_retries} retries)",
            ) from None
        except openai.APIStatusError as exc:
            raise LLMError(
                502,
                f"the LLM at {self.config.base_url} answered HTTP {exc.status_code}: {_short(exc.message)}",
            ) from None
        except openai.APIError as exc:
            raise LLMError(502, f"the LLM at {self.config.base_url} failed: {_short(str(exc))}") from None
        finally:
            status = "success" if ok else "failure"
            metrics.LLM_CALLS.labels(llm_model=self.config.model, status=status).inc()
            metrics.LLM_CALL_SECONDS.labels(llm_model=self.config.model).observe(time.perf_counter() - start)
        metrics.LLM_TOKENS.labels(llm_model=self.config.model, kind="prompt").inc(reply.usage.prompt_tokens)
        metrics.LLM_TOKENS.labels(llm_model=self.config.model, kind="completion").inc(
            reply.usage.completion_tokens
        )
        return reply

    async def _stream(self, kwargs: dict[str, Any], on_delta: Callable[[str], Awaitable[None]]) -> Reply:
        stream = await self.client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        text: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        usage, finish = Usage(), ""
        async for chunk in stream:
            if chunk.usage is not None:
                usage = Usage(chunk.usage.prompt_tokens or 0, chunk.usage.completion_tokens or 0)
            for choice in chunk.choices:
                delta = choice.delta
                if delta.content:
                    text.append(delta.content)
                    await on_delta(delta.content)
                for tc in delta.tool_calls or []:  # tool calls arrive in pieces, keyed by index
                    slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                    slot["id"] = tc.id or slot["id"]
                    if tc.function is not None:
                        slot["name"] += tc.function.name or ""
                        slot["arguments"] += tc.function.arguments or ""
                finish = choice.finish_reason or finish
        tool_calls = [
            ToolCall(c["id"] or f"call_{i}", c["name"], c["arguments"]) for i, c in sorted(calls.items())
        ]
        return Reply("".join(text), tool_calls, usage, finish)


def _from_completion(completion: Any) -> Reply:
    if not completion.choices:
        return Reply("", usage=_usage(completion))
    choice = completion.choices[0]
    calls = [
        ToolCall(c.id, c.function.name, c.function.arguments or "")
        for c in (choice.message.tool_calls or [])
        if getattr(c, "function", None) is not None
    ]
    return Reply(choice.message.content or "", calls, _usage(completion), choice.finish_reason or "")


def _usage(completion: Any) -> Usage:
    u = getattr(completion, "usage", None)
    return Usage(u.prompt_tokens or 0, u.completion_tokens or 0) if u is not None else Usage()


def _short(text: str, limit: int = 300) -> str:
    text = text if isinstance(text, str) else json.dumps(text)
    return text if len(text) <= limit else text[:limit] + "…"
