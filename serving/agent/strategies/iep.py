"""Inferential Exclusion Prompting (Tong et al., 2023, "Eliminating Reasoning via Inferring with Planning").

The paper's three moves, each a traced step:

1. **plan** — enumerate the possible answers: the options when the question has them, else the LLM
   lists candidates (a JSON array);
2. **infer** — for each candidate, a natural-language-inference prompt: does the context, commonsense
   and the known facts *entail*, *contradict*, or say nothing (*neutral*) about "the answer is <c>"?
   (one call per candidate; a JSON verdict);
3. **exclude** the contradicted candidates and answer from what remains: the single survivor, or the
   LLM's choice among the survivors (it may not pick an excluded one). If every candidate is
   contradicted there is no answer, and the run says so instead of inventing one.

``iep+cot`` (:mod:`serving.agent.strategies.iep_cot`) runs the same steps with chain-of-thought inside
each inference and in the final choice.
"""

from __future__ import annotations

from serving.agent.strategies.base import (
    LABELS,
    NLI_STEP,
    AgentError,
    Problem,
    ReplyError,
    Run,
    examples_as_messages,
    parse_choice_among,
    parse_json,
)

NAME = "iep"
RELATIONS = ("entailment", "neutral", "contradiction")
MAX_CANDIDATES = 8


def parse_candidates(text: str) -> list[str]:
    data = parse_json(text)
    if isinstance(data, dict):
        data = data.get("candidates", data.get("answers"))
    if not isinstance(data, list) or not all(isinstance(c, str | int | float) for c in data):
        raise ReplyError("expected a JSON array of candidate answers (strings)")
    seen: list[str] = []
    for c in (str(c).strip() for c in data):
        if c and c.lower() not in (s.lower() for s in seen):
            seen.append(c)
    if not seen:
        raise ReplyError("the array of candidate answers was empty")
    return seen[:MAX_CANDIDATES]


def parse_relation(text: str) -> dict[str, str]:
    data = parse_json(text, last=True)  # after any step-by-step reasoning (iep+cot)
    if not isinstance(data, dict) or "relation" not in data:
        raise ReplyError('expected a JSON object {"relation": ..., "reason": ...}')
    relation = str(data["relation"]).strip().lower()
    if relation not in RELATIONS:
        raise ReplyError(f"relation {data['relation']!r} is not one of {list(RELATIONS)}")
    return {"relation": relation, "reason": str(data.get("reason", ""))}


async def plan(run: Run, problem: Problem, facts: str) -> list[str]:
    """Step 1: the candidate answers."""
    if problem.options:
        await run.record(
            {
                "step": "plan",
                "prompt": None,
                "reply": None,
                "verdict": {"candidates": problem.options, "source": "the question's options"},
            }
        )
        return list(problem.options)
    messages = [
        {"role": "system", "content": "Plan before answering: list every plausible answer to the question."},
        *examples_as_messages(problem.examples),
        {
            "role": "user",
            "content": problem.statement(facts) + "\n\nReply with only a JSON array of 2 to "
            f"{MAX_CANDIDATES} short candidate answers, most plausible first.",
        },
    ]
    candidates = await run.ask("plan", messages, parse_candidates)
    if run.max_nli_calls is not None and len(candidates) > run.max_nli_calls:
        # one NLI judgment each: keep the most plausible ones (the LLM lists them first) within the budget
        candidates = candidates[: run.max_nli_calls]
        await run.record(
            {
                "step": "plan",
                "prompt": None,
                "reply": None,
                "verdict": {"candidates": candidates, "source": f"the first {run.max_nli_calls} "
                            "(agent_max_nli_calls)"},
            }
        )  # fmt: skip
    return candidates


async def infer(run: Run, problem: Problem, facts: str, candidates: list[str], cot: bool) -> list[dict]:
    """Step 2: one NLI judgment per candidate against context, commonsense and facts."""
    judgments = []
    for i, candidate in enumerate(candidates):
        premise = "\n\n".join(
            p
            for p in (
                f"Context:\n{problem.context}" if problem.context else "",
                f"Facts gathered with Kiln's tools:\n{facts}" if facts else "",
                "Commonsense and well-established facts about the world.",
            )
            if p
        )
        how = (
            "Think step by step about whether the premise supports or rules out the hypothesis, then end "
            "with the JSON object."
            if cot
            else "Reply with only the JSON object."
        )
        messages = [
            {
                "role": "system",
                "content": "You judge natural-language inference: does the premise entail the "
                "hypothesis, contradict it, or neither (neutral)?",
            },
            {
                "role": "user",
                "content": f"Premise:\n{premise}\n\nHypothesis: the answer to the question "
                f'"{problem.question}" is "{candidate}".\n\n{how} Format: '
                '{"relation": "entailment" | "neutral" | "contradiction", "reason": "<one sentence>"}',
            },
        ]
        judgments.append(
            await run.ask(NLI_STEP, messages, parse_relation, candidate=candidate, label=LABELS[i])
        )
    return judgments


async def exclude_and_answer(
    run: Run, problem: Problem, candidates: list[str], judgments: list[dict], cot: bool
) -> str:
    """Step 3: drop the contradicted candidates; answer from the survivors."""
    survivors = [i for i, j in enumerate(judgments) if j["relation"] != "contradiction"]
    excluded = [candidates[i] for i in range(len(candidates)) if i not in survivors]
    await run.record(
        {
            "step": "exclude",
            "prompt": None,
            "reply": None,
            "verdict": {"excluded": excluded, "remaining": [candidates[i] for i in survivors]},
        }
    )
    if not survivors:
        raise AgentError(
            422,
            "every candidate answer was contradicted by the context, commonsense or facts: no answer "
            "is left (see the trace's judgments)",
            run.trace,
        )
    if len(survivors) == 1:
        answer = candidates[survivors[0]]
        await run.record(
            {
                "step": "answer",
                "prompt": None,
                "reply": None,
                "verdict": f"the only candidate not contradicted: {answer}",
            }
        )
        return answer
    listing = "\n".join(
        f"{LABELS[i]}. {candidates[i]} — judged {judgments[i]['relation']}: {judgments[i]['reason']}"
        for i in survivors
    )
    how = "Think step by step about which remaining candidate is best supported, then end" if cot else "End"
    messages = [
        {"role": "system", "content": "Answer from the candidates that survived exclusion."},
        {
            "role": "user",
            "content": f"{problem.statement()}\n\nCandidates still standing (the others were "
            f"contradicted and are excluded):\n{listing}\n\n{how} with one line 'Answer: <letter>' "
            "naming one of the candidates still standing.",
        },
    ]
    return await run.ask("answer", messages, lambda text: parse_choice_among(text, candidates, survivors))


async def run_iep(run: Run, problem: Problem, cot: bool) -> str:
    facts = await run.gather(problem)
    candidates = await plan(run, problem, facts)
    judgments = await infer(run, problem, facts, candidates, cot)
    return await exclude_and_answer(run, problem, candidates, judgments, cot)


async def solve(run: Run, problem: Problem) -> str:
    return await run_iep(run, problem, cot=False)
