"""What every reasoning strategy shares: the problem, the run (LLM calls, usage, the trace), robust reply
parsing with bounded re-asking, and the tool phase.

Real LLM output is messy. Every reply a strategy uses goes through :meth:`Run.ask` with a parser; a reply
the parser rejects (empty, a refusal, malformed JSON, an option that does not exist) is recorded in the
trace with the reason and re-asked with that reason, at most ``MAX_ATTEMPTS`` times; then the run fails
with :class:`AgentError` naming the last problem. No strategy ever picks an answer the LLM did not give.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from serving.agent.llm import LLM, LLMError, Reply, Usage
from serving.agent.tools import Tool, call_tool

T = TypeVar("T")

MAX_ATTEMPTS = 3  # asks per step: the first and two corrections
MAX_TOOL_ROUNDS = 4  # LLM turns that may call tools before it must answer
NLI_STEP = "infer"  # the step of IEP's NLI judgments, bounded per run by ``Run.max_nli_calls``
LABELS = string.ascii_uppercase
_REFUSAL = re.compile(
    r"\b(I can(?:no|')t|I am unable|I'm unable|I won't|I will not|as an AI|I'm sorry|I apologi[sz]e)\b", re.I
)
GATHER_SYSTEM = (
    "You can call Kiln's tools to gather facts the question needs. Call them as needed; when you have the "
    "facts, reply with a short summary of them (no answer)."
)
_ANSWER = re.compile(r"(?:^|\n)[^\n]*?\banswer(?:\s+is)?\W*[:：]\s*(.+)", re.I)  # the last such line counts


class AgentError(Exception):
    """The agent could not answer: ``status`` is the HTTP status (502 unusable LLM output, 504 timeout)."""

    def __init__(self, status: int, message: str, trace: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.trace = trace or []


class ReplyError(ValueError):
    """A reply a parser cannot use; its message is told to the LLM when re-asking."""


@dataclass
class Example:
    """A stored trajectory shown as an in-context example (Learn-by-interact's retrieval)."""

    instruction: str
    actions: list[dict[str, Any]]  # [{"tool", "arguments", "result"}]
    similarity: float


@dataclass
class Problem:
    question: str
    options: list[str] | None = None
    context: str | None = None
    tools: list[Tool] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)

    def labelled_options(self) -> str:
        return "\n".join(f"{LABELS[i]}. {o}" for i, o in enumerate(self.options or []))

    def statement(self, facts: str = "") -> str:
        """Question, options, context and gathered facts as one prompt block."""
        parts = []
        if self.context:
            parts.append(f"Context:\n{self.context}")
        if facts:
            parts.append(f"Facts gathered with Kiln's tools:\n{facts}")
        parts.append(f"Question: {self.question}")
        if self.options:
            parts.append(f"Options:\n{self.labelled_options()}")
        return "\n\n".join(parts)


Emit = Callable[[dict[str, Any]], Awaitable[None]]


class Run:
    """One solve: the LLM, the trace of every step, call and token counts, and a live step callback."""

    def __init__(
        self,
        llm: LLM,
        emit: Emit | None = None,
        stream_tokens: bool = False,
        max_nli_calls: int | None = None,
    ):
        """``max_nli_calls`` bounds the LLM calls of NLI judgments (the ``infer`` step, retries included)
        in this run; None = no bound."""
        self.llm = llm
        self.max_nli_calls = max_nli_calls
        self.nli_calls = 0
        self.trace: list[dict[str, Any]] = []
        self.llm_calls = 0
        self.usage = Usage()
        self.actions: list[dict[str, Any]] = []  # every tool call: tool, arguments, result, ok
        self._emit = emit
        self._stream_tokens = stream_tokens and emit is not None

    async def record(self, step: dict[str, Any]) -> None:
        step = {"index": len(self.trace), **step}
        self.trace.append(step)
        if self._emit is not None:
            await self._emit({"event": "step", **step})

    async def chat(self, step: str, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> Reply:
        on_delta = None
        if self._stream_tokens:

            async def on_delta(text: str) -> None:
                await self._emit({"event": "token", "step": step, "text": text})

        if step == NLI_STEP:
            if self.max_nli_calls is not None and self.nli_calls >= self.max_nli_calls:
                raise AgentError(
                    422,
                    f"the question's NLI judgments need more than the {self.max_nli_calls} LLM calls a "
                    "question may use (agent_max_nli_calls, retries included); give fewer options",
                    self.trace,
                )
            self.nli_calls += 1
        self.llm_calls += 1
        try:
            reply = await self.llm.chat(messages, tools=tools, on_delta=on_delta)
        except LLMError as exc:
            await self.record(
                {"step": step, "prompt": messages, "reply": None, "verdict": f"error: {exc.message}"}
            )
            raise AgentError(exc.status, exc.message, self.trace) from None
        self.usage.add(reply.usage)
        return reply

    async def ask(
        self, step: str, messages: list[dict[str, Any]], parse: Callable[[str], T], **info: Any
    ) -> T:
        """Ask until ``parse`` accepts the reply (at most ``MAX_ATTEMPTS`` times); raises AgentError 502."""
        messages = list(messages)
        problem = ""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            reply = await self.chat(step, messages)
            try:
                value = parse(reply.content)
            except ReplyError as exc:
                problem = str(exc)
                await self.record(
                    {
                        "step": step,
                        **info,
                        "attempt": attempt,
                        "prompt": messages,
                        "reply": reply.content,
                        "verdict": f"rejected: {problem}",
                    }
                )
                messages = [
                    *messages,
                    {"role": "assistant", "content": reply.content},
                    {
                        "role": "user",
                        "content": f"Your reply could not be used: {problem}. Answer again, "
                        "following the required format exactly.",
                    },
                ]
                continue
            await self.record(
                {
                    "step": step,
                    **info,
                    "attempt": attempt,
                    "prompt": messages,
                    "reply": reply.content,
                    "verdict": _verdict(value),
                }
            )
            return value
        raise AgentError(
            502,
            f"step {step!r}: the LLM gave no usable reply in {MAX_ATTEMPTS} attempts; "
            f"last problem: {problem}",
            self.trace,
        )

    async def gather(self, problem: Problem, system: str = GATHER_SYSTEM) -> str:
        """The tool phase: let the LLM call Kiln's tools (OpenAI tool calling) to gather facts.

        Returns the observations as text for the later prompts ("" when no tools were given).
        """
        if not problem.tools:
            return ""
        tools = {t.name: t for t in problem.tools}
        specs = [t.openai_spec() for t in problem.tools]
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": system},
            *examples_as_messages(problem.examples),
            {"role": "user", "content": problem.statement()},
        ]
        observations: list[str] = []
        for _ in range(MAX_TOOL_ROUNDS):
            reply = await self.chat("tools", messages, tools=specs)
            if not reply.tool_calls:
                await self.record(
                    {"step": "tools", "prompt": messages, "reply": reply.content, "verdict": "done gathering"}
                )
                if reply.content.strip():
                    observations.append(f"Summary: {reply.content.strip()}")
                return "\n".join(observations)
            messages.append(reply.assistant_message())
            for call in reply.tool_calls:
                result = await call_tool(tools, call.name, call.arguments, caller="agent")
                text = result.for_llm()
                self.actions.append(
                    {
                        "tool": call.name,
                        "arguments": call.arguments,
                        "result": json.loads(text),
                        "ok": result.ok,
                    }
                )
                await self.record(
                    {
                        "step": "tool_call",
                        "tool": call.name,
                        "arguments": call.arguments,
                        "result": json.loads(text),
                        "verdict": "ok" if result.ok else "error",
                    }
                )
                messages.append({"role": "tool", "tool_call_id": call.id, "content": text})
                observations.append(f"{call.name}({call.arguments}) -> {text}")
        await self.record(
            {
                "step": "tools",
                "prompt": None,
                "reply": None,
                "verdict": f"stopped after {MAX_TOOL_ROUNDS} tool rounds; answering from what was gathered",
            }
        )
        return "\n".join(observations)


def examples_as_messages(examples: list[Example]) -> list[dict[str, Any]]:
    if not examples:
        return []
    lines = ["Examples of tasks done before with these tools (retrieved as relevant):"]
    for ex in examples:
        lines.append(f"- Task: {ex.instruction}")
        for a in ex.actions:
            lines.append(
                f"  called {a['tool']}({json.dumps(a['arguments'])}) -> {json.dumps(a['result'])[:300]}"
            )
    return [{"role": "system", "content": "\n".join(lines)}]


def _verdict(value: Any) -> Any:
    return value if isinstance(value, str | dict | list) else str(value)


# --- parsers -----------------------------------------------------------------------------------------


def _check_text(text: str) -> str:
    text = (text or "").strip()
    if not text:
        raise ReplyError("the reply was empty")
    return text


def parse_answer(text: str, options: list[str] | None) -> str:
    """The answer on the reply's last ``Answer: ...`` line; with options, the chosen option's text.

    An option may be named by its letter (``B``, ``(B)``, ``B.``) or its exact text; anything else raises.
    """
    text = _check_text(text)
    found = _ANSWER.findall(text)
    if not found:
        if _REFUSAL.search(text):
            raise ReplyError("the reply is a refusal with no 'Answer:' line")
        raise ReplyError("the reply has no line 'Answer: <answer>'")
    raw = found[-1].strip().strip("*").strip()
    if not options:
        if not raw:
            raise ReplyError("the 'Answer:' line is empty")
        return raw
    return _option(raw, options, list(range(len(options))))


def parse_choice_among(text: str, options: list[str], allowed: list[int]) -> str:
    """Like :func:`parse_answer`, but the option must be one of ``allowed`` (indices still standing)."""
    text = _check_text(text)
    found = _ANSWER.findall(text)
    if not found:
        if _REFUSAL.search(text):
            raise ReplyError("the reply is a refusal with no 'Answer:' line")
        raise ReplyError("the reply has no line 'Answer: <letter>'")
    return _option(found[-1].strip().strip("*").strip(), options, allowed)


def _option(raw: str, options: list[str], allowed: list[int]) -> str:
    names = ", ".join(LABELS[i] for i in allowed)
    for i, option in enumerate(options):  # the option's own text first ("A dog" is not letter A)
        if raw.lower().rstrip(".") == option.lower():
            if i in allowed:
                return option
            raise ReplyError(f"option {LABELS[i]} was excluded; choose one of {names}")
    m = re.match(r"^\(?([A-Za-z])\)?(?=$|[.):\s])", raw)
    if m is None:
        raise ReplyError(f"{raw!r} is not one of the options; answer with one letter of {names}")
    index = LABELS.find(m.group(1).upper())
    if index in allowed:
        return options[index]
    if 0 <= index < len(options):
        raise ReplyError(f"option {LABELS[index]} was excluded; choose one of {names}")
    raise ReplyError(f"option {m.group(1)!r} does not exist; choose one of {names}")


def parse_json(text: str, last: bool = False) -> Any:
    """The first (or ``last``) top-level JSON object or array in the reply; code fences and prose around
    it are allowed (a chain-of-thought reply reasons first and ends with its JSON verdict)."""
    text = _check_text(text)
    decoder = json.JSONDecoder()
    found, i = [], 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                i += 1
                continue
            if not last:
                return value
            found.append(value)
            i = end  # skip what is nested inside it
            continue
        i += 1
    if found:
        return found[-1]
    if _REFUSAL.search(text):
        raise ReplyError("the reply is a refusal, not JSON")
    raise ReplyError("the reply contains no valid JSON")
