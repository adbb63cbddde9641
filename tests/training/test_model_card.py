"""The shipped models' cards are rendered from their facts, not kept by hand."""

from __future__ import annotations

import shutil
from pathlib import Path

from training.model_card import CARD_SUFFIX, write_folder

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_models_readme_is_what_the_cards_render(tmp_path: Path) -> None:
    cards = sorted(MODELS.glob(f"*{CARD_SUFFIX}"))
    assert len(cards) == 3  # the seed CNN, its int8 variant, the photo model
    for card in cards:
        shutil.copy(card, tmp_path)
        onnx = card.name.removesuffix(CARD_SUFFIX) + ".onnx"
        (tmp_path / onnx).symlink_to(MODELS / onnx)
    readme = write_folder(tmp_path)
    assert readme.read_text() == (MODELS / "README.md").read_text()
    for card in cards:
        md = card.name.removesuffix(CARD_SUFFIX) + ".md"
        assert (tmp_path / md).read_text() == (MODELS / md).read_text()
    text = readme.read_text()
    assert text.index("`fashion_mnist_seed_cnn.onnx`") < text.index(
        "`fashion_mnist_seed_cnn.int8.onnx`") < text.index("`efficientnet_lite0_imagenet.onnx`")
    assert "int8: accuracy 92.45% on 10,000 images (fp32: 92.44%)" in text
