"""``GET /docs`` (Swagger UI) and ``GET /redoc``: the API's pages, with their scripts and
styles served by this server (``/docs/assets/...``) from the ``fastapi-offline`` package.

FastAPI's own pages load them from a CDN, without an integrity check: a cluster with no
way out showed a blank page, and whoever serves the CDN's files runs code in the page.
Open, like ``/openapi.json``: they carry no secret."""

from __future__ import annotations

import functools
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response

from ..errors import NotFound

router = APIRouter(include_in_schema=False)

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
OAUTH2_REDIRECT = "/docs/oauth2-redirect"


@functools.cache
def _asset(name: str) -> bytes:
    return (ASSETS / name).read_bytes()


def _assets(request: Request) -> str:
    return f"{request.scope.get('root_path', '')}/docs/assets"


@router.get("/docs", name="docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root, assets = request.scope.get("root_path", ""), _assets(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        oauth2_redirect_url=OAUTH2_REDIRECT,
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon.png",
    )


@router.get(OAUTH2_REDIRECT, name="docs")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc", name="docs")
async def redoc(request: Request) -> HTMLResponse:
    root, assets = request.scope.get("root_path", ""), _assets(request)
    return get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{assets}/redoc.standalone.js",
        redoc_favicon_url=f"{assets}/favicon.png",
        with_google_fonts=False,
    )


@router.get("/docs/assets/{name}", name="docs")
async def asset(name: str) -> Response:
    if name not in _TYPES:
        raise NotFound(f"no such asset: {name[:100]}")
    return Response(_asset(name), media_type=_TYPES[name], headers={"Cache-Control": "public, max-age=86400"})
