"""The agent's strategies (CoT, IEP, IEP+CoT), reply parsing and LLM client, against the LLM test double
(a real HTTP server speaking chat completions with scripted replies, tests/llm_double.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from llm_double import LLMDouble
from pydantic import BaseModel, Field

from serving.agent.llm import LLM, LLMConfig, LLMConfigError
from serving.agent.strategies import STRATEGIES
from serving.agent.strategies.base import AgentError, Problem, ReplyError, Run, parse_answer, parse_json
from serving.agent.tools import Tool, call_tool, compact

OPTIONS = ["Paris", "Lyon", "Nice"]
QUESTION = "In which city was the meeting held?"
CONTEXT = "The meeting was held in Lyon, not in the capital."


@pytest.fixture(scope="module")
def double():
    d = LLMDouble().start()
    yield d
    d.stop()


@pytest.fixture
def llm(double):
    double.reset()
    yield LLM(LLMConfig(double.url, "double-model", timeout=2, max_retries=0))
    assert not double.pending(), "the test scripted replies that were never asked for"


def solve(llm, strategy, problem, **run_kw):
    run = Run(llm, **run_kw)
    answer = asyncio.run(STRATEGIES[strategy](run, problem))
    return answer, run


# --- parsing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Lyon is right.\nAnswer: B", "Lyon"),
        ("**Answer:** (B)", "Lyon"),
        ("answer: b.", "Lyon"),
        ("Final answer: Lyon", "Lyon"),
        ("So the final answer is: (B) Lyon", "Lyon"),
        ("<think>A or B?</think>\nThe answer: b", "Lyon"),
        ("Reasoning... Answer: A\nOn reflection,\nAnswer: C) Nice", "Nice"),
    ],
)
def test_parse_answer_accepts_the_forms_llms_write(reply, expected):
    assert parse_answer(reply, OPTIONS) == expected


@pytest.mark.parametrize(
    "reply, problem",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("I'm sorry, I can't help with that.", "refusal"),
        ("It is probably the second one.", "no line 'Answer"),
        ("Answer: E", "does not exist"),
        ("Answer: Marseille", "not one of the options"),
    ],
)
def test_parse_answer_rejects_with_a_reason(reply, problem):
    with pytest.raises(ReplyError, match=problem):
        parse_answer(reply, OPTIONS)


def test_parse_json_finds_json_in_prose_and_fences():
    assert parse_json('Sure:\n```json\n{"a": [1, 2]}\n```') == {"a": [1, 2]}
    assert parse_json('The list: ["x", "y"] as asked') == ["x", "y"]
    with pytest.raises(ReplyError, match="no valid JSON"):
        parse_json('{"relation": "contradiction", ')
    reasoning = (
        'Let {x} be the city; {"a": 1} is a guess.\nVerdict: {"relation": "neutral", "nested": {"b": 2}}'
    )
    assert parse_json(reasoning) == {"a": 1}
    assert parse_json(reasoning, last=True) == {"relation": "neutral", "nested": {"b": 2}}


# --- strategies -------------------------------------------------------------------------------------


def test_cot_answers_from_the_answer_line_and_counts_calls_and_tokens(llm, double):
    double.script("think step by step", "The context says Lyon.\nAnswer: B")
    answer, run = solve(llm, "cot", Problem(QUESTION, OPTIONS, CONTEXT))
    assert answer == "Lyon" and run.llm_calls == 1
    assert run.usage.prompt_tokens > 0 and run.usage.completion_tokens > 0
    [step] = run.trace
    assert step["step"] == "cot" and step["verdict"] == "Lyon" and step["reply"].endswith("Answer: B")
    assert step["prompt"][-1]["content"].startswith("Context:\nThe meeting was held in Lyon")


def test_iep_excludes_contradicted_candidates_and_answers_the_survivor(llm, double):
    double.script(r'is "Paris"', '{"relation": "contradiction", "reason": "it was not the capital"}')
    double.script(r'is "Lyon"', '{"relation": "entailment", "reason": "the context says Lyon"}')
    double.script(r'is "Nice"', '{"relation": "contradiction", "reason": "the context says Lyon"}')
    answer, run = solve(llm, "iep", Problem(QUESTION, OPTIONS, CONTEXT))
    assert answer == "Lyon"
    assert run.llm_calls == 3  # one NLI judgment per candidate; a lone survivor needs no final call
    steps = [s["step"] for s in run.trace]
    assert steps == ["plan", "infer", "infer", "infer", "exclude", "answer"]
    exclude = run.trace[4]["verdict"]
    assert exclude == {"excluded": ["Paris", "Nice"], "remaining": ["Lyon"]}
    nli_prompt = run.trace[1]["prompt"][-1]["content"]
    assert "Commonsense" in nli_prompt and CONTEXT in nli_prompt and "Hypothesis" in nli_prompt


def test_iep_chooses_among_survivors_and_refuses_an_excluded_option(llm, double):
    double.script(r'is "Paris"', '{"relation": "contradiction", "reason": "not the capital"}')
    double.script(r'is "Lyon"', '{"relation": "neutral", "reason": "possible"}')
    double.script(r'is "Nice"', '{"relation": "neutral", "reason": "possible"}')
    # The LLM first names the excluded option, then one that does not exist, then a survivor.
    double.script("Candidates still standing", "Answer: A", "Answer: F", "Answer: B")
    answer, run = solve(llm, "iep", Problem(QUESTION, OPTIONS, CONTEXT))
    assert answer == "Lyon" and run.llm_calls == 6
    verdicts = [s["verdict"] for s in run.trace if s["step"] == "answer"]
    assert "excluded" in verdicts[0] and "does not exist" in verdicts[1] and verdicts[2] == "Lyon"


def test_iep_without_options_plans_candidates_first(llm, double):
    double.script("list every plausible answer", 'Candidates: ["Lyon", "Paris"]')
    double.script(r'is "Lyon"', '{"relation": "entailment", "reason": "stated"}')
    double.script(r'is "Paris"', '{"relation": "contradiction", "reason": "not the capital"}')
    answer, run = solve(llm, "iep", Problem(QUESTION, None, CONTEXT))
    assert answer == "Lyon"
    assert run.trace[0]["step"] == "plan" and run.trace[0]["verdict"] == ["Lyon", "Paris"]


def test_iep_when_every_candidate_is_contradicted_gives_no_answer(llm, double):
    for city in OPTIONS:
        double.script(rf'is "{city}"', '{"relation": "contradiction", "reason": "no"}')
    with pytest.raises(AgentError, match="every candidate answer was contradicted") as err:
        solve(llm, "iep", Problem(QUESTION, OPTIONS, CONTEXT))
    assert err.value.status == 422 and err.value.trace[-1]["step"] == "exclude"


def test_iep_cot_reasons_inside_each_judgment(llm, double):
    double.script(
        r'is "Paris".*Think step by step',
        "The capital is Paris; the meeting was not there.\n"
        '{"relation": "contradiction", "reason": "not the capital"}',
    )
    double.script(r'is "Lyon".*Think step by step', 'Stated.\n{"relation": "entailment", "reason": "stated"}')
    double.script(r'is "Nice".*Think step by step', 'Unclear.\n{"relation": "neutral", "reason": "unknown"}')
    double.script("Candidates still standing.*Think step by step", "Lyon is stated outright.\nAnswer: B")
    answer, run = solve(llm, "iep+cot", Problem(QUESTION, OPTIONS, CONTEXT))
    assert answer == "Lyon" and run.llm_calls == 4


def test_malformed_replies_get_bounded_retries_then_a_clear_error(llm, double):
    double.script(r'is "Paris"', "not json at all", '{"relation": "maybe"}', '{"verdict": "contradiction"}')
    with pytest.raises(AgentError) as err:
        solve(llm, "iep", Problem(QUESTION, OPTIONS, CONTEXT))
    assert err.value.status == 502
    assert "no usable reply in 3 attempts" in err.value.message and "relation" in err.value.message
    verdicts = [s["verdict"] for s in err.value.trace]
    assert verdicts[1:] == [
        "rejected: the reply contains no valid JSON",
        "rejected: relation 'maybe' is not one of ['entailment', 'neutral', 'contradiction']",
        'rejected: expected a JSON object {"relation": ..., "reason": ...}',
    ]
    # each retry tells the LLM what was wrong
    assert (
        "could not be used: the reply contains no valid JSON" in err.value.trace[2]["prompt"][-1]["content"]
    )


def test_refusals_and_empty_replies_are_never_turned_into_answers(llm, double):
    double.script("think step by step", "I'm sorry, but I can't help with that.", "", "Answer: Z")
    with pytest.raises(AgentError, match="no usable reply") as err:
        solve(llm, "cot", Problem(QUESTION, OPTIONS, CONTEXT))
    assert [s["verdict"] for s in err.value.trace] == [
        "rejected: the reply is a refusal with no 'Answer:' line",
        "rejected: the reply was empty",
        "rejected: option 'Z' does not exist; choose one of A, B, C",
    ]


# --- the LLM client -----------------------------------------------------------------------------------


def test_timeouts_become_504_after_the_retries(double):
    double.reset()
    double.script("slow question", "Answer: A", "Answer: A", delay=1.5)
    llm = LLM(LLMConfig(double.url, "double-model", timeout=0.5, max_retries=1))
    with pytest.raises(AgentError, match=r"did not answer within 0.5s \(1 retries\)") as err:
        solve(llm, "cot", Problem("slow question", OPTIONS))
    assert err.value.status == 504
    assert len(double.requests) == 2  # the first attempt and one retry


def test_server_errors_are_retried_with_backoff_then_502(double):
    double.reset()
    double.script("flaky", {"status": 503}, "Answer: C")
    llm = LLM(LLMConfig(double.url, "double-model", timeout=2, max_retries=1))
    answer, run = solve(llm, "cot", Problem("flaky", OPTIONS))
    assert answer == "Nice" and len(double.requests) == 2 and run.llm_calls == 1
    double.script("flaky", {"status": 500}, {"status": 500})
    llm = LLM(LLMConfig(double.url, "double-model", timeout=2, max_retries=1))  # a client per event loop
    with pytest.raises(AgentError, match="answered HTTP 500") as err:
        solve(llm, "cot", Problem("flaky", OPTIONS))
    assert err.value.status == 502


def test_streaming_forwards_tokens_and_usage(llm, double):
    double.script("think step by step", "Lyon, as the context says.\nAnswer: B")
    events = []

    async def emit(event):
        events.append(event)

    answer, run = solve(llm, "cot", Problem(QUESTION, OPTIONS, CONTEXT), emit=emit, stream_tokens=True)
    assert answer == "Lyon" and double.requests[-1]["stream"] is True
    tokens = [e["text"] for e in events if e["event"] == "token"]
    assert len(tokens) > 1 and "".join(tokens) == "Lyon, as the context says.\nAnswer: B"
    assert events[-1]["event"] == "step" and events[-1]["verdict"] == "Lyon"
    assert run.usage.prompt_tokens > 0  # the final usage chunk (stream_options.include_usage)


def test_llm_config_from_env(monkeypatch):
    monkeypatch.delenv("KILN_LLM_BASE_URL", raising=False)
    assert LLMConfig.from_env() is None
    monkeypatch.setenv("KILN_LLM_BASE_URL", "http://localhost:8000/v1")
    monkeypatch.delenv("KILN_LLM_MODEL", raising=False)
    with pytest.raises(LLMConfigError, match="KILN_LLM_MODEL"):
        LLMConfig.from_env()
    monkeypatch.setenv("KILN_LLM_MODEL", "qwen")
    monkeypatch.setenv("KILN_LLM_TIMEOUT", "abc")
    with pytest.raises(LLMConfigError, match="KILN_LLM_TIMEOUT"):
        LLMConfig.from_env()
    monkeypatch.setenv("KILN_LLM_TIMEOUT", "5")
    cfg = LLMConfig.from_env()
    assert cfg.model == "qwen" and cfg.timeout == 5 and cfg.api_key == "none"


# --- tools ----------------------------------------------------------------------------------------------


class _EchoRequest(BaseModel):
    text: str = Field(min_length=1)
    times: int = Field(1, ge=1, le=3)


class _EchoResponse(BaseModel):
    echoed: str


async def _echo(req: _EchoRequest) -> _EchoResponse:
    return _EchoResponse(echoed=req.text * req.times)


ECHO = Tool("echo", "Repeat text.", _EchoRequest, _echo)


def test_tool_schema_is_the_request_models():
    spec = ECHO.openai_spec()["function"]
    assert spec["parameters"] == _EchoRequest.model_json_schema()
    assert spec["parameters"]["properties"]["times"]["maximum"] == 3


@pytest.mark.parametrize(
    "name, arguments, error",
    [
        ("nope", "{}", "no tool 'nope'; available: ['echo']"),
        ("echo", "{not json", "arguments are not valid JSON"),
        (
            "echo",
            '{"text": "a", "times": 9}',
            "invalid arguments: times: Input should be less than or equal to 3",
        ),
        ("echo", "[1]", "arguments must be a JSON object"),
    ],
)
def test_bad_tool_calls_become_messages_not_crashes(name, arguments, error):
    result = asyncio.run(call_tool({"echo": ECHO}, name, arguments, caller="agent"))
    assert not result.ok and result.error.startswith(error)
    assert json.loads(result.for_llm()) == {"error": result.error}


def test_tool_loop_feeds_results_back_and_the_strategy_answers(llm, double):
    double.script(
        "repeat",
        {"tool_calls": [{"name": "echo", "arguments": {"text": "ab", "times": 9}}]},  # invalid: 9 > 3
        {"tool_calls": [{"name": "echo", "arguments": {"text": "ab", "times": 2}}]},
        "The tool returned abab.",
    )
    double.script("Facts gathered.*abab.*think step by step", "Answer: abab")
    answer, run = solve(llm, "cot", Problem("repeat ab twice", None, None, tools=[ECHO]))
    assert answer == "abab" and run.llm_calls == 4
    calls = [s for s in run.trace if s["step"] == "tool_call"]
    assert [c["verdict"] for c in calls] == ["error", "ok"] and calls[1]["result"] == {"echoed": "abab"}
    tool_request = double.requests[0]
    assert tool_request["tools"][0]["function"]["name"] == "echo"
    # the failed call's message reached the LLM, so it could correct itself
    assert "less than or equal to 3" in json.dumps(double.requests[1]["messages"])


def test_compact_elides_pixels_and_base64():
    value = {"images": ["x" * 1000], "label": "7", "grid": [[0.0] * 32] * 32}
    assert compact(value) == {
        "images": ["<1000 characters elided>"],
        "label": "7",
        "grid": "<list of 32 items elided>",
    }


# --- work budgets (issue 16) -------------------------------------------------------------------------


def test_every_call_carries_max_tokens(double):
    double.reset()
    llm = LLM(LLMConfig(double.url, "double-model", timeout=2, max_retries=0, max_tokens=77))
    double.script("think step by step", "Answer: B")
    answer, _ = solve(llm, "cot", Problem(QUESTION, OPTIONS, CONTEXT))
    assert answer == "Lyon" and [r["max_tokens"] for r in double.requests] == [77]


def test_nli_calls_are_bounded_per_question_retries_included(llm, double):
    double.script(r'is "Paris"', "not json", '{"relation": "contradiction", "reason": "no"}')
    double.script(r'is "Lyon"', '{"relation": "entailment", "reason": "stated"}')
    with pytest.raises(AgentError, match="agent_max_nli_calls") as err:
        solve(llm, "iep", Problem(QUESTION, OPTIONS, CONTEXT), max_nli_calls=3)
    assert err.value.status == 422
    assert [s["step"] for s in err.value.trace].count("infer") == 3  # Paris twice, Lyon once; Nice never


def test_planned_candidates_are_cut_to_the_nli_budget(llm, double):
    double.script("list every plausible answer", '["Lyon", "Paris", "Nice", "Lille"]')
    double.script(r'is "Lyon"', '{"relation": "entailment", "reason": "stated"}')
    double.script(r'is "Paris"', '{"relation": "contradiction", "reason": "not the capital"}')
    answer, run = solve(llm, "iep", Problem(QUESTION, None, CONTEXT), max_nli_calls=2)
    assert answer == "Lyon" and run.nli_calls == 2
    assert run.trace[1]["verdict"]["candidates"] == ["Lyon", "Paris"]
