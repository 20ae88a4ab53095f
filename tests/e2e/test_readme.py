"""The README runs: its first requests are executed against a real server, its commands exist.

After LitServe's test_readme.py: the code blocks under "First requests" are run as written, with only
the addresses rewritten to the test server's free ports.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks(section: str, lang: str) -> list[str]:
    start = README.index(section)
    end = README.index("\n## ", start)
    return re.findall(rf"```{lang}\n(.*?)```", README[start:end], flags=re.S)


def _rewrite(code: str, server) -> str:
    return code.replace("localhost:3000", server.http_hostport).replace("localhost:8001", server.grpc)


def test_quick_start_commands_are_make_targets():
    quick = _blocks("## Quick start", "bash")[0]
    targets = re.findall(r"^make (\w+)", quick, flags=re.M)
    assert targets == ["serve", "test"]
    for target in targets:
        r = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.parametrize("index", range(len(_blocks("### First requests", "bash"))))
def test_first_requests_curl(server, index, tmp_path):
    code = _rewrite(_blocks("### First requests", "bash")[index], server)
    r = subprocess.run(  # in a scratch directory: a block may write files (latent.json)
        ["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "each README request prints its answer"
    assert "error" not in r.stdout.lower(), r.stdout


def test_every_readme_curl_fails_on_http_errors():
    """curl exits 0 on a 4xx/5xx answer unless told to fail: every call in the README's shell blocks must,
    so a README request that breaks fails its block (and test_first_requests_curl) instead of printing
    an error body."""
    calls = [
        line
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", README, flags=re.S)
        for line in block.splitlines()
        if re.search(r"(^|\|)\s*curl\s", line)
    ]
    assert calls
    for line in calls:
        assert re.search(r"\s(--fail-with-body|--fail|-f)\s", line), line


@pytest.mark.parametrize("index", range(len(_blocks("### First requests", "python"))))
def test_first_requests_python(server, index):
    code = _rewrite(_blocks("### First requests", "python")[index], server)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


@pytest.mark.parametrize("command", ["train", "export", "import", "serve", "bench", "models"])
def test_every_cli_command_has_help(command):
    r = subprocess.run([sys.executable, "-m", "kiln.cli", command, "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout and len(r.stdout) > 200


def test_readme_names_every_cli_command():
    for command in (
        "kiln train",
        "kiln export",
        "kiln import",
        "kiln serve",
        "kiln models list",
        "kiln bench vit",
        "kiln bench diffusion",
        "kiln bench forecast",
    ):
        assert command in README


def test_cli_models_list_and_show(server, kiln_home):
    import os

    env = {**os.environ, "KILN_HOME": str(kiln_home)}
    r = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "models", "list"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0 and "vit-soft:" in r.stdout and "onnx" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "models", "show", "vit-soft"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0 and '"architecture": "vit_soft_tiny"' in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "models", "show", "nope"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 1 and "no model 'nope'" in r.stderr


def test_bentoml_models_list_shows_the_artifacts(server, kiln_home):
    import os

    env = {**os.environ, "BENTOML_HOME": str(kiln_home / "bentoml")}
    r = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "list"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    assert re.search(r"vit-soft:\w+", r.stdout) and re.search(r"vit-softmax:\w+", r.stdout)
