"""The shipped photo model: EfficientNet-Lite0 with its ImageNet-1k weights, exported with its
1,000 class names, ImageNet normalisation inside the graph, and the evaluation preprocessing
ImageNet models are measured with (resize to cover 224 / 0.875 = 256, centre crop 224)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from service.imaging import PreprocessSpec
from training.efficientnet_lite import IMAGENET_MEAN, IMAGENET_STD, imagenet_labels, load_pretrained
from training.export import ModelInfo, export_onnx
from training.models import Normalize

IMAGE_SIZE = 224  # Lite0's training resolution
CROP_FRACTION = 0.875  # the reference evaluation's crop: 224 of 256


def imagenet_spec(image_size: int = IMAGE_SIZE) -> PreprocessSpec:
    return PreprocessSpec(image_size, image_size, 3, "bilinear", "in_graph", IMAGENET_MEAN,
                          IMAGENET_STD, resize="center_crop", crop_fraction=CROP_FRACTION)


def export_imagenet_lite0(out: Path, version: str = "1") -> float:
    """Export the ImageNet EfficientNet-Lite0 to ``out``; returns the ORT-vs-torch difference."""
    model = nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), load_pretrained(IMAGE_SIZE))
    info = ModelInfo("efficientnet_lite0_imagenet", version, "imagenet-1k")
    return export_onnx(model.eval(), imagenet_spec(), imagenet_labels(), out, info)
