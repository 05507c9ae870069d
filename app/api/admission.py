"""A bound on each project's compute requests in flight, so one tenant's flood
cannot take every tenant's share of the service.

Requests of a project beyond ``concurrency`` wait, without using a thread,
until one of its own finishes; beyond ``queue`` waiting they are refused with
Nova's 429 ``overLimit`` and a Retry-After. A slot is released when the
response has been sent, not when its background work (the NMI after a 202)
ends. Requests without a valid token pass on, to get their 401.

The token is validated here, once: the routes read it from the request's
state (``app.api.deps.context``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.faults import fault_body
from app.api.middleware import is_compute_path
from app.identity import Token

RETRY_AFTER_SECONDS = 1


class _Share:
    """One project's slots, and how many of its requests wait for one."""

    def __init__(self, concurrency: int) -> None:
        self.slots = asyncio.Semaphore(concurrency)
        self.waiting = 0


class TenantAdmission:
    def __init__(
        self,
        app: ASGIApp,
        validate: Callable[[str | None], Token | None],
        concurrency: int,
        queue: int,
    ) -> None:
        self.app = app
        self.validate = validate
        self.concurrency = concurrency
        self.queue = queue
        self._shares: dict[str, _Share] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = None
        if scope["type"] == "http" and is_compute_path(scope["path"]):
            token = self.validate(_header(scope, b"x-auth-token"))
            scope.setdefault("state", {})["token"] = token
        if token is None:
            await self.app(scope, receive, send)
            return
        project = token.credentials.project_id
        share = self._shares.setdefault(project, _Share(self.concurrency))
        if share.slots.locked() and share.waiting >= self.queue:
            await _refuse(send, scope["path"], project)
            return
        share.waiting += 1
        try:
            await share.slots.acquire()
        finally:
            share.waiting -= 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                share.slots.release()

        async def send_then_release(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                release()

        try:
            await self.app(scope, receive, send_then_release)
        finally:
            release()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


async def _refuse(send: Send, path: str, project: str) -> None:
    body: dict[str, Any] = fault_body(
        429, f"Too many requests of project {project} in flight; retry later.", path
    )
    body["overLimit"]["retryAfter"] = str(RETRY_AFTER_SECONDS)
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
