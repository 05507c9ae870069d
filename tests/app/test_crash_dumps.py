"""Following crash dumps with real peers: QEMU guests under libvirt, ``crashlab serve`` over HTTP.

Each server is registered with its guest's raw dump disk (``vda``) as its
dump target and short phase timeouts, so every way a dump can end is reached
in seconds. The verified path, with the vmcore's sha256, is
tests/scenarios/test_external_guest.py's; here one verified kdump run serves
the access checks, the download's ``Range`` and ``Digest``, and the vmcore
of an earlier crash.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import wait_for_dump
from app.events import (
    COLLECT_DUMP_EVENT,
    CRASH_DUMP_EVENT,
    FOLLOW_EVENTS,
    OBSERVE_PANIC_EVENT,
    VERIFY_DUMP_EVENT,
)
from app.follower import NOTHING_AT_ALL
from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.guest import Guest
from emulators.guest_image import GuestImage, ImageVariant
from tests.live import LiveServer, fake_cloud_config, start_server

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

BOOT_TIMEOUT = 180.0
# Under TCG a kdump guest's crash kernel boots about 20 s after the NMI and has
# written its dump about 15 s later; these bound a slow runner, not the usual case.
KDUMP_TIMEOUTS: dict[str, float] = {"panic": 90, "collect": 120, "verify": 60}
SKEW_SECONDS = 20
OTHER_RELEASE = "9.9.9-not-this-kernel"

CONFIG = fake_cloud_config(
    servers=[],
    # Several NMIs to one guest within a minute, in the earlier-crash test.
    nmi_guard={"enabled": False},
    # A killed process's dumps are claimed once its lease lapses: seconds, not 15.
    lease_seconds=3,
    crash_dumps={"clock_skew_seconds": SKEW_SECONDS},
)
# The crash kernel writes through its page cache, so the disk grows in bursts
# 5 to 10 s apart: a 3 s stall is set only where the guest is killed mid-dump.
STALLING_CONFIG = {**CONFIG, "crash_dumps": {**CONFIG["crash_dumps"], "stall_seconds": 3}}


@dataclass(frozen=True)
class VerifiedRun:
    """A kdump guest's dump, followed to ``verified``, and a copy of its dump disk."""

    server_id: str
    request_id: str
    dump: dict[str, Any]
    disk: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One ``crashlab serve`` for the module's tests that do not restart it."""
    server = start_server(tmp_path_factory.mktemp("crashlab"), CONFIG)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def verified(
    lab: LiveServer,
    images: dict[ImageVariant, GuestImage],
    tmp_path_factory: pytest.TempPathFactory,
) -> VerifiedRun:
    with Guest(images[ImageVariant.KDUMP]) as guest:
        guest.wait_ready(BOOT_TIMEOUT)
        server_id = register(lab, guest, KDUMP_TIMEOUTS)
        with lab.client("alice") as alice:
            request_id = trigger(alice, server_id)
            dump = wait_for_dump(alice.get, server_id, request_id, timeout=300)
        disk = tmp_path_factory.mktemp("earlier") / "dump.img"
        shutil.copyfile(guest.dump_disk, disk)
    assert dump["state"] == "verified", dump
    return VerifiedRun(server_id, request_id, dump, disk)


# -- helpers ----------------------------------------------------------------------------


def register(server: LiveServer, guest: Guest, timeouts: dict[str, float], **extra: Any) -> str:
    """Register ``guest`` for alice, its dump disk as its dump target; returns the server id."""
    with server.client("admin") as admin:
        registered = admin.post(
            "/crashlab/servers",
            json={
                "server": {
                    "name": guest.name,
                    "project_id": "alice",
                    "user_id": "alice",
                    "driver": "libvirt",
                    "driver_info": {"uri": DEFAULT_LIBVIRT_URI, "domain": guest.name},
                    "dump_target": {"type": "disk", "device": "vda"},
                    "dump_timeouts": timeouts,
                    **extra,
                }
            },
        )
    assert registered.status_code == 201, registered.text
    return str(registered.json()["server"]["uuid"])


def trigger(client: httpx.Client, server_id: str) -> str:
    """Nova's trigger_crash_dump; returns the request id."""
    response = client.post(f"/servers/{server_id}/action", json={"trigger_crash_dump": None})
    assert response.status_code == 202, response.text
    return response.headers["x-openstack-request-id"]


def dumps_of(client: httpx.Client, server_id: str, request_id: str) -> list[dict[str, Any]]:
    listed = client.get(f"/crashlab/servers/{server_id}/crash-dumps")
    assert listed.status_code == 200, listed.text
    return [d for d in listed.json()["crash_dumps"] if d["request_id"] == request_id]


def wait_state(
    client: httpx.Client, server_id: str, request_id: str, states: set[str], timeout: float
) -> dict[str, Any]:
    """The dump of ``request_id`` once its state is one of ``states``."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        for dump in dumps_of(client, server_id, request_id):
            if not seen or seen[-1] != dump["state"]:
                seen.append(dump["state"])
            if dump["state"] in states:
                return dump
        assert time.monotonic() < deadline, f"no dump in {states} within {timeout} s; saw {seen}"
        time.sleep(0.2)


def events_of(server: LiveServer, server_id: str, request_id: str) -> dict[str, dict[str, Any]]:
    """The action's events by name, with their details (read as admin)."""
    with server.client("admin") as admin:
        shown = admin.get(f"/crashlab/servers/{server_id}/os-instance-actions/{request_id}")
    assert shown.status_code == 200, shown.text
    events = shown.json()["instanceAction"]["events"]
    names = [event["event"] for event in events]
    assert len(names) == len(set(names)), f"an event recorded twice: {names}"
    return {event["event"]: event for event in events}


def write_over(disk: Path, source: Path) -> None:
    """Write ``source``'s bytes over the guest's dump disk, in place (QEMU holds it open)."""
    with source.open("rb") as src, disk.open("r+b") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def blank(disk: Path) -> None:
    with disk.open("r+b") as f:
        size = f.seek(0, 2)
        f.truncate(0)
        f.truncate(size)


# -- tests ------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_no_kdump_panics_then_fails_for_want_of_a_dump(
    lab: LiveServer, images: dict[ImageVariant, GuestImage]
) -> None:
    with Guest(images[ImageVariant.NO_KDUMP]) as guest:
        guest.wait_ready(BOOT_TIMEOUT)
        server_id = register(lab, guest, {"panic": 60, "collect": 6, "verify": 10})
        with lab.client("alice") as alice:
            request_id = trigger(alice, server_id)
            panicked = wait_state(alice, server_id, request_id, {"panicked", "failed"}, 90)
            assert panicked["state"] == "panicked", panicked
            dump = wait_for_dump(alice.get, server_id, request_id, timeout=60)

    assert dump["state"] == "failed"
    assert dump["error"] == "no dump arrived within 6 s"
    assert dump["vmcore"] is None
    assert "Kernel panic - not syncing: NMI" in dump["panic"]["message"]
    events = events_of(lab, server_id, request_id)
    assert events[OBSERVE_PANIC_EVENT]["result"] == "Success"
    assert events[COLLECT_DUMP_EVENT]["result"] == "Error"
    assert events[COLLECT_DUMP_EVENT]["details"] == dump["error"]
    assert VERIFY_DUMP_EVENT not in events


@pytest.mark.timeout(300)
def test_an_ignored_nmi_gives_no_panic_and_no_dump(
    lab: LiveServer, nmi_logging_guest: Guest
) -> None:
    guest = nmi_logging_guest
    # Long enough for a guest starved of CPU to log the NMI it ignores.
    server_id = register(lab, guest, {"panic": 10, "collect": 4, "verify": 10})
    with lab.client("alice") as alice:
        request_id = trigger(alice, server_id)
        dump = wait_for_dump(alice.get, server_id, request_id, timeout=60)

    assert dump["state"] == "failed"
    assert dump["error"] == "no panic seen and no dump arrived"
    assert dump["panic"] is None and dump["vmcore"] is None
    events = events_of(lab, server_id, request_id)
    assert events[CRASH_DUMP_EVENT]["result"] == "Success"
    observed = events[OBSERVE_PANIC_EVENT]
    assert observed["result"] == "Error"
    assert "the guest logged the NMI and went on" in observed["details"], observed
    assert events[COLLECT_DUMP_EVENT]["details"] == NOTHING_AT_ALL
    assert guest.is_active(), "the guest that ignores NMIs went down"


@pytest.mark.timeout(300)
def test_a_vmcore_from_an_earlier_crash_is_not_this_nmis(
    lab: LiveServer, verified: VerifiedRun, nmi_logging_guest: Guest
) -> None:
    """The disk holds the verified run's dump; the guest ignores the NMI and writes nothing."""
    guest = nmi_logging_guest
    earlier = verified.dump["vmcore"]
    server_id = register(lab, guest, {"panic": 4, "collect": 6, "verify": 30})
    write_over(guest.dump_disk, verified.disk)
    try:
        with lab.client("alice") as alice:
            # Left as it was: the old stream is not taken for this NMI's dump.
            request_id = trigger(alice, server_id)
            untouched = wait_for_dump(alice.get, server_id, request_id, timeout=60)
            assert untouched["state"] == "failed"
            assert untouched["error"] == NOTHING_AT_ALL
            assert untouched["vmcore"] is None

            # Written again after the NMI (the disk changed, its stream did not):
            # the vmcore's own CRASHTIME, before this NMI, gives it away.
            crashed = dt.datetime.fromisoformat(earlier["crash_time"])
            wait = (crashed - dt.datetime.now(dt.UTC)).total_seconds() + SKEW_SECONDS + 2
            time.sleep(max(0.0, wait))
            request_id = trigger(alice, server_id)
            wait_state(alice, server_id, request_id, {"waiting", "panicked"}, 30)
            write_over(guest.dump_disk, verified.disk)
            rewritten = wait_for_dump(alice.get, server_id, request_id, timeout=90)
    finally:
        blank(guest.dump_disk)

    assert rewritten["state"] == "failed", rewritten
    assert "it is from an earlier crash" in rewritten["error"], rewritten
    with lab.client("admin") as admin:  # the error unredacted, its times whole
        shown = admin.get(f"/crashlab/servers/{server_id}/crash-dumps/{rewritten['id']}")
    assert (
        f"the vmcore crashed at {earlier['crash_time']}, before"
        in shown.json()["crash_dump"]["error"]
    )
    assert rewritten["vmcore"]["sha256"] == earlier["sha256"]
    assert rewritten["vmcore"]["crash_time"] == earlier["crash_time"]
    events = events_of(lab, server_id, request_id)
    assert events[COLLECT_DUMP_EVENT]["result"] == "Success"
    assert events[VERIFY_DUMP_EVENT]["result"] == "Error"


@pytest.mark.timeout(300)
def test_a_vmcore_of_another_kernel_fails_naming_both(
    lab: LiveServer, images: dict[ImageVariant, GuestImage]
) -> None:
    image = images[ImageVariant.KDUMP]
    with Guest(image) as guest:
        guest.wait_ready(BOOT_TIMEOUT)
        server_id = register(lab, guest, KDUMP_TIMEOUTS, expected_kernel_release=OTHER_RELEASE)
        with lab.client("alice") as alice:
            request_id = trigger(alice, server_id)
            dump = wait_for_dump(alice.get, server_id, request_id, timeout=300)

    assert dump["state"] == "failed", dump
    assert dump["error"] == (
        f"the vmcore's kernel is {image.kernel_release}, expected {OTHER_RELEASE}"
    )
    assert dump["vmcore"]["kernel_release"] == image.kernel_release
    events = events_of(lab, server_id, request_id)
    assert events[COLLECT_DUMP_EVENT]["result"] == "Success"
    assert events[VERIFY_DUMP_EVENT]["result"] == "Error"
    assert events[VERIFY_DUMP_EVENT]["details"] == dump["error"]


@pytest.mark.timeout(300)
def test_a_guest_killed_while_dumping_leaves_an_incomplete_dump(
    crashlab_server: Callable[..., LiveServer], images: dict[ImageVariant, GuestImage]
) -> None:
    lab = crashlab_server(STALLING_CONFIG)
    with Guest(images[ImageVariant.KDUMP]) as guest:
        guest.wait_ready(BOOT_TIMEOUT)
        server_id = register(lab, guest, KDUMP_TIMEOUTS)
        with lab.client("alice") as alice:
            request_id = trigger(alice, server_id)
            collecting = wait_state(alice, server_id, request_id, {"collecting", "collected"}, 150)
            assert collecting["state"] == "collecting", "the dump was complete before the kill"
            guest.domain().destroy()
            dump = wait_for_dump(alice.get, server_id, request_id, timeout=60)

    assert dump["state"] == "failed", dump
    assert dump["error"].startswith("incomplete dump: the stream stopped at "), dump
    assert dump["vmcore"] is None
    events = events_of(lab, server_id, request_id)
    assert events[COLLECT_DUMP_EVENT]["result"] == "Error"
    assert VERIFY_DUMP_EVENT not in events


@pytest.mark.timeout(300)
def test_a_killed_service_resumes_the_dump_it_was_following(
    crashlab_server: Callable[..., LiveServer], images: dict[ImageVariant, GuestImage]
) -> None:
    server = crashlab_server(CONFIG)
    with Guest(images[ImageVariant.KDUMP]) as guest:
        guest.wait_ready(BOOT_TIMEOUT)
        server_id = register(server, guest, KDUMP_TIMEOUTS)
        with server.client("alice") as alice:
            request_id = trigger(alice, server_id)
            killed_at = wait_state(alice, server_id, request_id, {"panicked", "collecting"}, 150)
        server.kill()
        server.start()
        with server.client("alice") as alice:
            dump = wait_for_dump(alice.get, server_id, request_id, timeout=200)
            all_dumps = alice.get(f"/crashlab/servers/{server_id}/crash-dumps").json()

    assert killed_at["state"] in ("panicked", "collecting")
    assert [d["id"] for d in all_dumps["crash_dumps"]] == [dump["id"]]
    assert dump["state"] in ("verified", "failed")
    if dump["state"] == "failed":
        assert dump["error"], dump
    events = events_of(server, server_id, request_id)
    assert all(events[name]["finish_time"] for name in FOLLOW_EVENTS if name in events), events
    if dump["state"] == "verified":
        assert [events[name]["result"] for name in FOLLOW_EVENTS] == ["Success"] * 3


@pytest.mark.timeout(120)
def test_the_project_reader_reads_and_other_projects_see_nothing(
    lab: LiveServer, verified: VerifiedRun
) -> None:
    server_id, dump_id = verified.server_id, verified.dump["id"]
    base = f"/crashlab/servers/{server_id}/crash-dumps"
    vmcore = verified.dump["vmcore"]

    with lab.client("carol") as carol:  # a reader of alice's project
        listed = carol.get(base)
        assert listed.status_code == 200
        assert [d["id"] for d in listed.json()["crash_dumps"]] == [dump_id]
        shown = carol.get(f"{base}/{dump_id}")
        assert shown.status_code == 200
        assert shown.json()["crash_dump"]["state"] == "verified"

        whole = carol.get(f"{base}/{dump_id}/vmcore")
        assert whole.status_code == 200
        assert len(whole.content) == vmcore["bytes"]
        digest = base64.b64encode(hashlib.sha256(whole.content).digest()).decode()
        assert whole.headers["Digest"] == f"sha-256={digest}"

        head = carol.get(f"{base}/{dump_id}/vmcore", headers={"Range": "bytes=0-99"})
        assert head.status_code == 206
        assert head.content == whole.content[:100]
        assert head.headers["Content-Range"] == f"bytes 0-99/{vmcore['bytes']}"

        dmesg = carol.get(f"{base}/{dump_id}/dmesg")
        assert dmesg.status_code == 200
        assert "Kernel panic - not syncing: NMI" in dmesg.text

        refused = carol.post(f"/servers/{server_id}/action", json={"trigger_crash_dump": None})
        assert refused.status_code == 403, refused.text
        refused = carol.post(
            f"/crashlab/servers/{server_id}/action", json={"trigger_crash_dump": None}
        )
        assert refused.status_code == 403, refused.text

    with lab.client("bob") as bob:  # another project
        for path in (
            base,
            f"{base}/{dump_id}",
            f"{base}/{dump_id}/vmcore",
            f"{base}/{dump_id}/dmesg",
        ):
            assert bob.get(path).status_code == 404, path

    with lab.client("alice") as alice:  # the refused triggers sent no NMI
        assert [d["id"] for d in alice.get(base).json()["crash_dumps"]] == [dump_id]
