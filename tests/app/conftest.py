"""The in-process tier: every test gets its own app, state file and fake machines; and a
private sshd for the collector gate's tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from app.api.app import create_app
from drivers.fake import FakeDriver
from tests.app.cloud import AppCloud, fake_cloud_config
from tests.sshd import SSHD, PrivateSSHD


@pytest.fixture
def start_cloud(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., AppCloud]]:
    """Factory: ``start_cloud(**config_overrides)``, an app on a fresh state file, lifespan run."""
    monkeypatch.setenv("CRASHLAB_SECRET_KEY", "")  # a key file next to the state, per test
    # The fake driver's machines live in the process, keyed by server id: start from none.
    FakeDriver.machines.clear()
    started: list[AppCloud] = []
    with ExitStack() as stack:

        def start(**overrides: Any) -> AppCloud:
            config = fake_cloud_config(**overrides)
            state = tmp_path / f"state-{len(started)}.db"
            client = stack.enter_context(TestClient(create_app(config, state_file=state)))
            started.append(AppCloud(client, config))
            return started[-1]

        yield start
    FakeDriver.machines.clear()


@pytest.fixture
def cloud(start_cloud: Callable[..., AppCloud]) -> AppCloud:
    """scenarios/fake-cloud.yaml, served in-process on a fresh state file."""
    return start_cloud()


@pytest.fixture
def private_sshd(tmp_path: Path) -> Iterator[PrivateSSHD]:
    """A real OpenSSH sshd on 127.0.0.1 in ``tmp_path/sshd``, stopped by its PID afterwards."""
    if not SSHD.exists():
        pytest.fail(f"{SSHD} is missing: apt-get install openssh-server (scripts/apt-packages)")
    sshd = PrivateSSHD(tmp_path / "sshd")
    sshd.start()
    try:
        yield sshd
    finally:
        sshd.stop()
