"""Fixtures shared by every layer: live ``crashlab serve`` processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.live import LiveServer, fake_cloud_config, start_server

# The fast tier (``pytest -m fast``): tests/app, and the modules elsewhere that test
# pure functions in-process, with no child process and no peer.
FAST_MODULES = frozenset(
    {
        "tests/api/test_redaction.py",
        "tests/drivers/test_support_matrix.py",
        "tests/drivers/test_uris.py",
        "tests/scenarios/test_verdict.py",
        "tests/scenarios/test_vmcore.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.relative_to(config.rootpath).as_posix()
        if module.startswith("tests/app/") or module in FAST_MODULES:
            item.add_marker(pytest.mark.fast)


@pytest.fixture
def crashlab_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Factory: start ``crashlab serve`` on a config; every one is stopped after the test."""
    started: list[LiveServer] = []

    def start(
        config: dict[str, Any] | Path | None = None, env: dict[str, str] | None = None
    ) -> LiveServer:
        where = tmp_path / f"server{len(started)}"
        server = start_server(where, config if config is not None else fake_cloud_config(), env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fake_cloud(crashlab_server: Callable[..., LiveServer]) -> LiveServer:
    """scenarios/fake-cloud.yaml served by a fresh process with a fresh state file."""
    return crashlab_server()
