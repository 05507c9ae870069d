"""The libvirt driver against a real libvirtd and a QEMU guest (TCG or KVM).

The guest is the ``nmi-ignored`` image: its kernel logs every NMI on the
serial console ("NMI received") and keeps running, so one boot serves the
whole module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import libvirt
import pytest

from app.client import wait_for_action
from drivers.base import BackendUnreachable, InstanceNotRunning, PowerState, ServerNotFound
from drivers.libvirt import LibvirtDriver, LibvirtSettings
from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.guest import Guest
from emulators.guest_image import NMI_LOGGED, ImageVariant, build_image
from tests.live import LiveServer, fake_cloud_config

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    with Guest(build_image(ImageVariant.NMI_IGNORED)) as running:
        running.wait_ready(timeout=180)
        yield running


def _driver(domain: str, uri: str = DEFAULT_LIBVIRT_URI) -> LibvirtDriver:
    return LibvirtDriver(
        "00000000-0000-0000-0000-000000000001", LibvirtSettings(uri=uri, domain=domain)
    )


def _nmi_count(guest: Guest) -> int:
    return guest.console.text().count(NMI_LOGGED)


def _wait_nmi_count(guest: Guest, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _nmi_count(guest) < count:
        assert time.monotonic() < deadline, f"console after NMI:\n{guest.console.tail()}"
        time.sleep(0.2)


def test_injects_nmi_that_the_guest_kernel_logs(guest: Guest) -> None:
    before = _nmi_count(guest)
    driver = _driver(guest.name)
    assert driver.get_power_state() == PowerState.RUNNING
    driver.trigger_crash_dump()
    _wait_nmi_count(guest, before + 1)
    assert guest.is_active(), "nmi-ignored guest must keep running"


def test_domain_found_by_uuid(guest: Guest) -> None:
    assert _driver(guest.uuid).get_power_state() == PowerState.RUNNING


def test_trigger_through_the_api_as_owner(
    guest: Guest, crashlab_server: Callable[..., LiveServer]
) -> None:
    config = fake_cloud_config(
        servers=[
            {
                "name": "vm-libvirt",
                "project_id": "alice",
                "user_id": "alice",
                "driver": "libvirt",
                "driver_info": {"uri": DEFAULT_LIBVIRT_URI, "domain": guest.name},
            }
        ]
    )
    server = crashlab_server(config)
    before = _nmi_count(guest)
    with server.client("alice") as alice:
        [listed] = alice.get("/servers/detail").json()["servers"]
        assert (listed["status"], listed["OS-EXT-STS:power_state"]) == ("ACTIVE", 1)
        response = alice.post(f"/servers/{listed['id']}/action", json={"trigger_crash_dump": None})
        assert response.status_code == 202 and response.text == ""
        request_id = response.headers["x-openstack-request-id"]
    _wait_nmi_count(guest, before + 1)
    with server.client("admin") as admin:
        action = wait_for_action(
            admin.get, listed["id"], request_id, timeout=30, poll=0.1, details=False
        )
    assert action["request_id"] == request_id
    assert action["message"] is None
    assert action["events"][0]["result"] == "Success"


def test_stopped_domain_is_not_running() -> None:
    with Guest(build_image(ImageVariant.NMI_IGNORED)) as stopped:
        stopped.domain().destroy()
        driver = _driver(stopped.name)
        assert driver.get_power_state() == PowerState.SHUTDOWN
        with pytest.raises(InstanceNotRunning, match=r"^Instance .* is not running\.$"):
            driver.trigger_crash_dump()


def test_missing_domain_is_reported() -> None:
    with pytest.raises(ServerNotFound, match="crashlab-no-such-domain does not exist"):
        _driver("crashlab-no-such-domain").trigger_crash_dump()


def test_unreachable_uri_is_reported_clearly() -> None:
    started = time.monotonic()
    with pytest.raises(
        BackendUnreachable, match=r"cannot connect to libvirt at qemu\+ssh://127\.0\.0\.1:1/system"
    ):
        _driver("any", uri="qemu+ssh://127.0.0.1:1/system").get_power_state()
    assert time.monotonic() - started < 10


def test_test_driver_accepts_nmi_as_a_no_op() -> None:
    # libvirt's own test driver: handy for API overhead measurements.
    driver = _driver("test", uri="test:///default")
    assert driver.get_power_state() == PowerState.RUNNING
    driver.trigger_crash_dump()
    assert libvirt.getVersion() > 0
