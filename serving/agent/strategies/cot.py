"""Chain-of-thought (Wei et al., 2022): reason step by step, then answer.

One LLM call (after the tool phase, if tools were given); the reply must end with ``Answer: <X>``, where
X is an option's letter when the question has options.
"""

from __future__ import annotations

from serving.agent.strategies.base import Problem, Run, examples_as_messages, parse_answer

NAME = "cot"


def _instruction(problem: Problem) -> str:
    if problem.options:
        return "Think step by step. Then end with one line 'Answer: <letter>' naming exactly one option."
    return "Think step by step. Then end with one line 'Answer: <your short answer>'."


async def solve(run: Run, problem: Problem) -> str:
    facts = await run.gather(problem)
    messages = [
        {"role": "system", "content": "You answer questions carefully. " + _instruction(problem)},
        *examples_as_messages(problem.examples),
        {"role": "user", "content": problem.statement(facts) + "\n\nLet's think step by step."},
    ]
    return await run.ask("cot", messages, lambda text: parse_answer(text, problem.options))
