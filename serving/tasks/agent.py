"""The agent task: reasoning over an OpenAI-compatible LLM with Kiln's own capabilities as tools.

A task without an artifact (``None`` as its model class in ``TASKS``): it serves routes only, and reaches
the other tasks through their tools (``serving.tasks.tools``).

- ``POST /agent/solve`` — ``{"question", "options"?, "context"?, "strategy": "cot" | "iep" | "iep+cot",
  "tools"?, "stream"?}`` → ``{"answer", "trace", "llm_calls", "usage"}``; ``"stream": true`` sends
  Server-Sent Events: ``step`` for each step as it happens, ``token`` for LLM text as it streams, then
  ``result`` (the same body as without streaming) or ``error``.
- ``POST /agent/trajectories/synthesize`` (admin: ``Authorization: Bearer $KILN_ADMIN_TOKEN``) —
  Learn-by-interact over Kiln's docs or the caller's; ``GET /agent/trajectories`` lists what is stored.

Without ``KILN_LLM_BASE_URL`` the agent routes answer 503 saying how to configure one; the rest of Kiln
serves as usual. A bad ``KILN_LLM_*`` value stops start-up with what to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, Header, Query
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from serving import metrics
from serving.admin import require_admin
from serving.agent.interact import Doc, default_docs, retrieve, synthesize
from serving.agent.llm import HOW_TO_CONFIGURE, LLM, LLMConfig
from serving.agent.store import MiniLMEmbedder, SQLiteTrajectoryStore
from serving.agent.strategies import STRATEGIES
from serving.agent.strategies.base import AgentError, Problem, Run
from serving.agent.tools import Tool
from serving.config import ServeConfig
from serving.repository import InferenceError, ModelRepository

log = logging.getLogger("kiln.serving")

TASK = "agent"
Strategy = Literal["cot", "iep", "iep+cot"]


class SolveRequest(BaseModel):
    question: str = Field(min_length=1, max_length=20000, description="The question to answer.")
    options: list[str] | None = Field(
        None, min_length=2, max_length=26, description="Multiple-choice options; the answer is one of them."
    )
    context: str | None = Field(None, max_length=100000, description="Text the answer must agree with.")
    strategy: Strategy = Field("cot", description="cot, iep (Inferential Exclusion Prompting) or iep+cot.")
    tools: list[str] | None = Field(
        None, description="Kiln tools the agent may call (e.g. ['classify']); ['*'] = all; none by default."
    )
    stream: bool = Field(False, description="Server-Sent Events: each step as it happens, then the result.")


class SolveResponse(BaseModel):
    answer: str
    strategy: str
    trace: list[dict[str, Any]] = Field(description="Every step: prompt, reply, verdict (and tool calls).")
    llm_calls: int
    usage: dict[str, int] = Field(description="prompt_tokens, completion_tokens, total_tokens")
    examples: list[str] = Field(description="Instructions of the stored trajectories shown as examples.")
    seconds: float


class SynthesizeRequest(BaseModel):
    docs: list[str] | None = Field(
        None, max_length=32, description="Documentation texts; default Kiln's own (tool schemas, README)."
    )
    tasks_per_doc: int = Field(2, ge=1, le=8, description="Tasks to synthesize from each document.")
    max_docs: int = Field(8, ge=1, le=32, description="Use at most this many documents.")
    tools: list[str] | None = Field(None, description="Tools to explore; default all.")


class SynthesizeResponse(BaseModel):
    added: list[dict[str, Any]]
    stored: int
    llm_calls: int
    usage: dict[str, int]
    trace: list[dict[str, Any]]


class _Agent:
    """What the agent routes share: the LLM (or None), the tools, the trajectory store and embedder."""

    def __init__(self, repo: ModelRepository):
        from bentoml._internal.context import server_context

        limits = ServeConfig.from_env()  # the agent's work budgets: agent_max_tokens, agent_max_nli_calls
        self.max_nli_calls = limits.agent_max_nli_calls
        config = LLMConfig.from_env()  # raises LLMConfigError at start-up for bad settings
        if config is not None:
            config = dataclasses.replace(config, max_tokens=limits.agent_max_tokens)
        self.llm = LLM(config) if config is not None else None
        # BentoML's CLI process imports the service to read its definition before the workers import it:
        # say it once, from the worker that serves (the CLI process still checks the settings above).
        say = log.info if server_context.worker_index is not None else log.debug
        if config is None:
            say("agent: no LLM configured (KILN_LLM_BASE_URL); the /agent routes answer 503")
        else:
            say("agent: LLM %r at %s (timeout %gs, %d retries)", config.model, config.base_url,
                     config.timeout, config.max_retries)  # fmt: skip
        self.repo = repo
        self._tools: list[Tool] | None = None
        self.store = SQLiteTrajectoryStore()
        self.embedder = MiniLMEmbedder()

    @property
    def tools(self) -> list[Tool]:
        if self._tools is None:
            from serving.tasks import tools  # the registry imports this module: resolve at first use

            self._tools = tools(self.repo)
        return self._tools

    def require_llm(self) -> LLM:
        if self.llm is None:
            raise InferenceError(503, f"the agent endpoints need an LLM; {HOW_TO_CONFIGURE}")
        return self.llm

    def select(self, names: list[str] | None) -> list[Tool]:
        if not names:
            return []
        by_name = {t.name: t for t in self.tools}
        if names == ["*"]:
            return list(self.tools)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise InferenceError(400, f"unknown tools {unknown}; available: {sorted(by_name)} (or ['*'])")
        return [by_name[n] for n in names]


def _authorize(authorization: str | None = Header(None)) -> None:
    """The admin check (serving.admin), run before the body is read: 401 without a token, 403 when wrong."""
    require_admin(authorization)


def _error(exc: AgentError) -> JSONResponse:
    return JSONResponse({"error": exc.message, "trace": exc.trace}, status_code=exc.status)


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def router(repo: ModelRepository) -> APIRouter:
    api = APIRouter(tags=["agent"])
    agent = _Agent(repo)

    async def _solve(req: SolveRequest, run: Run, problem: Problem) -> SolveResponse:
        start = time.perf_counter()
        if problem.tools:
            problem.examples = await retrieve(agent.store, agent.embedder, req.question)
            if problem.examples:
                await run.record(
                    {
                        "step": "retrieve",
                        "prompt": None,
                        "reply": None,
                        "verdict": [
                            {"instruction": e.instruction, "similarity": round(e.similarity, 4)}
                            for e in problem.examples
                        ],
                    }
                )
        ok = False
        try:
            answer = await STRATEGIES[req.strategy](run, problem)
            ok = True
        finally:
            metrics.AGENT_SOLVES.labels(strategy=req.strategy, status="success" if ok else "failure").inc()
        return SolveResponse(
            answer=answer,
            strategy=req.strategy,
            trace=run.trace,
            llm_calls=run.llm_calls,
            usage=run.usage.as_dict(),
            examples=[e.instruction for e in problem.examples],
            seconds=round(time.perf_counter() - start, 3),
        )

    @api.post("/agent/solve", response_model=SolveResponse)
    async def solve(req: SolveRequest):
        """Answer a question with chain-of-thought, IEP or IEP+CoT, optionally calling Kiln's tools."""
        llm = agent.require_llm()
        problem = Problem(req.question, req.options, req.context, agent.select(req.tools))
        if req.strategy != "cot" and req.options and len(req.options) > agent.max_nli_calls:
            raise InferenceError(  # checked before any LLM call: one NLI judgment per option at least
                400,
                f"{len(req.options)} options need at least {len(req.options)} NLI judgments with strategy "
                f"{req.strategy!r}; at most {agent.max_nli_calls} per question (agent_max_nli_calls)",
            )
        if not req.stream:
            try:
                return await _solve(req, Run(llm, max_nli_calls=agent.max_nli_calls), problem)
            except AgentError as exc:
                return _error(exc)

        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def emit(event: dict[str, Any]) -> None:
            kind = event.pop("event")
            await queue.put(_sse(kind, event))

        async def produce() -> None:
            try:
                run = Run(llm, emit, stream_tokens=True, max_nli_calls=agent.max_nli_calls)
                result = await _solve(req, run, problem)
                await queue.put(_sse("result", result.model_dump()))
            except AgentError as exc:
                await queue.put(_sse("error", {"error": exc.message, "status": exc.status}))
            except Exception as exc:  # noqa: BLE001 - the stream must end with an event, not a cut connection
                await queue.put(
                    _sse("error", {"error": f"internal error: {type(exc).__name__}: {exc}", "status": 500})
                )
            finally:
                await queue.put(None)

        async def events() -> AsyncIterator[bytes]:
            task = asyncio.create_task(produce())
            try:
                while (item := await queue.get()) is not None:
                    yield item
            finally:
                if not task.done():  # the client went away: stop asking the LLM
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @api.post(
        "/agent/trajectories/synthesize",
        response_model=SynthesizeResponse,
        dependencies=[Depends(_authorize)],
    )
    async def synthesize_trajectories(req: SynthesizeRequest | None = Body(None)):
        """Learn-by-interact: synthesize tasks from docs, run them with the tools, store what they did."""
        req = req or SynthesizeRequest()
        if agent.store.disabled:  # a read-only KILN_HOME: nothing could be stored
            raise InferenceError(503, agent.store.disabled)
        llm = agent.require_llm()
        tools = agent.select(req.tools or ["*"])
        if not tools:
            raise InferenceError(400, "no tools to explore: this server serves none")
        docs = [Doc(f"doc:{i}", d) for i, d in enumerate(req.docs)] if req.docs else default_docs(tools)
        run = Run(llm)
        try:
            added = await synthesize(
                run, tools, docs[: req.max_docs], req.tasks_per_doc, agent.store, agent.embedder
            )
        except AgentError as exc:
            return _error(exc)
        return SynthesizeResponse(
            added=[t.as_dict() for t in added],
            stored=agent.store.count(),
            llm_calls=run.llm_calls,
            usage=run.usage.as_dict(),
            trace=run.trace,
        )

    @api.get("/agent/trajectories")
    async def list_trajectories(limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        """The stored trajectories, newest first (instruction, proposed task, actions, source)."""
        out = {"count": agent.store.count(), "trajectories": [t.as_dict() for t in agent.store.list(limit)]}
        return {**out, "disabled": agent.store.disabled} if agent.store.disabled else out

    return api
