"""A real ``crashlab serve`` process on loopback, for tests over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from app.process import free_port

REPO = Path(__file__).resolve().parent.parent
FAKE_CLOUD = REPO / "scenarios" / "fake-cloud.yaml"
PROJECT_OF = {"admin": "admin", "alice": "alice", "bob": "bob", "carol": "alice"}


def fake_cloud_config(**overrides: Any) -> dict[str, Any]:
    """scenarios/fake-cloud.yaml as a dict, with top-level keys replaced."""
    config: dict[str, Any] = yaml.safe_load(FAKE_CLOUD.read_text())
    config.update(overrides)
    return config


@dataclass
class LiveServer:
    """One ``crashlab serve`` subprocess; ``url`` is its root."""

    config_path: Path
    state_file: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def compute_url(self) -> str:
        return f"{self.url}/v2.1"

    @property
    def auth_url(self) -> str:
        return f"{self.url}/identity/v3"

    def start(self, timeout: float = 30.0) -> LiveServer:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--config",
                str(self.config_path),
                "--state",
                str(self.state_file),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            cwd=REPO,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"crashlab serve exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"crashlab serve did not answer within {timeout} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown handler runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def token(self, user: str, password: str | None = None, project: str | None = None) -> str:
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": user,
                            "password": password or f"{user}-secret",
                            "domain": {"name": "Default"},
                        }
                    },
                },
                "scope": {
                    "project": {
                        "name": project or PROJECT_OF.get(user, user),
                        "domain": {"name": "Default"},
                    }
                },
            }
        }
        response = httpx.post(self.auth_url + "/auth/tokens", json=body, timeout=10)
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
    tmp.mkdir(parents=True, exist_ok=True)
    if isinstance(config, dict):
        config_path = tmp / "crashlab.yaml"
        config_path.write_text(yaml.safe_dump(config))
    else:
        config_path = config
    server = LiveServer(
        config_path=config_path,
        state_file=tmp / "state.db",
        log_path=tmp / "serve.log",
        env={"CRASHLAB_SECRET_KEY": "", **(env or {})},
    )
    return server.start()
