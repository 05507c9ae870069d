"""Fixtures for the reliability suite: live services shared by a module.

Starting ``crashlab serve`` costs about a second, so tests that only read (or
that each use their own servers) share one process per module. Every process
is stopped after its module, whatever happened. ``alice`` and ``admin`` are
clients of the ``cloud`` a module defines.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.domains import PREFIX, remove, start_blank
from tests.live import LiveServer, started_servers


@pytest.fixture(scope="module")
def module_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., LiveServer]]:
    """Factory: ``module_server(config_dict)``, a service kept for the whole module."""
    with started_servers(lambda _: tmp_path_factory.mktemp("crashlab")) as start:
        yield start


@pytest.fixture(scope="module")
def alice(cloud: LiveServer) -> Iterator[httpx.Client]:
    """Alice's client of the module's ``cloud``, kept for the whole module."""
    with cloud.client("alice") as client:
        yield client


@pytest.fixture(scope="module")
def admin(cloud: LiveServer) -> Iterator[httpx.Client]:
    """The admin's client of the module's ``cloud``, kept for the whole module."""
    with cloud.client("admin") as client:
        yield client


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
