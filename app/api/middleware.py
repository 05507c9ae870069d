"""Headers every response carries, and limits checked before routing.

A pure ASGI middleware (no per-request task, unlike BaseHTTPMiddleware):
request ids, the microversion and its headers, the body size limit, and the
500 fault of an unexpected error. Starlette runs an ``Exception`` handler in
its outermost layer, outside every middleware, so its 500 would carry none of
these headers: an error escaping the routes is answered here instead.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.faults import fault_body
from app.api.microversion import MIN_VERSION, APIVersion, requested_version
from app.exceptions import APIError, BadRequest, InternalError, PayloadTooLarge

LOG = logging.getLogger(__name__)

COMPUTE_PREFIX = "/v2.1"
# Nova's [wsgi] max_header_line default, and eventlet.wsgi's MAX_TOTAL_HEADER_SIZE.
MAX_HEADER_LINE = 16384
MAX_TOTAL_HEADER_SIZE = 65536
# How much of a request's head uvicorn's h11 parser buffers (its default is 16 KiB).
# Heads up to this size are read whole and refused here in Nova's fault format; a
# server that refused a head it had not read would close with the client's bytes
# unread, and the kernel's reset could reach the client before the answer.
MAX_REQUEST_HEAD_BYTES = 2 * MAX_TOTAL_HEADER_SIZE


def is_compute_path(path: str) -> bool:
    return path == COMPUTE_PREFIX or path.startswith(COMPUTE_PREFIX + "/")


def new_request_id() -> str:
    """Nova's request id format (oslo.context): ``req-<uuid4>``."""
    return f"req-{uuid.uuid4()}"


def request_id_headers(request_id: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-openstack-request-id", request_id.encode()),
        (b"x-compute-request-id", request_id.encode()),
    ]


def version_headers(version: APIVersion) -> list[tuple[bytes, bytes]]:
    return [
        (b"openstack-api-version", f"compute {version}".encode()),
        (b"x-openstack-nova-api-version", str(version).encode()),
        (b"vary", b"OpenStack-API-Version"),
        (b"vary", b"X-OpenStack-Nova-API-Version"),
    ]


class NovaHeadersMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        extra = request_id_headers(request_id)
        path = scope["path"]
        try:
            _check_header_sizes(scope["headers"])
            if is_compute_path(path):
                version = requested_version(headers)
                state["api_version"] = version
                extra += version_headers(version)
            body = await self._read_body(headers, receive)
        except APIError as error:
            if is_compute_path(path) and "api_version" not in state:
                extra += version_headers(MIN_VERSION)[2:]
            await _send_fault(send, error, path, extra)
            return

        replayed = False
        started = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        try:
            await self.app(scope, replay, send_with_headers)
        except Exception:
            if started:  # too late for a fault: the server closes the connection
                raise
            LOG.exception("unexpected error on %s %s (%s)", scope["method"], path, request_id)
            await _send_fault(send, InternalError(), path, extra)

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes:
        """The whole body, refused with 413 as soon as it passes the limit."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLarge()
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _check_header_sizes(headers: list[tuple[bytes, bytes]]) -> None:
    lines = [len(name) + len(value) + 2 for name, value in headers]
    if any(size > MAX_HEADER_LINE for size in lines):
        raise BadRequest("Header line too long")
    if sum(lines) > MAX_TOTAL_HEADER_SIZE:
        raise BadRequest("Headers too large")


async def _send_fault(
    send: Send, error: APIError, path: str, extra: list[tuple[bytes, bytes]]
) -> None:
    body = json.dumps(fault_body(error.status, error.message, path)).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
