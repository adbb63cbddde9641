"""Transfer learning: start a registered backbone from ImageNet weights, train a new head.

For the first ``freeze_epochs`` only the new head learns (the backbone's parameters take no
gradient, which also makes those epochs cheap); then the backbone learns too, at
``backbone_lr_scale`` of the head's rate, so the pretrained features move slowly.

Batch norm, ``bn``: ``frozen`` keeps the backbone's ImageNet statistics throughout (evaluation
mode), right when batches are too small to estimate them; ``adapt`` keeps them while the backbone
is frozen, then lets them follow the training batches once it learns (training mode).
"""

from __future__ import annotations

import torch
from torch import nn

from training.efficientnet_lite import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetLite0,
    pretrained_weights_path,
)

PRETRAINED = ("efficientnet_lite0",)
BN_MODES = ("frozen", "adapt")
# With ``adapt``, how fast the running statistics follow the training batches: PyTorch's default,
# against EfficientNet's 0.01 (a lag of ~100 steps, several epochs of a small folder, during which
# validation would see statistics that match neither ImageNet nor the new images).
ADAPT_MOMENTUM = 0.1


def imagenet_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation the pretrained weights expect; grey images get the channel average."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)


def backbone_of(model: nn.Module) -> EfficientNetLite0:
    found = [m for m in model.modules() if isinstance(m, EfficientNetLite0)]
    if len(found) != 1:
        raise ValueError("no pretrained backbone in this model")
    return found[0]


class FineTune:
    """The head/backbone split of a model built with ``--pretrained``."""

    def __init__(self, model: nn.Module, freeze_epochs: int, backbone_lr_scale: float,
                 bn: str = "frozen") -> None:
        if bn not in BN_MODES:
            raise ValueError(f"batch-norm mode must be one of {BN_MODES}, not {bn!r}")
        self.net = backbone_of(model)
        self.bn = bn
        self.freeze_epochs = freeze_epochs
        self.backbone_lr_scale = backbone_lr_scale
        self.head = list(self.net._fc.parameters())
        head_ids = {id(p) for p in self.head}
        self.backbone = [p for p in self.net.parameters() if id(p) not in head_ids]

    def load_imagenet(self) -> None:
        """ImageNet weights into everything but the new head."""
        state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if sorted(missing) != ["_fc.bias", "_fc.weight"] or unexpected:
            raise ValueError(f"pretrained weights do not fit: missing {missing}, "
                             f"unexpected {unexpected}")

    def param_groups(self, lr: float) -> list[dict[str, object]]:
        return [{"params": self.head, "lr": lr},
                {"params": self.backbone, "lr": lr * self.backbone_lr_scale}]

    def start_epoch(self, epoch: int) -> None:
        """Call after ``model.train()``: freeze or thaw the backbone and its BN statistics."""
        frozen = epoch < self.freeze_epochs
        for p in self.backbone:
            p.requires_grad_(not frozen)
        for m in self.net.modules():
            if isinstance(m, nn.BatchNorm2d):
                if frozen or self.bn == "frozen":
                    m.eval()
                else:
                    m.momentum = ADAPT_MOMENTUM
