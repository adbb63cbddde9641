from __future__ import annotations

import pytest
import torch
from torch import nn

from training.models import REGISTRY, build_model, count_parameters, seed_cnn


def test_seed_cnn_is_the_classic_architecture() -> None:
    net = seed_cnn(3, 10, 32, 32)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Conv2d",
                     "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 32, (3, 3)), (32, 64, (3, 3)), (64, 128, (3, 3))]
    dense = [m for m in net if isinstance(m, nn.Linear)]
    assert [(d.out_features) for d in dense] == [128, 10]


@pytest.mark.parametrize(("channels", "height", "width"), [(1, 28, 28), (3, 32, 32), (3, 64, 48),
                                                           (1, 9, 13)])
@pytest.mark.parametrize("name", sorted(set(REGISTRY) - {"efficientnet_lite0"}))
def test_models_take_any_input_size(name: str, channels: int, height: int, width: int) -> None:
    model = build_model(name, channels, 5, height, width, [0.5] * channels, [0.25] * channels)
    model.eval()
    assert model(torch.rand(3, channels, height, width)).shape == (3, 5)


@pytest.mark.parametrize(("channels", "size"), [(1, 32), (3, 64)])
def test_efficientnet_lite0_takes_square_inputs(channels: int, size: int) -> None:
    model = build_model("efficientnet_lite0", channels, 5, size, size, [0.5] * channels,
                        [0.25] * channels).eval()
    assert model(torch.rand(2, channels, size, size)).shape == (2, 5)
    with pytest.raises(ValueError, match="square"):
        build_model("efficientnet_lite0", channels, 5, size, size + 8, [0.5] * channels,
                    [0.25] * channels)
    with pytest.raises(ValueError, match="image-size"):
        build_model("efficientnet_lite0", 1, 5, 28, 28, [0.5], [0.25])


def test_resnet_small_is_compact() -> None:
    assert count_parameters(build_model("resnet_small", 1, 10, 28, 28, [0.3], [0.35])) < 1_000_000


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match="resnet_small"):
        build_model("vgg", 1, 10, 28, 28, [0.3], [0.35])


def test_normalisation_is_inside_the_model() -> None:
    model = build_model("seed_cnn", 1, 10, 28, 28, [0.5], [0.25])
    x = torch.full((1, 1, 28, 28), 0.75)
    assert torch.allclose(model[0](x), torch.ones_like(x))
