"""The shipped photo model (EfficientNet-Lite0, ImageNet-1k) through HTTP: real photographs
from scikit-image get their ImageNet classes, with the resize-and-centre-crop preprocessing
that its metadata asks for."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data

from service.app import create_app
from service.config import REPO_MODELS, Settings

PHOTO_MODEL = REPO_MODELS / "efficientnet_lite0_imagenet.onnx"
CATS = {"Egyptian cat", "tabby, tabby cat", "tiger cat", "lynx, catamount",
        "Siamese cat, Siamese", "Persian cat"}


@pytest.fixture(scope="module")
def photo_client() -> Iterator[TestClient]:
    assert PHOTO_MODEL.is_file(), f"the shipped photo model {PHOTO_MODEL} is missing"
    settings = Settings(model_path=Path(PHOTO_MODEL), access_log=False, max_batch_size=8)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the photo model did not become ready"
            time.sleep(0.1)
        yield client


def classify(client: TestClient, photo: str) -> list[tuple[str, float]]:
    buf = io.BytesIO()
    Image.fromarray(getattr(data, photo)()).convert("RGB").save(buf, "JPEG", quality=95)
    resp = client.post("/v1/classify", content=buf.getvalue(),
                       headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 200, resp.text
    return [(p["label"], p["score"]) for p in resp.json()["results"][0]["predictions"]]


def test_a_cat_photo_is_a_cat(photo_client: TestClient) -> None:
    top5 = classify(photo_client, "chelsea")
    assert top5[0][0] == "Egyptian cat"
    assert {label for label, _ in top5[:3]} <= CATS  # every likely answer is a cat
    assert sum(score for label, score in top5 if label in CATS) > 0.8


def test_a_coffee_photo_is_an_espresso(photo_client: TestClient) -> None:
    top5 = classify(photo_client, "coffee")
    assert top5[0] == ("espresso", pytest.approx(0.85, abs=0.05))
    assert {"cup", "coffee mug"} <= {label for label, _ in top5}


def test_the_model_describes_itself(photo_client: TestClient) -> None:
    [model] = photo_client.get("/v1/models").json()["models"]
    assert model["name"] == "efficientnet_lite0_imagenet" and len(model["labels"]) == 1000
    prep = model["preprocessing"]
    assert (prep["height"], prep["width"], prep["channels"]) == (224, 224, 3)
    assert prep["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert (prep["resize"], prep["crop_fraction"]) == ("center_crop", 0.875)
