"""The crashlab API as a scenario uses it: over HTTP, as an operator and a user would.

``ScenarioAPI`` holds two authenticated clients of one service: an admin who
registers servers through the admin extension and reads the instance
actions' events, and the owning user who triggers the crash dump and reads,
and downloads, what crashlab followed after it. ``LocalService`` starts ``crashlab serve``
(scenarios/serve.py) on a free loopback port with a generated config holding
exactly those two users, and its dump collector on another free loopback port.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
from cryptography.fernet import Fernet

from app.client import CrashlabClient, Credentials, wait_for_action, wait_for_dump
from app.events import CRASH_DUMP_EVENT
from app.identity import hash_password
from app.process import free_port
from scenarios.serve import ServeProcess, write_config

POLL_SECONDS = 0.2
FINISH_TIMEOUT = 30.0


@dataclass(frozen=True)
class Account:
    """A Keystone user scoped to one project."""

    username: str
    password: str = field(repr=False)
    project: str


# The users of scenarios/fake-cloud.yaml, the defaults for --api.
FAKE_CLOUD_ADMIN = Account("admin", "admin-secret", "admin")
FAKE_CLOUD_USER = Account("alice", "alice-secret", "alice")


class ScenarioAPI:
    """An admin and a user of one crashlab (or Nova-compatible) API at ``url``."""

    def __init__(self, url: str, admin: Account, user: Account) -> None:
        self.url = url.rstrip("/")
        self.admin_account = admin
        self.user_account = user
        self._admin: CrashlabClient | None = None
        self._user: CrashlabClient | None = None

    def _login(self, account: Account) -> CrashlabClient:
        return CrashlabClient(
            Credentials(
                auth_url=f"{self.url}/identity/v3",
                username=account.username,
                password=account.password,
                project_name=account.project,
            )
        )

    @property
    def admin(self) -> CrashlabClient:
        if self._admin is None:
            self._admin = self._login(self.admin_account)
        return self._admin

    @property
    def user(self) -> CrashlabClient:
        if self._user is None:
            self._user = self._login(self.user_account)
        return self._user

    def login(self) -> None:
        """Authenticate both accounts now, so bad credentials fail before a guest boots."""
        _ = self.admin, self.user

    def register(self, name: str, driver: str, driver_info: dict[str, Any], **dump: Any) -> str:
        """Register a server owned by the user, through the admin extension; its uuid.

        ``dump`` holds the server's ``dump_target``, ``dump_timeouts`` and
        ``expected_kernel_release`` (app/dump_targets.py), where given.
        """
        body = {
            "server": {
                "name": name,
                "project_id": self.user_account.project,
                "user_id": self.user_account.username,
                "driver": driver,
                "driver_info": driver_info,
                **{key: value for key, value in dump.items() if value is not None},
            }
        }
        response = self.admin.request("POST", "/crashlab/servers", json=body)
        server_id: str = response.json()["server"]["uuid"]
        return server_id

    def dump_target_key(self, server_id: str) -> dict[str, Any]:
        """The key of the server's ssh dump target and the collector to send to (admin)."""
        response = self.admin.request("GET", f"/crashlab/servers/{server_id}/dump-target/key")
        key: dict[str, Any] = response.json()["dump_target_key"]
        return key

    def unregister(self, server_id: str) -> None:
        self.admin.request("DELETE", f"/crashlab/servers/{server_id}")

    def trigger_crash_dump(self, server_id: str) -> str:
        """POST the action as the owning user; the request id from the 202."""
        return self.user.trigger_crash_dump(server_id)

    def wait_for_trigger(
        self, server_id: str, request_id: str, timeout: float
    ) -> dict[str, Any] | None:
        """The instance action once its crash-dump event has a result; None after ``timeout``.

        Read as admin through crashlab's extension: at 2.17 Nova shows events
        to admins only, and the extension adds their details (the driver's
        error). The events that follow the dump may still be running.
        """
        deadline = time.monotonic() + timeout
        while True:
            action = self.admin.get_action(server_id, request_id)
            trigger = [e for e in action["events"] if e["event"] == CRASH_DUMP_EVENT]
            if trigger and trigger[0]["finish_time"]:
                return action
            if time.monotonic() > deadline:
                return None
            time.sleep(POLL_SECONDS)

    def wait_for_dump(
        self,
        server_id: str,
        request_id: str,
        timeout: float,
        *,
        on_change: Callable[[dict[str, Any]], None],
        on_poll: Callable[[], None],
    ) -> dict[str, Any] | None:
        """The request's crash dump once terminal, as its owner reads it; None after ``timeout``.

        ``on_change`` sees each new state, ``on_poll`` runs before each look.
        """

        def get(path: str) -> httpx.Response:
            on_poll()
            return self.user.get(path)

        try:
            return wait_for_dump(get, server_id, request_id, timeout=timeout, on_change=on_change)
        except TimeoutError:
            return None

    def finished_action(self, server_id: str, request_id: str) -> dict[str, Any]:
        """The instance action once all its events have ended (a terminal dump's last
        event ends just after its state is stored), else as it stands."""
        try:
            return wait_for_action(self.admin.get, server_id, request_id, timeout=FINISH_TIMEOUT)
        except TimeoutError:
            return self.admin.get_action(server_id, request_id)

    def close(self) -> None:
        for client in (self._admin, self._user):
            if client is not None:
                client.close()
        self._admin = self._user = None


class LocalService(ServeProcess):
    """``crashlab serve`` as a child process (scenarios/serve.py), with a generated config."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.admin = Account("admin", secrets.token_urlsafe(12), "admin")
        self.user = Account("scenario", secrets.token_urlsafe(12), "scenario")
        super().__init__(
            workdir / "crashlab.yaml",
            workdir / "state.db",
            workdir / "serve.log",
            log_level="warning",
        )

    def api(self) -> ScenarioAPI:
        return ScenarioAPI(self.url, self.admin, self.user)

    def start(self, timeout: float = 60.0) -> Self:
        write_config(self.config_path, self.config())
        return super().start(timeout)

    def config(self) -> dict[str, Any]:
        # Hashing cost 4: these passwords live for one run and are random.
        users = [
            {
                "name": account.username,
                "password_hash": hash_password(account.password, rounds=4),
                "project": account.project,
                "roles": [role],
            }
            for account, role in ((self.admin, "admin"), (self.user, "member"))
        ]
        return {
            "secret_key": Fernet.generate_key().decode(),
            "identity": {"users": users},
            # The bare-metal paths' dumps arrive over SSH (scenarios/via.py).
            "collector": {"enabled": True, "port": free_port()},
        }
