"""GET /: one page to try the service in a browser (no build step, nothing fetched from
elsewhere): choose, drop or paste an image; see the top classes, the occlusion heatmap and the
model's facts."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["page"])


@cache
def _page() -> str:
    return resources.files("service").joinpath("static/index.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, summary="A page to try the service",
            include_in_schema=False)
@router.head("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_page(), headers={
        # The page runs only its own inline script and talks only to this server.
        "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
        "style-src 'unsafe-inline'; img-src 'self' blob: data:; connect-src 'self'",
        "X-Content-Type-Options": "nosniff"})
