"""ONNX export: the trained model plus softmax, a dynamic batch axis, and everything the service
needs in the file's metadata. The export fails unless ONNX Runtime agrees with torch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.imaging import PreprocessSpec

OPSET = 18  # pinned: ONNX Runtime 1.16+ and TensorRT 8.6+ run it; torch's default moves
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
METADATA_FORMAT = "1"
PARITY_BATCHES = (1, 7, 64)
PARITY_ATOL = 1e-5


class ExportError(RuntimeError):
    """The exported graph does not reproduce the torch model."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    dataset: str
    test_accuracy: float | None = None


def metadata(spec: PreprocessSpec, classes: Sequence[str], info: ModelInfo) -> dict[str, str]:
    """The metadata properties the service reads (see service.model)."""
    meta = {
        "imgserve.format": METADATA_FORMAT,
        "imgserve.labels": json.dumps(list(classes)),
        "imgserve.preprocess": spec.to_json(),
        "imgserve.model_name": info.name,
        "imgserve.model_version": info.version,
        "imgserve.dataset": info.dataset,
    }
    if info.test_accuracy is not None:
        meta["imgserve.test_accuracy"] = f"{info.test_accuracy:.4f}"
    return meta


def set_metadata(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Write (or overwrite) metadata properties on a model proto."""
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in meta.items():
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)


def check_parity(
    model: nn.Module, path: Path, spec: PreprocessSpec, batches: Sequence[int] = PARITY_BATCHES,
    atol: float = PARITY_ATOL, seed: int = 0,
) -> float:
    """Largest |ORT - torch| over random inputs at each batch size; raises ExportError past atol."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n in batches:
        x = torch.rand(n, spec.channels, spec.height, spec.width, generator=gen)
        with torch.no_grad():
            expected = torch.softmax(model(x), dim=1).numpy()
        got = session.run(None, {INPUT_NAME: x.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportError(f"batch {n}: ONNX output shape {got.shape}, torch {expected.shape}")
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        if diff > atol:
            raise ExportError(f"batch {n}: ONNX Runtime differs from torch by {diff:.2e} > {atol}")
    return worst


def export_onnx(
    model: nn.Module, spec: PreprocessSpec, classes: Sequence[str], path: Path, info: ModelInfo,
) -> float:
    """Export ``model`` (taking [0, 1] pixels, giving logits) as one self-contained ONNX file.

    The graph is ``input`` (N×C×H×W float32, N dynamic) -> ``probabilities`` (N×K float32).
    Labels, preprocessing and model identity go into the metadata; ``onnx.checker`` must pass and
    ONNX Runtime must match torch within 1e-5 at batch sizes 1, 7 and 64, or ExportError is
    raised and no file is left behind. Returns the largest difference seen.
    """
    wrapped = nn.Sequential(model, nn.Softmax(dim=1)).eval().to("cpu", torch.float32)
    wrapped.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    example = torch.rand(2, spec.channels, spec.height, spec.width)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        wrapped, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), external_data=False,
        verbose=False,
    )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    set_metadata(proto, metadata(spec, classes, info))
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    onnx.save_model(proto, str(tmp), save_as_external_data=False)
    try:
        worst = check_parity(wrapped[0], tmp, spec)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return worst
