"""The agent family in a real `kiln serve` process, its LLM a test double (tests/llm_double.py: a real HTTP
server speaking chat completions with scripted replies): /agent/solve with each strategy, Kiln's own
classify tool executed for real through OpenAI tool calling, Server-Sent Events, malformed replies and
timeouts, the same tools over MCP with the `mcp` package's own client, Learn-by-interact synthesis behind
the admin token, and the 503 an LLM-less server answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from llm_double import LLMDouble
from serverproc import metric_total, start_server, stop_server

from serving.tasks.classification import ClassifyRequest

ADMIN = "agent-test-admin"
IMAGE = [[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]]
OPTIONS = ["Paris", "Lyon", "Nice"]
QUESTION = "In which city was the meeting held?"
CONTEXT = "The meeting was held in Lyon, not in the capital."


@contextlib.contextmanager
def _env(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def double():
    d = LLMDouble().start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def agent_server(kiln_home, double):
    """`kiln serve` with vit-soft only (trained with the shared fixture's epochs if the store lacks it)."""
    with _env(
        KILN_LLM_BASE_URL=double.url,
        KILN_LLM_MODEL="double-model",
        KILN_LLM_TIMEOUT="2",
        KILN_LLM_MAX_RETRIES="0",
        KILN_ADMIN_TOKEN=ADMIN,
        KILN_THREADS="1",
        KILN_AGENT_MAX_TOKENS="256",
        KILN_AGENT_MAX_NLI_CALLS="8",
    ):
        srv = start_server(kiln_home, "--models", "vit-soft", "--train-epochs", "2")
    yield srv
    stop_server(srv.process)


@pytest.fixture
def llm(double):
    double.reset()
    yield double
    assert not double.pending(), "the test scripted replies that were never asked for"


def _solve(server, timeout=60, **body):
    return httpx.post(f"{server.http}/agent/solve", json=body, timeout=timeout)


def test_iep_over_http_excludes_and_reports_calls_usage_and_metrics(agent_server, llm):
    llm.script(r'is "Paris"', '{"relation": "contradiction", "reason": "not the capital"}')
    llm.script(r'is "Lyon"', '{"relation": "entailment", "reason": "stated"}')
    llm.script(r'is "Nice"', '{"relation": "contradiction", "reason": "Lyon is stated"}')
    before = httpx.get(f"{agent_server.http}/metrics", timeout=10).text
    r = _solve(agent_server, question=QUESTION, options=OPTIONS, context=CONTEXT, strategy="iep")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == "Lyon" and body["strategy"] == "iep" and body["llm_calls"] == 3
    assert [s["step"] for s in body["trace"]] == ["plan", "infer", "infer", "infer", "exclude", "answer"]
    assert body["trace"][4]["verdict"]["excluded"] == ["Paris", "Nice"]
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        > 0
    )
    after = httpx.get(f"{agent_server.http}/metrics", timeout=10).text
    for kind in ("prompt", "completion"):
        grown = metric_total(
            after, "kiln_llm_tokens_total", llm_model="double-model", kind=kind
        ) - metric_total(before, "kiln_llm_tokens_total", llm_model="double-model", kind=kind)
        assert grown == body["usage"][f"{kind}_tokens"]
    assert metric_total(after, "kiln_agent_solves_total", strategy="iep", status="success") >= 1


def test_the_agent_calls_kiln_classify_for_real(agent_server, llm):
    direct = httpx.post(
        f"{agent_server.http}/classify", json={"image": IMAGE, "model": "vit-soft"}, timeout=30
    )
    assert direct.status_code == 200
    label = direct.json()["label"]
    llm.script(
        "What digit does this drawing show",
        {"tool_calls": [{"name": "classify", "arguments": {"image": IMAGE, "model": "vit-soft"}}]},
        "The classifier said it.",
    )
    llm.script(
        r"Facts gathered.*classify.*think step by step", f"The classifier says {label}.\nAnswer: {label}"
    )
    r = _solve(agent_server, question=f"What digit does this drawing show? {IMAGE}", tools=["classify"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == label and body["llm_calls"] == 3
    [call] = [s for s in body["trace"] if s["step"] == "tool_call"]
    assert call["tool"] == "classify" and call["verdict"] == "ok" and call["result"]["label"] == label
    # the tool's schema reached the LLM as OpenAI tools, and its result came back as a tool message
    first, second = llm.requests[0], llm.requests[1]
    assert first["tools"][0]["function"]["parameters"] == ClassifyRequest.model_json_schema()
    tool_message = next(m for m in second["messages"] if m["role"] == "tool")
    assert json.loads(tool_message["content"])["label"] == label


def test_solve_streams_each_step_as_server_sent_events(agent_server, llm):
    llm.script(r'is "Paris"', '{"relation": "contradiction", "reason": "no"}')
    llm.script(r'is "Lyon"', '{"relation": "neutral", "reason": "maybe"}')
    llm.script(r'is "Nice"', '{"relation": "neutral", "reason": "maybe"}')
    llm.script("Candidates still standing", "Lyon is stated in the context.\nAnswer: B")
    events = []
    body = {"question": QUESTION, "options": OPTIONS, "context": CONTEXT, "strategy": "iep", "stream": True}
    with httpx.stream("POST", f"{agent_server.http}/agent/solve", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    kinds = [e for e, _ in events]
    assert kinds[-1] == "result" and events[-1][1]["answer"] == "Lyon"
    steps = [d["step"] for e, d in events if e == "step"]
    assert steps == ["plan", "infer", "infer", "infer", "exclude", "answer"]
    assert kinds.count("token") > 1  # the LLM's text arrives while it streams
    assert all(llm_request["stream"] for llm_request in llm.requests)


def test_malformed_replies_end_in_a_clear_502_with_the_trace(agent_server, llm):
    llm.script("think step by step", "I'm sorry, I can't answer that.", "", "Answer: Q")
    r = _solve(agent_server, question=QUESTION, options=OPTIONS, strategy="cot")
    assert r.status_code == 502
    assert "no usable reply in 3 attempts" in r.json()["error"] and len(r.json()["trace"]) == 3
    # the server keeps serving
    llm.script("think step by step", "Answer: B")
    assert _solve(agent_server, question=QUESTION, options=OPTIONS).json()["answer"] == "Lyon"


def test_an_llm_that_does_not_answer_in_time_gives_504(agent_server, llm):
    llm.script("slow question", "Answer: A", delay=3.0)  # KILN_LLM_TIMEOUT=2, no retries
    r = _solve(agent_server, question="slow question", options=OPTIONS)
    assert r.status_code == 504 and "did not answer within 2s" in r.json()["error"]


@pytest.mark.parametrize(
    "body, problem",
    [
        ({"question": QUESTION, "strategy": "tot"}, "strategy"),
        ({"question": ""}, "question"),
        ({"question": QUESTION, "options": ["only one"]}, "options"),
        ({"question": QUESTION, "tools": ["teleport"]}, "unknown tools ['teleport']"),
    ],
)
def test_bad_solve_requests_get_400_naming_the_problem(agent_server, body, problem):
    r = _solve(agent_server, **body)
    assert r.status_code == 400 and problem in r.json()["error"]


def test_agent_work_is_bounded_by_its_settings(agent_server, llm):
    # more options than NLI judgments a question may use: 400 before any LLM call
    options = [f"city {i}" for i in range(10)]
    r = _solve(agent_server, question=QUESTION, options=options, context=CONTEXT, strategy="iep")
    assert r.status_code == 400 and "agent_max_nli_calls" in r.json()["error"], r.text
    assert not llm.requests
    # every LLM call carries the completion-token bound
    llm.script("think step by step", "Lyon.\nAnswer: B")
    r = _solve(agent_server, question=QUESTION, options=OPTIONS, context=CONTEXT, strategy="cot")
    assert r.status_code == 200, r.text
    assert [q["max_tokens"] for q in llm.requests] == [256]


def test_mcp_lists_and_calls_kiln_tools_with_the_mcp_client(agent_server):
    from mcp import Client

    direct = httpx.post(f"{agent_server.http}/classify", json={"image": IMAGE}, timeout=30).json()

    async def session():
        async with Client(f"{agent_server.http}/mcp") as client:
            listed = await client.list_tools()
            ok = await client.call_tool("classify", {"image": IMAGE, "model": "vit-soft"})
            bad = await client.call_tool("classify", {"image": IMAGE, "model": "nope"})
            invalid = await client.call_tool("classify", {"model": "vit-soft"})
            return listed, ok, bad, invalid

    listed, ok, bad, invalid = asyncio.run(session())
    tools = {t.name: t for t in listed.tools}
    assert {"classify", "generate"} <= set(tools)
    assert tools["classify"].input_schema == ClassifyRequest.model_json_schema()
    assert not ok.is_error and ok.structured_content["label"] == direct["label"]
    assert json.loads(ok.content[0].text)["probabilities"] == pytest.approx(direct["probabilities"])
    assert bad.is_error and "unknown model 'nope'" in bad.content[0].text
    assert invalid.is_error and "image" in invalid.content[0].text


def test_synthesize_needs_the_admin_token(agent_server):
    url = f"{agent_server.http}/agent/trajectories/synthesize"
    assert httpx.post(url, json={}, timeout=10).status_code == 401
    assert httpx.post(url, timeout=10).status_code == 401  # the token is checked before the body
    r = httpx.post(url, json={}, headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 403 and "wrong admin token" in r.json()["error"]


def test_learn_by_interact_synthesizes_stores_and_retrieves_trajectories(agent_server, llm):
    before = httpx.get(f"{agent_server.http}/agent/trajectories", timeout=10).json()["count"]
    llm.script("realistic tasks", json.dumps([f"Use vit-soft to read the digit in {IMAGE}"]))
    llm.script(
        "exploring Kiln",
        {"tool_calls": [{"name": "classify", "arguments": {"image": IMAGE, "model": "vit-soft"}}]},
        "I classified the image.",
    )
    llm.script(
        "accomplish exactly", '{"instruction": "Classify a small hand-drawn digit image with vit-soft"}'
    )
    r = httpx.post(
        f"{agent_server.http}/agent/trajectories/synthesize",
        json={"tools": ["classify"], "max_docs": 1, "tasks_per_doc": 1},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    [added] = body["added"]
    assert (
        added["instruction"] == "Classify a small hand-drawn digit image with vit-soft"
    )  # backward construction
    assert added["proposed"].startswith("Use vit-soft") and added["source"] == "tool:classify"
    assert added["actions"][0]["tool"] == "classify" and added["actions"][0]["ok"]
    assert body["stored"] == before + 1 and body["llm_calls"] == 4
    listed = httpx.get(f"{agent_server.http}/agent/trajectories", timeout=10).json()
    assert listed["count"] == before + 1 and listed["trajectories"][0]["id"] == added["id"]

    # at solve time the stored trajectory is retrieved and shown to the LLM as an in-context example
    asked = len(llm.requests)
    llm.script("Which digit is drawn here", "Nothing to call.")
    llm.script(r"Which digit is drawn here.*think step by step", "Answer: unknown")
    r = _solve(
        agent_server, question="Which digit is drawn here, classify the digit image", tools=["classify"]
    )
    assert r.status_code == 200, r.text
    assert r.json()["examples"][0] == added["instruction"]
    assert r.json()["trace"][0]["step"] == "retrieve"
    assert "Classify a small hand-drawn digit image" in json.dumps(llm.requests[asked]["messages"])


def test_without_an_llm_agent_routes_answer_503_and_the_rest_serves(server):
    r = _solve(server, question=QUESTION)
    assert r.status_code == 503 and "KILN_LLM_BASE_URL" in r.json()["error"]
    assert httpx.post(f"{server.http}/classify", json={"image": IMAGE}, timeout=30).status_code == 200


# --- the README's agent section runs (its LLM blocks against this server and the double) --------------

_ROOT = Path(__file__).resolve().parents[2]
_README = (_ROOT / "README.md").read_text()


def _agent_blocks(lang: str) -> list[str]:
    start = _README.index("## Agents")
    end = _README.index("\n## ", start + 1)
    return re.findall(rf"```{lang}\n(.*?)```", _README[start:end], flags=re.S)


def _script_for(block: str, llm) -> None:
    """What the LLM double says for each README request (blocks that need an LLM say so)."""
    if '"strategy": "iep"' in block:
        llm.script(r'is "Paris"', '{"relation": "contradiction", "reason": "it moved away from the capital"}')
        llm.script(r'is "Lyon"', '{"relation": "entailment", "reason": "it moved to Lyon"}')
        llm.script(r'is "Nice"', '{"relation": "contradiction", "reason": "it moved to Lyon"}')
    elif '"tools": ["classify"], "stream": true' in block:
        llm.script(
            "Which digit is drawn in",
            {"tool_calls": [{"name": "classify", "arguments": {"image": IMAGE, "model": "vit-soft"}}]},
            "The classifier answered.",
        )
        llm.script(
            r"Facts gathered.*think step by step", "The classifier named it.\nAnswer: the classifier's label"
        )
    elif "synthesize" in block:
        llm.script("realistic tasks", json.dumps([f"Classify the digit {IMAGE} with vit-soft"]))
        llm.script(
            "exploring Kiln",
            {"tool_calls": [{"name": "classify", "arguments": {"image": IMAGE, "model": "vit-soft"}}]},
            "Done.",
        )
        llm.script("accomplish exactly", '{"instruction": "Classify a 6x5 digit drawing with vit-soft"}')


@pytest.mark.parametrize("index", range(len(_agent_blocks("bash"))))
def test_readme_agent_requests_run(agent_server, llm, index):
    """Each README agent block, as written, from the repository root (`.venv/bin/kiln token`), twice."""
    block = _agent_blocks("bash")[index]
    if "/agent/solve" in block or "/synthesize" in block:
        assert block.startswith("# needs an LLM"), "README blocks that need an LLM are marked"
    code = block.replace("localhost:3000", agent_server.http_hostport)
    for _ in range(2):
        _script_for(block, llm)
        r = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=_ROOT,
            env={**os.environ, "KILN_ADMIN_TOKEN": ADMIN},  # what `kiln token` prints, as the server has it
        )
        assert r.returncode == 0, r.stderr + r.stdout
        assert r.stdout.strip() and "error" not in r.stdout.lower(), r.stdout


@pytest.mark.parametrize("index", range(len(_agent_blocks("python"))))
def test_readme_mcp_python_runs(agent_server, index):
    code = _agent_blocks("python")[index].replace("localhost:3000", agent_server.http_hostport)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "classify" in r.stdout


def test_readme_mcp_client_config_is_json_pointing_at_mcp():
    [config] = _agent_blocks("json")
    assert json.loads(config)["mcpServers"]["kiln"]["url"] == "http://localhost:3000/mcp"
