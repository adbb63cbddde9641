"""Calibrated scores: temperature scaling, fitted on the validation split and folded into the
ONNX graph before its softmax, with the expected calibration error before and after.

A score of 0.9 should be right about 90% of the time. One scalar T divides the logits; it is
fitted by minimising the negative log-likelihood on held-out validation images (never the test
images, which only measure). Dividing by T > 0 keeps every image's ranking, so accuracy is
unchanged. This works on any exported classifier whose graph ends in a Softmax, which is how
``export_onnx`` writes them, so a shipped ONNX file can be calibrated without its checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from training.export import INPUT_NAME, set_metadata

BINS = 15
METADATA_KEY = "imgserve.calibration"


class CalibrationError(RuntimeError):
    """The graph cannot be calibrated (no final Softmax), or the result does not check out."""


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """ECE: over ``bins`` equal-width confidence bins, the image-weighted mean |accuracy -
    confidence| of the top class."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += mask.sum() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total / len(labels))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict[str, float]]:
    """Per bin: its range, image count, mean confidence and accuracy (the diagram's data)."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = index == b
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(mask.sum()),
                     "confidence": float(confidence[mask].mean()) if mask.any() else 0.0,
                     "accuracy": float(correct[mask].mean()) if mask.any() else 0.0})
    return rows


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the mean negative log-likelihood of softmax(logits / T)."""
    def nll(log_t: float) -> float:
        logp = log_softmax(logits / np.exp(log_t), axis=1)
        return float(-logp[np.arange(len(labels)), labels].mean())

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                             options={"xatol": 1e-5})
    return float(np.exp(result.x))


@dataclass(frozen=True)
class Calibration:
    temperature: float
    bins: int
    ece_validation_before: float
    ece_validation_after: float
    ece_test_before: float | None
    ece_test_after: float | None
    validation_images: int
    test_images: int | None

    def to_json(self) -> str:
        return json.dumps({k: round(v, 6) if isinstance(v, float) else v
                           for k, v in asdict(self).items()})


def _final_softmax(proto: onnx.ModelProto) -> onnx.NodeProto:
    out = proto.graph.output[0].name
    node = next((n for n in proto.graph.node if out in n.output), None)
    if node is None or node.op_type != "Softmax":
        raise CalibrationError("the graph's output is not a Softmax: nothing to scale")
    return node


def logits_of(model: Path | onnx.ModelProto, *image_sets: np.ndarray,
              batch: int = 256) -> list[np.ndarray]:
    """The inputs of the final Softmax for each N×C×H×W float32 image set, from one session."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model if isinstance(model, onnx.ModelProto) else onnx.load(str(model)))
    softmax_node = _final_softmax(proto)
    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(softmax_node.input[0]))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.concatenate([session.run(None, {INPUT_NAME: images[i : i + batch]})[0]
                            for i in range(0, len(images), batch)]) for images in image_sets]


def calibrate_onnx(path: Path, out: Path, val: tuple[np.ndarray, np.ndarray],
                   test: tuple[np.ndarray, np.ndarray] | None = None) -> Calibration:
    """Fit T on ``val`` (images in [0, 1], labels), write ``out`` = ``path`` with logits / T
    before its softmax and the figures in its metadata; ``test`` is only measured."""
    proto = onnx.load(str(path))
    if any(p.key == METADATA_KEY for p in proto.metadata_props):
        raise CalibrationError(f"{path} is calibrated already")
    node = _final_softmax(proto)
    sets = [val] if test is None else [val, test]
    logits = logits_of(proto, *(images for images, _ in sets))
    t = fit_temperature(logits[0], val[1])
    ece = [(expected_calibration_error(softmax(z, 1), y),
            expected_calibration_error(softmax(z / t, 1), y))
           for z, (_, y) in zip(logits, sets, strict=True)]
    test_ece = ece[1] if test is not None else (None, None)
    cal = Calibration(
        temperature=t, bins=BINS, ece_validation_before=ece[0][0], ece_validation_after=ece[0][1],
        ece_test_before=test_ece[0], ece_test_after=test_ece[1], validation_images=len(val[1]),
        test_images=len(test[1]) if test is not None else None)
    scaled = node.input[0] + "_over_temperature"
    proto.graph.initializer.append(onnx.numpy_helper.from_array(
        np.array(1.0 / t, dtype=np.float32), "inverse_temperature"))
    position = list(proto.graph.node).index(node)
    proto.graph.node.insert(position, onnx.helper.make_node(
        "Mul", [node.input[0], "inverse_temperature"], [scaled], name="temperature_scaling"))
    node.input[0] = scaled
    set_metadata(proto, {METADATA_KEY: cal.to_json()})
    onnx.checker.check_model(proto, full_check=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    onnx.save_model(proto, str(tmp), save_as_external_data=False)
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: val[0][:64]})[0]
    want = softmax(logits[0][:64] / t, 1)
    if not np.allclose(got, want, atol=1e-5) or not (got.argmax(1) == want.argmax(1)).all():
        tmp.unlink(missing_ok=True)
        raise CalibrationError("the calibrated graph does not give softmax(logits / T)")
    tmp.replace(out)
    return cal
