"""Smaller and faster variants of an exported model: int8 (static, QDQ format, calibrated on
training images) for CPUs, float16 for GPUs, each re-measured and refused if it loses too much.

Both work on any exported ONNX classifier, with ONNX Runtime's own tools: ``quantize_static``
after its pre-processing (shape inference and graph optimisation), and its float16 converter
(inputs and outputs stay float32, so the service and its clients see no difference). The
variant's measured accuracy, and the fp32 accuracy it was compared with, go into its metadata.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from service.onnx_meta import read_metadata_props
from training.export import INPUT_NAME, set_metadata

METADATA_KEY = "imgserve.variant"
DEFAULT_MAX_LOSS = 0.005  # accuracy points (as a fraction) a variant may lose, at most


class VariantRefused(ValueError):
    """The variant loses more accuracy than allowed; nothing was written."""


@dataclass(frozen=True)
class Variant:
    kind: str  # "int8" or "fp16"
    accuracy: float  # measured on the images given; for photos, top-1 agreement with fp32
    reference_accuracy: float  # the fp32 model on the same images
    measure: str  # "accuracy" or "top1_agreement"
    images: int
    calibration_images: int

    def to_json(self) -> str:
        return json.dumps({k: round(v, 6) if isinstance(v, float) else v
                           for k, v in asdict(self).items()})


class _Reader(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int = 32) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def predict(path: Path | bytes, images: np.ndarray, batch: int = 256) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path) if isinstance(path, Path) else path, options,
                                   providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {INPUT_NAME: images[i : i + batch]})[0]
                           for i in range(0, len(images), batch)])


def _int8(path: Path, out: Path, calibration: np.ndarray) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), _Reader(calibration),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax)


def _fp16(path: Path, out: Path) -> None:
    proto = onnx.load(str(path))
    onnx.save(convert_float_to_float16(proto, keep_io_types=True), str(out))


def make_variant(path: Path, out: Path, kind: str, calibration: np.ndarray,
                 images: np.ndarray, labels: np.ndarray | None = None,
                 max_loss: float = DEFAULT_MAX_LOSS) -> Variant:
    """Write the ``kind`` variant of ``path`` to ``out`` if, on ``images``, it keeps the fp32
    model's accuracy (``labels``) or, without labels, its top-1 answers, within ``max_loss``;
    raise :class:`VariantRefused` otherwise. ``calibration`` (int8 only) are training images."""
    reference = predict(path, images).argmax(1)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "variant.onnx"
        if kind == "int8":
            _int8(path, candidate, calibration)
        elif kind == "fp16":
            _fp16(path, candidate)
        else:
            raise ValueError(f"unknown variant {kind!r}: int8 or fp16")
        got = predict(candidate, images).argmax(1)
        if labels is not None:
            ref_acc, acc, measure = (float((reference == labels).mean()),
                                     float((got == labels).mean()), "accuracy")
        else:
            ref_acc, acc, measure = 1.0, float((got == reference).mean()), "top1_agreement"
        if ref_acc - acc > max_loss:
            raise VariantRefused(
                f"the {kind} variant's {measure.replace('_', ' ')} is {acc:.2%} against "
                f"{ref_acc:.2%} for fp32 on {len(images)} images: a loss of "
                f"{100 * (ref_acc - acc):.2f} points, over the {100 * max_loss:.2f} allowed "
                f"(--max-loss); nothing was written")
        proto = onnx.load(str(candidate))
        variant = Variant(kind, acc, ref_acc, measure, len(images),
                          len(calibration) if kind == "int8" else 0)
        # Its own name, so that a repository holding both serves both (not a conflict).
        name = read_metadata_props(path).get("imgserve.model_name", path.stem)
        meta = {METADATA_KEY: variant.to_json(), "imgserve.model_name": f"{name}_{kind}"}
        if labels is not None:
            meta["imgserve.test_accuracy"] = f"{acc:.4f}"
        set_metadata(proto, meta)
        onnx.save(proto, str(candidate))
        out.parent.mkdir(parents=True, exist_ok=True)
        candidate.replace(out)
    return variant
