"""Fixtures for the reliability suite: live services shared by a module.

Starting ``crashlab serve`` costs about a second, so tests that only read (or
that each use their own servers) share one process per module. Every process
is stopped after its module, whatever happened.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.domains import PREFIX, remove, start_blank
from tests.live import LiveServer, start_server


@pytest.fixture(scope="module")
def module_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., LiveServer]]:
    """Factory: ``module_server(config_dict)``, a service kept for the whole module."""
    started: list[LiveServer] = []

    def start(config: dict[str, Any] | Path, env: dict[str, str] | None = None) -> LiveServer:
        server = start_server(tmp_path_factory.mktemp("crashlab"), config, env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def blank_domains() -> Iterator[Callable[[], str]]:
    """Factory: start a blank domain, return its name; every one is removed after the test."""
    names: list[str] = []

    def make() -> str:
        name = PREFIX + secrets.token_hex(4)
        names.append(name)
        start_blank(name)
        return name

    yield make
    for name in names:
        remove(name)
