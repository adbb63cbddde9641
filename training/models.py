"""Model registry: the seed CNN this project starts from, a stronger compact ResNet, and
EfficientNet-Lite0, which can start from ImageNet weights (``training.finetune``).

Every model is wrapped as ``Normalize -> network``: the network sees normalised pixels, while the
whole module (and so the exported ONNX graph) takes raw pixels in [0, 1]. Outputs are logits;
export appends the softmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

ModelFactory = Callable[[int, int, int, int], nn.Module]


class Normalize(nn.Module):
    """(x - mean) / std per channel, kept as buffers so it travels inside checkpoints and ONNX."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def seed_cnn(channels: int, num_classes: int, height: int, width: int) -> nn.Module:
    """The classic CNN: conv32-pool-conv64-pool-conv128-pool-dense128-dense N.

    3x3 convolutions keep their input size (padding 1) so any input of at least 8x8 works.
    """
    if height < 8 or width < 8:
        raise ValueError(f"seed_cnn needs inputs of at least 8x8, got {height}x{width}")
    flat = 128 * (height // 8) * (width // 8)
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv + batch-norm layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet_small(channels: int, num_classes: int, height: int, width: int) -> nn.Module:
    """A ResNet of three stages (32, 64, 128 channels, two blocks each): about 0.7M parameters."""
    del height, width  # global pooling makes it size-agnostic
    widths = (32, 64, 128)
    layers: list[nn.Module] = [
        nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    ]
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for block in range(2):
            layers.append(BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


class GreyToRGB(nn.Module):
    """One grey channel repeated into three, for backbones pretrained on colour photographs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


def efficientnet_lite0(channels: int, num_classes: int, height: int, width: int) -> nn.Module:
    """EfficientNet-Lite0 (``training.efficientnet_lite``) for square inputs; grey images are fed
    as three equal channels. ``--pretrained`` starts it from ImageNet weights."""
    from training.efficientnet_lite import EfficientNetLite0

    if height != width:
        raise ValueError(f"efficientnet_lite0 needs square inputs, got {height}x{width}")
    if height < 32:
        raise ValueError(f"efficientnet_lite0 needs inputs of at least 32x32 (96-224 suit it), "
                         f"got {height}x{width}; set --image-size")
    net = EfficientNetLite0(num_classes, image_size=height)
    return nn.Sequential(GreyToRGB(), net) if channels == 1 else net


REGISTRY: dict[str, ModelFactory] = {"seed_cnn": seed_cnn, "resnet_small": resnet_small,
                                     "efficientnet_lite0": efficientnet_lite0}


def build_model(
    name: str,
    channels: int,
    num_classes: int,
    height: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> nn.Sequential:
    """Build a registered model behind its input normalisation."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(REGISTRY)}")
    return nn.Sequential(Normalize(mean, std), REGISTRY[name](channels, num_classes, height, width))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
