"""Dependencies shared by the routers, as ``Annotated`` aliases.

All ``async def``: FastAPI runs a plain ``def`` dependency on AnyIO's thread
pool, a thread hop (and a thread woken) per dependency per request.
"""

from __future__ import annotations

import hmac
import ipaddress
import urllib.parse
from typing import Annotated

from fastapi import Depends, Request

from .context import RequestContext
from .errors import Forbidden, NotReady, Overloaded, Unauthorized
from .state import ServerState

__all__ = [
    "State",
    "Context",
    "Authorized",
    "Admin",
    "check_admin",
    "Ready",
    "Admitted",
    "get_state",
    "require_api_key",
    "require_ready",
    "require_room",
    "check_api_key",
    "check_ready",
    "check_room",
]


async def get_state(request: Request) -> ServerState:
    return request.app.state.chanseg


async def get_context(request: Request) -> RequestContext:
    """The request's context, which the middleware made (``service.context``)."""
    return request.scope["chanseg"]


def check_api_key(state, headers) -> None:
    """401 unless ``headers`` (HTTP headers, or gRPC metadata as a dict) carry the API
    key, when one is set: ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``."""
    _check_key(state.settings.api_key, headers)


def check_admin(state, headers) -> None:
    """The model repository's guard: 403 for a web page of another origin (module
    docstring), then 401 unless ``headers`` carry ``ADMIN_API_KEY`` (``API_KEY`` when unset)."""
    s = state.settings
    origin = headers.get("origin")
    if origin is not None and not _origin_allowed(origin, headers.get("host", ""), s.admin_origin_set):
        raise Forbidden(
            f"a web page at {origin[:100]} may not use the model repository's routes: only tools, the server's "
            "own pages reached by address, and the origins in ADMIN_ORIGINS"
        )
    _check_key(s.admin_api_key or s.api_key, headers)


def _check_key(key, headers) -> None:
    if key is None:
        return
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if not given or not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise Unauthorized()


def _origin_allowed(origin: str, host: str, allowed: frozenset) -> bool:
    """A browser's request (it carries ``Origin``): from a listed origin, or from the server's
    own page when the server was reached by an IP address or ``localhost``. The same origin
    by a DNS name is not enough: a page can rebind its own name to this server's address."""
    origin = origin.strip().lower().rstrip("/")
    if origin in allowed:
        return True
    try:
        parsed = urllib.parse.urlsplit(origin)
        hostname, netloc = parsed.hostname or "", parsed.netloc
    except ValueError:
        return False
    if parsed.scheme not in ("http", "https") or netloc != host.strip().lower():
        return False
    if hostname == "localhost":
        return True
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def check_ready(state) -> None:
    """503 while the server drains, starts, or has no model loaded."""
    if state.draining:
        raise NotReady("the server is shutting down", retry_after_s=5)
    if not state.ready:
        raise NotReady("the model is not ready yet", retry_after_s=5)
    if state.segmenter is None:
        raise NotReady("no model loaded: it was unloaded through the model repository", retry_after_s=5)


def check_room(state) -> None:
    """503 before the body is read when the queue could not take even one more image."""
    if state.batcher is not None and not state.batcher.has_room(1):
        raise Overloaded("server busy: the queue is full; retry later", retry_after_s=1)


async def require_api_key(request: Request) -> None:
    check_api_key(request.app.state.chanseg, request.headers)


async def require_admin(request: Request) -> None:
    check_admin(request.app.state.chanseg, request.headers)


async def require_ready(request: Request) -> None:
    check_ready(request.app.state.chanseg)


async def require_room(request: Request) -> None:
    check_room(request.app.state.chanseg)


State = Annotated[ServerState, Depends(get_state)]
Context = Annotated[RequestContext, Depends(get_context)]
Authorized = Depends(require_api_key)
Admin = Depends(require_admin)
Ready = Depends(require_ready)
Admitted = Depends(require_room)
