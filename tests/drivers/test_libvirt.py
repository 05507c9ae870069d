"""The libvirt driver against a real libvirtd and QEMU guests (TCG or KVM).

One guest of each of the kdump, no-kdump and nmi-ignored variants is booted for
the whole module, side by side.
The NMIs go to the ``nmi-ignored`` guest: its kernel logs every NMI on the
serial console ("NMI received") and keeps running. Each guest's settings are
read through its QEMU guest agent, and the ``nmi-ignored`` guest's memory is
captured, which it also survives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from app.client import wait_for_action
from app.vmcore import extract_vmcore, has_flattened_dump, read_vmcore
from drivers.base import (
    BackendUnreachable,
    GuestAgentUnavailable,
    InstanceNotRunning,
    PowerState,
    ServerNotFound,
)
from drivers.libvirt import LibvirtDriver, LibvirtSettings
from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.guest import Guest
from emulators.guest_image import (
    CRASH_KERNEL_CMDLINE,
    CRASH_KERNEL_CMDLINE_FILE,
    NMI_LOGGED,
    GuestImage,
    ImageVariant,
)
from tests.live import LiveServer, fake_cloud_config

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

BOOT_TIMEOUT = 180.0
# Small enough for a quick capture under TCG; the kdump guest keeps the default for its crashkernel.
SMALL_MEMORY_MIB = 512
UNKNOWN_NMI_PANIC = "/proc/sys/kernel/unknown_nmi_panic"
KEXEC_CRASH_LOADED = "/sys/kernel/kexec_crash_loaded"
KEXEC_CRASH_SIZE = "/sys/kernel/kexec_crash_size"
VMCOREINFO_ENTRY = "/sys/firmware/qemu_fw_cfg/by_name/etc/vmcoreinfo/name"


@pytest.fixture(scope="module")
def guests(images: dict[ImageVariant, GuestImage]) -> Iterator[dict[ImageVariant, Guest]]:
    booted = {
        variant: Guest(
            images[variant],
            **({} if variant is ImageVariant.KDUMP else {"memory_mib": SMALL_MEMORY_MIB}),
        )
        for variant in (ImageVariant.KDUMP, ImageVariant.NO_KDUMP, ImageVariant.NMI_IGNORED)
    }
    try:
        for each in booted.values():
            each.start()
        for each in booted.values():
            each.wait_ready(timeout=BOOT_TIMEOUT)
        yield booted
    finally:
        for each in booted.values():
            each.cleanup()


@pytest.fixture(scope="module")
def guest(guests: dict[ImageVariant, Guest]) -> Guest:
    return guests[ImageVariant.NMI_IGNORED]


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


def test_stopped_domain_is_not_running(
    images: dict[ImageVariant, GuestImage], tmp_path: Path
) -> None:
    with Guest(images[ImageVariant.NMI_IGNORED]) as stopped:
        stopped.domain().destroy()
        driver = _driver(stopped.name)
        assert driver.get_power_state() == PowerState.SHUTDOWN
        with pytest.raises(InstanceNotRunning, match=r"^Instance .* is not running\.$"):
            driver.trigger_crash_dump()
        with pytest.raises(InstanceNotRunning):
            driver.read_guest_files([UNKNOWN_NMI_PANIC])
        with pytest.raises(InstanceNotRunning):
            driver.capture_memory_dump(tmp_path / "vmcore", destroy=False)
        assert list(tmp_path.iterdir()) == []


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


# -- the guest agent ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "unknown_nmi_panic", "crash_loaded"),
    [
        (ImageVariant.KDUMP, b"1\n", b"1\n"),
        (ImageVariant.NO_KDUMP, b"1\n", b"0\n"),
        (ImageVariant.NMI_IGNORED, b"0\n", b"0\n"),
    ],
)
def test_reads_each_variants_settings_through_the_guest_agent(
    guests: dict[ImageVariant, Guest],
    variant: ImageVariant,
    unknown_nmi_panic: bytes,
    crash_loaded: bytes,
) -> None:
    paths = [UNKNOWN_NMI_PANIC, KEXEC_CRASH_LOADED, KEXEC_CRASH_SIZE, CRASH_KERNEL_CMDLINE_FILE]
    read = _driver(guests[variant].name).read_guest_files([*paths, VMCOREINFO_ENTRY])
    assert (read[UNKNOWN_NMI_PANIC], read[KEXEC_CRASH_LOADED]) == (unknown_nmi_panic, crash_loaded)
    assert read[VMCOREINFO_ENTRY] == b"etc/vmcoreinfo\n"  # the domain's <vmcoreinfo/>
    if variant is ImageVariant.KDUMP:
        assert int(read[KEXEC_CRASH_SIZE] or b"0") > 0
        assert read[CRASH_KERNEL_CMDLINE_FILE] == CRASH_KERNEL_CMDLINE.encode() + b"\n"
    else:
        assert read[CRASH_KERNEL_CMDLINE_FILE] is None


def test_a_file_the_guest_lacks_reads_as_none(guest: Guest) -> None:
    read = _driver(guest.name).read_guest_files(["/etc/crashlab/no-such-file", "/proc/version"])
    assert read["/etc/crashlab/no-such-file"] is None
    assert (read["/proc/version"] or b"").startswith(b"Linux version ")


def test_a_guest_without_the_agent_channel_has_no_agent(
    images: dict[ImageVariant, GuestImage],
) -> None:
    with Guest(images[ImageVariant.NO_KDUMP], guest_agent=False) as no_channel:
        started = time.monotonic()
        with pytest.raises(GuestAgentUnavailable, match="^no guest agent: .*not configured"):
            _driver(no_channel.name).read_guest_files([UNKNOWN_NMI_PANIC])
        assert time.monotonic() - started < 5


def test_an_agent_that_has_not_connected_is_unavailable(
    images: dict[ImageVariant, GuestImage],
) -> None:
    # Read at once after start: the guest's kernel is seconds away from starting qemu-ga.
    with Guest(images[ImageVariant.NO_KDUMP]) as booting:
        started = time.monotonic()
        with pytest.raises(GuestAgentUnavailable, match="^no guest agent: .*not connected"):
            _driver(booting.name).read_guest_files([UNKNOWN_NMI_PANIC])
        assert time.monotonic() - started < 5
        assert "CRASHLAB-READY" not in booting.console.text()


# -- memory dumps -------------------------------------------------------------------------


def test_memory_bytes_is_the_domains_memory(guest: Guest) -> None:
    assert _driver(guest.name).memory_bytes() == guest.memory_mib * 1024 * 1024


def test_captures_the_memory_of_a_running_guest_which_runs_on(guest: Guest, tmp_path: Path) -> None:
    written = tmp_path / "capture"
    driver = _driver(guest.name)
    driver.capture_memory_dump(written, destroy=False)
    # QEMU before 8.2 writes kdump-zlib only as makedumpfile's flattened stream.
    if has_flattened_dump(written):
        vmcore = extract_vmcore(written, tmp_path / "vmcore", timeout=120)
    else:
        vmcore = read_vmcore(written)
    assert vmcore.format == "kdump-compressed"
    assert vmcore.vmcoreinfo["OSRELEASE"] == guest.image.kernel_release
    assert driver.get_power_state() == PowerState.RUNNING
    assert driver.read_guest_files([UNKNOWN_NMI_PANIC]) == {UNKNOWN_NMI_PANIC: b"0\n"}


def test_aborting_with_no_dump_in_progress_does_nothing(guest: Guest) -> None:
    driver = _driver(guest.name)
    driver.abort_memory_dump()
    assert driver.get_power_state() == PowerState.RUNNING
