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


def _hard(new_new: dict[str, list[float]], new_old: dict[str, list[float]], old_old: float = 70.0) -> dict:
    """Five-seed off-the-ceiling results as ``run_hard`` returns them, from per-seed top-1 lists."""
    from benchmarks.retrieval import HARD_METHODS, _stats

    runs = {
        label: [
            {"seed": i, "new/old": _m(no), "new/new": _m(nn), "val_new_new_top1": nn - 1}
            for i, (no, nn) in enumerate(zip(new_old[label], new_new[label], strict=True))
        ]
        for label in HARD_METHODS
    }
    summary = {
        label: {
            case: {k: _stats([r[case][k] for r in rs]) for k in ("top1", "map")}
            for case in ("new/old", "new/new")
        }
        for label, rs in runs.items()
    }
    return {
        "config": {"train_per_class": 30, "epochs": 15, "batch_size": 16},
        "new_classes": list(range(8)),
        "seeds": [0, 1, 2, 3, 4],
        "old_model": "bench-embed-old:1",
        "old/old": _m(old_old),
        "val_old_old_top1": 65.0,
        "runs": runs,
        "summary": summary,
    }


def _spread(center: float) -> list[float]:
    return [center - 1, center - 0.5, center, center + 0.5, center + 1]  # std 0.79


def test_hard_targets_check_bt2s_claim_beyond_the_seed_spread():
    from benchmarks.retrieval import hard_targets

    claim_holds = _hard(
        new_new={
            "independent": _spread(90),
            "BCT": _spread(85),
            "BT²": _spread(89.5),
            "BT² transform=none": _spread(86),
            "OCA": _spread(89),
        },
        new_old={
            "independent": _spread(15),
            "BCT": _spread(75),
            "BT²": _spread(78),
            "BT² transform=none": _spread(74),
            "OCA": _spread(80),
        },
    )
    met = {t["target"]: t["met"] for t in hard_targets(claim_holds)}
    assert all(met.values()), met
    # on the ceiling, BCT within the spread of the independent model, BT² far below it, one seed's
    # new/old under old/old, and no gain from the change of basis: every one of those is a miss
    claim_fails = _hard(
        new_new={
            "independent": _spread(99),
            "BCT": _spread(98.5),
            "BT²": _spread(94),
            "BT² transform=none": _spread(95),
            "OCA": _spread(99),
        },
        new_old={
            "independent": _spread(15),
            "BCT": _spread(75),
            "BT²": [69.0, 75, 76, 77, 78],
            "BT² transform=none": _spread(74),
            "OCA": _spread(80),
        },
    )
    missed = {t["target"] for t in hard_targets(claim_fails) if not t["met"]}
    assert missed == {
        "off the ceiling: independent new/new top-1 below 95",
        "BCT loses new/new against the independent model (by more than the seed spread)",
        "BT² does not lose new/new against the independent model (not below by more than the spread)",
        "BT² new/old top-1 > old/old top-1 (every seed)",
        "BT² new/old mAP > old/old mAP (every seed)",
        "methods told apart: BT² and BCT new/old mAP differ by more than their seed spread",
        "ablation: the change of basis beats transform=none on new/new or new/old (beyond the spread)",
    }


def test_markdown_reports_the_seed_spread_section():
    from benchmarks.retrieval import hard_targets

    hard = _hard(
        new_new={k: _spread(90) for k in ("independent", "BCT", "BT²", "BT² transform=none", "OCA")},
        new_old={k: _spread(75) for k in ("independent", "BCT", "BT²", "BT² transform=none", "OCA")},
    )
    results = {
        "command": "kiln bench retrieval",
        "machine": {"date": "today", "cpu": "cpu", "usable_cores": 2, "torch": "2"},
        "compatibility": _compat(80.0, 98.0, 12.0),
        "xbt": _xbt(95.0),
        "off_ceiling": hard,
    }
    results["targets"] = targets(results["compatibility"], results["xbt"]) + hard_targets(hard)
    text = markdown(results, Path("r.json"))
    assert "### Off the ceiling: 30 training images per class, seeds 0, 1, 2, 3, 4" in text
    assert "| BT² transform=none | 75.0 ± 0.8 (74.0–76.0) | 74.0 ± 0.8 (73.0–75.0) | 90.0 ± 0.8" in text
    assert "Validation new/new top-1 (mean over the seeds" in text and "independent 89.0" in text
