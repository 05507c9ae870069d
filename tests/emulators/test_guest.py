"""Real guests on libvirt + QEMU: boot, NMI, vmcore, cleanup."""

from __future__ import annotations

import time
from pathlib import Path

import libvirt
import pytest

from app.vmcore import extract_vmcore
from emulators.guest import Guest, GuestStopped
from emulators.guest_image import (
    CRASH_KERNEL_MARKER,
    DUMP_SAVED_MARKER,
    PANIC_LOG_MARKER,
    GuestImage,
    ImageVariant,
)
from tests.domains import domain_exists

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

BOOT_TIMEOUT = 120.0
NMI_LINE = "NMI received for unknown reason"
PANIC_LINE = "Kernel panic - not syncing: NMI"


def test_kdump_guest_saves_a_vmcore_of_its_own_kernel(
    images: dict[ImageVariant, GuestImage], tmp_path: Path
) -> None:
    image = images[ImageVariant.KDUMP]
    with Guest(image) as guest:
        ready = guest.wait_ready(BOOT_TIMEOUT)
        assert ready["kernel"] == image.kernel_release
        assert ready["kexec_crash_loaded"] == "1"
        assert ready["unknown_nmi_panic"] == "1"

        guest.inject_nmi()
        guest.wait_for(CRASH_KERNEL_MARKER, 60)
        # The panicked kernel's own lines, replayed by the crash kernel.
        guest.wait_for(f"{PANIC_LOG_MARKER} .*{NMI_LINE}", 60)
        guest.wait_for(f"{PANIC_LOG_MARKER} .*{PANIC_LINE}", 60)
        guest.wait_for(DUMP_SAVED_MARKER, 120)
        guest.wait_stopped(30)
        vmcore = extract_vmcore(guest.dump_disk, tmp_path / "vmcore")

    assert vmcore.format == "kdump-compressed"
    assert vmcore.kernel_release == image.kernel_release
    assert vmcore.panic_message == "NMI: Not continuing"
    assert vmcore.bytes > 1024 * 1024


def test_no_kdump_guest_panics_and_stays_up(images: dict[ImageVariant, GuestImage]) -> None:
    with Guest(images[ImageVariant.NO_KDUMP]) as guest:
        assert guest.wait_ready(BOOT_TIMEOUT)["kexec_crash_loaded"] == "0"
        guest.inject_nmi()
        guest.wait_for(PANIC_LINE, 60)
        time.sleep(2)  # a reboot or power-off would show within this
        assert guest.is_active()
        assert CRASH_KERNEL_MARKER not in guest.console.text()


def test_nmi_ignored_guest_logs_the_nmi_and_carries_on(
    images: dict[ImageVariant, GuestImage],
) -> None:
    with Guest(images[ImageVariant.NMI_IGNORED]) as guest:
        assert guest.wait_ready(BOOT_TIMEOUT)["unknown_nmi_panic"] == "0"
        guest.inject_nmi()
        guest.wait_for(NMI_LINE, 60)
        guest.wait_for("Dazed and confused, but trying to continue", 30)
        # Linux swallows an NMI that follows another at the same RIP
        # (default_do_nmi's back-to-back check), so leave the idle loop time to move.
        time.sleep(2)
        guest.inject_nmi()
        time.sleep(2)
        assert guest.is_active()
        console = guest.console.text()
        assert "Kernel panic" not in console
        assert console.count(NMI_LINE) == 2


def _assert_removed(conn: libvirt.virConnect, guest: Guest) -> None:
    assert not domain_exists(conn, guest.name)
    assert not guest.workdir.exists()


def test_cleanup_after_an_exception_leaves_nothing(
    images: dict[ImageVariant, GuestImage], libvirt_conn: libvirt.virConnect
) -> None:
    with pytest.raises(RuntimeError, match="boom"), Guest(images[ImageVariant.NO_KDUMP]) as guest:
        assert domain_exists(libvirt_conn, guest.name)
        assert guest.dump_disk.exists()
        raise RuntimeError("boom")
    _assert_removed(libvirt_conn, guest)


def test_cleanup_of_a_transient_domain(
    images: dict[ImageVariant, GuestImage], libvirt_conn: libvirt.virConnect
) -> None:
    with Guest(images[ImageVariant.NO_KDUMP]) as guest:
        guest.domain().undefine()  # running but no longer persistent
        assert guest.is_active()
    _assert_removed(libvirt_conn, guest)


def test_cleanup_of_a_guest_that_powered_itself_off(
    images: dict[ImageVariant, GuestImage], libvirt_conn: libvirt.virConnect
) -> None:
    with Guest(images[ImageVariant.NO_KDUMP]) as guest:
        guest.domain().destroy()  # defined, shut off
        with pytest.raises(GuestStopped):
            guest.wait_ready(BOOT_TIMEOUT)
    _assert_removed(libvirt_conn, guest)
