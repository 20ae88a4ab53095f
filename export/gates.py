"""Quality gates: how much of a task's quality metric a derived graph may lose against the fp32 graph.

The fp32 ONNX graph is gated by parity with PyTorch (``export.pipeline``); every graph derived from it —
8-bit QDQ graphs, TensorRT engines — is gated by the task's own quality metric, measured on that graph
by the task's :meth:`ExportSpec.quality` and compared with the fp32 graph's value. A graph that fails
is discarded: its file is removed, the reason is recorded in the manifest, and serving never loads it
(:func:`serving.runtime.available_backends` reports the reason instead).

Each task declares its gates on its export spec (``quality_gates``); an operator tightens or loosens
them per metric with ``kiln export --max-loss METRIC=VALUE``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class QualityGate:
    """At most ``max_loss`` of ``metric`` may be lost against the fp32 graph.

    Attributes:
        metric: a key of the task's ``quality()`` result.
        max_loss: the largest tolerated loss; absolute (accuracy points as a fraction) unless ``relative``.
        higher_is_better: accuracy-like (True) or distance-like, e.g. FID (False).
        relative: the loss is a fraction of the fp32 value (for scale-free metrics such as FID).
    """

    metric: str
    max_loss: float
    higher_is_better: bool = True
    relative: bool = False

    def loss(self, fp32: float, derived: float) -> float:
        """How much worse ``derived`` is than ``fp32`` (negative when it is better)."""
        worse = fp32 - derived if self.higher_is_better else derived - fp32
        return worse / abs(fp32) if self.relative else worse

    def check(self, fp32: Mapping[str, Any], derived: Mapping[str, Any]) -> dict[str, Any]:
        """The gate's verdict on one derived graph: ``{"metric", "fp32", "value", "loss", "max_loss",
        "passed", "reason"}``; a metric missing on either side fails (an unmeasured graph is never served)."""
        a, b = fp32.get(self.metric), derived.get(self.metric)
        out: dict[str, Any] = {
            "metric": self.metric,
            "fp32": a,
            "value": b,
            "max_loss": self.max_loss,
            "relative": self.relative,
        }
        if not _number(a) or not _number(b):
            note = derived.get("quality_note") or fp32.get("quality_note") or "no value recorded"
            side = "the fp32 graph" if not _number(a) else "this graph"
            return {
                **out,
                "loss": None,
                "passed": False,
                "reason": f"{self.metric} of {side} unknown ({note})",
            }
        if self.relative and a == 0:
            return {**out, "loss": None, "passed": False, "reason": f"{self.metric} of the fp32 graph is 0"}
        loss = self.loss(float(a), float(b))
        passed = loss <= self.max_loss
        if self.relative:
            lost, allowed = f"{loss:.1%}", f"{self.max_loss:.1%} of fp32"
        else:
            lost, allowed = f"{loss:.4f}", f"{self.max_loss:g}"
        reason = (
            ""
            if passed
            else (f"{self.metric} {float(b):.4f} vs fp32 {float(a):.4f}: loses {lost} > allowed {allowed}")
        )
        return {**out, "loss": loss, "passed": passed, "reason": reason}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def with_overrides(
    gates: Sequence[QualityGate], max_loss: Mapping[str, float] | None
) -> tuple[QualityGate, ...]:
    """The task's gates with the operator's ``max_loss`` per metric; an unknown metric is a ValueError."""
    if not max_loss:
        return tuple(gates)
    known = {g.metric for g in gates}
    unknown = sorted(set(max_loss) - known)
    if unknown:
        raise ValueError(f"no quality gate on {unknown}; this task gates {sorted(known)}")
    return tuple(replace(g, max_loss=float(max_loss[g.metric])) if g.metric in max_loss else g for g in gates)


def evaluate(
    gates: Sequence[QualityGate], fp32: Mapping[str, Any], derived: Mapping[str, Any]
) -> dict[str, Any]:
    """All gates' verdicts on one graph: ``{"passed": bool, "reason": str, "checks": [...]}``."""
    checks = [gate.check(fp32, derived) for gate in gates]
    failed = [c["reason"] for c in checks if not c["passed"]]
    return {"passed": not failed, "reason": "; ".join(failed), "checks": checks}


def parse_max_loss(items: Sequence[str]) -> dict[str, float]:
    """``["val_accuracy=0.02", ...]`` → ``{"val_accuracy": 0.02}``; a malformed item is a ValueError."""
    out = {}
    for item in items:
        metric, sep, value = item.partition("=")
        try:
            if not sep or not metric:
                raise ValueError
            out[metric.strip()] = float(value)
        except ValueError:
            raise ValueError(
                f"--max-loss takes METRIC=VALUE (e.g. val_accuracy=0.01), got {item!r}"
            ) from None
    return out
