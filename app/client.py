"""A small REST client for crashlab (and any Nova), used by the CLI and scenarios.

It authenticates against Keystone v3 like any OpenStack client and finds the
compute endpoint in the token's catalog.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from drivers.base import is_uuid

MICROVERSION = "2.17"
# A crash dump in one of these states is followed no further (app/follower.py).
TERMINAL_DUMP_STATES = frozenset({"verified", "failed"})
# A host-side capture's states before its terminal one (its "collected" is terminal).
CAPTURE_RUNNING_STATES = frozenset({"capturing", "verifying"})


class ClientError(Exception):
    """An API call failed; the message is the API's own fault message."""

    def __init__(self, status: int, message: str, request_id: str | None = None) -> None:
        super().__init__(
            f"{message} (HTTP {status})" + (f" (Request-ID: {request_id})" if request_id else "")
        )
        self.status = status
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class Credentials:
    auth_url: str
    username: str
    password: str
    project_name: str
    user_domain: str = "Default"
    project_domain: str = "Default"

    @classmethod
    def from_env(cls, **overrides: str | None) -> Credentials:
        values = {
            "auth_url": os.environ.get("OS_AUTH_URL"),
            "username": os.environ.get("OS_USERNAME"),
            "password": os.environ.get("OS_PASSWORD"),
            "project_name": os.environ.get("OS_PROJECT_NAME"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        missing = [k for k, v in values.items() if not v]
        if missing:
            names = ", ".join(f"OS_{k.upper()}" for k in missing)
            raise ValueError(f"missing credentials: set {names} or pass the matching --os-* flags")
        return cls(**{k: str(v) for k, v in values.items()})


def password_auth(credentials: Credentials) -> dict[str, Any]:
    """Keystone v3's password request, scoped to a project, both domains named."""
    return {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": credentials.username,
                        "password": credentials.password,
                        "domain": {"name": credentials.user_domain},
                    }
                },
            },
            "scope": {
                "project": {
                    "name": credentials.project_name,
                    "domain": {"name": credentials.project_domain},
                }
            },
        }
    }


def request_token(
    credentials: Credentials, http: httpx.Client | None = None, timeout: float = 30.0
) -> httpx.Response:
    """POST the password request to ``/auth/tokens``; the response as it came, unjudged."""
    url = credentials.auth_url.rstrip("/") + "/auth/tokens"
    body = password_auth(credentials)
    if http is None:
        return httpx.post(url, json=body, timeout=timeout)
    return http.post(url, json=body)


def action_path(server_id: str, request_id: str, *, details: bool = True) -> str:
    """An instance action's URL under the compute root: crashlab's extension shows
    the events' ``details``; Nova's own (``details=False``) does not."""
    prefix = "/crashlab" if details else ""
    return f"{prefix}/servers/{server_id}/os-instance-actions/{request_id}"


def wait_for_action(
    get: Callable[[str], httpx.Response],
    server_id: str,
    request_id: str,
    *,
    timeout: float = 120.0,
    poll: float = 0.2,
    max_poll: float | None = None,
    details: bool = True,
) -> dict[str, Any]:
    """The instance action once every event of it has finished.

    ``get`` reads a path under the compute root (``httpx.Client.get`` with that
    base URL, or ``CrashlabClient.get``). The first look is after ``poll``
    seconds, so it does not compete with the dispatch it waits for; the wait
    doubles after each look, up to ``max_poll`` (default: ``poll``). Raises
    ``ClientError`` for a fault and ``TimeoutError`` after ``timeout``.
    """
    path = action_path(server_id, request_id, details=details)

    def finished() -> dict[str, Any] | None:
        response = get(path)
        _raise_for_fault(response)
        action: dict[str, Any] = response.json()["instanceAction"]
        done = action["events"] and all(e["finish_time"] for e in action["events"])
        return action if done else None

    return poll_until(
        finished,
        timeout=timeout,
        poll=poll,
        max_poll=max_poll,
        what=f"no result for {request_id} within {timeout:g} s",
    )


def poll_until(
    look: Callable[[], dict[str, Any] | None],
    *,
    timeout: float,
    poll: float,
    max_poll: float | None = None,
    what: str,
) -> dict[str, Any]:
    """``look()`` after ``poll`` seconds and again, the wait doubling up to
    ``max_poll`` (default: ``poll``), until it returns something; else
    ``TimeoutError(what)`` after ``timeout``."""
    ceiling = poll if max_poll is None else max_poll
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(poll)
        poll = min(poll * 2, ceiling)
        if (found := look()) is not None:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(what)


class CrashlabClient:
    """An authenticated client of one cloud's compute API, at microversion 2.17."""

    def __init__(self, credentials: Credentials, timeout: float = 30.0) -> None:
        self.credentials = credentials
        self.http = httpx.Client(timeout=timeout)
        self.token, self.compute_url = self.login()

    def login(self) -> tuple[str, str]:
        """A token for the credentials, and the public compute URL of its catalog."""
        response = request_token(self.credentials, self.http)
        _raise_for_fault(response)
        catalog = response.json()["token"]["catalog"]
        compute = next(s for s in catalog if s["type"] == "compute")
        url = next(e["url"] for e in compute["endpoints"] if e["interface"] == "public")
        return response.headers["X-Subject-Token"], url.rstrip("/")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {
            "X-Auth-Token": self.token,
            "OpenStack-API-Version": f"compute {MICROVERSION}",
            "X-OpenStack-Nova-API-Version": MICROVERSION,
            **kwargs.pop("headers", {}),
        }
        response = self.http.request(method, self.compute_url + path, headers=headers, **kwargs)
        _raise_for_fault(response)
        return response

    def list_servers(self, detail: bool = True) -> list[dict[str, Any]]:
        servers: list[dict[str, Any]] = self.request(
            "GET", "/servers/detail" if detail else "/servers"
        ).json()["servers"]
        return servers

    def find_server(self, name_or_id: str) -> dict[str, Any]:
        """By uuid, else by exact name, as the OpenStack clients resolve it."""
        if is_uuid(name_or_id):
            server: dict[str, Any] = self.request("GET", f"/servers/{name_or_id}").json()["server"]
            return server
        matches = [s for s in self.list_servers() if s["name"] == name_or_id]
        if len(matches) != 1:
            reason = "No server" if not matches else "More than one server"
            raise ClientError(404, f"{reason} with a name or ID of '{name_or_id}' exists.")
        return matches[0]

    def trigger_crash_dump(
        self, server_id: str, *, require_armed: bool = False, allow_unknown: bool = False
    ) -> str:
        """Returns the request id, which names the instance action.

        ``require_armed`` sends through crashlab's guarded trigger, which
        refuses (409) a server whose crash readiness is not armed.
        """
        if not require_armed:
            response = self.request(
                "POST", f"/servers/{server_id}/action", json={"trigger_crash_dump": None}
            )
        else:
            options = {"require_armed": True, "allow_unknown": allow_unknown}
            response = self.request(
                "POST",
                f"/crashlab/servers/{server_id}/action",
                json={"trigger_crash_dump": options},
            )
        return response.headers["x-openstack-request-id"]

    def get_readiness(self, server_id: str, *, refresh: bool = False) -> dict[str, Any]:
        """The server's crash readiness: the last check, or a fresh one."""
        params = {"refresh": "true"} if refresh else {}
        readiness: dict[str, Any] = self.request(
            "GET", f"/crashlab/servers/{server_id}/crash-readiness", params=params
        ).json()["crash_readiness"]
        return readiness

    def capture_memory_dump(self, server_id: str, then: str = "resume") -> dict[str, Any]:
        """Start a host-side memory capture; returns its crash dump, still capturing."""
        dump: dict[str, Any] = self.request(
            "POST",
            f"/crashlab/servers/{server_id}/action",
            json={"capture_memory_dump": {"then": then}},
        ).json()["crash_dump"]
        return dump

    def wait_for_capture(
        self, server_id: str, dump_id: str, timeout: float = 300.0
    ) -> dict[str, Any]:
        """The capture's crash dump once it is verified, collected or failed."""

        def finished() -> dict[str, Any] | None:
            dump = self.get_crash_dump(server_id, dump_id)
            return None if dump["state"] in CAPTURE_RUNNING_STATES else dump

        return poll_until(
            finished,
            timeout=timeout,
            poll=0.5,
            what=f"the capture {dump_id} was not done within {timeout:g} s",
        )

    def list_actions(self, server_id: str) -> list[dict[str, Any]]:
        actions: list[dict[str, Any]] = self.request(
            "GET", f"/servers/{server_id}/os-instance-actions"
        ).json()["instanceActions"]
        return actions

    def get_action(self, server_id: str, request_id: str) -> dict[str, Any]:
        """The action with its events and their details (crashlab extension)."""
        action: dict[str, Any] = self.get(action_path(server_id, request_id)).json()[
            "instanceAction"
        ]
        return action

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)

    def wait_for_event(
        self, server_id: str, request_id: str, timeout: float = 120.0
    ) -> dict[str, Any]:
        """Poll until every event of the action has a result."""
        return wait_for_action(self.get, server_id, request_id, timeout=timeout)

    # crashlab's crash dumps: what followed each NMI

    def list_crash_dumps(self, server_id: str) -> list[dict[str, Any]]:
        dumps: list[dict[str, Any]] = self.get(crash_dumps_path(server_id)).json()["crash_dumps"]
        return dumps

    def get_crash_dump(self, server_id: str, dump_id: str) -> dict[str, Any]:
        dump: dict[str, Any] = self.get(crash_dumps_path(server_id, dump_id)).json()["crash_dump"]
        return dump

    def wait_for_dump(
        self,
        server_id: str,
        request_id: str,
        *,
        timeout: float = 600.0,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """The crash dump of ``request_id`` once terminal; ``on_change`` sees each new state."""
        return wait_for_dump(self.get, server_id, request_id, timeout=timeout, on_change=on_change)

    def download_vmcore(self, server_id: str, dump_id: str, out: Path) -> int:
        """Stream the vmcore to ``out``; returns its size."""
        url = self.compute_url + crash_dumps_path(server_id, dump_id) + "/vmcore"
        with self.http.stream("GET", url, headers={"X-Auth-Token": self.token}) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for_fault(response)
            with out.open("wb") as file:
                for chunk in response.iter_bytes(1 << 20):
                    file.write(chunk)
        return out.stat().st_size

    def close(self) -> None:
        self.http.close()


def crash_dumps_path(server_id: str, dump_id: str | None = None) -> str:
    path = f"/crashlab/servers/{server_id}/crash-dumps"
    return path if dump_id is None else f"{path}/{dump_id}"


def wait_for_dump(
    get: Callable[[str], httpx.Response],
    server_id: str,
    request_id: str,
    *,
    timeout: float = 600.0,
    poll: float = 0.5,
    on_change: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The crash dump that ``request_id``'s NMI caused, once it is terminal.

    ``get`` reads a path under the compute root, as for ``wait_for_action``.
    Raises ``TimeoutError`` after ``timeout``.
    """
    seen: list[str] = []

    def terminal() -> dict[str, Any] | None:
        response = get(crash_dumps_path(server_id))
        _raise_for_fault(response)
        dumps = response.json()["crash_dumps"]
        dump: dict[str, Any] | None = next(
            (d for d in dumps if d["request_id"] == request_id), None
        )
        if dump is None:
            return None
        if on_change is not None and dump["state"] not in seen:
            seen.append(dump["state"])
            on_change(dump)
        return dump if dump["state"] in TERMINAL_DUMP_STATES else None

    return poll_until(
        terminal,
        timeout=timeout,
        poll=poll,
        what=f"the crash dump of {request_id} was not done within {timeout:g} s",
    )


def _raise_for_fault(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    message = response.reason_phrase
    try:
        body = response.json()
        fault = next(iter(body.values()))
        message = fault.get("message", message)
    except (ValueError, StopIteration, AttributeError):
        pass
    raise ClientError(response.status_code, message, response.headers.get("x-compute-request-id"))
