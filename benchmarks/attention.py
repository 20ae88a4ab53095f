"""SOFT vs softmax attention: forward latency and peak memory against the token count.

Each configuration runs in a fresh Python process (``python -m benchmarks.attention ...`` prints one JSON
line), so one configuration's allocations can not inflate another's peak. Peak memory is the growth of
the process's resident set during one forward pass: the kernel's high-water mark ``VmHWM`` is reset
through ``/proc/self/clear_refs`` (Linux >= 4.0) right before the pass, and ``VmHWM - VmRSS(before)`` is
read after it. PyTorch's CPU allocator does not cache freed blocks, and the subprocess runs with
``MALLOC_MMAP_THRESHOLD_=65536`` (a fixed threshold: glibc then serves every block of 64 KiB or more
with its own mmap and unmaps it on free, instead of keeping warm-up's freed blocks in the heap), so this
is the pass's real working set beyond weights and input, to a page.
Where ``clear_refs`` is not writable the fallback (``ru_maxrss`` growth,
which can under-count) is named in the result's ``memory_method``.

Three attentions, all ``dim`` wide with ``heads`` heads, batch 1, under ``torch.inference_mode``:

* ``soft``: :class:`model_zoo.soft.SoftAttention` with landmark ratio ``side // 8`` (a fixed 8 x 8 = 64
  landmark grid, near the paper's 7 x 7) and 20 Newton iterations;
* ``softmax-explicit``: ``softmax(Q K^T / sqrt(d)) V`` written out, materialising the N x N scores (the
  standard quadratic attention SOFT's paper compares against), with the weights of a
  :class:`model_zoo.soft.SoftmaxAttention`;
* ``softmax-sdpa``: :class:`model_zoo.soft.SoftmaxAttention` itself, which calls
  ``F.scaled_dot_product_attention`` (a fused kernel that need not materialise N x N).

The speed-up of SOFT over fused SDPA is measured separately by :func:`measure_interleaved`
(``python -m benchmarks.attention --compare --side 64``): both layers in one process, timed in alternation
(SOFT, SDPA, SOFT, SDPA, ...) so that a shared machine's drift hits both alike, and with the default
allocator -- the fixed mmap threshold above exists to make the peak-memory reading exact, and it makes
every block of 64 KiB or more a fresh ``mmap`` with its page faults on each call, which no server runs with.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import median
from model_zoo.soft import SoftAttention, SoftmaxAttention

KINDS = ("soft", "softmax-explicit", "softmax-sdpa")
# Large blocks mmapped and unmapped on free: RSS then follows live tensors (see the module docstring).
_SUBPROCESS_ENV = {"PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
LANDMARK_GRID = 8  # landmarks per side: ratio = side // 8 keeps m = 64 at every size


def landmark_ratio(side: int) -> int:
    """The SOFT landmark ratio used at a ``side x side`` grid: ``side // 8`` (at least 1)."""
    return max(1, side // LANDMARK_GRID)


def explicit_softmax_attention(attn: SoftmaxAttention, x: torch.Tensor) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(d)) V`` with ``attn``'s weights, the N x N score matrix written out."""
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5  # (B, h, N, N)
    out = scores.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(B, N, C))


def build(kind: str, side: int, dim: int, heads: int):
    """A seeded module and a forward callable ``fn(x)`` for one attention kind."""
    torch.manual_seed(0)
    if kind == "soft":
        module = SoftAttention(dim, heads, landmark_ratio=landmark_ratio(side)).eval()
        return lambda x: module(x, side, side)
    if kind in ("softmax-explicit", "softmax-sdpa"):
        module = SoftmaxAttention(dim, heads).eval()
        if kind == "softmax-sdpa":
            return lambda x: module(x, side, side)
        return lambda x: explicit_softmax_attention(module, x)
    raise ValueError(f"unknown attention kind {kind!r}; valid: {list(KINDS)}")


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def peak_memory_bytes(fn, x: torch.Tensor) -> tuple[int, str]:
    """Growth of the resident set during one ``fn(x)``, in bytes, and the method used."""
    gc.collect()
    if _reset_peak_rss() and _proc_status_kib("VmHWM") is not None:
        before = _proc_status_kib("VmRSS")
        out = fn(x)
        peak = _proc_status_kib("VmHWM")
        del out
        return max(0, peak - before) * 1024, "VmHWM reset via /proc/self/clear_refs"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = fn(x)
    del out
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, after - before) * 1024, "ru_maxrss growth (may under-count)"


def time_forward(fn, x: torch.Tensor, warmup: int, reps: int, budget_s: float) -> list[float]:
    """Seconds per call: ``warmup`` untimed calls, then up to ``reps`` timed ones (at least 3, or fewer
    only if ``reps`` is), stopping early once ``budget_s`` is spent."""
    for _ in range(warmup):
        fn(x)
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < reps:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
        if len(times) >= min(3, reps) and time.perf_counter() - t_start > budget_s:
            break
    return times


def measure(
    kind: str,
    side: int,
    dim: int = 64,
    heads: int = 2,
    warmup: int = 2,
    reps: int = 7,
    budget_s: float = 10.0,
) -> dict[str, Any]:
    """Latency (median of the timed runs) and peak memory of one attention at ``side x side`` tokens."""
    fn = build(kind, side, dim, heads)
    x = torch.randn(1, side * side, dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        times = time_forward(fn, x, warmup, reps, budget_s)
        peak, method = peak_memory_bytes(fn, x)
    result = {
        "kind": kind,
        "tokens": side * side,
        "grid": f"{side}x{side}",
        "dim": dim,
        "heads": heads,
        "latency_ms": median(times) * 1e3,
        "latency_ms_all": [t * 1e3 for t in times],
        "peak_mib": peak / 2**20,
        "memory_method": method,
        "torch_threads": torch.get_num_threads(),
    }
    if kind == "soft":
        r = landmark_ratio(side)
        result.update(landmark_ratio=r, landmarks=(-(-side // r)) ** 2)
    return result


def explicit_skip_reason(side: int, heads: int, batch: int = 1) -> str | None:
    """Why the explicit N x N softmax is not run at this size, or None: it needs the scores and the
    probabilities at once (2 x B x h x N^2 float32), which must fit in half the available memory."""
    need = 2 * batch * heads * (side * side) ** 2 * 4
    avail = _meminfo_available()
    if avail is not None and need > avail / 2:
        return (
            f"needs ~{need / 2**30:.1f} GiB for two {side * side}^2 x {heads}-head float32 matrices; "
            f"{avail / 2**30:.1f} GiB available"
        )
    return None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_suite(
    sides: list[int], dim: int, heads: int, warmup: int, reps: int, budget_s: float, log=print
) -> list[dict[str, Any]]:
    """Every kind at every size, each in a fresh subprocess; skipped cells carry ``skipped`` (a reason)."""
    results = []
    for side in sides:
        for kind in KINDS:
            reason = explicit_skip_reason(side, heads) if kind == "softmax-explicit" else None
            if reason:
                results.append(
                    {"kind": kind, "tokens": side * side, "grid": f"{side}x{side}", "skipped": reason}
                )
                log(f"  attention {kind:<17} {side * side:>6} tokens: skipped ({reason})")
                continue
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.attention",
                "--kind",
                kind,
                "--side",
                str(side),
                "--dim",
                str(dim),
                "--heads",
                str(heads),
                "--warmup",
                str(warmup),
                "--reps",
                str(reps),
                "--budget-s",
                str(budget_s),
            ]
            res = run_json_subprocess(cmd, _SUBPROCESS_ENV)
            results.append(res)
            log(
                f"  attention {kind:<17} {side * side:>6} tokens: {res['latency_ms']:9.2f} ms  "
                f"peak {res['peak_mib']:8.1f} MiB"
            )
    return results


COMPARED = ("soft", "softmax-sdpa")


def measure_interleaved(
    side: int,
    dim: int = 64,
    heads: int = 2,
    warmup: int = 2,
    rounds: int = 7,
    budget_s: float = 10.0,
    kinds: tuple[str, ...] = COMPARED,
) -> dict[str, Any]:
    """Latency of ``kinds`` at ``side x side`` tokens in alternating rounds; the speed-up of the first
    over the second is the ratio of their medians."""
    fns = {kind: build(kind, side, dim, heads) for kind in kinds}
    x = torch.randn(1, side * side, dim, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        t_start = time.perf_counter()
        for i in range(rounds):
            for kind, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[kind].append((time.perf_counter() - t0) * 1e3)
            if i + 1 >= min(3, rounds) and time.perf_counter() - t_start > budget_s:
                break
    med = {kind: median(t) for kind, t in times.items()}
    return {
        "kind": "interleaved",
        "kinds": list(kinds),
        "tokens": side * side,
        "grid": f"{side}x{side}",
        "dim": dim,
        "heads": heads,
        "landmark_ratio": landmark_ratio(side),
        "latency_ms": med,
        "latency_ms_all": times,
        "speedup": med[kinds[1]] / med[kinds[0]],
        "rounds": len(times[kinds[0]]),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # at the end: other work on the machine
    }


def run_json_subprocess(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one measurement in a fresh process (``env`` added to ours); its last stdout line is its JSON."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_interleaved(
    sides: list[int], dim: int, heads: int, warmup: int, rounds: int, budget_s: float, log=print
) -> list[dict[str, Any]]:
    """:func:`measure_interleaved` of SOFT vs SDPA at each size, each in a fresh subprocess."""
    results = []
    for side in sides:
        cmd = [sys.executable, "-m", "benchmarks.attention", "--compare", "--side", str(side)]
        cmd += ["--dim", str(dim), "--heads", str(heads), "--warmup", str(warmup), "--reps", str(rounds)]
        cmd += ["--budget-s", str(budget_s)]
        res = run_json_subprocess(cmd, {"PYTHONUNBUFFERED": "1"})
        results.append(res)
        lat = res["latency_ms"]
        log(
            f"  interleaved {res['tokens']:>6} tokens: SOFT {lat['soft']:.2f} ms, "
            f"SDPA {lat['softmax-sdpa']:.2f} ms -> {res['speedup']:.1f}x over {res['rounds']} rounds"
        )
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=KINDS, help="measure one kind: latency and peak memory")
    p.add_argument("--compare", action="store_true", help="SOFT vs SDPA in interleaved rounds (no memory)")
    p.add_argument("--side", type=int, required=True)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--budget-s", type=float, default=10.0)
    a = p.parse_args(argv)
    if a.compare == bool(a.kind):
        p.error("give exactly one of --kind KIND or --compare")
    if a.compare:
        print(json.dumps(measure_interleaved(a.side, a.dim, a.heads, a.warmup, a.reps, a.budget_s)))
    else:
        print(json.dumps(measure(a.kind, a.side, a.dim, a.heads, a.warmup, a.reps, a.budget_s)))


if __name__ == "__main__":
    main()
