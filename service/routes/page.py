"""``GET /``: a page to try the model in a browser (``service/page/index.html``).

One static file, no build step, nothing fetched from elsewhere: it calls the public
API only (``GET /v1/model``, ``POST /predict``) with the API key typed into it, so
it stays open like ``/docs`` and carries no secret."""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["page"])

PAGE = Path(__file__).resolve().parent.parent / "page" / "index.html"
# The page's own script and styles, images from itself (data: and blob: URLs), requests to this server only.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@functools.cache
def _page() -> bytes:
    return PAGE.read_bytes()


@router.get("/", name="page", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_page(), headers=_HEADERS)
