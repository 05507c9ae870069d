"""``crashlab doctor`` and ``scripts/host`` on this host, and on a host whose /dev/kvm is root's.

The root-only ``/dev/kvm`` of a host without udev is made for real, briefly,
and only checks that call no libvirt run while it lasts: a libvirt call then
would start the very re-probe the doctor warns of.
"""

from __future__ import annotations

import grp
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulators.doctor import Status, check_kvm
from tests.scenarios.test_scenario import crashlab

pytestmark = [pytest.mark.libvirt]

REPO_ROOT = Path(__file__).resolve().parents[2]
KVM = Path("/dev/kvm")
CHECKS = [
    "libvirtd", "define round trip", "kvm", "apt packages", "venv",
    "guest images", "disk space", "emulators",
]  # fmt: skip


@pytest.fixture
def root_only_kvm() -> Iterator[None]:
    """/dev/kvm as a new host without udev has it: root:root 0600. Put back afterwards."""
    if not KVM.exists():
        pytest.skip("no /dev/kvm on this host")
    node = KVM.stat()
    os.chown(KVM, 0, 0)
    os.chmod(KVM, 0o600)
    try:
        yield
    finally:
        os.chown(KVM, node.st_uid, node.st_gid)
        os.chmod(KVM, node.st_mode & 0o7777)


def test_doctor_on_a_ready_host_has_no_fail_and_a_fast_define() -> None:
    run = crashlab("doctor", "--json", timeout=120)
    report = json.loads(run.stdout)
    assert run.returncode == 0, run.stdout
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == CHECKS
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert set(statuses.values()) <= {"ok", "warn"}
    define = next(c for c in report["checks"] if c["name"] == "define round trip")
    assert define["figure"].endswith(" ms") and int(define["figure"].split()[0]) < 2000


def test_doctor_prints_a_table_with_a_line_per_check() -> None:
    run = crashlab("doctor", timeout=120)
    assert run.returncode == 0, run.stdout
    lines = [line for line in run.stdout.splitlines() if not line.startswith(" ")]
    assert [line.split("  ")[0] for line in lines] == CHECKS


def test_root_only_kvm_fails_naming_the_fix_and_scripts_host_applies_debians_mode(
    root_only_kvm: None,
) -> None:
    check = check_kvm()
    assert check.status is Status.FAIL
    assert "cannot open /dev/kvm (crw------- root:root)" in check.detail
    assert check.fix and "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm" in check.fix

    run = subprocess.run([REPO_ROOT / "scripts" / "host"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "/dev/kvm was root:root 600, now root:kvm 660" in run.stdout
    node = KVM.stat()
    assert (node.st_mode & 0o777, node.st_gid) == (0o660, grp.getgrnam("kvm").gr_gid)
    assert check_kvm().status is not Status.FAIL
    again = subprocess.run([REPO_ROOT / "scripts" / "host"], capture_output=True, text=True)
    assert "/dev/kvm" not in again.stdout, "nothing to say when nothing changes"


def test_scenario_on_a_root_only_kvm_stops_before_booting(
    root_only_kvm: None, tmp_path: Path
) -> None:
    started = time.monotonic()
    run = crashlab("scenario", "kdump", "--output", str(tmp_path), timeout=120)
    assert run.returncode == 1
    assert "this host is not ready; nothing was booted" in run.stderr
    assert "fix: chgrp kvm /dev/kvm" in run.stderr
    assert "define round trip" in run.stderr and "skipped" in run.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "console.log").exists()
