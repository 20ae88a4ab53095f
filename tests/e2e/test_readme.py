"""The README runs: every request example is executed against a real server, twice, its commands exist.

After LitServe's test_readme.py: the README's code blocks are run as written, in order, from the
repository root — bash blocks with ``set -euo pipefail``, python blocks with this interpreter — with only
the addresses rewritten to the test server's free ports. The whole sequence runs twice and must print the
same the second time (the demos are idempotent). Blocks that need an LLM are run against the scripted
LLM double by tests/integration/test_agent.py; the rest that are not requests (the quick start's make
targets, configuration snippets) are checked here without being run.
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
    code = code.replace(".venv/bin/kiln ", f"{sys.executable} -m kiln.cli ")  # blocks run in a scratch dir
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


def _all_blocks() -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every fenced block with a language, in README order."""
    blocks, heading = [], ""
    for m in re.finditer(r"^(#{2,4} [^\n]*)$|^```(\w+)\n(.*?)^```$", README, flags=re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("# ").strip()
        else:
            blocks.append((heading, m.group(2), m.group(3)))
    return blocks


# Sections that start servers of their own (a Triton repository, an imported model) and run, as written,
# in their own tests.
OWN_TESTS = {
    "## Serve a Triton model repository": "tests/e2e/test_readme_triton.py",
    "## Import a Hugging Face or sentence-transformers model": "tests/e2e/test_readme_hf_import.py",
    "## Train on your own images": "tests/integration/test_train_your_data.py",
}


def _own_test(code: str) -> str:
    for section, test in OWN_TESTS.items():
        start = README.index(section)
        if code in README[start : README.index("\n## ", start + 1)]:
            return test
    return ""


def _not_run(heading: str, lang: str, code: str) -> str:
    """Why a block is not run here ("" = it is a request example and runs)."""
    if _own_test(code):
        return f"starts a server of its own: run as written by {_own_test(code)}"
    if heading == "Quick start":
        return "make targets: test_quick_start_commands_are_make_targets"
    if lang in ("sh", "json", "text"):
        return "configuration or a layout, not a request (the agent's LLM settings; an MCP client's config)"
    if code.startswith("# needs an LLM"):
        return "needs an LLM: run against the scripted LLM double by tests/integration/test_agent.py"
    return ""


EXAMPLES = [(h, lang, code) for h, lang, code in _all_blocks() if not _not_run(h, lang, code)]


def test_the_readme_examples_are_found_and_every_skipped_block_says_why():
    blocks = _all_blocks()
    assert {lang for _, lang, _ in blocks} == {"bash", "sh", "python", "json", "text"}
    assert len(EXAMPLES) >= 12
    headings = {h for h, _, _ in EXAMPLES}
    assert {
        "First requests",
        "Retrieval: upgrade the embedding model without re-embedding the gallery",
    } <= headings
    llm = [code for h, lang, code in blocks if _not_run(h, lang, code).startswith("needs an LLM")]
    assert len(llm) == 3 and all("/agent/" in code for code in llm)


def _run(lang: str, code: str) -> subprocess.CompletedProcess:
    argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    # from the repository root, as the README says (`.venv/bin/kiln`; latent.json is git-ignored)
    return subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=ROOT)


def test_every_readme_example_runs_twice_with_the_same_output(server):
    """In README order, then all again: each exits 0 and prints its answer, without an error; the second
    run prints what the first did (the retrieval story makes its own gallery afresh each time)."""
    assert (ROOT / ".venv" / "bin" / "kiln").exists(), "the README runs `.venv/bin/kiln`: `make install`"
    first: list[str] = []
    for run in (1, 2):
        for i, (heading, lang, code) in enumerate(EXAMPLES):
            r = _run(lang, _rewrite(code, server))
            where = f"run {run}, block {i} ({lang}) under {heading!r}:\n{code}"
            assert r.returncode == 0, f"{where}\nstderr: {r.stderr}\nstdout: {r.stdout}"
            assert r.stdout.strip(), f"{where}\nprints nothing"
            assert "error" not in r.stdout.lower(), f"{where}\n{r.stdout}"
            if run == 1:
                first.append(r.stdout)
            else:
                assert r.stdout == first[i], f"{where}\nprinted differently the second time"


def test_every_readme_wait_is_bounded():
    loops = [
        line
        for _, _, code in _all_blocks()
        for line in code.splitlines()
        if re.search(r"\b(until|while)\b", line)
    ]
    assert loops
    for line in loops:
        assert re.search(r"SECONDS|timeout", line), f"an unbounded wait: {line}"


def test_readme_names_only_kiln_commands_that_exist():
    import typer.main

    from kiln.cli import app

    command = typer.main.get_command(app)
    named = set(re.findall(r"\bkiln (\w+)", README)) - {"command", "is", "as", "on"}
    assert {"train", "serve", "prepare", "token", "models", "bench", "export"} <= named
    assert sorted(named - set(command.commands)) == []
    quick = README[README.index("## Quick start") : README.index("### First requests")]
    assert ".venv/bin/kiln" in quick and "source .venv/bin/activate" in quick


def test_the_train_row_lists_every_recipe():
    from training.recipes import RECIPES

    [row] = [line for line in README.splitlines() if line.startswith("| `kiln train ")]
    assert [name for name in RECIPES if f"`{name}`" not in row] == []
    assert all(f"`{series}`" in row for series in ("GOOG", "EURUSD", "BTCUSD"))


def test_generated_files_are_ignored():
    r = subprocess.run(
        ["git", "check-ignore", "latent.json", ".kiln/"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.split() == ["latent.json", ".kiln/"], r.stdout + r.stderr


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


@pytest.mark.parametrize(
    "command", ["train", "export", "serve", "bench", "models", "prepare", "token", "import"]
)
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
