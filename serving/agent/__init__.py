"""The agent family: reasoning over an OpenAI-compatible LLM with Kiln's own capabilities as tools.

- :mod:`serving.agent.llm` — the LLM client (``KILN_LLM_*``; timeouts, retries, streaming, token metrics),
- :mod:`serving.agent.strategies` — chain-of-thought, IEP and IEP+CoT, each tracing every step,
- :mod:`serving.agent.tools` — the ``Tool`` that task modules export through their ``tools(repo)`` slot,
- :mod:`serving.agent.mcp` — the same tools over the Model Context Protocol (mounted at ``/mcp``),
- :mod:`serving.agent.interact` and :mod:`serving.agent.store` — Learn-by-interact trajectories.

The routes are the ``agent`` task's (``serving/tasks/agent.py``), a task without an artifact.
"""
