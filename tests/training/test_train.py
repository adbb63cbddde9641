from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import train as train_module
from training.config import TINY, TrainConfig
from training.evaluate import history_figure, plot_history
from training.train import is_better, lr_factor, model_from_checkpoint, train, weights_digest


def _cfg(out: Path, **kw: object) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, "limit": 600, "out": str(out), "threads": 1, **kw})


def test_tiny_run_writes_metrics_and_checkpoints(tiny_run: Path) -> None:
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"} <= set(rows[0])
    assert rows[0]["val_acc"] > 0.4  # one short epoch on real data learns well above chance
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(tiny_run / name, weights_only=False)
        assert {"model", "optimizer", "scheduler", "config", "classes", "spec"} <= set(ckpt)
        assert ckpt["config"]["model"] == "seed_cnn"


def test_same_seed_same_weights(tmp_path: Path) -> None:
    train(_cfg(tmp_path / "a"))
    train(_cfg(tmp_path / "b"))
    train(_cfg(tmp_path / "c", seed=1))
    a, b, c = (torch.load(tmp_path / x / "last.pt", weights_only=False)["model"] for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    train(_cfg(tmp_path, epochs=1))
    result = train(_cfg(tmp_path, epochs=2, patience=5), resume=tmp_path)
    assert result.epochs_run == 1
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]


def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = train_module.random_affine

    def interrupt_late(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 12:  # after the first epoch's 8 steps
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "random_affine", interrupt_late)
    result = train(_cfg(tmp_path, epochs=3, patience=5))
    assert result.interrupted
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1
    monkeypatch.setattr(train_module, "random_affine", real)
    resumed = train(_cfg(tmp_path, epochs=2, patience=5), resume=tmp_path)
    assert not resumed.interrupted and resumed.epochs_run == 1


def test_early_stopping(tmp_path: Path) -> None:
    # Learning rate 0 never improves validation accuracy after the first epoch.
    result = train(_cfg(tmp_path, epochs=6, patience=2, lr=0.0, schedule="constant",
                        warmup_epochs=0.0))
    assert result.epochs_run == 3


def test_without_validation_images_every_epoch_runs_and_the_last_is_kept(tmp_path: Path) -> None:
    # Learning rate 0 would stop at epoch 3 with validation images (as above); without them
    # there is nothing to stop on, and best.pt is the last epoch, not the first.
    result = train(_cfg(tmp_path, epochs=4, patience=1, lr=0.0, schedule="constant",
                        warmup_epochs=0.0, val_fraction=0.0))
    assert result.epochs_run == 4
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["epoch"] == 4
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_loss"] is None is r["val_acc"] for r in rows)  # nothing to validate on
    assert result.best_val_acc is None
    fig = history_figure(rows)  # the training curves alone, no empty validation lines
    assert [[line.get_label() for line in ax.get_lines()] for ax in fig.axes] == [["train"]] * 2
    plot_history(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_sgd_l1_label_smoothing_onecycle_run(tmp_path: Path) -> None:
    result = train(_cfg(tmp_path, optimizer="sgd", lr=0.05, l1=1e-6, label_smoothing=0.1,
                        schedule="onecycle", augment="seed", weight_decay=1e-4))
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert result.epochs_run == 1 and 0 < row["train_loss"] < 10 and row["lr"] >= 0


@pytest.mark.parametrize("kind", ["constant", "cosine", "onecycle"])
def test_schedules_warm_up_and_stay_in_range(kind: str) -> None:
    factors = [lr_factor(s, 100, 10, kind) for s in range(100)]
    assert factors[0] == pytest.approx(0.1 if kind != "onecycle" else 1 / 30)
    assert all(0 <= f <= 1 for f in factors)
    assert max(factors) == pytest.approx(1.0)
    if kind != "constant":
        assert factors[-1] < 0.01


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, 10, 0, "step")


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", "-m", "training", "train", "--tiny", "--limit", "800",
           "--epochs", "2", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [(tmp_path / f"weights_rank{r}.sha256").read_text().strip() for r in (0, 1)]
    assert digests[0] == digests[1]
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    from training.train import model_from_checkpoint

    model, _ = model_from_checkpoint(ckpt)
    assert weights_digest(model) == digests[0]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_the_best_epoch_is_the_most_accurate_then_the_least_lossy() -> None:
    assert is_better(0.9, 0.5, 0.88, 0.1)  # accuracy first
    assert not is_better(0.88, 0.1, 0.9, 0.5)
    assert is_better(0.9, 0.4, 0.9, 0.5)  # a tie goes to the lower loss
    assert not is_better(0.9, 0.5, 0.9, 0.5)  # an exact repeat is no progress (early stopping)
    assert not is_better(0.9, float("nan"), 0.9, float("nan"))  # a NaN loss never wins a tie


def test_weight_average_is_what_is_kept_and_resume_carries_both(tmp_path: Path) -> None:
    train(_cfg(tmp_path, epochs=1, ema_decay=0.9))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert {"model", "trained", "ema_steps"} <= set(ckpt)
    averaged, trained = ckpt["model"], ckpt["trained"]
    assert set(averaged) == set(trained)
    assert not all(torch.equal(averaged[k], trained[k]) for k in averaged)
    model, _ = model_from_checkpoint(ckpt)  # the average is what evaluate and export load
    assert all(torch.equal(model.state_dict()[k], averaged[k]) for k in averaged)
    result = train(_cfg(tmp_path, epochs=2, patience=5, ema_decay=0.9), resume=tmp_path)
    assert result.epochs_run == 1
    resumed = torch.load(tmp_path / "last.pt", weights_only=False)
    assert resumed["ema_steps"] == 2 * ckpt["ema_steps"] > 0
    assert not all(torch.equal(resumed["model"][k], averaged[k]) for k in averaged)
    train(_cfg(tmp_path / "plain", epochs=1))
    with pytest.raises(ValueError, match="without --ema-decay"):
        train(_cfg(tmp_path / "plain", epochs=2, ema_decay=0.9), resume=tmp_path / "plain")
