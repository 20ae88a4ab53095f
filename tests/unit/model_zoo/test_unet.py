"""Registry-driven tests of the diffusion UNet variants: shapes, gradients, conditioning, config, ONNX."""

import json

import numpy as np
import onnx
import pytest
import torch

from export.onnx import export_onnx, max_abs_diff
from model_zoo import create_model, list_models, model_defaults

MODELS = list_models("unet_*")
# Two levels (16x16 and 8x8, attention at 8x8) with few channels: the same code paths as the defaults.
TINY = {"block_out_channels": (8, 16), "norm_num_groups": 4, "attention_head_dim": 8}


def _inputs(batch: int, seed: int = 0, label: int | None = None) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 1, 16, 16, generator=gen)
    timestep = torch.randint(0, 1000, (batch,), generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen) if label is None else torch.full((batch,), label)
    return sample, timestep, labels


def test_variants_registered():
    assert "unet_digits16" in MODELS


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_shapes(name, batch):
    torch.manual_seed(0)
    model = create_model(name, **TINY).eval()
    with torch.no_grad():
        out = model(*_inputs(batch))
    assert isinstance(out, torch.Tensor) and out.shape == (batch, 1, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_default_size(name):
    model = create_model(name)
    assert model.null_label == model_defaults(name)["num_classes"] == 10
    assert sum(p.numel() for p in model.parameters()) < 2_000_000  # trains in minutes on 2 CPU cores


@pytest.mark.parametrize("name", MODELS)
def test_backward_finite(name):
    torch.manual_seed(0)
    model = create_model(name, **TINY)
    sample, timestep, labels = _inputs(3, seed=1)
    torch.nn.functional.mse_loss(model(sample, timestep, labels), torch.randn_like(sample)).backward()
    for pname, p in model.named_parameters():
        if pname.startswith("unet.class_embedding"):
            continue  # only the rows of the labels in the batch get a gradient, checked below
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    rows = model.unet.class_embedding.weight.grad.abs().sum(1) > 0
    assert rows.nonzero().flatten().tolist() == sorted(set(labels.tolist()))


@pytest.mark.parametrize("name", MODELS)
def test_labels_condition_the_output(name):
    torch.manual_seed(0)
    model = create_model(name, **TINY).eval()
    sample, timestep, _ = _inputs(2, seed=2)
    with torch.no_grad():
        outs = {label: model(sample, timestep, torch.full((2,), label)) for label in (0, 7, model.null_label)}
    assert torch.isfinite(outs[model.null_label]).all()  # the null label is a valid input
    for a, b in ((0, 7), (0, model.null_label), (7, model.null_label)):
        assert (outs[a] - outs[b]).abs().max() > 1e-4, (a, b)
    with pytest.raises(IndexError):
        model(sample, timestep, torch.full((2,), model.null_label + 1))


@pytest.mark.parametrize("name", MODELS)
def test_config_round_trip(name):
    torch.manual_seed(0)
    model = create_model(name, **TINY)
    cfg = json.loads(json.dumps(model.kiln_config))  # the config must survive JSON (tuples become lists)
    rebuilt = create_model(cfg["architecture"], **cfg["args"])
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(*_inputs(2, seed=3)), model.eval()(*_inputs(2, seed=3)))
    defaults = json.loads(json.dumps(create_model(name).kiln_config))["args"]
    assert defaults == json.loads(json.dumps(model_defaults(name)))


def test_bad_options_raise():
    with pytest.raises(ValueError, match="divisible"):
        create_model("unet_digits16", image_size=18)
    with pytest.raises(ValueError, match="norm_num_groups"):
        create_model("unet_digits16", norm_num_groups=5)
    with pytest.raises(ValueError, match="expected sample"):
        create_model("unet_digits16", **TINY)(
            torch.zeros(1, 1, 8, 8), torch.zeros(1).long(), torch.zeros(1).long()
        )


@pytest.mark.parametrize("name", MODELS)
def test_export_parity_dynamic_batch(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, **TINY)
    # A batch-1 example: the batch must stay symbolic even when traced at size 1.
    path = export_onnx(
        model,
        dict(zip(("sample", "timestep", "label"), _inputs(1), strict=True)),
        tmp_path / f"{name}.onnx",
        output_names=["noise"],
    )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["sample", "timestep", "label"]
    assert [o.name for o in graph.graph.output] == ["noise"]
    for batch in (1, 3):
        sample, timestep, labels = _inputs(batch, seed=4 + batch)
        labels[0] = model.null_label
        inputs = {"sample": sample.numpy(), "timestep": timestep.numpy(), "label": labels.numpy()}
        assert inputs["timestep"].dtype == inputs["label"].dtype == np.int64
        assert max_abs_diff(model, path, inputs) < 1e-4
