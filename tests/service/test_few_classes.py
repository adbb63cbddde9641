"""A user's first model often has two or three classes: trained on a folder of 40x40 RGB JPEGs,
exported and served by a real server process, every default request (no top_k) is answered
with all of its classes, best first, as raw bodies and as multipart uploads."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.service.servers import post, running_server
from training.data import ImageSet

CLASSES = {0: "T-shirt", 1: "Trouser", 8: "Bag"}


def jpeg(pixels: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").resize((40, 40)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("n_classes", [2, 3])
def test_models_with_few_classes_answer_default_requests(tmp_path: Path, fmnist_test: ImageSet,
                                                         n_classes: int) -> None:
    chosen = dict(list(CLASSES.items())[:n_classes])
    data, held_out = tmp_path / "data", []
    labels = fmnist_test.labels.tolist()
    for index, name in chosen.items():
        rows = [i for i, y in enumerate(labels) if y == index][:45]
        (data / name).mkdir(parents=True)
        for i in rows[:40]:
            (data / name / f"{i}.jpg").write_bytes(jpeg(fmnist_test.images[i, 0].numpy()))
        held_out += [jpeg(fmnist_test.images[i, 0].numpy()) for i in rows[40:]]
    run = [sys.executable, "-m", "training"]
    subprocess.run([*run, "train", "--data", str(data), "--epochs", "2", "--batch-size", "32",
                    "--out", str(tmp_path / "run"), "--threads", "2"], check=True,
                   capture_output=True)
    model = tmp_path / "few.onnx"
    subprocess.run([*run, "export", str(tmp_path / "run"), "--out", str(model)], check=True,
                   capture_output=True)
    boundary = "fewclasses"
    multipart = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.jpg\""
        f"\r\nContent-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n"
        for i, image in enumerate(held_out)) + f"--{boundary}--\r\n".encode()
    with running_server(model, tmp_path, 1, {}) as (_, port):
        answers = [post(port, image, "image/jpeg") for image in held_out[:3]]
        answers.append(post(port, multipart, f"multipart/form-data; boundary={boundary}"))
    for status, body in answers:
        assert status == 200, body
        for result in json.loads(body)["results"]:
            predictions = result["predictions"]
            assert sorted(p["label"] for p in predictions) == sorted(chosen.values())
            scores = [p["score"] for p in predictions]
            assert scores == sorted(scores, reverse=True)
    assert len(json.loads(answers[-1][1])["results"]) == len(held_out)
