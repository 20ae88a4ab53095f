"""Small pure pieces shared by the benchmarks: percentiles, markdown tables, section replacement, machine."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) interpolating linearly between order statistics (as numpy)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; cells are ``str()``-ed and ``|`` is escaped."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table {len(headers)} columns: {row!r}")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def target_lines(targets: Sequence[dict[str, Any]]) -> list[str]:
    """One markdown line per target: what it asks, what was measured, MET / MISSED / NOT MEASURED, why."""
    lines = []
    for t in targets:
        verdict = {True: "MET", False: "MISSED", None: "NOT MEASURED"}[t["met"]]
        line = f"- target: {t['target']}; measured: {t['measured']}; **{verdict}**"
        if t["reason"]:
            line += f" — why: {t['reason']}"
        lines.append(line)
    return lines


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def replace_section(text: str, name: str, body: str) -> str:
    """Replace what lies between ``<!-- bench:NAME:start -->`` and ``...:end -->``, or append the section.

    Everything outside the markers is kept byte for byte.
    """
    start, end = section_markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    i, j = text.find(start), text.find(end)
    if i == -1 and j == -1:
        sep = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
        return f"{text}{sep}{block}\n"
    if i == -1 or j == -1 or j < i:
        raise ValueError(f"BENCHMARKS section {name!r}: unbalanced markers {start!r} / {end!r}")
    return text[:i] + block + text[j + len(end) :]


def write_section(path: Path, name: str, body: str) -> None:
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    path.write_text(replace_section(text, name, body))


def write_results(
    results: dict[str, Any], suite: str, output: str | Path, quick: bool, record: Path, markdown: Callable
) -> Path:
    """Write a suite's raw JSON (``record``; beside ``output`` for a quick run, which is not the record)
    and its section of the markdown file ``output``, rendered by ``markdown(results, json_path)``."""
    out_md = Path(output)
    json_path = out_md.with_name(f"{out_md.stem}.{suite}.json") if quick else record
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    write_section(out_md, suite, markdown(results, json_path))
    print(f"wrote {json_path} and the {suite} section of {out_md} ({results['wall_seconds']:.0f}s)")
    return json_path


def fmt(value: float | None, digits: int = 1) -> str:
    """A figure for a table: fixed decimals, thousands separators, ``-`` for none."""
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory, load average, library versions and the date, for the record."""
    import numpy
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    mem_gib = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": mem_gib,
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),  # > 0.5: the machine was not idle
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }


def run_header(results: dict[str, Any], json_path: Path | str, *extra: str) -> list[str]:
    """The lines every suite's BENCHMARKS.md section starts with: the exact command, date and wall time,
    the machine with its load (other work on the cores slows every timing), software and the raw file.

    ``extra`` lines (e.g. the models measured) go before the raw-figures line.
    """
    m = {k: "?" for k in ("date", "cpu", "usable_cores", "logical_cores", "memory_gib", "os")}
    m |= {k: "?" for k in ("python", "torch", "onnxruntime", "numpy", "load_average_1m_at_start")}
    m |= results["machine"]  # a results file from an older run may lack a field: "?" then
    wall = results.get("wall_seconds")
    load = f"1-min load average {m['load_average_1m_at_start']} at start"
    if "load_average_1m_at_end" in results:
        load += f", {results['load_average_1m_at_end']} at the end"
    providers = results.get("onnxruntime_providers")
    lines = []
    if results.get("quick"):
        lines += ["**(quick run — not for the record)**", ""]
    lines += [
        f"- command: `{results['command']}`",
        f"- date: {m['date']}" + (f" (wall time {wall:.0f} s)" if wall is not None else ""),
        f"- machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
        f"{m['memory_gib']} GiB RAM, {m['os']}; {load} (a load above the core count means other work "
        "shared the cores: times are then slower than on an idle machine)",
        f"- software: Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}"
        + (f" ({', '.join(providers)})" if providers else "")
        + f", numpy {m['numpy']}",
        *extra,
        f"- raw figures: `{display_path(json_path)}`",
    ]
    return lines


def display_path(path: Path | str) -> str:
    """``path`` relative to the repository root when it lies inside it (as BENCHMARKS.md shows raw files)."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)
