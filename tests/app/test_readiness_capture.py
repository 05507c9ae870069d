"""Crash readiness, the guarded trigger and host-side capture, against real QEMU guests.

The guests run crashlab's images under libvirt with the QEMU guest agent and
VMCOREINFO (emulators/guest.py); one is built without the agent's channel.
Most tests go through one ``crashlab serve`` over HTTP. The capture that runs
out of disk needs the moment after the free-space check, so it runs the app
in-process, its crash dump directory on a small tmpfs, with that check wrapped.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import libvirt
import libvirt_qemu
import pytest
from starlette.testclient import TestClient

import app.service
from app import policy as rules
from app.api.app import create_app
from app.capture import PARTIAL
from app.client import CAPTURE_RUNNING_STATES
from app.config import Config
from app.vmcore import read_vmcore
from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.guest import Guest
from emulators.guest_image import NMI_LOGGED, GuestImage, ImageVariant
from tests.app.cloud import AppCloud
from tests.app.cloud import fake_cloud_config as app_cloud_config
from tests.live import LiveServer, fake_cloud_config, start_server

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

BOOT_TIMEOUT = 180.0
CAPTURE_TIMEOUT = 120.0
# Enough for an idle busybox guest's capture, small enough to be quick under TCG.
CAPTURE_MEMORY_MIB = 512

CONFIG = fake_cloud_config(servers=[], nmi_guard={"enabled": False})


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("crashlab"), CONFIG)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guests(images: dict[ImageVariant, GuestImage]) -> Iterator[dict[str, Guest]]:
    """Four guests booted side by side: one per variant, and a no-kdump guest without an agent."""
    booted = {
        "kdump": Guest(images[ImageVariant.KDUMP]),
        "no-kdump": Guest(images[ImageVariant.NO_KDUMP], memory_mib=CAPTURE_MEMORY_MIB),
        "nmi-ignored": Guest(images[ImageVariant.NMI_IGNORED]),
        "no-agent": Guest(
            images[ImageVariant.NO_KDUMP], memory_mib=CAPTURE_MEMORY_MIB, guest_agent=False
        ),
    }
    try:
        for guest in booted.values():
            guest.start()
        for guest in booted.values():
            guest.wait_ready(BOOT_TIMEOUT)
        yield booted
    finally:
        for guest in booted.values():
            guest.cleanup()


@pytest.fixture(scope="module")
def servers(lab: LiveServer, guests: dict[str, Guest]) -> dict[str, str]:
    """Each guest registered for alice over libvirt; its server id by guest key."""
    with lab.client("admin") as admin:
        return {key: register(admin, guest) for key, guest in guests.items()}


# -- helpers ----------------------------------------------------------------------------


def register(admin: httpx.Client, guest: Guest) -> str:
    registered = admin.post(
        "/crashlab/servers",
        json={
            "server": {
                "name": guest.name,
                "project_id": "alice",
                "user_id": "alice",
                "driver": "libvirt",
                "driver_info": {"uri": DEFAULT_LIBVIRT_URI, "domain": guest.name},
            }
        },
    )
    assert registered.status_code == 201, registered.text
    return str(registered.json()["server"]["uuid"])


def readiness(client: httpx.Client, server_id: str) -> dict[str, Any]:
    """A fresh check; the guest's /init starts its agent before the READY line."""
    response = client.get(
        f"/crashlab/servers/{server_id}/crash-readiness", params={"refresh": "true"}
    )
    assert response.status_code == 200, response.text
    shown: dict[str, Any] = response.json()["crash_readiness"]
    return shown


def extension_action(client: httpx.Client, server_id: str, body: dict[str, Any]) -> httpx.Response:
    return client.post(f"/crashlab/servers/{server_id}/action", json=body)


def capture(client: httpx.Client, server_id: str, then: str = "resume") -> dict[str, Any]:
    response = extension_action(client, server_id, {"capture_memory_dump": {"then": then}})
    assert response.status_code == 202, response.text
    dump: dict[str, Any] = response.json()["crash_dump"]
    assert (dump["state"], dump["target"]) == ("capturing", "host-memory")
    return dump


def finished(client: httpx.Client, server_id: str, dump_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + CAPTURE_TIMEOUT
    while True:
        shown = client.get(f"/crashlab/servers/{server_id}/crash-dumps/{dump_id}")
        assert shown.status_code == 200, shown.text
        dump: dict[str, Any] = shown.json()["crash_dump"]
        if dump["state"] not in CAPTURE_RUNNING_STATES:
            return dump
        assert time.monotonic() < deadline, dump
        time.sleep(0.25)


def events(client: httpx.Client, server_id: str, request_id: str) -> list[tuple[str, str]]:
    path = f"/crashlab/servers/{server_id}/os-instance-actions/{request_id}"
    action = client.get(path).json()["instanceAction"]
    return [(e["event"], e["result"]) for e in action["events"]]


def assert_verified(dump: dict[str, Any], guest: Guest) -> None:
    assert dump["state"] == "verified", dump
    assert dump["error"] is None
    vmcore = dump["vmcore"]
    assert vmcore["format"] == "kdump-compressed"
    assert vmcore["kernel_release"] == guest.image.kernel_release
    assert vmcore["crash_time"] is None  # a live capture, not a crash


def domain_state(guest: Guest) -> int:
    state, _reason = guest.domain().state()
    return int(state)


def cpu_seconds(guest: Guest) -> float:
    return float(guest.domain().info()[4]) / 1e9


# -- readiness ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "verdict", "reason"),
    [
        ("kdump", "armed", None),
        ("no-kdump", "not-armed", "kexec_crash_loaded=0"),
        ("nmi-ignored", "not-armed", "unknown_nmi_panic=0"),
    ],
)
def test_each_variant_reads_as_what_it_is(
    lab: LiveServer,
    guests: dict[str, Guest],
    servers: dict[str, str],
    key: str,
    verdict: str,
    reason: str | None,
) -> None:
    with lab.client("alice") as alice:
        shown = readiness(alice, servers[key])
    assert shown["verdict"] == verdict, shown
    if reason is None:
        assert shown["reasons"] == []
    else:
        assert [r for r in shown["reasons"] if r.startswith(reason)], shown["reasons"]
    facts = shown["facts"]
    assert facts["kernel_release"]["value"] == guests[key].image.kernel_release
    assert facts["unknown_nmi_panic"]["source"] == "guest agent: /proc/sys/kernel/unknown_nmi_panic"
    assert facts["capture_verifiable"]["value"] is True, facts["capture_verifiable"]
    if key == "kdump":
        assert facts["crash_kernel_reserved_bytes"]["value"] > 0
        assert "reset_devices" in facts["crash_kernel_cmdline"]["value"]


def test_a_guest_without_the_agent_is_unknown_at_once(
    lab: LiveServer, servers: dict[str, str]
) -> None:
    with lab.client("alice") as alice:
        started = time.monotonic()
        shown = readiness(alice, servers["no-agent"])
        took = time.monotonic() - started
    assert shown["verdict"] == "unknown"
    assert shown["reasons"][0].startswith("no guest agent"), shown
    assert took < 5.0, took


# -- the guarded trigger -----------------------------------------------------------------


def test_the_guarded_trigger_refuses_a_guest_that_ignores_nmis(
    lab: LiveServer, guests: dict[str, Guest], servers: dict[str, str]
) -> None:
    guest, server_id = guests["nmi-ignored"], servers["nmi-ignored"]
    mark = guest.console.mark()
    with lab.client("alice") as alice:
        refused = extension_action(
            alice, server_id, {"trigger_crash_dump": {"require_armed": True}}
        )
        assert refused.status_code == 409, refused.text
        message = refused.json()["conflictingRequest"]["message"]
        assert "unknown_nmi_panic=0" in message and message.endswith("Nothing was sent.")
        time.sleep(3)  # an NMI, had one been sent, shows on the console within a second
        assert alice.get(f"/servers/{server_id}/os-instance-actions").json() == {
            "instanceActions": []
        }
    guest.console.poll()
    assert guest.console.find(NMI_LOGGED, mark) is None


def test_then_nmi_captures_first_and_sends_an_ordinary_trigger(
    lab: LiveServer, guests: dict[str, Guest], servers: dict[str, str]
) -> None:
    guest, server_id = guests["nmi-ignored"], servers["nmi-ignored"]
    mark = guest.console.mark()
    with lab.client("admin") as admin:
        readiness(admin, server_id)
        dump = finished(admin, server_id, capture(admin, server_id, then="nmi")["id"])
        assert_verified(dump, guest)
        path = f"/crashlab/servers/{server_id}/os-instance-actions/{dump['request_id']}"
        details = admin.get(path).json()["instanceAction"]["events"][0]["details"]
        found = re.search(r"then nmi: trigger_crash_dump (req-[0-9a-f-]+) accepted", details)
        assert found, details
        nmi_request = found.group(1)
        deadline = time.monotonic() + 30
        while events(admin, server_id, nmi_request) != [("compute_trigger_crash_dump", "Success")]:
            assert time.monotonic() < deadline, events(admin, server_id, nmi_request)
            time.sleep(0.25)
    guest.wait_for(NMI_LOGGED, timeout=30, start_line=mark)
    assert domain_state(guest) == libvirt.VIR_DOMAIN_RUNNING  # this variant survives its NMI


# -- captures ----------------------------------------------------------------------------


def test_a_capture_of_a_running_guest_is_verified_and_the_guest_runs_on(
    lab: LiveServer, guests: dict[str, Guest], servers: dict[str, str], tmp_path: Path
) -> None:
    guest, server_id = guests["no-kdump"], servers["no-kdump"]
    with lab.client("alice") as alice:
        readiness(alice, server_id)  # the expected kernel, as the guest reports it
    with lab.client("admin") as admin:
        dump = finished(admin, server_id, capture(admin, server_id)["id"])
        assert_verified(dump, guest)
        assert events(admin, server_id, dump["request_id"]) == [
            ("crashlab_capture_memory_dump", "Success"),
            ("crashlab_verify_dump", "Success"),
        ]
        listed = admin.get(f"/servers/{server_id}/os-instance-actions").json()
        assert [a["action"] for a in listed["instanceActions"]] == ["crashlab_capture_memory_dump"]
        downloaded = admin.get(f"/crashlab/servers/{server_id}/crash-dumps/{dump['id']}/vmcore")
        assert downloaded.status_code == 200
        (tmp_path / "vmcore").write_bytes(downloaded.content)
    vmcore = read_vmcore(tmp_path / "vmcore")
    assert vmcore.vmcoreinfo["OSRELEASE"] == guest.image.kernel_release
    assert domain_state(guest) == libvirt.VIR_DOMAIN_RUNNING


def test_a_paused_guest_is_captured_and_stays_paused(
    lab: LiveServer, guests: dict[str, Guest], servers: dict[str, str]
) -> None:
    guest, server_id = guests["no-kdump"], servers["no-kdump"]
    guest.domain().suspend()
    try:
        with lab.client("admin") as admin:
            dump = finished(admin, server_id, capture(admin, server_id)["id"])
        assert_verified(dump, guest)
        assert domain_state(guest) == libvirt.VIR_DOMAIN_PAUSED
    finally:
        guest.domain().resume()


def test_a_guest_spinning_at_full_cpu_is_captured(
    lab: LiveServer, guests: dict[str, Guest], servers: dict[str, str]
) -> None:
    guest, server_id = guests["no-kdump"], servers["no-kdump"]
    spin = {
        "execute": "guest-exec",
        "arguments": {"path": "/bin/sh", "arg": ["-c", "while :; do :; done"]},
    }
    libvirt_qemu.qemuAgentCommand(guest.domain(), json.dumps(spin), 10, 0)
    before, started = cpu_seconds(guest), time.monotonic()
    time.sleep(1)
    busy = (cpu_seconds(guest) - before) / (time.monotonic() - started)
    assert busy > 0.8, f"the guest used {busy:.0%} of a CPU"
    with lab.client("admin") as admin:
        dump = finished(admin, server_id, capture(admin, server_id)["id"])
    assert_verified(dump, guest)
    assert domain_state(guest) == libvirt.VIR_DOMAIN_RUNNING


def test_a_capture_is_admin_only_by_default(lab: LiveServer, servers: dict[str, str]) -> None:
    server_id = servers["no-kdump"]
    body = {"capture_memory_dump": None}
    for user, status in (("alice", 403), ("carol", 403), ("bob", 404)):
        with lab.client(user) as client:
            response = extension_action(client, server_id, body)
        assert response.status_code == status, (user, response.text)
    with lab.client("alice") as alice:
        message = extension_action(alice, server_id, body).json()["forbidden"]["message"]
    assert message == f"Policy doesn't allow {rules.CAPTURE_MEMORY_DUMP} to be performed."


def test_then_destroy_stops_the_guest_once_its_memory_is_written(
    lab: LiveServer, guests: dict[str, Guest], servers: dict[str, str]
) -> None:
    guest, server_id = guests["no-kdump"], servers["no-kdump"]
    with lab.client("admin") as admin:
        dump = finished(admin, server_id, capture(admin, server_id, then="destroy")["id"])
    assert_verified(dump, guest)
    assert domain_state(guest) == libvirt.VIR_DOMAIN_SHUTOFF


def test_a_domain_deleted_mid_capture_fails_and_leaves_no_file(
    lab: LiveServer, guests: dict[str, Guest], servers: dict[str, str]
) -> None:
    guest, server_id = guests["no-agent"], servers["no-agent"]
    dumps_dir = lab.state_file.parent / "crash-dumps"
    with lab.client("admin") as admin:
        dump = capture(admin, server_id)
        partial = dumps_dir / dump["id"] / PARTIAL
        deadline = time.monotonic() + 30
        while not partial.exists():
            assert time.monotonic() < deadline, "the capture never started writing"
            time.sleep(0.02)
        domain = guest.domain()
        domain.destroy()
        domain.undefine()
        dump = finished(admin, server_id, dump["id"])
        assert dump["state"] == "failed", dump
        assert dump["error"], dump
        assert events(admin, server_id, dump["request_id"]) == [
            ("crashlab_capture_memory_dump", "Error")
        ]
    assert not (dumps_dir / dump["id"]).exists()


# -- the guarded trigger that sends, last: the kdump guest crashes ---------------------------


def test_the_guarded_trigger_sends_to_an_armed_guest(
    lab: LiveServer, guests: dict[str, Guest], servers: dict[str, str]
) -> None:
    server_id = servers["kdump"]
    with lab.client("alice") as alice:
        sent = extension_action(alice, server_id, {"trigger_crash_dump": {"require_armed": True}})
        assert sent.status_code == 202, sent.text
        request_id = sent.headers["x-openstack-request-id"]
        deadline = time.monotonic() + 30
        while (got := events(alice, server_id, request_id)) != [
            ("compute_trigger_crash_dump", "Success")
        ]:
            assert time.monotonic() < deadline, got
            time.sleep(0.25)
    guests["kdump"].wait_for("Linux version", timeout=120)  # the crash kernel boots


# -- out of disk, in-process: the disk fills after the free-space check --------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs just larger than the capture guest's memory, so the free-space check passes."""
    mount = tmp_path / "dumps"
    mount.mkdir()
    size = f"{CAPTURE_MEMORY_MIB + 16}m"
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_capture_that_runs_out_of_disk_fails_cleanly(
    images: dict[ImageVariant, GuestImage],
    small_disk: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    filler = small_disk / "filler"
    real_check: Callable[[Path, int], None] = app.service.check_free_space

    def check_then_fill(directory: Path, needed: int) -> None:
        real_check(directory, needed)
        # Leave about 1 MiB: far less than the dump needs.
        subprocess.run(["fallocate", "-l", f"{CAPTURE_MEMORY_MIB + 15}m", str(filler)], check=True)

    monkeypatch.setattr(app.service, "check_free_space", check_then_fill)
    monkeypatch.setenv("CRASHLAB_SECRET_KEY", "")
    policy_file = tmp_path / "policy.yaml"
    # The capture rule, opened to the project's members, as a deployment may.
    policy_file.write_text(f'"{rules.CAPTURE_MEMORY_DUMP}": "rule:project_member_or_admin"\n')
    config: Config = app_cloud_config(
        servers=[],
        crash_dumps={"directory": str(small_disk)},
        policy_file=str(policy_file),
    )
    with (
        Guest(images[ImageVariant.NO_KDUMP], memory_mib=CAPTURE_MEMORY_MIB) as guest,
        TestClient(create_app(config, state_file=tmp_path / "state.db")) as client,
    ):
        guest.wait_ready(BOOT_TIMEOUT)
        cloud = AppCloud(client, config)

        def as_user(user: str) -> TestClient:
            # The same app, its lifespan already run by ``client``.
            return TestClient(
                client.app, base_url="http://testserver/v2.1", headers=cloud.headers(user)
            )

        admin, alice = as_user("admin"), as_user("alice")
        server_id = register(admin, guest)
        dump = finished(alice, server_id, capture(alice, server_id)["id"])
        assert dump["state"] == "failed", dump
        assert "No space left on device" in dump["error"] or "space" in dump["error"], dump
        assert [p.name for p in small_disk.iterdir()] == ["filler"]  # no partial file left
        # With the disk still full, the next capture is refused before anything is written.
        refused = extension_action(alice, server_id, {"capture_memory_dump": None})
        assert refused.status_code == 409, refused.text
        assert refused.json()["conflictingRequest"]["message"].startswith(
            "Not enough free space for a memory dump"
        )
        # Nothing else lost: the record, the server and the guest are as they were.
        assert domain_state(guest) == libvirt.VIR_DOMAIN_RUNNING
        filler.unlink()
        monkeypatch.setattr(app.service, "check_free_space", real_check)
        readiness(alice, server_id)
        again = finished(alice, server_id, capture(alice, server_id)["id"])
        assert_verified(again, guest)
        listed = alice.get(f"/crashlab/servers/{server_id}/crash-dumps").json()["crash_dumps"]
        assert [(d["id"], d["state"]) for d in listed] == [
            (again["id"], "verified"),
            (dump["id"], "failed"),
        ]
