"""One settings definition: serving.config.SETTINGS against ServeConfig.from_env, `kiln serve` and the README.

Adding a setting is one entry in SETTINGS and one row in the README's settings table; these tests fail when
either is missing, when a default differs, or when code reads a ``KILN_*`` variable nobody catalogued.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from kiln.cli import app
from serving.config import SETTING_BY_ENV, SETTINGS, ServeConfig

ROOT = Path(__file__).resolve().parents[3]
README = (ROOT / "README.md").read_text()


def _readme_table() -> list[tuple[str, str, str]]:
    """(flags, variable, default) of every row of the README's settings table, as written."""
    start = README.index("### Server settings")
    section = README[start : README.index("\n## ", start)]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 4 and re.match(r"(`--|—)", cells[0]):
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def _expected_row(setting) -> tuple[str, str, str]:
    flags = "—"
    if setting.flag:
        flags = f"`{setting.flag}`"
        if isinstance(setting.default, bool):
            flags += f" / `--no-{setting.flag.removeprefix('--')}`"
    return flags, f"`{setting.env}`" if setting.env else "—", setting.default_text


def test_readme_table_lists_every_setting_with_its_default_in_order():
    rows = [(flags, env, default.strip("`")) for flags, env, default in _readme_table()]
    assert rows == [_expected_row(s) for s in SETTINGS]


def test_defaults_of_serve_config_are_the_catalogued_ones(monkeypatch):
    for name in list(os.environ):
        if name.startswith("KILN_") and name != "KILN_HOME":
            monkeypatch.delenv(name)
    config = ServeConfig.from_env()
    compared = 0
    for field in dataclasses.fields(ServeConfig):
        setting = SETTING_BY_ENV.get(f"KILN_{field.name.upper()}")
        if setting is None or setting.shown is not None:  # a computed default (threads) or none
            continue
        value = getattr(config, field.name)
        assert (",".join(value) if field.name == "models" else value) == setting.default, field.name
        compared += 1
    assert compared >= 14


def _serve_command():
    return typer.main.get_command(app).commands["serve"]


def test_serve_options_are_the_catalogued_flags_with_their_variables_and_defaults():
    options = {
        p.opts[0]: p
        for p in _serve_command().params
        if p.param_type_name == "option" and p.opts[0] != "--help"
    }
    flagged = [s for s in SETTINGS if s.flag]
    assert sorted(options) == sorted(s.flag for s in flagged)
    for setting in flagged:
        option = options[setting.flag]
        assert option.envvar == setting.env, setting.flag
        assert option.default == setting.default, setting.flag
        assert option.help == setting.help, setting.flag
        if isinstance(setting.default, bool):  # an on/off pair, not two names of one switch
            assert option.secondary_opts == [f"--no-{setting.flag.removeprefix('--')}"]


def test_serve_help_names_every_flag_and_variable():
    r = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for setting in SETTINGS:
        for name in filter(None, (setting.flag, setting.env)):
            assert name in r.output, name
    assert "0.0.0.0" in r.output and "--host 127.0.0.1" in r.output


_READ = re.compile(
    r"""(?:environ(?:\.get)?\(|environ\[|envvar=|getenv\(|_number\()\s*["'](KILN_[A-Z0-9_]+)["']"""
)


def test_every_variable_the_code_reads_is_catalogued():
    read = {
        name
        for package in ("serving", "kiln", "training", "export")
        for path in (ROOT / package).rglob("*.py")
        for name in _READ.findall(path.read_text())
    }
    assert {"KILN_HTTP_PORT", "KILN_MILVUS_URI", "KILN_LLM_MODEL"} <= read  # the pattern finds reads
    assert sorted(read - set(SETTING_BY_ENV)) == []
