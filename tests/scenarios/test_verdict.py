"""How a scenario turns evidence into a verdict, and how it reports it (no guests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.vmcore import Vmcore
from emulators.guest_image import ImageVariant
from scenarios.kdump import ScenarioResult, Verdict, decide
from scenarios.report import render_report, render_summary, to_json
from scenarios.via import Via

pytestmark = pytest.mark.fast

RELEASE = "6.1.0-56-amd64"


def vmcore(release: str = RELEASE, format: str = "kdump-compressed") -> Vmcore:
    return Vmcore(Path("/tmp/vmcore"), 17_000_000, format, 6, release, "#1 SMP", "x86_64")


def result(variant: ImageVariant = ImageVariant.KDUMP, **evidence: Any) -> ScenarioResult:
    r = ScenarioResult(Via.LIBVIRT, variant, action_result="Success")
    r.guest_kernel_release = RELEASE
    for name, value in evidence.items():
        setattr(r, name, value)
    return r


@pytest.mark.parametrize(
    ("evidence", "running", "verdict"),
    [
        (dict(nmi_received=True, panicked=True, dump_saved=True, vmcore=vmcore()), False,
         Verdict.DUMP_VERIFIED),
        (dict(nmi_received=True, panicked=True), True, Verdict.PANIC_NO_DUMP),
        (dict(nmi_received=True), True, Verdict.NMI_IGNORED),
        (dict(nmi_received=True), False, Verdict.FAILED),
        (dict(), True, Verdict.FAILED),
        (dict(panicked=True, dump_saved=True, vmcore=vmcore("5.10.0-1-amd64")), False,
         Verdict.FAILED),
        (dict(panicked=True, dump_saved=True, vmcore=vmcore(format="diskdump")), False,
         Verdict.FAILED),
        (dict(panicked=True, dump_saved=True), False, Verdict.FAILED),
        (dict(action_result="Error", nmi_received=True, panicked=True), True, Verdict.FAILED),
        (dict(action_result=None, nmi_received=True), True, Verdict.FAILED),
    ],
)  # fmt: skip
def test_verdict_follows_the_evidence(
    evidence: dict[str, Any], running: bool, verdict: Verdict
) -> None:
    found, reason = decide(result(**evidence), running)
    assert found is verdict
    if verdict is Verdict.FAILED:
        assert reason


def test_kdump_guest_that_panicked_without_a_dump_says_why() -> None:
    console = "CRASHLAB-CRASH-KERNEL kernel=x\nCRASHLAB-DUMP-FAILED rc=1"
    verdict, reason = decide(result(panicked=True), True, console)
    assert verdict is Verdict.PANIC_NO_DUMP
    assert reason is not None and "DUMP-FAILED rc=1" in reason
    assert not result(panicked=True, verdict=verdict).ok


def test_only_the_expected_verdict_is_ok() -> None:
    assert result(ImageVariant.KDUMP, verdict=Verdict.DUMP_VERIFIED).ok
    assert result(ImageVariant.NO_KDUMP, verdict=Verdict.PANIC_NO_DUMP).ok
    assert result(ImageVariant.NMI_IGNORED, verdict=Verdict.NMI_IGNORED).ok
    assert not result(ImageVariant.NO_KDUMP, verdict=Verdict.DUMP_VERIFIED).ok


def test_json_report_has_the_fields_the_issue_asks_for() -> None:
    r = result(nmi_received=True, panicked=True, dump_saved=True, vmcore=vmcore(),
               verdict=Verdict.DUMP_VERIFIED, server_id="s", request_id="req-1")  # fmt: skip
    r.seconds.boot, r.seconds.trigger_to_panic = 6.04, 0.051
    report = json.loads(to_json(r))
    for key in ("via", "variant", "server_id", "request_id", "action_result", "nmi_received",
                "panicked", "dump_saved", "vmcore", "guest_kernel_release", "seconds",
                "verdict"):  # fmt: skip
        assert key in report
    assert set(report["vmcore"]) >= {"path", "bytes", "format", "kernel_release"}
    assert set(report["seconds"]) == {"boot", "trigger_to_panic", "panic_to_dump", "total"}
    assert report["seconds"]["trigger_to_panic"] == 0.05
    assert report["ok"] is True
    assert json.loads(to_json([r]))["ok"] is True


def test_readable_report_and_summary() -> None:
    ok = result(verdict=Verdict.DUMP_VERIFIED, vmcore=vmcore(), dump_saved=True)
    bad = result(ImageVariant.NO_KDUMP, verdict=Verdict.FAILED, reason="no NMI")
    assert "dump-verified  PASS" in render_report(ok)
    assert "FAIL (expected panic-no-dump)" in render_report(bad)
    summary = render_summary([ok, bad])
    assert "1/2 scenarios gave the expected verdict" in summary
    assert "libvirt/no-kdump: failed: no NMI" in summary
