"""Admin input is data, never a command: hostile registrations are 400s that create nothing.

A registration through the admin extension names a backend; crashlab must
never let it run a program, read or append to a file, or open a socket of the
admin's choosing (drivers/uris.py). Each case below is refused in Nova's fault
format, and the inventory is read afterwards to show nothing was added.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live import LiveServer
from tests.reliability.cloud import assert_fault, cloud_config


@pytest.fixture(scope="module")
def cloud(module_server: Callable[..., LiveServer]) -> LiveServer:
    return module_server(cloud_config())


@pytest.fixture
def script(tmp_path: Path) -> tuple[Path, Path]:
    """An executable that would leave a marker file if anything ran it."""
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.sh"
    path.write_text(f"#!/bin/sh\ntouch {marker}\n")
    path.chmod(0o755)
    return path, marker


def _server(driver: str, driver_info: dict[str, Any], name: str = "hostile") -> dict[str, Any]:
    body = {"name": name, "project_id": "alice", "user_id": "alice", "driver": driver}
    return {"server": body | {"driver_info": driver_info}}


def _inventory(admin: httpx.Client) -> list[str]:
    response = admin.get("/crashlab/servers")
    assert response.status_code == 200, response.text
    return sorted(server["uuid"] for server in response.json()["servers"])


def _refused(admin: httpx.Client, body: Any, contains: str = "", **kwargs: Any) -> str:
    before = _inventory(admin)
    if isinstance(body, bytes):
        headers = {"Content-Type": "application/json"}
        response = admin.post("/crashlab/servers", content=body, headers=headers)
    else:
        response = admin.post("/crashlab/servers", json=body)
    message = assert_fault(response, 400, contains, **kwargs)
    assert _inventory(admin) == before, "a refused registration created a server"
    return message


HOSTILE_URIS = [
    "qemu+ext:///system?command={script}",
    "qemu+ssh://localhost/system?command={script}",
    "qemu+ssh://-oProxyCommand={script}/system",
    "qemu+ssh://-oProxyCommand={script}@localhost/system",
    "test:///etc/hostname",
    "test://{script}",
    "qemu+unix:///system?socket=/var/run/libvirt/libvirt-sock",
    "qemu:///system?socket=/tmp/any.sock",
    "qemu+ssh://localhost/system?keyfile=/etc/shadow",
    "qemu+tls://localhost/system?pkipath=/root",
    "qemu+tcp://localhost/system",
    "qemu+libssh://localhost/system",
    "qemu+libssh2://localhost/system",
    "qemu+ssh:///system",
    "qemu://localhost/system",
    "qemu:///system#x",
]


@pytest.mark.parametrize("template", HOSTILE_URIS)
def test_hostile_libvirt_uris_are_400_and_nothing_runs(
    admin: httpx.Client, script: tuple[Path, Path], template: str
) -> None:
    path, marker = script
    uri = template.format(script=path)
    message = _refused(admin, _server("libvirt", {"uri": uri, "domain": "any"}))
    assert "Invalid input for field/attribute uri" in message
    assert not marker.exists(), "the hostile script ran"


@pytest.mark.parametrize(
    ("driver", "driver_info"),
    [
        ("ipmi", {"address": "/var/run/bmc.sock"}),
        ("ipmi", {"address": "file:///etc/passwd"}),
        ("ipmi", {"address": "10.0.0.1#x"}),
        ("redfish", {"address": "file:///etc/passwd"}),
        ("redfish", {"address": "http+unix://%2Fvar%2Frun%2Fbmc.sock/"}),
        ("redfish", {"address": "https://bmc/redfish/v1?x=/etc/passwd"}),
        ("redfish", {"address": "https://bmc", "ca_bundle": "/dev/zero"}),
    ],
)
def test_bmc_addresses_are_hosts_never_files_or_sockets(
    admin: httpx.Client, driver: str, driver_info: dict[str, Any]
) -> None:
    credentials = {"address": "10.0.0.1", "username": "u", "password": "p"}
    _refused(admin, _server(driver, credentials | driver_info))


def test_fake_driver_file_paths_are_refused_through_the_api(
    admin: httpx.Client, tmp_path: Path
) -> None:
    log = tmp_path / "appended"
    body = _server("fake", {"nmi_log": str(log)})
    _refused(admin, body, "nmi_log can be set only in the config file")
    assert not log.exists()


@pytest.mark.parametrize(
    "content",
    [
        b'{"server": {"name": "n", "project_id": "alice", "user_id": "alice", "driver": "fake",'
        b' "driver_info": {"delay_seconds": NaN}}}',
        b'{"server": {"name": "n", "project_id": "alice", "user_id": "alice", "driver": "fake",'
        b' "driver_info": {"delay_seconds": Infinity}}}',
        b'{"server": {"name": "n", "project_id": "alice", "user_id": "alice", "driver": "fake",'
        b' "driver_info": {"delay_seconds": -Infinity}}}',
        b'{"server": {"name": "n", "project_id": "alice", "user_id": "alice", "driver": "fake",'
        b' "driver_info": {"delay_seconds": 1e400}}}',
    ],
    ids=["nan", "infinity", "-infinity", "overflow"],
)
def test_non_finite_numbers_are_400_and_create_nothing(admin: httpx.Client, content: bytes) -> None:
    _refused(admin, content, "Malformed request body")


@pytest.mark.parametrize("delay", [-1, 61, 1e300])
def test_fake_delay_is_bounded(admin: httpx.Client, delay: float) -> None:
    message = _refused(admin, _server("fake", {"delay_seconds": delay}))
    assert "delay_seconds" in message
    assert json.dumps(delay) in message


def test_fake_drivers_through_the_api_only_where_the_config_enables_them(
    module_server: Callable[..., LiveServer],
) -> None:
    production = module_server(cloud_config(test_drivers=False))
    with production.client("admin") as admin:
        for driver in ("fake", "fake-nonmi"):
            _refused(admin, _server(driver, {}), "test_drivers is not enabled")
        body = _server("libvirt", {"uri": "test:///default", "domain": "test"})
        _refused(admin, body, "test_drivers")
        # The config's own fake servers still load and answer.
        listed = admin.get("/servers", params={"all_tenants": "1"}).json()["servers"]
        assert "alice-active" in {server["name"] for server in listed}
