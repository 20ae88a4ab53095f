"""Learn-by-interact (Su et al., 2025): agents that teach themselves an environment from its documentation.

1. **Synthesize** tasks from documentation — by default Kiln's own: every tool's description and request
   schema (the OpenAPI of its route) and the README's "What is served" section; or docs the caller gives.
2. **Run** each task as a trajectory: the LLM calls Kiln's tools (real calls, real results).
3. **Backward construction**: the instruction a trajectory was given is often not what it did, so the
   LLM writes the instruction that each (sub-)trajectory — the first k actions, k = 1..n — *actually*
   accomplished. Those instructions, not the proposed ones, are stored.
4. **Store** them with an embedding of the instruction; at solve time :func:`retrieve` finds the most
   similar ones and the strategies show them as in-context examples.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.agent.store import Embedder, Trajectory, TrajectoryStore
from serving.agent.strategies.base import Example, Problem, ReplyError, Run, parse_json
from serving.agent.tools import Tool

MAX_DOC_CHARS = 4000  # one documentation chunk in a prompt
RETRIEVE_K = 2
MIN_SIMILARITY = 0.3  # below this a stored trajectory is not shown (MiniLM cosine)
_ROOT = Path(__file__).resolve().parents[2]

TRAJECTORY_SYSTEM = (
    "You are exploring Kiln, a model server, through its tools. Carry out the task by calling the tools "
    "with valid arguments; when done, reply with one sentence saying what you did."
)


@dataclass
class Doc:
    name: str
    text: str


def default_docs(tools: list[Tool], readme: Path | None = None) -> list[Doc]:
    """Kiln's own docs: each tool's description + request schema, and the README's served-API list."""
    docs = [
        Doc(
            f"tool:{t.name}",
            f"Tool {t.name}: {t.description}\nRequest schema (OpenAPI):\n{json.dumps(t.input_schema())}",
        )
        for t in tools
    ]
    readme = readme or _ROOT / "README.md"
    if readme.is_file():
        text = readme.read_text()
        m = re.search(r"\n## What is served\n(.*?)(?=\n## )", text, flags=re.S)
        if m:
            docs.append(Doc("README:What is served", m.group(1).strip()))
    return docs


def parse_tasks(text: str) -> list[str]:
    data = parse_json(text)
    if not isinstance(data, list) or not data or not all(isinstance(t, str) and t.strip() for t in data):
        raise ReplyError("expected a non-empty JSON array of task strings")
    return [t.strip() for t in data]


def parse_instruction(text: str) -> str:
    data = parse_json(text)
    if not isinstance(data, dict) or not str(data.get("instruction", "")).strip():
        raise ReplyError('expected a JSON object {"instruction": "..."}')
    return str(data["instruction"]).strip()


async def synthesize(
    run: Run,
    tools: list[Tool],
    docs: list[Doc],
    tasks_per_doc: int,
    store: TrajectoryStore,
    embedder: Embedder,
) -> list[Trajectory]:
    """Synthesize tasks from ``docs``, run them against ``tools``, store backward-constructed trajectories."""
    names = ", ".join(t.name for t in tools)
    added: list[Trajectory] = []
    for doc in docs:
        messages = [
            {"role": "system", "content": "You write realistic tasks for an agent that uses Kiln's tools."},
            {
                "role": "user",
                "content": f"Documentation ({doc.name}):\n{doc.text[:MAX_DOC_CHARS]}\n\n"
                f"The agent's tools: {names}. Write {tasks_per_doc} distinct, concrete tasks a user could "
                "ask it to do with these tools, with every argument value the task needs. Reply with only "
                "a JSON array of strings.",
            },
        ]
        tasks = (await run.ask("synthesize", messages, parse_tasks, doc=doc.name))[:tasks_per_doc]
        for task in tasks:
            start = len(run.actions)
            outcome = await run.gather(Problem(question=task, tools=tools), system=TRAJECTORY_SYSTEM)
            actions = run.actions[start:]
            if not any(a["ok"] for a in actions):
                await run.record(
                    {
                        "step": "discard",
                        "prompt": None,
                        "reply": None,
                        "task": task,
                        "verdict": "no tool call succeeded; nothing was accomplished",
                    }
                )
                continue
            for k in range(1, len(actions) + 1):  # every sub-trajectory: the first k actions
                prefix = actions[:k]
                if not prefix[-1]["ok"]:
                    continue
                instruction = await run.ask(
                    "backward", _backward_prompt(prefix), parse_instruction, task=task
                )
                traj = Trajectory(instruction, task, doc.name, prefix, outcome if k == len(actions) else "")
                [vector] = await asyncio.to_thread(embedder.embed, [instruction])
                store.add(traj, vector)
                added.append(traj)
    return added


def _backward_prompt(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    steps = "\n".join(
        f"{i + 1}. called {a['tool']} with {a['arguments']} -> {json.dumps(a['result'])[:600]}"
        for i, a in enumerate(actions)
    )
    return [
        {"role": "system", "content": "You describe what an agent's actions actually accomplished."},
        {
            "role": "user",
            "content": f"An agent took these actions against Kiln's tools:\n{steps}\n\nWrite the "
            "single user instruction that these actions accomplish exactly (it may differ from whatever the "
            'agent was asked). Reply with only {"instruction": "..."}',
        },
    ]


async def retrieve(
    store: TrajectoryStore, embedder: Embedder, query: str, k: int = RETRIEVE_K
) -> list[Example]:
    """The stored trajectories most similar to ``query`` (cosine ≥ ``MIN_SIMILARITY``), as examples."""
    if store.count() == 0:
        return []
    [vector] = await asyncio.to_thread(embedder.embed, [query])
    return [
        Example(t.instruction, [{k2: a[k2] for k2 in ("tool", "arguments", "result")} for a in t.actions], s)
        for t, s in store.search(vector, k)
        if s >= MIN_SIMILARITY
    ]
