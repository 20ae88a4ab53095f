"""``kiln bench retrieval``: backward-compatible embeddings (BCT, BT², OCA) and cross-modal XBT on digits.

Measured on the store's retrieval models (trained first where missing, as ``kiln serve`` does):

1. compatibility, in BT²'s table shape — the test split's fixed query/gallery halves
   (``training.retrieval.query_gallery``); top-1, top-5 and mAP of cosine retrieval for old/old,
   new/old (new-model queries against the old model's gallery, through the compatible subspace: the
   first 32 coordinates, re-normalised) and new/new, for the independent new model and each method.
   The independent model has no compatible subspace; its new/old uses its first 32 coordinates the same
   way, which is what "just swap the model" amounts to.
2. XBT — text→image recall@1/5 of held-out-phrasing captions against the old dual encoder's image
   gallery (test split): old text tower (old/old), all-MiniLM-L6-v2 without projection (its first 32
   coordinates), with the projection after the text-only stage (figure recorded by the trainer), and
   after the image–text pair stage.

Then the gallery sections of retrieval-gallery's ``benchmarks/retrieval_gallery.py`` (upgrade cost,
search latency) run under the same command. Writes ``benchmarks/results/retrieval.json`` and the
``retrieval`` section of the markdown file; every figure and MET / MISSED comes from this run.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.report import fmt, machine_info, markdown_table, run_header, target_lines, write_results

RECORD = Path(__file__).parent / "results" / "retrieval.json"
OLD = "embed-old"
NEW_MODELS = {
    "independent": "embed-new-independent",
    "BCT": "embed-new-bct",
    "BT²": "embed-new-bt2",
    "OCA": "embed-new-oca",
}
XBT_OLD, XBT_NEW = "xbt-old", "xbt-new-text"
COMPAT_DIM = 32
NEW_NEW_TOLERANCE = 2.0  # points of new/new top-1 a compatible model may lose against the independent one
SPREAD_SEEDS = (1, 2)  # besides seed 0 (the store's models); --quick skips them
CHANCE_MARGIN = 10.0  # "near chance": new/old top-1 within this many points of the chance level


def _ensure(names: list[str]) -> dict[str, Any]:
    from training.retrieval import require_artifact

    return {n: require_artifact(n) for n in names}


def chance_top1(labels_q: np.ndarray, labels_g: np.ndarray) -> float:
    """Expected top-1 of a random ranking: the mean share of same-class gallery items, in percent."""
    share = {c: float((labels_g == c).mean()) for c in np.unique(labels_q)}
    return 100 * float(np.mean([share[c] for c in labels_q]))


def run_compatibility(arts: dict[str, Any]) -> dict[str, Any]:
    from kiln.artifacts import get_artifact, load_torch_model
    from training.retrieval import embed_images, query_gallery, retrieval_metrics, to_space

    old_art = arts[OLD]
    qg = query_gallery("test", tuple(old_art.manifest["preprocess"]["size"]))
    (xq, yq), (xg, yg) = qg["query"], qg["gallery"]
    old_models = {}

    def old_embeddings(art):
        if art.tag not in old_models:
            m = load_torch_model(art)
            old_models[art.tag] = (embed_images(m, xq), embed_images(m, xg))
        return old_models[art.tag]

    rows = []
    oq, og = old_embeddings(old_art)
    old_old = retrieval_metrics(oq, yq, og, yg)
    rows.append({"method": "old model", "model": old_art.tag, "old/old": old_old})
    for method, name in NEW_MODELS.items():
        art = arts[name]
        compatible = art.manifest["embedding"]["compatible"]
        # a compatible model is measured against the old version it was trained with
        base = get_artifact(f"{compatible[0]['model']}:{compatible[0]['version']}") if compatible else old_art
        bq, bg = old_embeddings(base)
        model = load_torch_model(art)
        nq, ng = embed_images(model, xq), embed_images(model, xg)
        dims = compatible[0]["dims"] if compatible else COMPAT_DIM
        rows.append(
            {
                "method": method,
                "model": art.tag,
                "old_model": base.tag,
                "old/old": retrieval_metrics(bq, yq, bg, yg),
                "new/old": retrieval_metrics(to_space(nq, dims), yq, bg, yg),
                "new/new": retrieval_metrics(nq, yq, ng, yg),
                "train_seconds": art.manifest["metrics"].get("train_seconds"),
                "dim": art.manifest["embedding"]["dim"],
            }
        )
    return {
        "queries": len(yq),
        "gallery": len(yg),
        "chance_top1": chance_top1(yq, yg),
        "old_train_seconds": old_art.manifest["metrics"].get("train_seconds"),
        "rows": rows,
    }


def run_seed_spread(arts: dict[str, Any], seeds: tuple[int, ...]) -> dict[str, Any]:
    """Each new method retrained with other seeds against the same old model (artifacts
    ``<name>-seed<k>``, reused when present): new/old and new/new on the test split per seed."""
    import dataclasses

    from kiln.artifacts import ArtifactError, get_artifact, load_torch_model
    from training.recipes import RECIPES
    from training.retrieval import embed_images, query_gallery, retrieval_metrics, to_space
    from training.trainer import train

    old_art = arts[OLD]
    qg = query_gallery("test", tuple(old_art.manifest["preprocess"]["size"]))
    (xq, yq), (xg, yg) = qg["query"], qg["gallery"]
    old = load_torch_model(old_art)
    og = embed_images(old, xg)
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in NEW_MODELS}
    for seed in seeds:
        for method, name in NEW_MODELS.items():  # independent first: BT²'s reference for the same seed
            tag = f"{name}-seed{seed}"
            try:
                art = get_artifact(tag)
                if art.manifest["embedding"]["compatible"] and (
                    art.manifest["embedding"]["compatible"][0]["version"] != old_art.version
                ):
                    raise ArtifactError("trained against another old model")
            except ArtifactError:
                recipe = RECIPES[name]
                if recipe.reference_model:
                    recipe = dataclasses.replace(
                        recipe, reference_model=f"{recipe.reference_model}-seed{seed}"
                    )
                print(f"   training {tag}")
                art = train(tag, recipe=recipe, seed=seed, progress=False).artifact
            model = load_torch_model(art)
            nq, ng = embed_images(model, xq), embed_images(model, xg)
            dims = (
                art.manifest["embedding"]["compatible"][0]["dims"] if method != "independent" else COMPAT_DIM
            )
            out[method].append(
                {
                    "seed": seed,
                    "model": art.tag,
                    "new/old": retrieval_metrics(to_space(nq, dims), yq, og, yg),
                    "new/new": retrieval_metrics(nq, yq, ng, yg),
                }
            )
    return {"seeds": list(seeds), "runs": out}


def run_xbt(arts: dict[str, Any]) -> dict[str, Any]:
    from kiln.artifacts import get_artifact, load_torch_model
    from training.retrieval import embed_images, retrieval_metrics, split_tensors, to_space
    from training.xbt import eval_queries

    new_art = arts[XBT_NEW]
    entry = new_art.manifest["embedding"]["compatible"][0]
    old_art = get_artifact(f"{entry['model']}:{entry['version']}")
    old, new = load_torch_model(old_art), load_torch_model(new_art)
    xg, yg = split_tensors("test", tuple(old_art.manifest["preprocess"]["size"]))
    gallery, yg = embed_images(old, xg), yg.numpy()
    texts, yq = eval_queries("test")
    with torch.inference_mode():
        old_q = old.embed_texts(texts).numpy()
        native = new.embed_native(texts)
        projected = new.encode_text(texts)[f"embedding_{entry['space']}"].numpy()

    def recall(q):
        m = retrieval_metrics(q, yq, gallery, yg)
        return {"r1": m["top1"], "r5": m["top5"]}

    text_only = new_art.manifest["evaluation"]["test"]["new/old (text-only projection)"]
    return {
        "queries": len(yq),
        "gallery": len(yg),
        "old_model": old_art.tag,
        "new_model": new_art.tag,
        "chance_r1": chance_top1(yq, yg),
        "rows": [
            {"case": "old text → old image (old/old)", **recall(old_q)},
            {
                "case": "MiniLM → old image, no projection (first 32 dims)",
                **recall(to_space(native.numpy(), 32)),
            },
            {"case": "MiniLM + projection, text-only stage (recorded at training)", **text_only},
            {"case": "MiniLM + projection, text + image–text pairs", **recall(projected)},
        ],
        "train_seconds": {
            XBT_OLD: old_art.manifest["metrics"].get("train_seconds"),
            XBT_NEW: new_art.manifest["metrics"].get("train_seconds"),
        },
        "paired_images": new_art.manifest["training"].get("paired_images"),
    }


def targets(compat: dict[str, Any], xbt: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {r["method"]: r for r in compat["rows"]}
    out = []
    indep = rows["independent"]
    for method in ("BT²", "OCA"):
        r = rows[method]
        no, oo = r["new/old"]["top1"], r["old/old"]["top1"]
        out.append(
            {
                "target": f"{method} new/old top-1 > old/old top-1",
                "measured": f"{no:.1f} vs {oo:.1f}",
                "met": no > oo,
                "reason": ""
                if no > oo
                else "the compatible subspace retrieves worse than the old model itself",
            }
        )
        nn_, ind = r["new/new"]["top1"], indep["new/new"]["top1"]
        ok = nn_ >= ind - NEW_NEW_TOLERANCE
        out.append(
            {
                "target": f"{method} new/new top-1 within {NEW_NEW_TOLERANCE:g} points of the independent",
                "measured": f"{nn_:.1f} vs {ind:.1f}",
                "met": ok,
                "reason": "" if ok else "the compatibility losses cost the new model more than the tolerance",
            }
        )
    chance, ind_no = compat["chance_top1"], indep["new/old"]["top1"]
    ok = ind_no <= chance + CHANCE_MARGIN
    out.append(
        {
            "target": f"independent new/old top-1 near chance ({chance:.1f} + {CHANCE_MARGIN:g} points)",
            "measured": f"{ind_no:.1f}",
            "met": ok,
            "reason": "" if ok else "an independently trained model's leading coordinates happen to align",
        }
    )
    x = {r["case"]: r for r in xbt["rows"]}
    proj = xbt["rows"][3]["r1"]
    none = xbt["rows"][1]["r1"]
    ok = proj > none
    out.append(
        {
            "target": "XBT: projected MiniLM text→old image recall@1 above the unprojected",
            "measured": f"{proj:.1f} vs {none:.1f} (old/old {x[xbt['rows'][0]['case']]['r1']:.1f})",
            "met": ok,
            "reason": "" if ok else "the projection did not learn the old space",
        }
    )
    return out


def run(quick: bool, output: str, command: str) -> dict[str, Any]:
    """Run the suite: the model sections here, then retrieval-gallery's (upgrade cost, search latency)."""
    results = run_models(quick, output, command)
    if importlib.util.find_spec("benchmarks.retrieval_gallery") is None:
        print("retrieval-gallery sections: benchmarks/retrieval_gallery.py is not present; not run")
    else:
        importlib.import_module("benchmarks.retrieval_gallery").run(
            quick=quick, output=output, command=command
        )
    return results


def run_models(quick: bool, output: str, command: str) -> dict[str, Any]:
    """The compatibility and XBT sections: write the JSON and the ``retrieval`` markdown section."""
    from kiln.settings import kiln_home

    print(f"kiln bench retrieval{' --quick' if quick else ''}: store {kiln_home()}")
    arts = _ensure([OLD, *NEW_MODELS.values(), XBT_OLD, XBT_NEW])
    machine = machine_info()
    t0 = time.perf_counter()
    print("1/3 compatibility (old/old, new/old, new/new) on the test query/gallery split")
    compat = run_compatibility(arts)
    print("2/3 XBT text→image recall")
    xbt = run_xbt(arts)
    spread = None
    if not quick:
        print(f"3/3 seed spread: each new method retrained with seeds {SPREAD_SEEDS}")
        spread = run_seed_spread(arts, SPREAD_SEEDS)
    results = {
        "suite": "retrieval",
        "command": command,
        "quick": quick,
        "machine": machine,
        "compatibility": compat,
        "xbt": xbt,
        "seed_spread": spread,
        "targets": targets(compat, xbt),
        "wall_seconds": time.perf_counter() - t0,
    }
    write_results(results, "retrieval", output, quick, RECORD, markdown)
    return results


def _spread_lines(spread: dict[str, Any] | None, compat: dict[str, Any]) -> list[str]:
    if not spread:
        return []
    seed0 = {r["method"]: r for r in compat["rows"][1:]}
    rows = []
    for method, runs in spread["runs"].items():
        runs = [{"new/old": seed0[method]["new/old"], "new/new": seed0[method]["new/new"]}, *runs]

        def cell(case: str, key: str, runs=runs) -> str:
            v = [r[case][key] for r in runs]
            return f"{np.mean(v):.1f} ({min(v):.1f}–{max(v):.1f})"

        rows.append(
            [
                method,
                cell("new/old", "top1"),
                cell("new/old", "map"),
                cell("new/new", "top1"),
                cell("new/new", "map"),
            ]
        )
    seeds = ", ".join(str(s) for s in [0, *spread["seeds"]])
    return [
        f"Seed spread (seeds {seeds}; the same old model): mean (min–max) over the training seeds.",
        "",
        markdown_table(["method", "new/old top-1", "new/old mAP", "new/new top-1", "new/new mAP"], rows),
        "",
    ]


def _saturation_note(xbt: dict[str, Any]) -> list[str]:
    text_only, final = xbt["rows"][2]["r1"], xbt["rows"][3]["r1"]
    if min(text_only, final) < 99.5:
        return []
    return [
        "Both projection stages reach the ceiling of this class-level task (a caption names a digit, not an "
        "image), so what the image–text pair stage adds is not measurable here.",
        "",
    ]


def markdown(results: dict[str, Any], json_path: Path) -> str:
    c, x = results["compatibility"], results["xbt"]

    def cells(d: dict | None) -> list[str]:
        return [fmt(d[k]) for k in ("top1", "top5", "map")] if d else ["-", "-", "-"]

    rows = [
        [r["method"], *cells(r.get("old/old")), *cells(r.get("new/old")), *cells(r.get("new/new"))]
        for r in c["rows"]
    ]
    headers = [
        "method",
        *(f"{case} {k}" for case in ("old/old", "new/old", "new/new") for k in ("top-1", "top-5", "mAP")),
    ]
    seconds = [f"{r['method']} {fmt(r.get('train_seconds'), 0)} s" for r in c["rows"][1:]]
    lines = [
        "## Retrieval: backward-compatible embeddings (BCT, BT², OCA) and XBT",
        "",
        *run_header(results, json_path),
        "",
        "Digits (sklearn, 8×8 upsampled to 16×16); old model `embed-old` (small CNN, 32-d) trained on "
        "digits 0-4 only, new models (wider CNN) on all ten; BT² and OCA embed in 32 compatible + 32 extra "
        "dimensions, BCT in 32. Test split divided once into "
        f"{c['queries']} queries / {c['gallery']} gallery images, cosine retrieval over all ten classes "
        f"(chance top-1 {c['chance_top1']:.1f}%). new/old: new-model queries (first 32 coordinates, "
        "re-normalised) against the old model's gallery, i.e. the upgrade with zero re-embedding. "
        "Percent; the store's models (training seed 0), the seed spread below.",
        "",
        markdown_table(headers, rows),
        "",
        "Training seconds from each artifact (2-core CPU shared with other jobs, so upper bounds): "
        f"old {fmt(c['old_train_seconds'], 0)} s; " + ", ".join(seconds) + ".",
        "",
        *_spread_lines(results.get("seed_spread"), c),
        "### XBT: new text encoder against the old image gallery",
        "",
        f"Old: `{x['old_model']}` (CLIP-style dual encoder, 32-d). New: all-MiniLM-L6-v2 (frozen) + "
        f"projection `{x['new_model']}` trained on captions alone, then on {x['paired_images']} image–text "
        f"pairs. {x['queries']} caption queries in phrasings unseen in training against the "
        f"{x['gallery']} test images embedded by the old image tower; a hit is an image of the caption's "
        f"digit among the top k (chance recall@1 {x['chance_r1']:.1f}%).",
        "",
        markdown_table(
            ["query encoder → gallery", "recall@1", "recall@5"],
            [[r["case"], fmt(r["r1"]), fmt(r["r5"])] for r in x["rows"]],
        ),
        "",
        *_saturation_note(x),
        *target_lines(results["targets"]),
    ]
    return "\n".join(lines)
