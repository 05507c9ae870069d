"""How a scenario turns what the API said into a verdict, and how it reports it (no guests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.events import COLLECT_DUMP_EVENT, CRASH_DUMP_EVENT, OBSERVE_PANIC_EVENT, VERIFY_DUMP_EVENT
from app.vmcore import Vmcore
from emulators.guest_image import ImageVariant
from scenarios.kdump import (
    ApiEvidence,
    Download,
    ScenarioResult,
    Verdict,
    decide,
    read_evidence,
)
from scenarios.report import render_report, render_summary, to_json
from scenarios.via import Via

pytestmark = pytest.mark.fast

RELEASE = "6.1.0-56-amd64"
SHA = "ab" * 32
# How app/follower.py words a guest that logged the NMI and went on.
NMI_LOGGED = "no panic within 10 s: the guest logged the NMI and went on (Dazed and confused)"


def event(name: str, result: str | None, start: str, finish: str, details: str = "") -> Any:
    day = "2025-01-01T12:00:"
    return {"event": name, "result": result, "start_time": day + start,
            "finish_time": day + finish, "details": details}  # fmt: skip


TRIGGER = event(CRASH_DUMP_EVENT, "Success", "00.000000", "00.200000")
PANICKED = event(OBSERVE_PANIC_EVENT, "Success", "00.200000", "03.500000")
NO_PANIC = event(OBSERVE_PANIC_EVENT, "Error", "00.200000", "10.200000", NMI_LOGGED)
NO_SIGN = event(OBSERVE_PANIC_EVENT, "Error", "00.200000", "10.200000", "no panic seen")
COLLECTED = event(COLLECT_DUMP_EVENT, "Success", "03.500000", "20.000000")
NOT_COLLECTED = event(COLLECT_DUMP_EVENT, "Error", "03.500000", "13.500000", "no dump arrived")
VERIFIED = event(VERIFY_DUMP_EVENT, "Success", "20.000000", "21.000000")


def api(*events: Any, state: str | None = None, running: bool = True, **extra: Any) -> ApiEvidence:
    """What the API said: the action's events, the dump in ``state``, the server's power."""
    dump = None
    if state is not None:
        dump = {"id": "d-1", "server_id": "s", "state": state, "error": extra.pop("error", None),
                "vmcore": {"sha256": SHA}, "panic": None}  # fmt: skip
    return ApiEvidence(
        action={"events": list(events)},
        dump=dump,
        states=[] if state is None else [state],
        server={"OS-EXT-STS:power_state": 1 if running else 4},
        **extra,
    )


def download(release: str = RELEASE, format: str = "kdump-compressed", sha: str = SHA) -> Download:
    vmcore = Vmcore(Path("/tmp/vmcore"), 17_000_000, format, 6, release, "#1 SMP", "x86_64")
    return Download(vmcore, sha)


def result(variant: ImageVariant = ImageVariant.KDUMP, **fields: Any) -> ScenarioResult:
    r = ScenarioResult(Via.LIBVIRT, variant)
    r.guest_kernel_release = RELEASE
    for name, value in fields.items():
        setattr(r, name, value)
    return r


VERIFIED_DUMP = api(TRIGGER, PANICKED, COLLECTED, VERIFIED, state="verified", download=download())


@pytest.mark.parametrize(
    ("evidence", "verdict"),
    [
        (VERIFIED_DUMP, Verdict.DUMP_VERIFIED),
        (api(TRIGGER, PANICKED, NOT_COLLECTED, state="failed"), Verdict.PANIC_NO_DUMP),
        (api(TRIGGER, NO_PANIC, NOT_COLLECTED, state="failed"), Verdict.NMI_IGNORED),
        (api(TRIGGER, NO_PANIC, NOT_COLLECTED, state="failed", running=False), Verdict.FAILED),
        (api(TRIGGER, NO_SIGN, NOT_COLLECTED, state="failed"), Verdict.FAILED),
        # The API says verified, but the vmcore downloaded through it does not hold up.
        (api(TRIGGER, PANICKED, COLLECTED, VERIFIED, state="verified",
             download=download("5.10.0-1-amd64")), Verdict.FAILED),
        (api(TRIGGER, PANICKED, COLLECTED, VERIFIED, state="verified",
             download=download(format="diskdump")), Verdict.FAILED),
        (api(TRIGGER, PANICKED, COLLECTED, VERIFIED, state="verified",
             download=download(sha="cd" * 32)), Verdict.FAILED),
        (api(TRIGGER, PANICKED, COLLECTED, VERIFIED, state="verified",
             download=Download(error="HTTP 404")), Verdict.FAILED),
        (api(TRIGGER, PANICKED, COLLECTED, VERIFIED, state="verified"), Verdict.FAILED),
        # A dump that arrived but failed verification is no "panic without a dump".
        (api(TRIGGER, PANICKED, COLLECTED, state="failed", error="wrong kernel"), Verdict.FAILED),
        (api(TRIGGER, PANICKED, state="collecting"), Verdict.FAILED),
        (api(TRIGGER), Verdict.FAILED),
        (api({**TRIGGER, "result": "Error"}, PANICKED, state="failed"), Verdict.FAILED),
        (api({**TRIGGER, "result": None, "finish_time": None}), Verdict.FAILED),
        (ApiEvidence(), Verdict.FAILED),
    ],
)  # fmt: skip
def test_verdict_follows_what_the_api_said(evidence: ApiEvidence, verdict: Verdict) -> None:
    found, reason = decide(result(), evidence)
    assert found is verdict
    if verdict is Verdict.FAILED:
        assert reason


def test_a_dump_that_passed_panicked_counts_as_a_panic() -> None:
    evidence = api(TRIGGER, NO_SIGN, NOT_COLLECTED, state="failed")
    evidence.states = ["panicked", "failed"]
    assert decide(result(ImageVariant.NO_KDUMP), evidence) == (Verdict.PANIC_NO_DUMP, None)


def test_kdump_guest_that_panicked_without_a_dump_says_why() -> None:
    evidence = api(TRIGGER, PANICKED, NOT_COLLECTED, state="failed", error="no dump within 240 s")
    verdict, reason = decide(result(), evidence)
    assert verdict is Verdict.PANIC_NO_DUMP
    assert reason is not None and "no dump within 240 s" in reason
    assert not result(verdict=verdict).ok


def test_report_fields_and_timings_come_from_the_api() -> None:
    r = result()
    read_evidence(r, VERIFIED_DUMP)
    assert (r.action_result, r.nmi_received, r.panicked, r.dump_saved) == (
        "Success",
        True,
        True,
        True,
    )
    assert (r.dump_id, r.dump_state, r.dump_error) == ("d-1", "verified", None)
    assert r.vmcore is not None and r.vmcore.kernel_release == RELEASE
    # The 202 to the panic seen, and the panic seen to the complete dump, on the API's clock.
    assert r.seconds.trigger_to_panic == pytest.approx(3.5)
    assert r.seconds.panic_to_dump == pytest.approx(16.5)
    # The NMI's own event, the verification, and the 202 to verified.
    assert r.seconds.nmi == pytest.approx(0.2)
    assert r.seconds.verify == pytest.approx(1.0)
    assert r.seconds.trigger_to_verified == pytest.approx(21.0)
    ignored = result(ImageVariant.NMI_IGNORED)
    read_evidence(ignored, api(TRIGGER, NO_PANIC, NOT_COLLECTED, state="failed"))
    assert (ignored.nmi_received, ignored.panicked, ignored.dump_saved) == (True, False, False)
    assert ignored.seconds.trigger_to_panic is None


def test_only_the_expected_verdict_is_ok() -> None:
    assert result(ImageVariant.KDUMP, verdict=Verdict.DUMP_VERIFIED).ok
    assert result(ImageVariant.NO_KDUMP, verdict=Verdict.PANIC_NO_DUMP).ok
    assert result(ImageVariant.NMI_IGNORED, verdict=Verdict.NMI_IGNORED).ok
    assert not result(ImageVariant.NO_KDUMP, verdict=Verdict.DUMP_VERIFIED).ok


def test_json_report_has_the_fields_the_issue_asks_for() -> None:
    r = result(verdict=Verdict.DUMP_VERIFIED, server_id="s", request_id="req-1")
    read_evidence(r, VERIFIED_DUMP)
    r.seconds.boot, r.seconds.trigger_to_panic = 6.04, 0.051
    report = json.loads(to_json(r))
    for key in ("via", "variant", "server_id", "request_id", "action_result", "nmi_received",
                "panicked", "dump_saved", "vmcore", "guest_kernel_release", "seconds",
                "verdict", "dump_id", "dump_state", "dump_error"):  # fmt: skip
        assert key in report
    assert report["dump_id"] == "d-1" and report["dump_state"] == "verified"
    assert set(report["vmcore"]) >= {"path", "bytes", "format", "kernel_release"}
    assert set(report["seconds"]) == {
        "boot",
        "nmi",
        "trigger_to_panic",
        "panic_to_dump",
        "verify",
        "trigger_to_verified",
        "total",
    }
    assert report["seconds"]["trigger_to_panic"] == 0.05
    assert report["ok"] is True
    assert json.loads(to_json([r]))["ok"] is True


def test_readable_report_and_summary() -> None:
    ok = result(verdict=Verdict.DUMP_VERIFIED)
    read_evidence(ok, VERIFIED_DUMP)
    bad = result(ImageVariant.NO_KDUMP, verdict=Verdict.FAILED, reason="no NMI")
    assert "dump-verified  PASS" in render_report(ok)
    assert "d-1 (verified)" in render_report(ok)
    assert "FAIL (expected panic-no-dump)" in render_report(bad)
    summary = render_summary([ok, bad])
    assert "1/2 scenarios gave the expected verdict" in summary
    assert "libvirt/no-kdump: failed: no NMI" in summary
