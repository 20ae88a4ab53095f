"""SOFT vs softmax attention in onnxruntime: one exported attention layer of each kind, run interleaved.

One layer, ``dim`` wide with ``heads`` heads, batch 1, on a ``side x side`` token grid (the settings of
:mod:`benchmarks.attention`), exported and run in onnxruntime (CPU) with the server's session settings
(``serving/runtime.py``: ``intra_op_num_threads`` = ``KILN_THREADS``, one inter-op thread,
``ORT_ENABLE_ALL``). The kinds:

* ``soft``: :class:`model_zoo.soft.SoftAttention` (landmark ratio ``side // 8``, 20 Newton steps) through
  the project's exporter, :func:`export.onnx.export_onnx` (opset 18, the exportable form of
  :func:`model_zoo.soft.set_exportable`) -- the graph ``kiln export`` writes for a SOFT model.
* ``softmax-mha``: the weights of a :class:`model_zoo.soft.SoftmaxAttention` in a graph whose attention
  is onnxruntime's own fused CPU kernel, the ``com.microsoft.MultiHeadAttention`` contrib op
  (``MatMul + Add`` for q, k, v -> ``Split`` -> ``MultiHeadAttention`` -> ``MatMul + Add``).
* ``softmax-attention23``: ``SoftmaxAttention`` exported at opset 23, where the exporter writes
  ``F.scaled_dot_product_attention`` as the standard ONNX ``Attention`` op, run by onnxruntime's kernel.
* ``softmax-unfused``: ``SoftmaxAttention`` at the project's opset 18, where the exporter decomposes SDPA
  into ``MatMul -> Softmax -> MatMul``. onnxruntime's graph optimizer does **not** fuse this back into an
  attention kernel (checked on every run: ``fused`` in the result counts the ``Attention`` /
  ``MultiHeadAttention`` nodes of the optimised graph), so it materialises the N x N scores; it runs only
  up to :data:`UNFUSED_MAX_TOKENS` tokens (one call at 16384 tokens takes 6-16 s here).

Every graph is checked against its PyTorch module on the benchmark's input (``max_abs_diff``) before it
is timed. Timing: ``warmup`` untimed calls of each, then rounds in which every session runs once, in
turn (interleaved, so the machine's drift hits all kinds alike), up to ``rounds`` rounds or ``budget_s``
(at least 3). ``python -m benchmarks.attention_onnx --side 64`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.attention import landmark_ratio, run_json_subprocess
from benchmarks.report import median
from model_zoo.soft import SoftAttention, SoftmaxAttention

KINDS = ("soft", "softmax-mha", "softmax-attention23", "softmax-unfused")
FUSED_SOFTMAX = ("softmax-mha", "softmax-attention23")
UNFUSED_MAX_TOKENS = 4096
PROJECT_OPSET = 18  # export/onnx.py's default, what `kiln export` writes


class _OnGrid(nn.Module):
    """An attention layer with its ``H x W`` grid fixed, so the graph takes one input ``x: (B, N, C)``."""

    def __init__(self, attn: nn.Module, side: int) -> None:
        super().__init__()
        self.attn, self.side = attn, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, self.side, self.side)


def build_layers(side: int, dim: int, heads: int) -> dict[str, nn.Module]:
    """The seeded PyTorch layers (the same seed and construction as :func:`benchmarks.attention.build`)."""
    torch.manual_seed(0)
    soft = SoftAttention(dim, heads, landmark_ratio=landmark_ratio(side)).eval()
    torch.manual_seed(0)
    softmax = SoftmaxAttention(dim, heads).eval()
    return {"soft": _OnGrid(soft, side), "softmax": _OnGrid(softmax, side)}


def multihead_attention_graph(attn: SoftmaxAttention, tokens: int, path: Path) -> Path:
    """``attn`` as an ONNX graph around onnxruntime's ``com.microsoft.MultiHeadAttention`` contrib op."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dim = attn.num_heads * attn.head_dim

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().astype(np.float32)

    inits = [
        numpy_helper.from_array(arr(attn.qkv.weight.T).copy(), "w_qkv"),
        numpy_helper.from_array(arr(attn.qkv.bias), "b_qkv"),
        numpy_helper.from_array(arr(attn.proj.weight.T).copy(), "w_proj"),
        numpy_helper.from_array(arr(attn.proj.bias), "b_proj"),
        numpy_helper.from_array(np.array([dim, dim, dim], dtype=np.int64), "split"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_qkv"], ["qkv_mm"]),
        helper.make_node("Add", ["qkv_mm", "b_qkv"], ["qkv"]),
        helper.make_node("Split", ["qkv", "split"], ["q", "k", "v"], axis=2),
        # softmax(q k^T / sqrt(d)) v per head; the default scale is 1 / sqrt(head size), as SDPA's.
        helper.make_node(
            "MultiHeadAttention", ["q", "k", "v"], ["att"], domain="com.microsoft", num_heads=attn.num_heads
        ),
        helper.make_node("MatMul", ["att", "w_proj"], ["proj_mm"]),
        helper.make_node("Add", ["proj_mm", "b_proj"], ["y"]),
    ]
    io = {n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", tokens, dim]) for n in ("x", "y")}
    graph = helper.make_graph(nodes, "softmax_attention_mha", [io["x"]], [io["y"]], inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", PROJECT_OPSET), helper.make_opsetid("com.microsoft", 1)],
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def export_graphs(side: int, dim: int, heads: int, workdir: Path, kinds=KINDS) -> dict[str, Path]:
    """Write each kind's graph under ``workdir``."""
    from export.onnx import export_onnx

    layers = build_layers(side, dim, heads)
    x = torch.randn(1, side * side, dim)
    paths = {}
    for kind in kinds:
        path = workdir / f"{kind}-{side}.onnx"
        if kind == "soft":
            export_onnx(layers["soft"], x, path, opset=PROJECT_OPSET, input_name="x", output_name="y")
        elif kind == "softmax-unfused":
            export_onnx(layers["softmax"], x, path, opset=PROJECT_OPSET, input_name="x", output_name="y")
        elif kind == "softmax-attention23":
            export_onnx(layers["softmax"], x, path, opset=23, input_name="x", output_name="y")
        elif kind == "softmax-mha":
            multihead_attention_graph(layers["softmax"].attn, side * side, path)
        else:
            raise ValueError(f"unknown kind {kind!r}; valid: {list(KINDS)}")
        paths[kind] = path
    return paths


def open_session(path: Path, threads: int, optimized_path: Path | None = None, spinning: bool = True):
    """An onnxruntime CPU session with the server's settings (``serving/runtime.py``'s ``OnnxRuntime``).

    ``spinning=False`` sets ``session.intra_op.allow_spinning`` to 0 (not the server's setting): worker
    threads then sleep between parallel sections instead of spinning, which on a machine whose cores
    other work shares keeps a graph of many parallel ops from waiting on descheduled spinners.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def optimized_op_counts(path: Path) -> dict[str, int]:
    """Op types (with counts) of the graph onnxruntime runs after its optimizer."""
    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def measure(
    side: int,
    dim: int = 64,
    heads: int = 2,
    threads: int | None = None,
    warmup: int = 1,
    rounds: int = 7,
    budget_s: float = 30.0,
    kinds: tuple[str, ...] = KINDS,
    spinning: bool = True,
) -> dict[str, Any]:
    """Export, check and time every kind at ``side x side`` tokens; latencies in ms, interleaved rounds."""
    from benchmarks.runtimes import server_threads

    threads = threads or server_threads()
    tokens = side * side
    skipped = {}
    if "softmax-unfused" in kinds and tokens > UNFUSED_MAX_TOKENS:
        skipped["softmax-unfused"] = (
            f"N x N scores at {tokens} tokens: seconds per call; only run up to {UNFUSED_MAX_TOKENS} tokens"
        )
    run_kinds = [k for k in kinds if k not in skipped]
    layers = build_layers(side, dim, heads)
    x = torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = {"soft": layers["soft"](x).numpy(), "softmax": layers["softmax"](x).numpy()}
    feeds = {"x": x.numpy()}
    result: dict[str, Any] = {"kind": "onnxruntime", "tokens": tokens, "grid": f"{side}x{side}"}
    result.update(dim=dim, heads=heads)
    result.update(threads=threads, spinning=spinning, landmark_ratio=landmark_ratio(side), kinds={})
    with tempfile.TemporaryDirectory(prefix="kiln-attn-onnx-") as tmp:
        t0 = time.perf_counter()
        paths = export_graphs(side, dim, heads, Path(tmp), run_kinds)
        result["export_seconds"] = round(time.perf_counter() - t0, 1)
        sessions = {}
        for kind in run_kinds:
            opt = Path(tmp) / f"{kind}-{side}.opt.onnx"
            sessions[kind] = open_session(paths[kind], threads, opt, spinning)
            ops = optimized_op_counts(opt)
            out = sessions[kind].run(None, feeds)[0]
            ref = expected["soft" if kind == "soft" else "softmax"]
            result["kinds"][kind] = {
                "max_abs_diff": float(np.abs(out - ref).max()),
                "fused_attention_nodes": ops.get("Attention", 0) + ops.get("MultiHeadAttention", 0),
                "optimized_ops": ops,
                "file_mib": round(paths[kind].stat().st_size / 2**20, 2),
            }
        for sess in sessions.values():
            for _ in range(max(0, warmup - 1)):  # the parity run above was the first warm-up call
                sess.run(None, feeds)
        times: dict[str, list[float]] = {k: [] for k in run_kinds}
        t_start = time.perf_counter()
        for i in range(rounds):
            for kind, sess in sessions.items():
                t = time.perf_counter()
                sess.run(None, feeds)
                times[kind].append((time.perf_counter() - t) * 1e3)
            if i + 1 >= min(3, rounds) and time.perf_counter() - t_start > budget_s:
                break
    for kind in run_kinds:
        result["kinds"][kind].update(latency_ms=median(times[kind]), latency_ms_all=times[kind])
    for kind, reason in skipped.items():
        result["kinds"][kind] = {"skipped": reason}
    result["load_average_1m"] = round(os.getloadavg()[0], 2)  # at the end: other work on the machine
    fused = [k for k in FUSED_SOFTMAX if "latency_ms" in result["kinds"].get(k, {})]
    if "soft" in run_kinds and fused:
        best = min(fused, key=lambda k: result["kinds"][k]["latency_ms"])
        result["fastest_fused_softmax"] = best
        # Ratio of medians over the same interleaved rounds.
        result["speedup_vs_fused"] = (
            result["kinds"][best]["latency_ms"] / result["kinds"]["soft"]["latency_ms"]
        )
    return result


def run_suite(
    sides: list[int], dim: int, heads: int, warmup: int, rounds: int, budget_s: float, log=print
) -> list[dict[str, Any]]:
    """:func:`measure` at each size, each in a fresh subprocess (one JSON line each)."""
    results = []
    for side in sides:
        cmd = [sys.executable, "-m", "benchmarks.attention_onnx", "--side", str(side), "--dim", str(dim)]
        cmd += ["--heads", str(heads), "--warmup", str(warmup), "--rounds", str(rounds)]
        cmd += ["--budget-s", str(budget_s)]
        res = run_json_subprocess(cmd, {"PYTHONUNBUFFERED": "1"})
        results.append(res)
        cells = ", ".join(
            f"{k} {v['latency_ms']:.1f} ms" if "latency_ms" in v else f"{k} skipped"
            for k, v in res["kinds"].items()
        )
        ratio = res.get("speedup_vs_fused")
        log(
            f"  onnxruntime {res['tokens']:>6} tokens: {cells}"
            + (f"; SOFT {ratio:.1f}x the fused softmax" if ratio else "")
        )
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, required=True, help="token grid side: side x side tokens")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: KILN_THREADS)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--budget-s", type=float, default=30.0)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument(
        "--no-spinning",
        action="store_true",
        help="session.intra_op.allow_spinning=0 (not the server's setting; for a machine under other load)",
    )
    a = p.parse_args(argv)
    res = measure(
        a.side, a.dim, a.heads, a.threads, a.warmup, a.rounds, a.budget_s, tuple(a.kinds), not a.no_spinning
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
