"""Training configuration: one dataclass, each field with its unit and the reason for its default.

Checkpoints store it, so ``evaluate``, ``export`` and ``--resume`` rebuild exactly what trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    data: str = _f("fashion-mnist", "'fashion-mnist' or an image folder <root>/<class>/*")
    model: str = _f("seed_cnn", "model name from the registry (seed_cnn, resnet_small, "
                    "efficientnet_lite0)")
    out: str = _f("runs/train", "output folder for checkpoints, metrics and plots")
    epochs: int = _f(30, "passes over the training set; early stopping usually ends sooner")
    batch_size: int = _f(128, "images per step; 128 keeps 2 CPU cores busy, 32 is the classic")
    optimizer: str = _f("adam", "adam or sgd (with momentum)")
    lr: float = _f(1e-3, "peak learning rate; 1e-3 is Adam's well-tried default")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(0.0, "L2 penalty (decoupled for Adam, i.e. AdamW)")
    l1: float = _f(0.0, "L1 penalty on weights, added to the loss")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing in [0, 1)")
    schedule: str = _f("cosine", "learning-rate schedule: constant, cosine or onecycle")
    warmup_epochs: float = _f(0.5, "linear warm-up length in epochs; avoids early Adam blow-ups")
    augment: str = _f("light", "augmentation preset: seed, light or none")
    val_fraction: float = _f(0.1, "share of training data held out for validation, seeded; 0 "
                             "trains on all of it for --epochs and keeps the last epoch")
    patience: int = _f(5, "stop after this many epochs without a better validation accuracy "
                  "(or an equal one with a lower loss)")
    seed: int = _f(0, "seed for split, shuffling, augmentation and initialisation")
    amp: str = _f("auto", "mixed precision: auto (bf16 where supported), bf16, fp16 or off")
    interpolation: str = _f("bilinear", "resize filter for folder images; stored in the model")
    image_size: int = _f(0, "square input size for folder data; 0 picks it from the images")
    resize: str = _f("stretch", "stretch (to the input size) or center_crop (keep the aspect "
                     "ratio, cut out the centre); stored in the model, used by serving too")
    channels: int = _f(0, "1 (grey) or 3 (RGB) for folder data; 0 picks it from the images")
    pretrained: bool = _f(False, "start from ImageNet weights (efficientnet_lite0): a new head, "
                          "the backbone frozen for --freeze-epochs, then slower")
    freeze_epochs: int = _f(3, "with --pretrained: epochs in which only the new head learns")
    backbone_lr_scale: float = _f(0.1, "with --pretrained: the backbone's learning rate once "
                                  "thawed, relative to --lr; small, so ImageNet features move "
                                  "slowly")
    backbone_bn: str = _f("frozen", "with --pretrained: the backbone's batch norm: frozen "
                          "(ImageNet statistics) or adapt (following the training batches once the "
                          "backbone learns)")
    ema_decay: float = _f(0.0, "keep an exponential moving average of the weights (decay per "
                          "step, for example 0.98); it is validated, kept and exported. 0 = off")
    limit: int = _f(0, "use only the first N images of each split (0 = all); for quick runs")
    threads: int = _f(0, "CPU threads for torch; 0 = all available cores")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# A preset that trains a real model in a few seconds on CPU, for tests and smoke runs.
TINY = {"epochs": 1, "batch_size": 64, "limit": 2000, "augment": "light", "patience": 1}

# Fine-tuning ImageNet EfficientNet-Lite0: the recipe chosen on dev images at 50 images per class
# (bench/learning_curve.py, method finetune; 85.9% on the test images, the README's learning
# curve). With --pretrained, each is the default unless the command line sets it.
FINETUNE: dict[str, Any] = {
    "model": "efficientnet_lite0",  # the one model with ImageNet weights here
    "epochs": 40,  # of the cosine schedule; 30 gave 85.0%, 40 85.4% on dev images
    "batch_size": 32,  # 16 steps an epoch at 500 images, where 128 would give 4
    "freeze_epochs": 2,  # the new head alone first, so its random start moves no features
    "backbone_lr_scale": 0.3,  # 0.1 learnt too slowly in 40 epochs (82.5% against 84.5%)
    "backbone_bn": "adapt",  # Fashion-MNIST's statistics are not ImageNet's (+0.6 points)
    "label_smoothing": 0.1,
    "val_fraction": 0.0,  # with tens of images a class, every image is worth more in training
    # than in choosing an epoch: the whole schedule runs and the last epoch is kept
}
FINETUNE_IMAGE_SIZE = {"cpu": 96, "cuda": 224}  # 224 is ImageNet's; 96 keeps a CPU run minutes


def finetune_defaults(cuda: bool) -> dict[str, Any]:
    """The fine-tuning recipe, with the input size for the device that trains."""
    return {**FINETUNE, "image_size": FINETUNE_IMAGE_SIZE["cuda" if cuda else "cpu"]}
