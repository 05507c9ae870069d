"""``crashlab scenario`` end to end: real guests, emulators, API and the vmcores it downloads."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from app.process import free_port
from tests.domains import domain_exists
from tests.fixtures import processes_mentioning
from tests.live import LiveServer, fake_cloud_config

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

EXPECTED = {
    ("libvirt", "kdump"): "dump-verified",
    ("ipmi", "kdump"): "dump-verified",
    ("redfish", "kdump"): "dump-verified",
    ("libvirt", "no-kdump"): "panic-no-dump",
    ("libvirt", "nmi-ignored"): "nmi-ignored",
}
# The scenarios before and beyond the NMI, after the kdump runs.
EXPECTED_BEYOND = {
    ("preflight", "kdump"): "readiness-as-expected",
    ("guarded", "nmi-ignored"): "guard-refused",
    ("capture", "no-kdump"): "capture-verified",
}


# The matrix under TCG takes about 4 minutes on 2 cores; leave room for a slow runner.
MATRIX_TIMEOUT = 2400


def crashlab_command() -> list[str]:
    """The installed ``crashlab`` entry point beside this interpreter, as a user runs it."""
    script = Path(sys.executable).with_name("crashlab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "scenarios.cli"]


def crashlab(
    *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*crashlab_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.bmc
@pytest.mark.timeout(MATRIX_TIMEOUT + 60)
def test_scenario_all_gives_every_expected_verdict(
    tmp_path: Path, libvirt_conn: libvirt.virConnect
) -> None:
    """The README's main command, as CI runs it: under TCG, so it passes without KVM."""
    run = crashlab(
        "scenario", "all", "--json", "--output", str(tmp_path),
        timeout=MATRIX_TIMEOUT, env={"CRASHLAB_ACCEL": "tcg"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["ok"] is True
    kdump_runs = [r for r in report["results"] if r["scenario"] == "kdump"]
    beyond = [r for r in report["results"] if r["scenario"] != "kdump"]
    assert {(r["via"], r["variant"]): r["verdict"] for r in kdump_runs} == EXPECTED
    # Bare metal's dumps arrive over SSH; the libvirt path keeps the disk.
    over_ssh = {(r["via"], r["variant"]) for r in kdump_runs if r["target"] == "ssh"}
    assert over_ssh == {("ipmi", "kdump"), ("redfish", "kdump")}
    for r in kdump_runs:
        resource = json.loads((Path(r["artifacts"]) / "crash_dump.json").read_text())
        assert resource["id"] == r["dump_id"] and resource["target"] == r["target"], resource
    assert {(r["scenario"], r["variant"]): r["verdict"] for r in beyond} == EXPECTED_BEYOND
    for r in beyond:
        assert r["accel"] == "tcg" and r["ok"] is True
        assert not domain_exists(libvirt_conn, r["domain"])
    capture = next(r for r in beyond if r["scenario"] == "capture")
    assert capture["dump_state"] == "verified"
    assert capture["vmcore"]["kernel_release"] == capture["guest_kernel_release"]
    assert capture["vmcore"]["format"] == "kdump-compressed"
    for r in kdump_runs:
        assert r["accel"] == "tcg"
        assert r["action_result"] == "Success"
        assert r["nmi_received"] is True
        assert not domain_exists(libvirt_conn, r["domain"])
        assert r["dump_id"] and r["dump_state"] == (
            "verified" if r["variant"] == "kdump" else "failed"
        )
        if r["variant"] == "kdump":
            assert_verified_vmcore(r)
        else:
            assert r["vmcore"] is None and r["dump_saved"] is False
    assert {r["panicked"] for r in kdump_runs if r["variant"] != "nmi-ignored"} == {True}


def assert_verified_vmcore(r: dict[str, Any]) -> None:
    vmcore = r["vmcore"]
    assert vmcore["format"] == "kdump-compressed"
    assert vmcore["kernel_release"] == r["guest_kernel_release"]
    path = Path(vmcore["path"])
    assert path.stat().st_size == vmcore["bytes"] > 1_000_000
    described = subprocess.run(["file", "-b", str(path)], capture_output=True, text=True).stdout
    assert "Kdump compressed dump" in described
    assert f"release {r['guest_kernel_release']}" in described
    assert r["seconds"]["trigger_to_verified"] > 0
    # Only the disk target's console shows a panic; over ssh crashlab reads none.
    if r["target"] == "disk":
        assert r["seconds"]["panic_to_dump"] > 0
    else:
        assert r["seconds"]["panic_to_dump"] is None


def test_scenario_against_a_running_api(
    tmp_path: Path, crashlab_server: Callable[..., LiveServer]
) -> None:
    """The fake cloud's admin registers the guest, alice triggers its dump."""
    server = crashlab_server(fake_cloud_config())
    run = crashlab(
        "scenario", "kdump", "--variant", "no-kdump", "--api", server.url,
        "--json", "--output", str(tmp_path),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["verdict"] == "panic-no-dump"
    assert report["api_url"] == server.url
    assert report["action_result"] == "Success"
    assert report["dump_state"] == "failed" and report["panicked"] is True


def test_unreachable_api_fails_before_booting(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    run = crashlab("scenario", "kdump", "--api", dead, "--json", "--output", str(tmp_path))
    assert run.returncode == 1
    report = json.loads(run.stdout)
    assert report["verdict"] == "failed"
    assert report["reason"]
    assert report["domain"] is None


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupted_scenario_cleans_up(tmp_path: Path, libvirt_conn: libvirt.virConnect) -> None:
    process = subprocess.Popen(
        [*crashlab_command(), "scenario", "kdump", "--via", "redfish", "--output", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as at a terminal: a job started in the background by a shell without
        # job control inherits SIGINT ignored, and so would the scenario.
        preexec_fn=_default_sigint,
    )  # fmt: skip
    assert process.stderr is not None
    domain = None
    deadline = time.monotonic() + 120
    for line in process.stderr:
        if found := re.search(r"guest (crashlab-\S+)", line):
            domain = found.group(1)
        if domain and "booting the guest" in line:
            break
        assert time.monotonic() < deadline
    assert domain and domain_exists(libvirt_conn, domain)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode == 130
    assert not domain_exists(libvirt_conn, domain)
    assert not list((tmp_path / "sushy").glob("*.pid"))
    sushy_log = (tmp_path / "sushy" / "emulator.log").read_text()
    assert sushy_log  # it ran; and it is gone:
    assert not processes_mentioning(tmp_path / "sushy")
