"""Property-based API testing with schemathesis against a real server process: every operation
in /openapi.json, a bounded number of generated requests each, all of schemathesis's checks
(no server errors, responses conform to the document, schema-valid requests accepted,
schema-invalid ones rejected).

Image bytes cannot be described by a JSON schema, so schema-valid cases get real Fashion-MNIST
PNGs where the document says "binary" or "base64 image"; everything else (query values,
headers, the V2 request's other fields, path values, media types) is generated from the
document."""

from __future__ import annotations

import base64
from typing import Any

import hypothesis
import schemathesis
from fastapi.testclient import TestClient
from schemathesis import Case

from service.app import create_app
from service.config import DEFAULT_MODEL, Settings
from tests.conftest import png_bytes, wait_ready
from training.data import load_fashion_mnist

IMAGES = [png_bytes(load_fashion_mnist("test").images[i, 0].numpy()) for i in range(4)]


def realistic(path: str, body: Any) -> Any:
    """Real images where the document promises image bytes (for schema-valid cases only: an
    invalid case keeps what makes it invalid)."""
    if path.endswith(("/classify", "/explain")):
        if isinstance(body, dict):
            files = body.get("file")
            if isinstance(files, list):
                return {**body, "file": [IMAGES[i % 4] for i in range(len(files))]}
            return body
        return IMAGES[0]  # a raw body (bytes, or schemathesis's binary wrapper)
    if path.endswith("/infer") and isinstance(body, dict):
        for tensor in body.get("inputs") or []:
            if not isinstance(tensor, dict) or not isinstance(tensor.get("shape"), list):
                continue
            n = min(int(tensor["shape"][0]), 4) if tensor["shape"] else 1
            if tensor.get("datatype") == "BYTES":  # [N] encoded images
                tensor["shape"] = [n]
                tensor["data"] = [base64.b64encode(IMAGES[i % 4]).decode() for i in range(n)]
            elif tensor.get("datatype") in ("FP32", "UINT8"):  # [N, 1, 28, 28] pixels
                tensor["shape"] = [n, 1, 28, 28]
                tensor["data"] = [0.5 if tensor["datatype"] == "FP32" else 128] * (n * 28 * 28)
    return body


def _document() -> dict[str, Any]:
    """The document the server publishes, with the shipped model loaded (its name, input and
    output names fill the enums), read once at collection through the real app."""
    settings = Settings(model_path=DEFAULT_MODEL, access_log=False)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        doc: dict[str, Any] = client.get("/openapi.json").json()
    return doc


# 413 is how this API refuses too many images or bytes: the right refusal of a request that
# breaks the document's maxItems, beside schemathesis's default list. The coverage phase is
# off: its boundary cases bypass the hook, so its "valid" images and tensors are not valid.
CONFIG = schemathesis.config.SchemathesisConfig.from_dict({
    "checks": {"negative_data_rejection": {"expected-statuses": [
        400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]}},
    "phases": {"coverage": {"enabled": False}},
})
schema = schemathesis.openapi.from_dict(_document(), config=CONFIG)


@schema.parametrize()
@hypothesis.settings(max_examples=200, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_every_operation_conforms_to_the_document(case: Case, shared_server: int) -> None:
    if case.meta is not None and case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE:
        case.body = realistic(case.operation.path, case.body)
        if case.operation.path.endswith("/explain") and case.query:
            # The document cannot say that a stride must be coarse enough for its patch (at
            # most 400 positions); the default stride always is. Fine strides: test_explain.
            case.query.pop("stride", None)
        # Setting the body makes schemathesis re-judge the case, and raw bytes do not validate as
        # a JSON "string": it is still the schema-valid case it was, with a real image.
        case.meta.generation.mode = schemathesis.GenerationMode.POSITIVE
    case.call_and_validate(base_url=f"http://127.0.0.1:{shared_server}", timeout=30)
