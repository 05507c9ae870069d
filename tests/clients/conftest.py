"""The fake cloud behind one ``crashlab serve`` per test module.

The NMI guard is off, so several tests may dump the same server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.clients.harness import Cloud
from tests.live import fake_cloud_config, start_server


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    tmp = tmp_path_factory.mktemp("cloud")
    server = start_server(tmp / "serve", fake_cloud_config(nmi_guard={"enabled": False}))
    try:
        home = tmp / "home"
        home.mkdir()
        with server.client("admin") as admin:
            listed = admin.get("/servers", params={"all_tenants": "1"}).json()["servers"]
            yield Cloud(server, home, admin, {s["name"]: s["id"] for s in listed})
    finally:
        server.stop()
