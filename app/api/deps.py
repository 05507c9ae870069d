"""Request-scoped inputs shared by the routes: the caller, the version, the body."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request

from app.api.microversion import MIN_VERSION, APIVersion
from app.exceptions import MalformedBody, Unauthorized, UnsupportedMediaType
from app.service import ComputeService, Context

# Nova's wsgi.Request accepts these; a missing Content-Type means JSON.
JSON_TYPES = ("application/json", "application/vnd.openstack.compute+json")


# The dependencies are async although they never wait: FastAPI runs a sync
# dependency in a worker thread, and that hop cost more than the work itself.


async def service(request: Request) -> ComputeService:
    compute: ComputeService = request.app.state.service
    return compute


async def context(request: Request) -> Context:
    """The authenticated caller, from X-Auth-Token; 401 otherwise."""
    # Validated once per compute request, by app.api.admission, before routing.
    token = getattr(request.state, "token", None)
    if token is None:
        raise Unauthorized()
    compute = await service(request)
    return Context(
        credentials=token.credentials,
        is_admin=compute.policy.is_admin(token.credentials),
        request_id=request.state.request_id,
    )


async def api_version(request: Request) -> APIVersion:
    version: APIVersion = getattr(request.state, "api_version", MIN_VERSION)
    return version


async def json_body(request: Request) -> Any:
    """The parsed JSON body, or None when there is none."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and content_type not in JSON_TYPES:
        raise UnsupportedMediaType("Unsupported Content-Type")
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
        # A lone surrogate ("\ud800") parses but cannot be encoded again, in
        # an error message or the database; nesting past Python's recursion
        # limit cannot be parsed at all. Both are malformed bodies, not 500s.
        json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, RecursionError):
        raise MalformedBody() from None
    return body


# RFC 8259 JSON has no NaN or Infinity, and a number such as 1e400 would read as
# infinite: Python's json accepts both, crashlab refuses them as malformed.
def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value
