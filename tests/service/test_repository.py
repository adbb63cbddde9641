"""The model repository on disk: scanning, naming, conflicts, the version policy, and reading an
ONNX file's metadata without loading it."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnxruntime as ort
import pytest
from pydantic import ValidationError

from service.config import REPO_MODELS, Settings
from service.onnx_meta import NotOnnx, read_metadata_props
from service.repository import VersionPolicy, scan, version_key

SEED = REPO_MODELS / "fashion_mnist_seed_cnn.onnx"
PHOTO = REPO_MODELS / "efficientnet_lite0_imagenet.onnx"


def place(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


@pytest.mark.parametrize("path", [SEED, PHOTO], ids=["seed", "photo"])
def test_metadata_read_without_loading_equals_onnx_runtimes(path: Path) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert read_metadata_props(path) == dict(session.get_modelmeta().custom_metadata_map)


def test_metadata_of_a_truncated_or_foreign_file_is_refused(tmp_path: Path) -> None:
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(SEED.read_bytes()[:5000])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    text = tmp_path / "text.onnx"
    text.write_bytes(b"this is not a protobuf message at all")
    for path in (cut, empty, text):
        with pytest.raises(NotOnnx):
            read_metadata_props(path)


def test_layout_and_plain_files_are_found_with_their_names(tmp_path: Path) -> None:
    place(SEED, tmp_path / "clothes" / "1" / "model.onnx")
    place(SEED, tmp_path / "clothes" / "10" / "model.onnx")
    place(SEED, tmp_path / "clothes" / "2" / "model.onnx")
    place(PHOTO, tmp_path / "photo.onnx")  # named by its metadata
    (tmp_path / "clothes" / "notes").mkdir()  # not a version directory: ignored
    (tmp_path / "clothes" / "3").mkdir()  # a version directory without model.onnx
    (tmp_path / ".partial.onnx").write_bytes(b"half a copy")  # hidden: ignored
    (tmp_path / "README.txt").write_text("not a model")
    found, problems = scan(tmp_path)
    names = sorted((f.name, f.version) for f in found)
    assert names == [("clothes", "1"), ("clothes", "10"), ("clothes", "2"),
                     ("efficientnet_lite0_imagenet", "1")]
    clothes = next(f for f in found if f.version == "10")
    assert "the directory" in clothes.note and "fashion_mnist_seed_cnn" in clothes.note
    assert [(p.name, p.version) for p in problems] == [("clothes", "3")]
    assert "model.onnx not found" in problems[0].reason


def test_a_single_file_is_a_repository_of_one(tmp_path: Path) -> None:
    found, problems = scan(SEED)
    assert [(f.name, f.version, f.path) for f in found] == [
        ("fashion_mnist_seed_cnn", "1", SEED)] and not problems
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    found, problems = scan(bad)
    assert not found and "not a readable ONNX file" in problems[0].reason
    assert scan(tmp_path / "missing")[1][0].reason == "no such file or directory"


def test_the_layout_wins_over_a_plain_file_with_the_same_name_and_version(tmp_path: Path) -> None:
    place(SEED, tmp_path / "fashion_mnist_seed_cnn" / "1" / "model.onnx")
    place(SEED, tmp_path / "copy.onnx")
    place(SEED, tmp_path / "another_copy.onnx")
    found, problems = scan(tmp_path)
    assert [f.path for f in found] == [tmp_path / "fashion_mnist_seed_cnn" / "1" / "model.onnx"]
    assert sorted(p.path.name for p in problems) == ["another_copy.onnx", "copy.onnx"]
    assert all("already served from" in p.reason for p in problems)


def test_a_changed_file_has_a_new_signature(tmp_path: Path) -> None:
    path = place(SEED, tmp_path / "m" / "1" / "model.onnx")
    before = scan(tmp_path)[0][0].signature
    place(SEED, tmp_path / "new.tmp")
    (tmp_path / "new.tmp").replace(path)  # an atomic replacement, as operators should do
    assert scan(tmp_path)[0][0].signature != before


@pytest.mark.parametrize(("policy", "expected"), [
    ("latest:1", ["10"]),
    ("latest:2", ["10", "9"]),
    ("latest:9", ["10", "9", "2", "1"]),
    ("all", ["10", "9", "2", "1"]),
    ("specific:1,9", ["9", "1"]),
    ("specific:7", []),
])
def test_version_policy_selects_numerically_newest_first(policy: str, expected: list[str]) -> None:
    assert VersionPolicy(policy).select(["1", "9", "10", "2"]) == expected


@pytest.mark.parametrize("bad", ["latest", "latest:0", "latest:x", "newest:1", "specific:", ""])
def test_a_malformed_version_policy_is_refused_at_start(bad: str) -> None:
    with pytest.raises(ValueError, match="latest:N"):
        VersionPolicy(bad)
    with pytest.raises(ValidationError):
        Settings(version_policy=bad)


def test_version_order_puts_numbers_first() -> None:
    assert sorted(["b", "10", "2", "a"], key=version_key) == ["2", "10", "a", "b"]
