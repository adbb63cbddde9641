"""The Open Inference Protocol (KServe V2) inference messages, without HTTP.

Parses an infer request (JSON, or JSON followed by raw tensor bytes as in Triton's binary tensor
data extension) into one input tensor, and encodes the response (JSON data, binary data, or
Triton's classification strings). Errors are :class:`ProtocolError` with the status to return.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidRequest, echo
from service.model import ModelMetadata

FP32 = "FP32"
UINT8 = "UINT8"
BYTES = "BYTES"
TENSOR_TYPES: dict[str, np.dtype[Any]] = {FP32: np.dtype("<f4"), UINT8: np.dtype(np.uint8)}
MAX_OBJECTS = 64  # JSON objects in a request header: the request, its tensors, their parameters


class ProtocolError(InvalidRequest):
    """A request the protocol refuses (400): wrong name, shape, datatype or element count."""


@dataclass
class RequestedOutput:
    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    id: str | None
    input_name: str
    datatype: str
    shape: list[int]
    tensor: np.ndarray | None = None  # FP32 (values in [0, 1]) or UINT8 (pixels): N×C×H×W
    images: list[bytes] = field(default_factory=list)  # BYTES: encoded images
    output: RequestedOutput = field(default_factory=lambda: RequestedOutput(binary=False))

    @property
    def batch(self) -> int:
        return self.shape[0]


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(f"{where}: 'parameters' must be an object")
    return params


def split_body(body: bytes, header_length: str | None,
               max_arrays: int | None = None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary tail (empty unless ``Inference-Header-Content-Length``).

    Before the JSON is parsed, its arrays and objects are counted (a byte count, fast): a body
    of millions of empty arrays costs the parser about a second of the event loop, while a
    request this server accepts needs at most ``max_arrays`` arrays (see :func:`max_arrays`)
    and a few objects."""
    if header_length is None:
        head, tail = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError("Inference-Header-Content-Length must be an integer") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {n} does not fit a body of "
                                f"{len(body)} bytes")
        head, tail = body[:n], body[n:]
    if max_arrays is not None and head.count(b"[") > max_arrays:
        raise ProtocolError(f"the request header holds more than {max_arrays} JSON arrays, "
                            "more than any request this model accepts")
    if head.count(b"{") > MAX_OBJECTS:
        raise ProtocolError(f"the request header holds more than {MAX_OBJECTS} JSON objects")
    try:
        request = orjson.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the request header is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object")
    return request, tail


def max_arrays(meta: ModelMetadata, max_images: int) -> int:
    """The most JSON arrays a request can need: FP32 data nested as [N][C][H][W], plus the
    inputs, outputs and shape lists."""
    _, c, h, _ = meta.input_shape
    return max_images * (1 + c * (1 + h)) + 16


MAX_DIMS = 8  # an image tensor has 4; more are refused before they are echoed or multiplied
MAX_DIM = 2**31 - 1


def _shape(value: Any) -> list[int]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_DIMS:
        raise ProtocolError(f"'shape' must be a list of 1 to {MAX_DIMS} non-negative integers, "
                            f"got {echo(value)}")
    dims = [_integer(d) for d in value]
    if any(d is None or not 0 <= d <= MAX_DIM for d in dims):
        raise ProtocolError(f"'shape' must be a list of 1 to {MAX_DIMS} integers from 0 to "
                            f"{MAX_DIM}, got {echo(value)}")
    return [int(d) for d in dims if d is not None]


def _integer(value: Any) -> int | None:
    """A JSON integer (2, or 2.0 as JSON Schema allows), else None; booleans are not numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """Triton's BYTES serialisation: each element a 4-byte little-endian length, then bytes.
    Exactly ``count`` elements, or ProtocolError as soon as there are more (a body of empty
    elements would otherwise cost a Python object per 4 bytes before the count is checked)."""
    out: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(out) == count:
            raise ProtocolError(f"binary BYTES data holds more than the {count} elements of "
                                "its shape")
        if offset + 4 > len(raw):
            raise ProtocolError("binary BYTES data ends inside an element length")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise ProtocolError("binary BYTES data ends inside an element")
        out.append(raw[offset : offset + n])
        offset += n
    return out


def encode_bytes_elements(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def parse_infer(request: dict[str, Any], tail: bytes, meta: ModelMetadata,
                max_images: int) -> InferRequest:
    """Validate an infer request against the model and pull out its one input."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"expected exactly one input, named {meta.input_name!r}")
    spec = inputs[0]
    name, datatype = spec.get("name"), spec.get("datatype")
    if name != meta.input_name:
        raise ProtocolError(f"unknown input {echo(name)}; this model's input is "
                            f"{meta.input_name!r}")
    shape = _shape(spec.get("shape"))
    params = _params(spec, f"input {name!r}")
    binary_size = params.get("binary_data_size")
    if binary_size is not None:
        if not isinstance(binary_size, int) or binary_size != len(tail):
            raise ProtocolError(f"input {name!r}: binary_data_size {echo(binary_size)} does not "
                                f"match the {len(tail)} bytes after the header")
        if "data" in spec:
            raise ProtocolError(f"input {name!r} has both 'data' and binary_data_size")
    elif tail:
        raise ProtocolError("binary data follows the header but no input has binary_data_size")
    elif "data" not in spec:
        raise ProtocolError(f"input {name!r} has no 'data'")
    req_id = request.get("id")
    if "id" in request and not isinstance(req_id, str):
        raise ProtocolError("'id' must be a string")
    out = InferRequest(id=req_id, input_name=name,
                       datatype=str(datatype), shape=shape)
    if shape[0] < 1:
        raise ProtocolError("the batch dimension must be at least 1")
    if shape[0] > max_images:
        raise ProtocolError(f"{shape[0]} images in one request; the limit is {max_images}")
    if datatype in TENSOR_TYPES:
        out.tensor = _tensor(spec, str(datatype), shape,
                             tail if binary_size is not None else None, meta)
    elif datatype == BYTES:
        out.images = _images(spec, shape, tail if binary_size is not None else None)
    else:
        raise ProtocolError(f"input {name!r}: datatype {echo(datatype)} is not supported; send "
                            f"{UINT8} pixels (0-255) or {FP32} values in [0, 1] shaped "
                            f"{list(meta.input_shape)}, or {BYTES} encoded images shaped [N]")
    out.output = _requested_output(request, meta)
    return out


def _tensor(spec: dict[str, Any], datatype: str, shape: list[int], raw: bytes | None,
            meta: ModelMetadata) -> np.ndarray:
    """The model's input as sent: FP32 values in [0, 1], or UINT8 pixels, which stay uint8 (a
    quarter of FP32's bytes over HTTP and to the device) until the model's engine divides them
    by 255, as decoding an image would give them."""
    want = list(meta.input_shape[1:])
    if len(shape) != 4 or shape[1:] != want:
        raise ProtocolError(f"{datatype} input shape {shape} does not match the model's "
                            f"[-1, {', '.join(map(str, want))}]")
    dtype = TENSOR_TYPES[datatype]
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise ProtocolError(f"{datatype} input shape {shape} needs "
                                f"{count * dtype.itemsize} bytes, got {len(raw)}")
        array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
    else:
        data = spec["data"]
        if not isinstance(data, list) or len(data) not in (count, shape[0]):
            # Flat (count numbers) or nested (shape[0] rows): anything else is refused before
            # numpy walks it.
            raise ProtocolError(f"{datatype} input shape {shape} holds {count} elements; "
                                "'data' must be a list of that many numbers, or nested as the "
                                "shape")
        try:
            values = np.asarray(data, dtype=np.float64)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ProtocolError(f"{datatype} 'data' must be numbers, flat or nested: "
                                f"{exc}") from None
        values = values.reshape(-1)
        if values.size != count:
            raise ProtocolError(f"{datatype} input shape {shape} holds {count} elements, "
                                f"'data' has {values.size}")
        if dtype.kind == "u" and not (np.all(values >= 0) and np.all(values <= 255)
                                      and np.all(values == np.round(values))):
            raise ProtocolError("UINT8 'data' must be integers from 0 to 255")
        array = values.astype(dtype.newbyteorder("="))
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise ProtocolError("FP32 input holds NaN or infinite values")
    return array.reshape(shape)


def _images(spec: dict[str, Any], shape: list[int], raw: bytes | None) -> list[bytes]:
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise ProtocolError(f"BYTES input shape must be [N] or [N, 1] (one image per element), "
                            f"got {shape}")
    if raw is not None:
        items = _bytes_elements(raw, shape[0])
    else:
        data = spec["data"]
        flat = data if isinstance(data, list) else [data]
        while flat and isinstance(flat[0], list):
            # Counted before flattening: evenly nested rows hold len(flat) * len(flat[0]).
            if len(flat) * len(flat[0]) > shape[0]:
                raise ProtocolError(f"BYTES input shape {shape} holds {shape[0]} elements, "
                                    f"'data' has more")
            if not all(isinstance(row, list) for row in flat):
                raise ProtocolError("BYTES 'data' must be a list of base64 strings, flat or "
                                    "evenly nested")
            flat = [x for row in flat for x in row]
        if len(flat) != shape[0]:
            raise ProtocolError(f"BYTES input shape {shape} holds {shape[0]} elements, got "
                                f"{len(flat)}")
        try:
            items = [base64.b64decode(x, validate=True) for x in flat]
        except (binascii.Error, TypeError, ValueError):
            raise ProtocolError("BYTES 'data' in JSON must be base64 strings, one encoded "
                                "image each (or send binary data)") from None
    if len(items) != shape[0]:
        raise ProtocolError(f"BYTES input shape {shape} holds {shape[0]} elements, got "
                            f"{len(items)}")
    return items


def _flag(params: dict[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"parameter {key!r} must be true or false, got {echo(value)}")
    return value


def _requested_output(request: dict[str, Any], meta: ModelMetadata) -> RequestedOutput:
    binary_default = _flag(_params(request, "request"), "binary_data_output", False)
    if "outputs" not in request:
        return RequestedOutput(binary=binary_default)
    outputs = request["outputs"]
    if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict):
        raise ProtocolError(f"request at most the one output, {meta.output_name!r}")
    spec = outputs[0]
    if spec.get("name") != meta.output_name:
        raise ProtocolError(f"unknown output {echo(spec.get('name'))}; this model's output is "
                            f"{meta.output_name!r}")
    params = _params(spec, f"output {meta.output_name!r}")
    k = _integer(params.get("classification", 0))
    if k is None or k < 0:
        raise ProtocolError("classification must be an integer >= 1 (classes to return)")
    # More classes than the model has: all of them, best first, as /v1's top_k.
    return RequestedOutput(binary=_flag(params, "binary_data", binary_default),
                           classification=min(k, meta.num_classes))


def infer_response(req: InferRequest, probs: np.ndarray,
                   meta: ModelMetadata) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it."""
    n = probs.shape[0]
    k = req.output.classification
    if k:
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        strings = [f"{float(probs[i, j])!r}:{int(j)}:{meta.labels[j]}"
                   for i in range(n) for j in order[i]]
        output: dict[str, Any] = {"name": meta.output_name, "datatype": BYTES, "shape": [n, k]}
        raw = encode_bytes_elements([s.encode() for s in strings])
        values: list[Any] = strings
    else:
        output = {"name": meta.output_name, "datatype": FP32, "shape": [n, meta.num_classes]}
        as_f32 = np.ascontiguousarray(probs, dtype="<f4")
        raw = as_f32.tobytes()
        values = as_f32.reshape(-1).tolist()
    body: dict[str, Any] = {"model_name": meta.name, "model_version": meta.version,
                            "outputs": [output]}
    if req.id is not None:
        body["id"] = req.id
    if not req.output.binary:
        output["data"] = values
        return orjson.dumps(body), None
    output["parameters"] = {"binary_data_size": len(raw)}
    head = orjson.dumps(body)
    return head + raw, len(head)
