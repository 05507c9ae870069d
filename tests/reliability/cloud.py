"""Helpers the reliability tests share: configs, ids, waiting for events, faults.

Everything goes over HTTP to a real ``crashlab serve``; nothing here reaches
into the service's process.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx

from app import client
from app.config import ID_NAMESPACE
from app.identity import hash_password
from tests.live import fake_cloud_config

# Nova's fault names (Fault._fault_names).
FAULT_NAMES = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    409: "conflictingRequest",
    413: "overLimit",
    415: "badMediaType",
}
TRIGGER = {"trigger_crash_dump": None}


def config_server_id(name: str) -> str:
    """The uuid crashlab derives for a config server without one (app.config.ServerConfig)."""
    return str(uuid.uuid5(ID_NAMESPACE, f"server:{name}"))


def fake_server(
    name: str, owner: str = "alice", driver: str = "fake", **info: Any
) -> dict[str, Any]:
    """A config ``servers:`` entry on the fake driver, owned by ``owner`` (user and project)."""
    return {
        "name": name,
        "project_id": owner,
        "user_id": owner,
        "driver": driver,
        "driver_info": {"power_state": "running", **info},
    }


def cloud_config(
    *, extra_servers: list[dict[str, Any]] | None = None, **overrides: Any
) -> dict[str, Any]:
    """scenarios/fake-cloud.yaml plus ``extra_servers``, top-level keys replaced."""
    config = fake_cloud_config(**overrides)
    config["servers"] = [*config["servers"], *(extra_servers or [])]
    return config


def user(name: str, project: str, roles: list[str]) -> dict[str, Any]:
    """A config user whose password is ``<name>-secret``, as in the fake cloud."""
    return {
        "name": name,
        "password_hash": hash_password(f"{name}-secret", rounds=4),
        "project": project,
        "roles": roles,
    }


def trigger(client: httpx.Client, server_id: str, **headers: str) -> httpx.Response:
    return client.post(f"/servers/{server_id}/action", json=TRIGGER, headers=headers)


def wait_for_action(
    admin: httpx.Client, server_id: str, request_id: str, timeout: float = 15.0
) -> dict[str, Any]:
    """The instance action (with event details, via the extension) once no event is running."""
    return client.wait_for_action(admin.get, server_id, request_id, timeout=timeout, poll=0.05)


def assert_fault(
    response: httpx.Response, status: int, contains: str = "", *, identity: bool = False
) -> str:
    """A fault in Nova's format (Keystone's for identity paths); returns its message."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    name = "error" if identity else FAULT_NAMES.get(status, "computeFault")
    assert list(body) == [name], body
    assert body[name]["code"] == status
    message: str = body[name]["message"]
    assert contains in message, message
    return message


def nmi_lines(path: Path) -> list[str]:
    """Lines the fake driver's ``nmi_log`` holds: one server id per NMI sent."""
    return path.read_text().split() if path.exists() else []
