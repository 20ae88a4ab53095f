"""The README's "Serve a Triton model repository" runs as written: its shell block builds the repository,
its `kiln serve` command serves it, and its Python block (Triton's unmodified client) answers, with only
the addresses rewritten to the test server's free ports."""

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
SECTION = "## Serve a Triton model repository"


def _blocks(lang: str) -> list[str]:
    start = README.index(SECTION)
    end = README.index("\n## ", start + 1)
    return re.findall(rf"```{lang}\n(.*?)```", README[start:end], flags=re.S)


def test_the_triton_repository_section_runs_as_written(tmp_path):
    build, serve = _blocks("bash")
    (client,) = _blocks("python")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", build], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "triton-models" / "linear" / "1" / "model.onnx").is_file()

    argv = shlex.split(serve.strip())
    assert argv[:2] == ["kiln", "serve"], serve
    args = [str(tmp_path / a) if a == "triton-models" else a for a in argv[2:]]
    (tmp_path / "home").mkdir()
    srv = start_server(tmp_path / "home", "--no-train", *args, timeout=300)
    try:
        code = client.replace("localhost:3000", srv.http_hostport).replace("localhost:8001", srv.grpc)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        assert "preferred_batch_size" in lines[0]
        assert "virginica" in r.stdout  # the classification extension's labels
        assert lines[-1] == "4"  # two requests of two rows each
    finally:
        stop_server(srv.process)
