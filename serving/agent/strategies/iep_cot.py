"""IEP combined with chain-of-thought: the paper reports that mixing IEP's non-linear (plan, infer,
exclude) and CoT's linear reasoning improves some tasks further.

Here the combination is IEP's plan → infer → exclude with chain-of-thought *inside* each NLI judgment
(reason step by step, then the verdict) and in the final choice among the surviving candidates. The
record in ``shared/PAPERS.md`` gives no finer recipe; this is our reading, measured by ``kiln bench agent``.
"""

from __future__ import annotations

from serving.agent.strategies.base import Problem, Run
from serving.agent.strategies.iep import run_iep

NAME = "iep+cot"


async def solve(run: Run, problem: Problem) -> str:
    return await run_iep(run, problem, cot=True)
