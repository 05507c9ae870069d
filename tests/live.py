"""A real ``crashlab serve`` process on loopback, for tests over HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from app.client import Credentials, request_token
from scenarios.serve import ServeProcess

REPO = Path(__file__).resolve().parent.parent
FAKE_CLOUD = REPO / "scenarios" / "fake-cloud.yaml"
PROJECT_OF = {"admin": "admin", "alice": "alice", "bob": "bob", "carol": "alice"}


def fake_cloud_config(**overrides: Any) -> dict[str, Any]:
    """scenarios/fake-cloud.yaml as a dict, with top-level keys replaced."""
    config: dict[str, Any] = yaml.safe_load(FAKE_CLOUD.read_text())
    config.update(overrides)
    return config


class LiveServer(ServeProcess):
    """scenarios/serve.py's ``crashlab serve`` child, with the tests' logins."""

    def token(self, user: str, password: str | None = None, project: str | None = None) -> str:
        credentials = Credentials(
            self.auth_url, user, password or f"{user}-secret", project or PROJECT_OF.get(user, user)
        )
        response = request_token(credentials, timeout=10)
        assert response.status_code == 201, response.text
        return response.headers["X-Subject-Token"]

    def client(self, user: str, version: str = "2.17") -> httpx.Client:
        """An httpx client for the compute API, authenticated as ``user``."""
        return httpx.Client(
            base_url=self.compute_url,
            headers={
                "X-Auth-Token": self.token(user),
                "OpenStack-API-Version": f"compute {version}",
            },
            timeout=30,
        )


def start_server(
    tmp: Path, config: dict[str, Any] | Path, env: dict[str, str] | None = None
) -> LiveServer:
    """Start ``crashlab serve`` on a config (a dict is written to ``tmp``)."""
    env = {"CRASHLAB_SECRET_KEY": "", **(env or {})}
    return LiveServer.in_workdir(tmp, config, env=env).start(timeout=30.0)


@contextmanager
def started_servers(workdir: Callable[[int], Path]) -> Iterator[Callable[..., LiveServer]]:
    """A ``start(config, env)`` for the block: each server in ``workdir(index)``, on
    scenarios/fake-cloud.yaml when no config is given; all of them stopped when the block ends.
    """
    started: list[LiveServer] = []

    def start(
        config: dict[str, Any] | Path | None = None, env: dict[str, str] | None = None
    ) -> LiveServer:
        where = workdir(len(started))
        server = start_server(where, config if config is not None else fake_cloud_config(), env)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
