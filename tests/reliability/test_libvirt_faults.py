"""Faults of the libvirt peer, against the real libvirtd and real QEMU domains.

- libvirtd stopped while the service runs, then started again: the trigger in
  between ends as an Error event within the timeout, other servers are not
  affected, and once libvirtd is back the same crashlab process sends NMIs
  again, without a restart of its own.
- The domain deleted between listing and triggering: the 202 is followed by
  an Error event naming the missing domain, as Nova's compute manager records
  an InstanceNotFound; nothing was sent, so a retry needs no cooldown.

The domains are blank (no OS; SeaBIOS waits), enough for libvirt to accept an
NMI. libvirtd here is a daemon started by hand (``libvirtd -d``, see
scripts/libvirtd), so the test stops exactly that process, by the pid in its
pid file, and always starts it again, even when the test fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.domains import URI, connect, remove, start_blank
from tests.live import LiveServer
from tests.reliability.cloud import (
    assert_fault,
    cloud_config,
    config_server_id,
    fake_server,
    trigger,
    wait_for_action,
)

pytestmark = pytest.mark.libvirt

PID_FILE = Path("/run/libvirtd.pid")
# Fast failure when libvirtd is gone; the driver's own calls are bounded by this too.
DRIVER_TIMEOUT = 10


class Libvirtd:
    """The running libvirtd, stopped and started by its pid file."""

    def pid(self) -> int | None:
        try:
            pid = int(PID_FILE.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"libvirtd" in cmdline else None

    def stop(self) -> None:
        pid = self.pid()
        assert pid is not None, f"no libvirtd process behind {PID_FILE}"
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, f"libvirtd {pid} did not stop"
            time.sleep(0.1)

    def start(self) -> None:
        if self.pid() is None:
            subprocess.run(["libvirtd", "-d"], check=True, timeout=30)
        connect(timeout=30).close()


@pytest.fixture
def libvirtd() -> Iterator[Libvirtd]:
    daemon = Libvirtd()
    if daemon.pid() is None:
        pytest.skip(f"libvirtd was not started by hand here ({PID_FILE} names no libvirtd)")
    try:
        yield daemon
    finally:
        daemon.start()


def _config(extra: list[dict[str, object]]) -> dict[str, object]:
    # Cooldown 0: a retry after a failed NMI is wanted here; the in-flight guard stays.
    return cloud_config(
        extra_servers=extra,
        nmi_guard={"enabled": True, "cooldown_seconds": 0},
        driver_timeout_seconds=DRIVER_TIMEOUT,
    )


def _libvirt_server(name: str, domain: str) -> dict[str, object]:
    return {
        "name": name,
        "project_id": "alice",
        "user_id": "alice",
        "driver": "libvirt",
        "driver_info": {"uri": URI, "domain": domain},
    }


def _dump(cloud: LiveServer, admin: httpx.Client, server: str) -> dict[str, object]:
    with cloud.client("alice") as alice:
        response = trigger(alice, server)
    assert response.status_code == 202, response.text
    action = wait_for_action(admin, server, response.headers["x-openstack-request-id"])
    event: dict[str, object] = action["events"][0]
    return event


def test_libvirtd_stopped_and_started_again_needs_no_service_restart(
    crashlab_server: Callable[..., LiveServer],
    blank_domains: Callable[[], str],
    libvirtd: Libvirtd,
) -> None:
    domain = blank_domains()
    cloud = crashlab_server(_config([_libvirt_server("vm", domain), fake_server("bystander")]))
    vm, bystander = config_server_id("vm"), config_server_id("bystander")
    assert cloud.process is not None
    service_pid = cloud.process.pid
    with cloud.client("admin") as admin:
        assert _dump(cloud, admin, vm)["result"] == "Success"

        libvirtd.stop()
        try:
            started = time.monotonic()
            event = _dump(cloud, admin, vm)
            assert time.monotonic() - started < DRIVER_TIMEOUT + 5
            assert event["result"] == "Error"
            assert "libvirt" in str(event["details"]), event
            # Other servers do not notice, and reading the server is no 500.
            assert _dump(cloud, admin, bystander)["result"] == "Success"
            assert admin.get(f"/servers/{vm}").status_code == 200
        finally:
            libvirtd.start()

        assert _dump(cloud, admin, vm)["result"] == "Success"
        shown = admin.get(f"/servers/{vm}").json()["server"]
        assert shown["OS-EXT-STS:power_state"] == 1
    assert cloud.process.poll() is None and cloud.process.pid == service_pid
    assert "Traceback" not in cloud.log_path.read_text()


def test_domain_deleted_between_listing_and_triggering(
    crashlab_server: Callable[..., LiveServer], blank_domains: Callable[[], str]
) -> None:
    domain = blank_domains()
    cloud = crashlab_server(_config([_libvirt_server("doomed", domain)]))
    doomed = config_server_id("doomed")
    with cloud.client("alice") as alice, cloud.client("admin") as admin:
        listed = alice.get("/servers/detail").json()["servers"]
        [server] = [s for s in listed if s["id"] == doomed]
        assert server["status"] == "ACTIVE" and server["OS-EXT-STS:power_state"] == 1

        remove(domain)

        for _ in range(2):  # nothing was sent, so the retry is not held by the guard
            event = _dump(cloud, admin, doomed)
            assert event["result"] == "Error"
            assert f"domain {domain} does not exist" in str(event["details"]), event
        assert alice.get(f"/servers/{doomed}").status_code == 200

        # The domain comes back (same name): the same server works again.
        start_blank(domain)
        assert _dump(cloud, admin, doomed)["result"] == "Success"
        # An id nobody knows is still a plain 404.
        assert_fault(trigger(alice, "6a1e0e5a-0000-4000-8000-000000000000"), 404)
