"""crashlab in-process: the app on the fake cloud, called through FastAPI's TestClient.

The config is scenarios/fake-cloud.yaml with its users' passwords hashed again
at bcrypt's lowest cost (4): a login then costs about a millisecond instead of
the fake cloud's ~70 ms, and every test may log in as it needs.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import yaml
from starlette.testclient import TestClient

from app.config import Config
from app.store import Store

REPO = Path(__file__).resolve().parents[2]
FAKE_CLOUD = REPO / "scenarios" / "fake-cloud.yaml"
PROJECT_OF = {"admin": "admin", "alice": "alice", "bob": "bob", "carol": "alice"}


@cache
def _cheap_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


def fake_cloud_config(**overrides: Any) -> Config:
    """The fake cloud (password ``<name>-secret``), top-level keys replaced by ``overrides``."""
    raw: dict[str, Any] = yaml.safe_load(FAKE_CLOUD.read_text())
    for user in raw["identity"]["users"]:
        user["password_hash"] = _cheap_hash(f"{user['name']}-secret")
    return Config.model_validate({**raw, **overrides})


def login_body(user: str, password: str, project: str) -> dict[str, Any]:
    """Keystone v3's password authentication, scoped to a project of the Default domain."""
    default = {"name": "Default"}
    return {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {"user": {"name": user, "password": password, "domain": default}},
            },
            "scope": {"project": {"name": project, "domain": default}},
        }
    }


class AppCloud:
    """A running app and its config; requests as a user of the fake cloud."""

    def __init__(self, client: TestClient, config: Config) -> None:
        self.client = client
        self.config = config
        self.ids = {server.name: server.server_uuid for server in config.servers}
        self._tokens: dict[str, str] = {}

    @property
    def store(self) -> Store:
        store: Store = self.client.app.state.service.store  # type: ignore[attr-defined]
        return store

    def token(self, user: str) -> str:
        if user not in self._tokens:
            body = login_body(user, f"{user}-secret", PROJECT_OF[user])
            response = self.client.post("/identity/v3/auth/tokens", json=body)
            assert response.status_code == 201, response.text
            self._tokens[user] = response.headers["X-Subject-Token"]
        return self._tokens[user]

    def headers(self, user: str, version: str = "2.17") -> dict[str, str]:
        return {"X-Auth-Token": self.token(user), "OpenStack-API-Version": f"compute {version}"}

    def get(self, user: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(f"/v2.1{path}", headers=self.headers(user), **kwargs)

    def action(self, user: str, name: str, body: dict[str, Any]) -> httpx.Response:
        """POST ``body`` to the action of the server called ``name``."""
        path = f"/v2.1/servers/{self.ids[name]}/action"
        return self.client.post(path, json=body, headers=self.headers(user))

    def trigger(self, user: str, name: str) -> httpx.Response:
        return self.action(user, name, {"trigger_crash_dump": None})

    def event(self, user: str, name: str, request_id: str) -> dict[str, Any]:
        """The one event of an action, as the extension's action view shows it."""
        path = f"/crashlab/servers/{self.ids[name]}/os-instance-actions/{request_id}"
        response = self.get(user, path)
        assert response.status_code == 200, response.text
        [event] = response.json()["instanceAction"]["events"]
        return dict(event)


def assert_fault(response: httpx.Response, status: int, name: str, message: str) -> None:
    """A Nova fault: ``{name: {"code": status, "message": message}}``."""
    assert response.status_code == status, response.text
    assert response.json() == {name: {"code": status, "message": message}}
