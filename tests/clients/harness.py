"""Running the real OpenStack clients against a live ``crashlab serve``; reading their output.

The CLIs run as subprocesses with only the standard ``OS_*`` settings and a
private ``HOME``, so no ``clouds.yaml`` of the developer's leaks in.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.client import wait_for_action
from tests.live import PROJECT_OF, LiveServer

BIN = Path(sys.executable).parent
REQUEST_ID = r"req-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
NOVA_DEPRECATION = "nova CLI is deprecated and will be removed in a future release\n"
ALICE_SERVERS = {
    "alice-active": "ACTIVE",
    "alice-paused": "PAUSED",
    "alice-stopped": "SHUTOFF",
    "alice-error": "ERROR",
    "alice-locked": "ACTIVE",
    "alice-nonmi": "ACTIVE",
}


@dataclass(frozen=True)
class Run:
    """What a CLI run printed, and how it exited."""

    returncode: int
    stdout: str
    stderr: str


def standard_env(server: LiveServer, user: str, home: Path) -> dict[str, str]:
    """The settings a Nova user exports for password authentication, and nothing else."""
    return {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(home),
        "LC_ALL": "C.UTF-8",
        "OS_AUTH_URL": server.auth_url,
        "OS_USERNAME": user,
        "OS_PASSWORD": f"{user}-secret",
        "OS_PROJECT_NAME": PROJECT_OF[user],
        "OS_USER_DOMAIN_NAME": "Default",
        "OS_PROJECT_DOMAIN_NAME": "Default",
    }


def run(command: str, *args: str, env: dict[str, str], cwd: Path | None = None) -> Run:
    """One of the venv's console scripts, with exactly ``env``."""
    done = subprocess.run(
        [str(BIN / command), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Run(done.returncode, done.stdout, done.stderr)


@dataclass
class Cloud:
    """The fake cloud behind one ``crashlab serve``, with an admin HTTP client."""

    server: LiveServer
    home: Path
    admin: httpx.Client
    ids: dict[str, str]

    def env(self, user: str, version: str | None = None) -> dict[str, str]:
        env = standard_env(self.server, user, self.home)
        if version is not None:
            env["OS_COMPUTE_API_VERSION"] = version
        return env

    def openstack(self, user: str, *args: str, version: str | None = None) -> Run:
        return run("openstack", *args, env=self.env(user, version))

    def nova(self, user: str, *args: str, version: str | None = None) -> Run:
        return run("nova", *args, env=self.env(user, version))

    def detail(self, name: str) -> dict[str, Any]:
        server: dict[str, Any] = self.admin.get(f"/servers/{self.ids[name]}").json()["server"]
        return server

    def actions(self, name: str) -> list[dict[str, Any]]:
        """The server's instance actions, newest first, as Nova lists them."""
        response = self.admin.get(f"/servers/{self.ids[name]}/os-instance-actions")
        actions: list[dict[str, Any]] = response.json()["instanceActions"]
        return actions

    def finished_action(self, name: str, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The action with its events once every event has finished."""
        return wait_for_action(
            self.admin.get, self.ids[name], request_id, timeout=timeout, poll=0.05, details=False
        )

    def new_actions(self, name: str, before: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen = {a["request_id"] for a in before}
        return [a for a in self.actions(name) if a["request_id"] not in seen]

    def trigger(self, name: str) -> str:
        """A trigger_crash_dump over HTTP as admin; its request id, once finished."""
        response = self.admin.post(
            f"/servers/{self.ids[name]}/action", json={"trigger_crash_dump": None}
        )
        assert response.status_code == 202, response.text
        request_id = response.headers["x-openstack-request-id"]
        self.finished_action(name, request_id)
        return request_id

    def set_locked(self, name: str, locked: bool) -> None:
        action = {"lock": None} if locked else {"unlock": None}
        response = self.admin.post(f"/servers/{self.ids[name]}/action", json=action)
        assert response.status_code == 202, response.text


def table(text: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the one ASCII table a CLI printed."""
    rows = [
        [cell.strip() for cell in line.strip()[1:-1].split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]
    return rows[0], rows[1:]


def show_table(text: str) -> dict[str, str]:
    """A two-column show table as a dict; continuation lines join with newlines."""
    _, rows = table(text)
    shown: dict[str, str] = {}
    last = ""
    for key, value in rows:
        if key:
            shown[key] = value
            last = key
        else:
            shown[last] += "\n" + value
    return shown


def as_json(run_: Run) -> Any:
    assert run_.returncode == 0, run_.stderr
    return json.loads(run_.stdout)


def debug_request(stderr: str, method: str, url_suffix: str) -> dict[str, str]:
    """The headers of the first request keystoneauth logged at --debug for method and URL."""
    pattern = re.compile(rf"REQ: curl -g -i -X {method} (\S+) ((?:-H \"[^\"]*\" ?)*)")
    for match in pattern.finditer(stderr):
        if match.group(1).split("?")[0].endswith(url_suffix):
            headers = re.findall(r'-H "([^:"]+): ?([^"]*)"', match.group(2))
            return dict(headers)
    raise AssertionError(f"no {method} …{url_suffix} in the debug log")
