"""`kiln bench agent`: the question file, the clear exit without an LLM, and a quick run against the LLM
test double (a real HTTP server with scripted replies, tests/llm_double.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from llm_double import LLMDouble

from benchmarks import agent as bench


def test_the_bundled_question_file_is_valid():
    questions = bench.load_questions(bench.DEFAULT_DATA)
    assert len(questions) >= 20 and len({q["id"] for q in questions}) == len(questions)
    assert sum(bool(q.get("context")) for q in questions) >= 5  # context-dependent questions for IEP


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{not json", "not JSON"),
        ('{"question": "q", "options": ["a"], "answer": 0}', "at least 2"),
        ('{"question": "q", "options": ["a", "b"], "answer": 2}', "index of the right option"),
        ('{"question": "", "options": ["a", "b"], "answer": 0}', "non-empty"),
    ],
)
def test_bad_question_files_name_the_line(tmp_path, line, problem):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "ok?", "options": ["a", "b"], "answer": 0}\n' + line + "\n")
    with pytest.raises(bench.BenchmarkError, match=rf"q.jsonl:2: .*{problem}"):
        bench.load_questions(path)


def test_cli_without_an_llm_exits_with_how_to_configure_one(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("KILN_LLM_")}
    r = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "bench", "agent", "--output", str(tmp_path / "B.md")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 1 and "needs an LLM" in r.stderr and "KILN_LLM_BASE_URL" in r.stderr


def test_quick_run_scores_each_strategy_against_the_double(tmp_path, monkeypatch):
    data = tmp_path / "two.jsonl"
    data.write_text(
        json.dumps({"id": "q1", "question": "Pick the fruit", "options": ["stone", "apple"], "answer": 1})
        + "\n"
    )
    double = LLMDouble().start()
    try:
        double.script("Pick the fruit.*think step by step", "Apples are fruit.\nAnswer: B")  # cot: right
        double.script(r'is "stone"', '{"relation": "contradiction", "reason": "not a fruit"}')  # iep
        double.script(
            r'is "apple"', '{"relation": "contradiction", "reason": "wrongly"}'
        )  # iep: nothing left
        double.script(r'is "stone"', 'No.\n{"relation": "contradiction", "reason": "not a fruit"}')  # iep+cot
        double.script(r'is "apple"', 'Yes.\n{"relation": "entailment", "reason": "a fruit"}')
        monkeypatch.setenv("KILN_LLM_BASE_URL", double.url)
        monkeypatch.setenv("KILN_LLM_MODEL", "double-model")
        out = tmp_path / "BENCHMARKS.md"
        bench.run(quick=True, output=str(out), command="kiln bench agent --quick", data=str(data))
    finally:
        double.stop()
    results = json.loads((tmp_path / "BENCHMARKS.agent.json").read_text())["strategies"]
    assert results["cot"]["accuracy"] == 1.0 and results["cot"]["llm_calls_per_question"] == 1
    assert results["iep"]["accuracy"] == 0.0 and results["iep"]["unanswered"] == 1
    assert results["iep+cot"]["accuracy"] == 1.0 and results["iep+cot"]["llm_calls_per_question"] == 2
    text = out.read_text()
    assert "<!-- bench:agent:start -->" in text and "| iep+cot | 1.000 |" in text
