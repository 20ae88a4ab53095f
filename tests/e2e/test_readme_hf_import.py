"""The README's "Import a Hugging Face or sentence-transformers model" runs as written: its shell block
imports the offline all-MiniLM-L6-v2 copy, its `kiln serve` line serves it, and its Python block (the
`openai` client) answers, with only the address rewritten to the test server's free port."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from serverproc import start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SECTION = "## Import a Hugging Face or sentence-transformers model"


def _blocks(lang: str) -> list[str]:
    start = README.index(SECTION)
    end = README.index("\n## ", start + 1)
    return re.findall(rf"```{lang}\n(.*?)```", README[start:end], flags=re.S)


def test_the_import_section_runs_as_written(tmp_path):
    build, serve = _blocks("bash")
    (client,) = _blocks("python")
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "KILN_HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", build], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "stored minilm:" in r.stdout

    argv = shlex.split(serve.strip())
    assignments = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    assert argv[len(assignments) :][:2] == ["kiln", "serve"], serve
    srv = start_server(home, "--no-train", *argv[len(assignments) + 2 :], env=assignments, timeout=300)
    try:
        code = client.replace("http://localhost:3000", srv.http)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["2", "384"]
    finally:
        stop_server(srv.process)
