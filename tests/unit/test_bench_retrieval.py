"""The pure pieces of ``kiln bench retrieval``: chance level, target verdicts, the markdown section."""

from pathlib import Path

import numpy as np
import pytest

from benchmarks.retrieval import chance_top1, markdown, targets


def _m(top1: float) -> dict:
    return {"top1": top1, "top5": top1 + 1, "map": top1 - 1}


def _compat(bt2_new_old: float, oca_new_new: float, indep_new_old: float) -> dict:
    rows = [{"method": "old model", "old/old": _m(70.0)}]
    for method, no, nn in (
        ("independent", indep_new_old, 99.0),
        ("BCT", 65.0, 98.0),
        ("BT²", bt2_new_old, 98.0),
        ("OCA", 90.0, oca_new_new),
    ):
        rows.append(
            {"method": method, "old/old": _m(70.0), "new/old": _m(no), "new/new": _m(nn), "train_seconds": 9}
        )
    return {"queries": 135, "gallery": 135, "chance_top1": 10.0, "old_train_seconds": 5, "rows": rows}


def _xbt(projected: float) -> dict:
    rows = [
        {"case": "old text → old image (old/old)", "r1": 60.0, "r5": 80.0},
        {"case": "MiniLM → old image, no projection (first 32 dims)", "r1": 10.0, "r5": 12.0},
        {"case": "MiniLM + projection, text-only stage (recorded at training)", "r1": 90.0, "r5": 99.0},
        {"case": "MiniLM + projection, text + image–text pairs", "r1": projected, "r5": 99.0},
    ]
    names = {"old_model": "xbt-old:1", "new_model": "xbt-new-text:1"}
    return {"rows": rows, "queries": 200, "gallery": 270, "chance_r1": 10.0, "paired_images": 100, **names}


def test_chance_top1_is_the_share_of_same_class_items():
    assert chance_top1(np.array([0, 1]), np.array([0, 0, 0, 1])) == pytest.approx(100 * (0.75 + 0.25) / 2)


def test_target_verdicts_follow_the_numbers():
    met = {t["target"]: t["met"] for t in targets(_compat(80.0, 98.0, 12.0), _xbt(95.0))}
    assert all(met.values()), met
    missed = {t["target"]: t["met"] for t in targets(_compat(60.0, 90.0, 40.0), _xbt(5.0))}
    assert missed["BT² new/old top-1 > old/old top-1"] is False
    assert missed["OCA new/new top-1 within 2 points of the independent"] is False
    assert missed["OCA new/old top-1 > old/old top-1"] is True
    assert [k for k, v in missed.items() if k.startswith("independent")] and not any(
        v for k, v in missed.items() if k.startswith(("independent", "XBT"))
    )


def test_markdown_has_the_bt2_table_shape():
    results = {
        "command": "kiln bench retrieval",
        "machine": {"date": "today", "cpu": "cpu", "usable_cores": 2, "torch": "2"},
        "compatibility": _compat(80.0, 98.0, 12.0),
        "xbt": _xbt(95.0),
    }
    results["targets"] = targets(results["compatibility"], results["xbt"])
    text = markdown(results, Path("r.json"))
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert header.count("|") == 11  # method + 3 cases × (top-1, top-5, mAP)
    assert "| BT² | 70.0 | 71.0 | 69.0 | 80.0 | 81.0 | 79.0 | 98.0 | 99.0 | 97.0 |" in text
    assert "| old model | 70.0 | 71.0 | 69.0 | - | - | - | - | - | - |" in text
    assert "**MISSED**" not in text and text.count("**MET**") == 6
