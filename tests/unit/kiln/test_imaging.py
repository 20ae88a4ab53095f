import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln.imaging import resize_bilinear, to_model_input


@pytest.mark.parametrize(
    ("src", "dst"), [((8, 8), (32, 32)), ((28, 28), (32, 32)), ((40, 24), (32, 32)), ((5, 7), (3, 2))]
)
def test_resize_matches_torch_bilinear(src, dst):
    rng = np.random.default_rng(0)
    images = rng.random((3, *src), dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(images)[:, None], size=dst, mode="bilinear", align_corners=False)[
        :, 0
    ]
    np.testing.assert_allclose(resize_bilinear(images, dst), ref.numpy(), atol=1e-6)


def test_to_model_input_shape_and_identity():
    images = np.random.default_rng(1).random((2, 32, 32), dtype=np.float32)
    out = to_model_input(images, (32, 32))
    assert out.shape == (2, 1, 32, 32) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], images)


def test_to_model_input_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        to_model_input(np.zeros((32, 32)), (32, 32))
