"""``kiln bench agent``: accuracy and LLM cost of CoT, IEP and IEP+CoT on multiple-choice questions.

Needs an LLM (``KILN_LLM_BASE_URL``, ``KILN_LLM_MODEL``; see ``serving/agent/llm.py``) and exits with
how to configure one otherwise. Questions come from a JSONL file (``--data``; default the bundled
``benchmarks/data/agent_mc.jsonl``, 24 questions written for this benchmark: context-dependent
reading, commonsense, arithmetic, logic and trick questions), one object per line:
``{"id", "question", "options": [...], "answer": <index of the right option>, "context"?}``.

Each strategy answers every question through the same code ``/agent/solve`` runs (in this process, so
the numbers are the strategies' and the LLM's, not HTTP's). A question the strategy could not answer
(AgentError: unusable replies, every candidate excluded, a timeout) counts as wrong and is counted apart.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.report import fmt, machine_info, markdown_table, run_header, write_results

RECORD = Path(__file__).parent / "results" / "agent.json"
DEFAULT_DATA = Path(__file__).parent / "data" / "agent_mc.jsonl"
QUICK_QUESTIONS = 5


class BenchmarkError(RuntimeError):
    pass


def load_questions(path: Path) -> list[dict[str, Any]]:
    """Read and check the JSONL question file; raises BenchmarkError naming the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"no question file {path}")
    questions = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{path}:{n}: not JSON ({exc})") from None
        options, answer = q.get("options"), q.get("answer")
        if not isinstance(q.get("question"), str) or not q["question"].strip():
            raise BenchmarkError(f"{path}:{n}: 'question' must be a non-empty string")
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise BenchmarkError(f"{path}:{n}: 'options' must be a list of at least 2 strings")
        if not isinstance(answer, int) or not 0 <= answer < len(options):
            raise BenchmarkError(
                f"{path}:{n}: 'answer' must be the index of the right option (0..{len(options) - 1})"
            )
        questions.append({"id": q.get("id", f"line{n}"), **q})
    if not questions:
        raise BenchmarkError(f"{path} has no questions")
    return questions


async def _evaluate(llm, strategy: str, questions: list[dict[str, Any]]) -> dict[str, Any]:
    from serving.agent.strategies import STRATEGIES
    from serving.agent.strategies.base import AgentError, Problem, Run

    rows, calls, prompt_tokens, completion_tokens, seconds = [], 0, 0, 0, 0.0
    for q in tqdm(questions, desc=f"agent {strategy}", unit="question"):
        run, start = Run(llm), time.perf_counter()
        try:
            answer, error = (
                await STRATEGIES[strategy](run, Problem(q["question"], q["options"], q.get("context"))),
                "",
            )
        except AgentError as exc:
            answer, error = None, exc.message
        seconds += time.perf_counter() - start
        calls += run.llm_calls
        prompt_tokens += run.usage.prompt_tokens
        completion_tokens += run.usage.completion_tokens
        rows.append(
            {"id": q["id"], "answer": answer, "correct": answer == q["options"][q["answer"]], "error": error}
        )
    n = len(questions)
    return {
        "questions": n,
        "accuracy": sum(r["correct"] for r in rows) / n,
        "unanswered": sum(bool(r["error"]) for r in rows),
        "llm_calls_per_question": calls / n,
        "prompt_tokens_per_question": prompt_tokens / n,
        "completion_tokens_per_question": completion_tokens / n,
        "seconds_per_question": seconds / n,
        "per_question": rows,
    }


def run(
    quick: bool = False,
    output: str = "BENCHMARKS.md",
    command: str = "kiln bench agent",
    data: str | None = None,
):
    from serving.agent.llm import HOW_TO_CONFIGURE, LLM, LLMConfig, LLMConfigError
    from serving.agent.strategies import STRATEGIES

    try:
        config = LLMConfig.from_env()
    except LLMConfigError as exc:
        raise BenchmarkError(str(exc)) from None
    if config is None:
        raise BenchmarkError(f"kiln bench agent needs an LLM: {HOW_TO_CONFIGURE}")
    data_path = Path(data) if data else DEFAULT_DATA
    questions = load_questions(data_path)
    if quick:
        questions = questions[:QUICK_QUESTIONS]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": command,
        "machine": machine_info(),
        "llm": {"base_url": config.base_url, "model": config.model},
        "data": str(data_path),
        "strategies": {},
    }

    async def evaluate_all() -> None:
        llm = LLM(config)  # one client (and its connection pool) on this event loop
        for strategy in STRATEGIES:
            results["strategies"][strategy] = await _evaluate(llm, strategy, questions)

    asyncio.run(evaluate_all())
    results["wall_seconds"] = time.perf_counter() - started
    return write_results(results, "agent", output, quick, RECORD, _markdown)


def _markdown(results: dict[str, Any], json_path: Path) -> str:
    rows = [
        [
            name,
            f"{r['accuracy']:.3f}",
            r["unanswered"],
            fmt(r["llm_calls_per_question"], 2),
            fmt(r["prompt_tokens_per_question"], 0),
            fmt(r["completion_tokens_per_question"], 0),
            fmt(r["seconds_per_question"], 2),
        ]
        for name, r in results["strategies"].items()
    ]
    n = next(iter(results["strategies"].values()))["questions"]
    return "\n".join(
        [
            "## Agent strategies (multiple choice)",
            "",
            *run_header(
                results,
                json_path,
                f"- LLM `{results['llm']['model']}` at {results['llm']['base_url']}, {n} questions from "
                f"`{results['data']}`",
            ),
            "",
            markdown_table(
                [
                    "strategy",
                    "accuracy",
                    "unanswered",
                    "LLM calls / q",
                    "prompt tok / q",
                    "completion tok / q",
                    "s / q",
                ],
                rows,
            ),
        ]
    )
