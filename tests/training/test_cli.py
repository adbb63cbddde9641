from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.cli import main


@pytest.mark.parametrize("sub", ["train", "evaluate", "export", "calibrate", "write-folder"])
def test_every_subcommand_has_help(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([sub, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_folder_user_story(tmp_path: Path) -> None:
    """write-folder, train on the folder, evaluate and export, as the README tells it."""
    data = tmp_path / "data"
    run = [sys.executable, "-m", "training"]
    subprocess.run([*run, "write-folder", "--out", str(data), "--classes", "Trouser,Bag,Sandal",
                    "--per-class", "60"], check=True, capture_output=True)
    out = subprocess.run([*run, "train", "--data", str(data), "--epochs", "2", "--batch-size",
                          "32", "--out", str(tmp_path / "run")], check=True, capture_output=True,
                         text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["epochs_run"] == 2
    subprocess.run([*run, "evaluate", str(tmp_path / "run")], check=True, capture_output=True)
    out = subprocess.run([*run, "export", str(tmp_path / "run"), "--out",
                          str(tmp_path / "m.onnx")], check=True, capture_output=True, text=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["max_abs_diff_vs_torch"] <= 1e-5
    # Calibrated by default, on the folder's own validation split (10% of 180 images).
    assert report["calibration"]["validation_images"] == 18 > 0 < report["calibration"][
        "temperature"]
    # The model card, from the run's evaluation and the file's metadata
    card = Path(report["model_card"]).read_text()
    assert Path(report["model_card"]) == tmp_path / "m.md"
    for part in ("# Model card: `m.onnx`", "| Data | the image folder", "| Training | adam",
                 "2 of 2 epochs", "| Test accuracy | **", "| Calibration | temperature scaling",
                 "## Intended use", "## Reproduce", "--epochs 2 --batch-size 32 --out",
                 "## Per-class results (test set)", "| Sandal |", "## Limits"):
        assert part in card, part
    facts = json.loads((tmp_path / "m.card.json").read_text())
    assert facts["evaluation"]["n"] == 18 and facts["parity"] == report["max_abs_diff_vs_torch"]


def test_bad_data_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_trained_on_every_image_exports_uncalibrated_and_says_why_it_cannot_calibrate(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, run, onnx = tmp_path / "data", tmp_path / "run", tmp_path / "m.onnx"
    assert main(["write-folder", "--out", str(data), "--classes", "Trouser,Bag",
                 "--per-class", "20"]) == 0
    assert main(["train", "--data", str(data), "--epochs", "2", "--batch-size", "8",
                 "--val-fraction", "0", "--threads", "1", "--out", str(run)]) == 0
    assert main(["evaluate", str(run)]) == 2
    assert "nothing to evaluate on" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(onnx)]) == 0  # calibrating is the default
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["calibration"] is None and onnx.is_file()
    assert main(["calibrate", str(onnx), "--data", str(data), "--val-fraction", "0"]) == 2
    assert "needs validation images" in capsys.readouterr().err
    assert main(["quantize", str(onnx), "--data", str(data), "--val-fraction", "0",
                 "--kind", "int8"]) == 2
    assert "no test or validation images" in capsys.readouterr().err
