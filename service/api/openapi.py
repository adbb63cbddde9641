"""The OpenAPI document with what is only known once the models are loaded: the served models'
names and versions as the only values of the model path parameters, their input and output
names in the V2 request schema, and the image-count limit. A client generated from it, or a
fuzzer, then sends what the server accepts."""

from __future__ import annotations

import copy
from typing import Any

from service.explain import MAX_IMAGES
from service.runtime import Runtime


def with_runtime_values(doc: dict[str, Any], runtime: Runtime) -> dict[str, Any]:
    served = [v.metadata for vs in runtime.models.serving.values() for v in vs if v.metadata]
    if not served:
        return doc
    limit = runtime.settings.max_images_per_request
    side = min(min(m.spec.height, m.spec.width) for m in served)  # the occlusion patch's bound
    classes = min(m.num_classes for m in served)
    targets = sorted({label for m in served for label in m.labels}) + [
        str(i) for i in range(classes)]
    values = {"name": sorted({m.name for m in served}),
              "version": sorted({m.version for m in served})}
    doc = copy.deepcopy(doc)
    for path, item in doc.get("paths", {}).items():
        for op in item.values():
            for param in op.get("parameters", []):
                if path.startswith(("/v2/models/", "/v1/models/")) and param.get("in") == "path":
                    enum = values.get(param["name"])
                    if enum is not None:
                        param["schema"] = {**param.get("schema", {}), "enum": enum}
                if path.endswith("/explain") and param["name"] in ("patch", "stride", "target"):
                    for option in param.get("schema", {}).get("anyOf", [param.get("schema")]):
                        if option and option.get("type") == "integer":
                            option["maximum"] = side
                        elif option and option.get("type") == "string":
                            option["enum"] = targets
            content = op.get("requestBody", {}).get("content", {})
            form = content.get("multipart/form-data", {}).get("schema", {})
            if "file" in form.get("properties", {}):
                explain = path.endswith("/explain")
                form["properties"]["file"]["maxItems"] = min(limit, MAX_IMAGES) if explain else (
                    limit)
            request = content.get("application/json", {}).get("schema", {})
            props = request.get("properties", {})
            if "inputs" in props and "outputs" in props:
                tensor = props["inputs"]["items"]["properties"]
                tensor["name"] = {**tensor["name"],
                                  "enum": sorted({m.input_name for m in served})}
                tensor["shape"]["items"]["maximum"] = max(
                    limit, *(d for m in served for d in m.input_shape[1:]))
                output = props["outputs"]["items"]["properties"]
                output["name"] = {**output["name"],
                                  "enum": sorted({m.output_name for m in served})}
    return doc
