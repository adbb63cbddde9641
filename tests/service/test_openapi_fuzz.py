"""Property-based API testing with schemathesis against a real server process: every operation
in /openapi.json, a bounded number of generated requests each, all of schemathesis's checks
(no server errors, responses conform to the document, schema-valid requests accepted,
schema-invalid ones rejected).

Image bytes cannot be described by a JSON schema, so a hook puts real Fashion-MNIST PNGs where
the document says "binary" or "base64 image"; everything else (query values, headers, the V2
request's other fields, path values, media types) is generated from the document."""

from __future__ import annotations

import base64
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis import Case

from tests.conftest import png_bytes
from training.data import load_fashion_mnist

IMAGES = [png_bytes(load_fashion_mnist("test").images[i, 0].numpy()) for i in range(4)]


@schemathesis.hook
def map_body(ctx: schemathesis.HookContext, body: Any) -> Any:
    """Real images where the document promises image bytes."""
    path = ctx.operation.path if ctx.operation else ""
    if path == "/v1/classify":
        if isinstance(body, bytes | str):
            return IMAGES[0]
        if isinstance(body, dict) and isinstance(body.get("file"), list):
            return {**body, "file": [IMAGES[i % 4] for i in range(len(body["file"]))]}
    if path.endswith("/infer") and isinstance(body, dict):
        for tensor in body.get("inputs") or []:
            if isinstance(tensor, dict) and tensor.get("datatype") == "BYTES":
                n = tensor["shape"][0] if tensor.get("shape") else 1
                tensor["data"] = [base64.b64encode(IMAGES[i % 4]).decode() for i in range(n)]
    return body


@pytest.fixture(scope="module")
def api(shared_server: int) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{shared_server}/openapi.json")


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@hypothesis.settings(max_examples=60, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_every_operation_conforms_to_the_document(case: Case) -> None:
    case.call_and_validate(timeout=30)
