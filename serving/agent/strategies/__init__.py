"""Reasoning strategies, one module each: ``solve(run, problem) -> answer`` over a shared
:class:`~serving.agent.strategies.base.Run` that records the trace.

- ``cot`` — chain-of-thought,
- ``iep`` — Inferential Exclusion Prompting (plan, NLI per candidate, exclude, answer),
- ``iep+cot`` — IEP with chain-of-thought in its inferences and final choice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from serving.agent.strategies import cot, iep, iep_cot
from serving.agent.strategies.base import Problem, Run

STRATEGIES: dict[str, Callable[[Run, Problem], Awaitable[str]]] = {
    cot.NAME: cot.solve,
    iep.NAME: iep.solve,
    iep_cot.NAME: iep_cot.solve,
}
