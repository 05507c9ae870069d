"""The ssh dump target with a real guest: its crash kernel uploads through crashlab's
collector, a real sshd, with the key the API handed out, and the dump ends ``verified``.

One kdump-ssh guest serves both tests, in order: the first NMI's dump is
verified and nothing is written to the guest's own disk; then the guest boots
again, and is destroyed while its second dump is on the way, which leaves an
incomplete upload that crashlab fails as such.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from app.client import wait_for_dump
from app.process import free_port
from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.guest import Guest
from emulators.guest_image import READY_MARKER, ImageVariant, build_image
from scenarios.via import ssh_dump_network
from tests.live import LiveServer, fake_cloud_config, start_server

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

BOOT_TIMEOUT = 180.0
TIMEOUTS = {"panic": 60, "collect": 120, "verify": 60}
STALL_SECONDS = 3


@dataclass
class SshLab:
    server: LiveServer
    guest: Guest
    server_id: str


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshLab]:
    workdir = tmp_path_factory.mktemp("ssh-target")
    config = fake_cloud_config(
        servers=[],
        nmi_guard={"enabled": False},
        collector={"enabled": True, "port": free_port()},
        crash_dumps={"stall_seconds": STALL_SECONDS},
    )
    server = start_server(workdir / "crashlab", config)
    guest = Guest(build_image(ImageVariant.KDUMP_SSH))
    try:
        guest.define()
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
                        "dump_target": {"type": "ssh"},
                        "dump_timeouts": TIMEOUTS,
                    }
                },
            )
            assert registered.status_code == 201, registered.text
            server_id = registered.json()["server"]["uuid"]
            key = admin.get(f"/crashlab/servers/{server_id}/dump-target/key").json()
        guest.dump_network = ssh_dump_network(key["dump_target_key"], workdir)
        guest.boot()
        guest.wait_ready(BOOT_TIMEOUT)
        yield SshLab(server, guest, server_id)
    finally:
        guest.cleanup()
        server.stop()


def _trigger(lab: SshLab) -> str:
    with lab.server.client("alice") as alice:
        response = alice.post(f"/servers/{lab.server_id}/action", json={"trigger_crash_dump": None})
    assert response.status_code == 202, response.text
    return response.headers["x-openstack-request-id"]


def _dump(lab: SshLab, request_id: str, **wait: Any) -> dict[str, Any]:
    with lab.server.client("alice") as alice:
        return wait_for_dump(alice.get, lab.server_id, request_id, timeout=240, **wait)


def test_a_guest_uploads_its_dump_over_ssh_and_it_is_verified(lab: SshLab) -> None:
    request_id = _trigger(lab)
    dump = _dump(lab, request_id)
    assert dump["state"] == "verified", dump
    assert dump["target"] == "ssh"
    assert dump["vmcore"]["kernel_release"] == lab.guest.image.kernel_release
    assert dump["vmcore"]["crash_time"] is not None
    assert dump["panic"]["message"].startswith("Kernel panic - not syncing: NMI")
    # crashlab never needed the guest's own disk: nothing was written to it.
    with lab.guest.dump_disk.open("rb") as disk:
        assert disk.read(1 << 20) == bytes(1 << 20)
    with lab.server.client("admin") as admin:
        action = admin.get(
            f"/crashlab/servers/{lab.server_id}/os-instance-actions/{request_id}"
        ).json()["instanceAction"]
    collected = {event["event"]: event for event in action["events"]}["crashlab_collect_dump"]
    assert collected["result"] == "Success"
    assert "arrived: /var/crash/10.0.2.15-" in collected["details"], collected


def test_an_upload_cut_off_by_the_guests_end_is_an_incomplete_dump(lab: SshLab) -> None:
    lab.guest.wait_stopped(60)  # the crash kernel powers off after its upload
    mark = lab.guest.console.mark()
    lab.guest.domain().create()
    lab.guest.wait_for(READY_MARKER, BOOT_TIMEOUT, start_line=mark)
    request_id = _trigger(lab)
    states: list[str] = []

    def cut_off_when_collecting(dump: dict[str, Any]) -> None:
        states.append(dump["state"])
        if dump["state"] == "collecting":
            lab.guest.domain().destroy()

    dump = _dump(lab, request_id, on_change=cut_off_when_collecting)
    assert "collecting" in states, states
    assert dump["state"] == "failed", dump
    # A member reads the error with paths redacted (app/redaction.py).
    stopped = re.fullmatch(
        r"incomplete dump: the upload \S+ stopped at (\d+) bytes (\d+) s ago", dump["error"]
    )
    assert stopped is not None, dump
    assert int(stopped[2]) >= STALL_SECONDS, dump
