"""The OpenAPI document with what is only known once the model is loaded: the model's name and
version as the only values of the V2 path parameters, its input and output names in the V2
request schema, and the image-count limit. A client generated from it, or a fuzzer, then sends
what the server accepts."""

from __future__ import annotations

import copy
from typing import Any

from service.runtime import Runtime


def with_runtime_values(doc: dict[str, Any], runtime: Runtime) -> dict[str, Any]:
    if runtime.classifier is None:
        return doc
    meta = runtime.classifier.metadata
    limit = runtime.settings.max_images_per_request
    doc = copy.deepcopy(doc)
    for path, item in doc.get("paths", {}).items():
        for op in item.values():
            for param in op.get("parameters", []):
                if path.startswith("/v2/models/") and param.get("in") == "path":
                    value = {"name": meta.name, "version": meta.version}.get(param["name"])
                    if value is not None:
                        param["schema"] = {**param.get("schema", {}), "enum": [value]}
            content = op.get("requestBody", {}).get("content", {})
            form = content.get("multipart/form-data", {}).get("schema", {})
            if "file" in form.get("properties", {}):
                form["properties"]["file"]["maxItems"] = limit
            request = content.get("application/json", {}).get("schema", {})
            props = request.get("properties", {})
            if "inputs" in props and "outputs" in props:
                tensor = props["inputs"]["items"]["properties"]
                tensor["name"] = {**tensor["name"], "enum": [meta.input_name]}
                tensor["shape"]["items"]["maximum"] = max(limit, *meta.input_shape[1:])
                output = props["outputs"]["items"]["properties"]
                output["name"] = {**output["name"], "enum": [meta.output_name]}
    return doc
