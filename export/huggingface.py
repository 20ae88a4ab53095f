"""``kiln import``: a Hugging Face / sentence-transformers ``save_pretrained`` directory, or an ONNX file,
→ a Kiln artifact with a parity-checked ONNX graph, served by name like the built-in models.

What is imported, by task (detected from the directory when ``--task`` is not given):

- ``embedding``: a sentence-transformers directory (``modules.json``) is exported whole — its
  Transformer, its own Pooling (mean / CLS / max / ...), Dense and Normalize modules — so the graph's
  ``sentence_embedding`` is what ``SentenceTransformer.encode`` returns; a transformers feature-extraction
  model (``BertModel``...) is exported with attention-masked mean pooling of its last hidden state.
- ``text-classification``: a ``*ForSequenceClassification`` model → ``logits``; labels from ``id2label``.
- ``image-classification``: a ``*ForImageClassification`` model with its image processor's
  normalisation ((x - mean) / std) inside the graph, so the graph takes RGB pixels in [0, 1] at the
  processor's size → ``logits``.
- ``onnx``: an ``.onnx`` file is stored as it is and served as a generic ONNX model (the tensors are
  read from the graph, as :mod:`serving.triton` auto-completes a repository model without a config).

The tokenizer is kept beside the graph (``tokenizer.json``, encoded in serving by
:class:`kiln.texts.TextTokenizer`), with the source's config and pre-processing files under ``source/``.

**Parity gate** (the pattern of :mod:`export.pipeline`): the served path — Kiln's tokenizer (or pixel
layout) and onnxruntime on the exported graph — is compared with the original run by sentence-transformers
/ transformers with its own tokenizer and processor, on built-in sentences (one longer than the model's
maximum, to check truncation) plus the ``--eval-data`` inputs. Embeddings need a cosine of at least
:data:`MIN_COSINE` on every text, classifiers logits within :data:`LOGITS_ATOL`; a graph that drifts is
discarded and nothing is stored. With ``--eval-data`` (JSONL of ``{"text"|"image", "label"}``) a
classifier's accuracy on it is recorded, for the graph and for the original.

Offline only: ``PATH`` must exist locally, and the libraries load with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kiln.texts import TEXT_INPUTS, TOKENIZER_FILE, TextTokenizer

TASKS = ("embedding", "text-classification", "image-classification")
OPSET = 18  # as export.onnx
MIN_COSINE = 0.999  # every parity text: cosine(served, original) at least this
LOGITS_ATOL = 1e-3  # classifiers: max |served logits - original logits|
GRAPH = "model.onnx"
SOURCE_DIR = "source"  # the source's config / tokenizer / processor files, kept in the artifact
_KEPT_SUFFIXES = (".json", ".txt", ".model")  # config, tokenizer and processor files (never weights)
_PARITY_TEXTS = (
    "Kiln serves models it did not train.",
    "hello world",
    "A short one.",
    "The quick brown fox jumps over the lazy dog while the kiln cools down slowly overnight.",
    "Ünïcödé, punctuation!? and numbers 12345 — mixed in.",
    " ".join(["a much longer text that runs past the model's maximum sequence length"] * 60),
)


class ImportError_(ValueError):  # noqa: N801 - the builtin ImportError means something else
    """The path cannot be imported (not found, a hub id, unsupported model, or its graph drifted)."""


def detect_task(path: str | Path) -> tuple[str, str]:
    """(task, source kind) of ``path``: kind is ``sentence-transformers``, ``transformers`` or ``onnx``.

    Raises:
        ImportError_: the path does not exist (a hub id gets its own message) or is not a model Kiln
            can import.
    """
    p = Path(path)
    if not p.exists():
        looks_like_hub_id = str(path).count("/") == 1 and not str(path).startswith((".", "/", "~"))
        hint = (
            f"{str(path)!r} looks like a Hugging Face Hub id, but Kiln imports local directories only and "
            "never downloads. Save the model once where it is available, e.g. "
            f"`SentenceTransformer({str(path)!r}).save_pretrained('my-model')` (or "
            "`AutoModel...from_pretrained(...).save_pretrained('my-model')` plus the tokenizer's or "
            "processor's `save_pretrained('my-model')`), then `kiln import my-model --name NAME`."
            if looks_like_hub_id
            else "give a save_pretrained directory or an .onnx file"
        )
        raise ImportError_(f"no such file or directory: {str(path)!r}; {hint}")
    if p.is_file():
        if p.suffix.lower() == ".onnx":
            return "onnx", "onnx"
        raise ImportError_(f"{p} is a file but not an .onnx graph; give an .onnx file or a model directory")
    if (p / "modules.json").is_file():
        return "embedding", "sentence-transformers"
    config = p / "config.json"
    if not config.is_file():
        raise ImportError_(
            f"{p} has neither modules.json (sentence-transformers) nor config.json (transformers): "
            "not a save_pretrained directory"
        )
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise ImportError_(f"{config} is not readable JSON: {exc}") from None
    for arch in architectures:
        if arch.endswith("ForSequenceClassification"):
            return "text-classification", "transformers"
        if arch.endswith("ForImageClassification"):
            return "image-classification", "transformers"
        if arch.endswith("Model") and "Head" not in arch:  # a base model, not e.g. GPT2LMHeadModel
            return "embedding", "transformers"
    raise ImportError_(
        f"{config} names architectures {architectures}; Kiln imports *ForSequenceClassification "
        "(text-classification), *ForImageClassification (image-classification) and base *Model "
        "feature extractors (embedding, mean pooled)"
    )


def import_model(
    path: str | Path,
    name: str,
    task: str | None = None,
    eval_data: str | Path | None = None,
    log: Callable[[str], None] = print,
):
    """Import ``path`` into the model store as ``name`` (a new version); returns the artifact.

    Raises:
        ImportError_: see :func:`detect_task`; a ``task`` the model does not have; the parity gate
            discarded the graph; malformed ``eval_data``.
    """
    from kiln.artifacts import save_artifact

    detected, kind = detect_task(path)
    if task is not None and task not in TASKS:
        raise ImportError_(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    # a sequence classifier's encoder also serves as a (mean-pooled) embedding model
    base_as_embedding = kind == "transformers" and task == "embedding" and detected == "text-classification"
    if task is not None and task != detected and not base_as_embedding:
        raise ImportError_(f"{path} is a {kind} {detected} model; it cannot be imported as {task}")
    task = task or detected
    if eval_data is not None and task not in ("text-classification", "image-classification"):
        raise ImportError_("--eval-data measures accuracy, so it applies to classifiers only")
    rows = _read_eval_data(Path(eval_data), task) if eval_data is not None else []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-import-") as tmp, _offline():
        work = Path(tmp)
        if kind == "onnx":
            manifest, weights = _onnx_file(Path(path), work), None
        else:
            importer = {
                "embedding": _embedding,
                "text-classification": _text_classifier,
                "image-classification": _image_classifier,
            }[task]
            manifest = importer(Path(path), kind, work, rows, log)
            weights = work / "weights.safetensors"
            _keep_source_files(Path(path), work / SOURCE_DIR)
        manifest["exports"]["onnx"]["seconds"] = round(time.perf_counter() - t0, 2)
        manifest["source"] = {"path": str(Path(path).resolve()), "kind": kind, **manifest.get("source", {})}
        art = save_artifact(name, weights, {"task": task, **manifest})
        for item in work.iterdir():
            if item.name != "weights.safetensors":
                shutil.move(str(item), art.path / item.name)
    log(f"imported {path} as {art.tag} ({task}, {kind}); parity: {manifest['exports']['onnx'].get('parity')}")
    return art


# --- sources ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _offline():
    """Hub access off while the libraries load (a path never triggers a download)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _keep_source_files(src: Path, dest: Path) -> None:
    for f in sorted(src.rglob("*")):
        if f.is_file() and f.suffix in _KEPT_SUFFIXES and not any(p.startswith(".") for p in f.parts):
            target = dest / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)


def _read_eval_data(path: Path, task: str) -> list[dict[str, Any]]:
    key = "text" if task == "text-classification" else "image"
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportError_(f"--eval-data {path} is unreadable: {exc}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ImportError_(f"--eval-data {path}:{i} is not JSON: {exc}") from None
        if not isinstance(row, dict) or key not in row or "label" not in row:
            raise ImportError_(f"--eval-data {path}:{i} needs {key!r} and 'label' (a label name or index)")
        if key == "image":
            row = {**row, "image": str((path.parent / row["image"]).resolve())}
        rows.append(row)
    if not rows:
        raise ImportError_(f"--eval-data {path} holds no rows")
    return rows


def _save_weights(model, dest: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(dest))  # handles tied weights; the original's weights, for the record


# --- export + parity ------------------------------------------------------------------------------------


def _export(wrapper, example: dict[str, Any], path: Path, outputs: list[str], dynamic: dict[str, tuple]):
    """torch.onnx.export (dynamo, as :func:`export.onnx.export_onnx`) with the given dynamic dims."""
    import torch

    dims = {n: {d: torch.export.Dim.DYNAMIC for d in dynamic[n]} for n in example}
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper.eval(),
                (),
                str(path),
                kwargs=dict(example),  # graph inputs named as forward's arguments
                output_names=outputs,
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                dynamic_shapes=dims,
            )
    except Exception as err:
        raise ImportError_(f"ONNX export of {type(wrapper).__name__} failed: {err}") from err


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def parity_gate(task: str, served: np.ndarray, original: np.ndarray) -> dict[str, Any]:
    """The verdict on an exported graph: ``{"passed", "reason", ...figures}``; NaN never passes."""
    served, original = np.asarray(served, np.float64), np.asarray(original, np.float64)
    if served.shape != original.shape:
        return {"passed": False, "reason": f"shapes differ: graph {served.shape}, original {original.shape}"}
    diff = float(np.abs(served - original).max())
    if task == "embedding":
        cos = float(cosine_rows(served, original).min())
        passed = cos >= MIN_COSINE  # False for NaN
        reason = "" if passed else f"min cosine {cos:.6f} < {MIN_COSINE} against the original"
        return {
            "passed": passed,
            "reason": reason,
            "min_cosine": cos,
            "max_abs_diff": diff,
            "min_cosine_required": MIN_COSINE,
            "samples": len(served),
        }
    passed = diff <= LOGITS_ATOL
    reason = "" if passed else f"max |Δ logits| {diff:.3g} > {LOGITS_ATOL:g} against the original"
    return {
        "passed": passed,
        "reason": reason,
        "max_abs_diff": diff,
        "atol": LOGITS_ATOL,
        "samples": len(served),
    }


def _gate(task: str, served: np.ndarray, original: np.ndarray, graph: Path, log) -> dict[str, Any]:
    verdict = parity_gate(task, served, original)
    if not verdict["passed"]:
        graph.unlink(missing_ok=True)
        raise ImportError_(
            f"parity gate: the exported graph is discarded, nothing was stored: {verdict['reason']}"
        )
    figures = {k: v for k, v in verdict.items() if k != "reason"}
    log(f"parity: {figures}")
    return verdict


def _text_spec(tokenizer, max_length: int, inputs: list[str], outputs: dict[str, str]) -> dict[str, Any]:
    return {
        "tokenizer": TOKENIZER_FILE,
        "max_length": int(max_length),
        "inputs": inputs,
        "pad_id": int(tokenizer.pad_token_id or 0),
        "outputs": outputs,
    }


def _write_tokenizer(tokenizer, work: Path) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ImportError_(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer; Kiln serves fast tokenizers "
            "(tokenizer.json). Save the model with its fast tokenizer (AutoTokenizer(..., use_fast=True))."
        )
    (work / TOKENIZER_FILE).write_text(tokenizer.backend_tokenizer.to_str())


def _max_length(tokenizer, config, declared: int | None = None) -> int:
    limits = [declared, getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    if not usable:
        raise ImportError_("the model declares no maximum sequence length (max_position_embeddings)")
    return min(usable)


def _graph_inputs(model) -> list[str]:
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params or "attention_mask" not in params:
        raise ImportError_(f"{type(model).__name__} does not take input_ids and attention_mask")
    return [n for n in TEXT_INPUTS if n in params]


def _feeds(input_ids, attention_mask, token_type_ids) -> dict[str, Any]:
    """The keyword arguments of a transformers text model (token_type_ids only when it takes them)."""
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        feeds["token_type_ids"] = token_type_ids
    return feeds


def _texts_tensors(tok: TextTokenizer, texts: list[str]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(v) for k, v in tok(texts).items()}


def _served_text(path: Path, tok: TextTokenizer, texts: list[str], output: str) -> np.ndarray:
    """What serving computes: Kiln's tokenizer, then onnxruntime on the graph (in small batches)."""
    session = _session(path)
    out = [session.run([output], tok(texts[i : i + 8]))[0] for i in range(0, len(texts), 8)]
    return np.concatenate(out)


# --- tasks -------------------------------------------------------------------------------------------------


def _embedding(src: Path, kind: str, work: Path, rows, log) -> dict[str, Any]:
    import torch
    from torch import nn

    texts = list(_PARITY_TEXTS)
    if kind == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(src), device="cpu", local_files_only=True).eval()
        first = st[0]
        hf_model, tokenizer = first.auto_model, first.tokenizer
        max_length = _max_length(tokenizer, hf_model.config, st.max_seq_length)
        pooling, normalize = _st_head(src)

        class Wrapper(nn.Module):  # the whole SentenceTransformer: its own pooling, dense, normalize
            def __init__(self, st):
                super().__init__()
                self.st = st

            def forward(self, input_ids, attention_mask, token_type_ids=None):
                return self.st(_feeds(input_ids, attention_mask, token_type_ids))["sentence_embedding"]

        def original(texts):
            return st.encode(texts, batch_size=8, convert_to_numpy=True)

        architecture = type(hf_model).__name__
    else:
        from transformers import AutoModel, AutoTokenizer

        hf_model = AutoModel.from_pretrained(str(src), local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        max_length = _max_length(tokenizer, hf_model.config)
        pooling, normalize = "mean", False
        architecture = type(hf_model).__name__

        class Wrapper(nn.Module):  # mean of the last hidden state over the attention mask
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, token_type_ids=None):
                hidden = self.model(**_feeds(input_ids, attention_mask, token_type_ids)).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

        def original(texts):
            enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.no_grad():
                return Wrapper(hf_model)(**{k: enc[k] for k in names}).numpy()

    names = _graph_inputs(hf_model)
    _write_tokenizer(tokenizer, work)
    tok = TextTokenizer(work / TOKENIZER_FILE, max_length, names, int(tokenizer.pad_token_id or 0))
    wrapper = _wrap(Wrapper(st if kind == "sentence-transformers" else hf_model))
    graph = work / GRAPH
    log(f"exporting {architecture} ({kind}, {pooling} pooling{', normalized' if normalize else ''}) to ONNX")
    _export(
        wrapper, _texts_tensors(tok, texts[:2]), graph, ["sentence_embedding"], dict.fromkeys(names, (0, 1))
    )
    with torch.no_grad():
        reference = original(texts)
    verdict = _gate("embedding", _served_text(graph, tok, texts, "sentence_embedding"), reference, graph, log)
    dim = int(reference.shape[1])
    _save_weights(hf_model, work / "weights.safetensors")
    return {
        "source": {"architecture": architecture},
        "inputs": [{"name": n, "datatype": "INT64", "shape": [-1, -1]} for n in names],
        "outputs": [{"name": "sentence_embedding", "datatype": "FP32", "shape": [-1, dim]}],
        "text": _text_spec(tokenizer, max_length, names, {"sentence_embedding": "embedding"}),
        "embedding": {"modality": "text", "dim": dim, "pooling": pooling, "normalize": normalize},
        "exports": {"onnx": {"file": GRAPH, "backend": "onnxruntime", "opset": OPSET, "parity": verdict}},
    }


def _st_head(src: Path) -> tuple[str, bool]:
    """The sentence-transformers model's pooling mode and whether it ends in Normalize (modules.json)."""
    modules = json.loads((src / "modules.json").read_text())
    pooling = "none"
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            cfg = json.loads((src / module.get("path", "") / "config.json").read_text())
            modes = [
                k.removeprefix("pooling_mode_").removesuffix("_tokens")
                for k, v in cfg.items()
                if k.startswith("pooling_mode_") and v is True
            ]
            pooling = "+".join(modes) or str(cfg.get("pooling_mode", "none"))
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    return pooling, normalize


def _text_classifier(src: Path, kind: str, work: Path, rows, log) -> dict[str, Any]:
    import torch
    from torch import nn
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(src), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    max_length = _max_length(tokenizer, model.config)
    names = _graph_inputs(model)
    labels = _labels(model.config)

    class Wrapper(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            return self.model(**_feeds(input_ids, attention_mask, token_type_ids)).logits

    _write_tokenizer(tokenizer, work)
    tok = TextTokenizer(work / TOKENIZER_FILE, max_length, names, int(tokenizer.pad_token_id or 0))
    graph = work / GRAPH
    log(f"exporting {type(model).__name__} ({len(labels)} labels) to ONNX")
    _export(
        _wrap(Wrapper(model)),
        _texts_tensors(tok, list(_PARITY_TEXTS[:2])),
        graph,
        ["logits"],
        dict.fromkeys(names, (0, 1)),
    )
    texts = list(_PARITY_TEXTS) + [str(r["text"]) for r in rows]

    def original(texts):
        out = []
        for i in range(0, len(texts), 8):
            enc = tokenizer(
                texts[i : i + 8], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            with torch.no_grad():
                out.append(model(**enc).logits.numpy())
        return np.concatenate(out)

    reference, served = original(texts), _served_text(graph, tok, texts, "logits")
    verdict = _gate("text-classification", served, reference, graph, log)
    n = len(_PARITY_TEXTS)
    metrics = _accuracy(rows, labels, served[n:], reference[n:]) if rows else {}
    _save_weights(model, work / "weights.safetensors")
    return {
        "source": {"architecture": type(model).__name__},
        "labels": labels,
        "metrics": metrics,
        "inputs": [{"name": n, "datatype": "INT64", "shape": [-1, -1]} for n in names],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, len(labels)]}],
        "text": _text_spec(tokenizer, max_length, names, {"logits": "logits"}),
        "exports": {"onnx": {"file": GRAPH, "backend": "onnxruntime", "opset": OPSET, "parity": verdict}},
    }


def _image_classifier(src: Path, kind: str, work: Path, rows, log) -> dict[str, Any]:
    import torch
    from PIL import Image
    from torch import nn
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from kiln.imaging import resize_bilinear

    model = AutoModelForImageClassification.from_pretrained(str(src), local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(str(src), local_files_only=True)
    labels = _labels(model.config)
    size = processor.size
    if "height" in size:
        hw = (int(size["height"]), int(size["width"]))
    elif "shortest_edge" in size and getattr(processor, "crop_size", None):
        hw = (int(processor.crop_size["height"]), int(processor.crop_size["width"]))
    else:
        raise ImportError_(f"image processor size {size} is not supported; Kiln needs height and width")
    channels = int(getattr(model.config, "num_channels", 3))
    rescale = float(processor.rescale_factor) * 255.0 if processor.do_rescale else 255.0
    mean = np.asarray(processor.image_mean if processor.do_normalize else [0.0] * channels, np.float32)
    std = np.asarray(processor.image_std if processor.do_normalize else [1.0] * channels, np.float32)

    class Wrapper(nn.Module):  # pixels in [0, 1] → the processor's rescale and normalisation → logits
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.register_buffer("scale", torch.tensor(rescale))
            self.register_buffer("mean", torch.from_numpy(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.from_numpy(std).view(1, -1, 1, 1))

        def forward(self, pixels):
            return self.model(pixel_values=(pixels * self.scale - self.mean) / self.std).logits

    graph = work / GRAPH
    log(f"exporting {type(model).__name__} ({len(labels)} labels, {hw[0]}x{hw[1]}) to ONNX")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*hw, channels), dtype=np.uint8) for _ in range(4)]
    images += [
        np.asarray(Image.open(r["image"]).convert("RGB").resize(hw[::-1], Image.BILINEAR)) for r in rows
    ]
    x = np.stack([img.astype(np.float32) / 255.0 for img in images]).transpose(0, 3, 1, 2)
    _export(_wrap(Wrapper(model)), {"pixels": torch.from_numpy(x[:2])}, graph, ["logits"], {"pixels": (0,)})
    with torch.no_grad():
        enc = processor(images=[Image.fromarray(img) for img in images], return_tensors="pt")
        reference = model(**enc).logits.numpy()
    x = resize_bilinear(x, hw)  # the serving path (identity at the processor's size)
    served = _session(graph).run(["logits"], {"pixels": x})[0]
    verdict = _gate("image-classification", served, reference, graph, log)
    metrics = _accuracy(rows, labels, served[4:], reference[4:]) if rows else {}
    _save_weights(model, work / "weights.safetensors")
    return {
        "source": {"architecture": type(model).__name__},
        "labels": labels,
        "metrics": metrics,
        "preprocess": {
            "size": list(hw),
            "channels": channels,
            "mean": mean.tolist(),
            "std": std.tolist(),
            "normalisation": "inside the graph: it takes pixels in [0, 1]",
        },
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, channels, *hw]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, len(labels)]}],
        "exports": {"onnx": {"file": GRAPH, "backend": "onnxruntime", "opset": OPSET, "parity": verdict}},
    }


def _onnx_file(src: Path, work: Path) -> dict[str, Any]:
    """Store the graph unchanged; its tensors are read from it when it is served (as a Triton repository
    model without config.pbtxt is auto-completed: :class:`serving.tasks.onnx_graph.OnnxModel`)."""
    try:
        _session(src)  # onnxruntime must load it: a broken file is refused now, not at serve time
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception classes
        raise ImportError_(f"{src} does not load in onnxruntime: {exc}") from None
    shutil.copyfile(src, work / GRAPH)
    entry = {"file": GRAPH, "backend": "onnxruntime", "parity": "stored unchanged (no conversion to check)"}
    return {"exports": {"onnx": entry}}


def _labels(config) -> list[str]:
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    return [id2label.get(i, str(i)) for i in range(int(config.num_labels))]


def _accuracy(rows, labels: list[str], served: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    truth = []
    for r in rows:
        label = r["label"]
        if isinstance(label, int) and 0 <= label < len(labels):
            truth.append(label)
        elif str(label) in labels:
            truth.append(labels.index(str(label)))
        else:
            raise ImportError_(f"--eval-data label {label!r} is not one of the model's labels {labels}")
    truth = np.asarray(truth)
    acc = float((served.argmax(1) == truth).mean())
    ref = float((reference.argmax(1) == truth).mean())
    return {"eval_accuracy": acc, "eval_accuracy_original": ref, "eval_samples": len(rows)}


def _wrap(module):
    """The module that is exported (a seam for the parity-gate test, which wraps it with a drift)."""
    return module
