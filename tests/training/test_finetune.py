"""Transfer learning end to end, small enough for CI: a folder of real Fashion-MNIST images,
EfficientNet-Lite0 from ImageNet weights with a new head (backbone frozen for the first epoch,
then slower), exported and checked against torch, as the README tells it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.config import TrainConfig
from training.finetune import ADAPT_MOMENTUM, FineTune
from training.models import build_model
from training.train import load_checkpoint


def test_pretrained_fine_tune_from_the_command_line(tmp_path: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    cmd = [sys.executable, "-m", "training"]
    for split, n in (("train", "16"), ("test", "10")):  # the recipe trains on every image:
        subprocess.run([*cmd, "write-folder", "--out", str(data / split), "--split", split,
                        "--classes", "Trouser,Bag,Sandal", "--per-class", n],
                       check=True, capture_output=True)  # evaluate reads data/test
    out = subprocess.run([*cmd, "train", "--data", str(data), "--model", "efficientnet_lite0",
                          "--pretrained", "--image-size", "64", "--epochs", "2",
                          "--freeze-epochs", "1", "--batch-size", "16", "--augment", "none",
                          "--threads", "2", "--out", str(run)],
                         check=True, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["epochs_run"] == 2
    ckpt = load_checkpoint(run)
    assert TrainConfig.from_dict(ckpt["config"]).pretrained
    evaluated = subprocess.run([*cmd, "evaluate", str(run)], check=True, capture_output=True,
                               text=True)
    assert "test set, 30 images" in evaluated.stdout and "accuracy" in evaluated.stdout.lower()
    out = subprocess.run([*cmd, "export", str(run), "--out", str(tmp_path / "ft.onnx")],
                         check=True, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["max_abs_diff_vs_torch"] <= 1e-5


def test_the_backbone_is_frozen_then_thawed_and_keeps_its_statistics() -> None:
    model = build_model("efficientnet_lite0", 1, 4, 64, 64, (0.449,), (0.226,))
    fine = FineTune(model, freeze_epochs=1, backbone_lr_scale=0.1)
    fine.load_imagenet()
    stem = fine.net._conv_stem.weight
    assert not torch.equal(stem, torch.zeros_like(stem))  # ImageNet weights, not random
    model.train()
    fine.start_epoch(0)
    assert not any(p.requires_grad for p in fine.backbone)
    assert all(p.requires_grad for p in fine.head)
    assert not fine.net._bn0.training  # ImageNet statistics kept
    fine.start_epoch(1)
    assert all(p.requires_grad for p in fine.backbone) and not fine.net._bn0.training
    groups = fine.param_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 4)  # grey in, as three channels


def test_batch_norm_can_follow_the_new_images_once_the_backbone_learns() -> None:
    model = build_model("efficientnet_lite0", 1, 4, 64, 64, (0.449,), (0.226,))
    fine = FineTune(model, freeze_epochs=1, backbone_lr_scale=0.1, bn="adapt")
    model.train()
    fine.start_epoch(0)
    assert not fine.net._bn0.training  # frozen with the backbone
    model.train()
    fine.start_epoch(1)
    assert fine.net._bn0.training and fine.net._bn0.momentum == ADAPT_MOMENTUM
    before = fine.net._bn0.running_mean.clone()
    model(torch.rand(4, 1, 64, 64))
    assert not torch.equal(before, fine.net._bn0.running_mean)
    with pytest.raises(ValueError, match="batch-norm mode"):
        FineTune(model, 1, 0.1, bn="sync")


def test_pretrained_defaults_to_the_recipe_that_won(monkeypatch: pytest.MonkeyPatch) -> None:
    """`train --pretrained` alone gets the fine-tuning recipe of the README's learning curve;
    every flag given still wins, and the input size follows the device."""
    from training.cli import build_parser, train_config
    from training.config import FINETUNE

    parse = build_parser().parse_args
    cfg = train_config(parse(["train", "--data", "d", "--pretrained", "--out", "r"]))
    assert cfg.model == "efficientnet_lite0" and cfg.image_size == 96
    assert {k: getattr(cfg, k) for k in FINETUNE} == FINETUNE
    assert (cfg.epochs, cfg.batch_size, cfg.freeze_epochs, cfg.backbone_lr_scale,
            cfg.label_smoothing, cfg.backbone_bn, cfg.val_fraction) == (
        40, 32, 2, 0.3, 0.1, "adapt", 0.0)
    mine = train_config(parse(["train", "--data", "d", "--pretrained", "--epochs", "5",
                               "--image-size", "128", "--val-fraction", "0.2"]))
    assert (mine.epochs, mine.image_size, mine.val_fraction, mine.batch_size) == (5, 128, 0.2, 32)
    plain = train_config(parse(["train", "--data", "d"]))
    assert (plain.model, plain.epochs, plain.val_fraction) == ("seed_cnn", 30, 0.1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_config(parse(["train", "--data", "d", "--pretrained"])).image_size == 224
