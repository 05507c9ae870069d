"""The same guest and API checked from outside: a kdump guest crashlab did not build.

The guest is made by ``external_guest.sh`` with apt-get, dpkg, cpio and gzip,
not by ``emulators.guest_image``; its domain is defined here with virsh from
plain XML, under TCG. crashlab only sees it as a libvirt server registered
through the admin extension, with its raw dump disk as its dump target. The
owner triggers the crash dump over HTTP, crashlab follows it to ``verified``,
and the vmcore the owner downloads is a kdump-compressed dump of the guest's
own kernel, with the resource's sha256.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import wait_for_action
from app.events import CRASH_DUMP_EVENT
from app.vmcore import read_vmcore, sha256_of
from drivers.uris import DEFAULT_LIBVIRT_URI
from tests.live import LiveServer, fake_cloud_config

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

BUILD_SCRIPT = Path(__file__).with_name("external_guest.sh")
URI = DEFAULT_LIBVIRT_URI
UP = re.compile(r"external-guest: up kernel=(\S+) crash_loaded=(\d)")
DUMP_SAVED = "external-guest: dump saved"
DUMP_OUTCOME = re.compile(r"external-guest: dump (saved|failed.*)")

DOMAIN_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>768</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{dir}/vmlinuz</kernel>
    <initrd>{dir}/initrd.img</initrd>
    <cmdline>console=ttyS0 unknown_nmi_panic crashkernel=256M</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{dir}/dump.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{dir}/console.log'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>
"""


@dataclass
class ExternalGuest:
    name: str
    dir: Path
    kernel_release: str

    @property
    def console(self) -> str:
        path = self.dir / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := re.search(pattern, self.console):
                return found
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout} s; console:\n{self.console[-3000:]}")

    def state(self) -> str:
        return virsh("domstate", self.name).stdout.strip()


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", URI, *args], capture_output=True, text=True, check=check, timeout=60
    )


@pytest.fixture
def external_guest() -> Iterator[ExternalGuest]:
    """Build, define and start the guest; destroy and undefine it afterwards."""
    # Not tmp_path: QEMU runs as libvirt-qemu and must reach the files.
    workdir = Path(tempfile.mkdtemp(prefix="crashlab-external-"))
    workdir.chmod(0o755)
    name = f"crashlab-external-{secrets.token_hex(4)}"
    try:
        subprocess.run(["sh", str(BUILD_SCRIPT), str(workdir)], check=True, timeout=600)
        subprocess.run(["truncate", "-s", "64M", str(workdir / "dump.img")], check=True)
        (workdir / "domain.xml").write_text(DOMAIN_XML.format(name=name, dir=workdir))
        virsh("define", str(workdir / "domain.xml"))
        virsh("start", name)
        release = (workdir / "release").read_text().strip()
        yield ExternalGuest(name, workdir, release)
    finally:
        virsh("destroy", name, check=False)
        virsh("undefine", name, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def test_external_guest_dump_through_the_api(
    external_guest: ExternalGuest, crashlab_server: Callable[..., LiveServer]
) -> None:
    guest = external_guest
    up = guest.wait_for(UP, 180)
    assert up.group(1) == guest.kernel_release
    assert up.group(2) == "1", "the guest loaded no crash kernel"

    server = crashlab_server(fake_cloud_config())
    with server.client("admin") as admin, server.client("alice") as alice:
        registered = admin.post(
            "/crashlab/servers",
            json={
                "server": {
                    "name": guest.name,
                    "project_id": "alice",
                    "user_id": "alice",
                    "driver": "libvirt",
                    "driver_info": {"uri": URI, "domain": guest.name},
                    "dump_target": {"type": "disk", "device": "vda"},
                    "dump_timeouts": {"panic": 120, "collect": 240, "verify": 60},
                }
            },
        )
        assert registered.status_code == 201, registered.text
        server_id = registered.json()["server"]["uuid"]
        assert alice.get(f"/servers/{server_id}").json()["server"]["status"] == "ACTIVE"

        triggered = alice.post(f"/servers/{server_id}/action", json={"trigger_crash_dump": None})
        assert triggered.status_code == 202, triggered.text
        request_id = triggered.headers["x-openstack-request-id"]

        assert wait_for_event(admin, server_id, request_id) == "Success"

        dump = wait_for_dump(alice, server_id, timeout=420)
        assert dump["state"] == "verified", dump
        assert dump["request_id"] == request_id
        assert dump["target"] == "disk"
        vmcore = dump["vmcore"]
        assert vmcore["format"] == "kdump-compressed"
        assert vmcore["kernel_release"] == guest.kernel_release
        assert vmcore["bytes"] > 1_000_000
        assert "NMI" in dump["panic"]["message"]

        downloaded = guest.dir / "downloaded-vmcore"
        with alice.stream(
            "GET", f"/crashlab/servers/{server_id}/crash-dumps/{dump['id']}/vmcore"
        ) as answer:
            assert answer.status_code == 200
            with downloaded.open("wb") as out:
                for chunk in answer.iter_bytes():
                    out.write(chunk)
        assert sha256_of(downloaded) == vmcore["sha256"]
        assert read_vmcore(downloaded).kernel_release == guest.kernel_release

    outcome = guest.wait_for(DUMP_OUTCOME, 10)
    assert outcome.group(0) == DUMP_SAVED, guest.console[-3000:]


def wait_for_dump(client: httpx.Client, server_id: str, timeout: float) -> dict[str, Any]:
    """The server's newest crash dump, once it has reached a terminal state."""
    deadline = time.monotonic() + timeout
    while True:
        dumps = client.get(f"/crashlab/servers/{server_id}/crash-dumps").json()["crash_dumps"]
        if dumps and dumps[0]["state"] in ("verified", "failed"):
            return dict(dumps[0])
        assert time.monotonic() < deadline, f"no terminal crash dump within {timeout} s: {dumps}"
        time.sleep(1)


def wait_for_event(admin: httpx.Client, server_id: str, request_id: str) -> str | None:
    """The compute_trigger_crash_dump event's result, read as admin (events need it at 2.17)."""
    try:
        action = wait_for_action(admin.get, server_id, request_id, timeout=60, details=False)
    except TimeoutError:
        return None
    return next(
        (str(e["result"]) for e in action["events"] if e["event"] == CRASH_DUMP_EVENT), None
    )
