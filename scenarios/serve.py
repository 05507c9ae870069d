"""``crashlab serve`` as a child process on loopback: the one launcher of the service.

The scenarios, the benchmarks, the load run and the tests all start the
service through ``ServeProcess``. It runs on app/process.py, so the child has
its own process group and a lifeline: run as ``python -m scenarios.serve
<serve flags>``, the child watches its stdin and exits when the parent dies,
even by SIGKILL, so a killed pytest or bench leaves no service behind.

    with ServeProcess.in_workdir(workdir, config) as service:
        service.url          # http://127.0.0.1:<free port>
        service.startup_s    # launch to the first 200 on GET /
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

import httpx
import yaml

from app.process import EmulatorProcess, free_port, hold_lifeline


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Write a crashlab config as YAML, readable by its owner only (it holds secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


class ServeProcess:
    """One ``crashlab serve`` child on ``127.0.0.1:port``; ``url`` is its root.

    ``env`` is added to this process's environment for the child. ``start``
    may follow ``stop`` or ``kill``: the same port, config and state file.
    """

    def __init__(
        self,
        config_path: Path,
        state_file: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        log_level: str | None = None,
    ) -> None:
        self.config_path = config_path
        self.state_file = state_file
        self.log_path = log_path
        self.env = dict(env or {})
        self.port = port or free_port()
        self.log_level = log_level
        self.startup_s = 0.0
        self._child: EmulatorProcess | None = None

    @classmethod
    def in_workdir(
        cls,
        workdir: Path,
        config: dict[str, Any] | Path,
        env: dict[str, str] | None = None,
        log_level: str | None = None,
    ) -> Self:
        """A service whose files are in ``workdir``; a dict config is written there (0600)."""
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = config if isinstance(config, Path) else workdir / "crashlab.yaml"
        if isinstance(config, dict):
            write_config(config_path, config)
        return cls(
            config_path, workdir / "state.db", workdir / "serve.log", env=env, log_level=log_level
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def compute_url(self) -> str:
        return f"{self.url}/v2.1"

    @property
    def auth_url(self) -> str:
        return f"{self.url}/identity/v3"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The running child (a ``subprocess.Popen``), None when stopped."""
        return self._child.popen if self._child else None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> Self:
        """Start the service and wait for its first 200 on ``GET /``.

        Raises app.process's ``EmulatorStartError``, with the log's tail, if it exits or does
        not answer within ``timeout``.
        """
        flags = [
            *("--config", str(self.config_path.resolve())),
            *("--state", str(self.state_file.resolve())),
            *("--host", "127.0.0.1", "--port", str(self.port)),
        ]
        if self.log_level:
            flags += ["--log-level", self.log_level]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._child = EmulatorProcess(
            "crashlab serve",
            [sys.executable, "-m", "scenarios.serve", *flags],
            env={**os.environ, **self.env},
            log_path=self.log_path.resolve(),
        )
        started = time.monotonic()
        self._child.start(ready=self._answers, timeout=timeout, poll=0.01)
        self.startup_s = time.monotonic() - started
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s. Idempotent."""
        if self._child is not None:
            self._child.stop(timeout=10)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown handler runs."""
        if self._child is not None:
            self._child.kill()

    def log_tail(self, lines: int = 20) -> str:
        return self._child.log_tail(lines) if self._child else ""

    def _answers(self) -> bool:
        try:
            return httpx.get(self.url + "/", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False


def main(argv: list[str] | None = None) -> int:
    """In the child: hold the lifeline, then run ``crashlab serve`` with ``argv``."""
    hold_lifeline()
    from app.cli import main as crashlab

    return crashlab(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
