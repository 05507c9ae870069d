"""The scenarios before and beyond the NMI, each over libvirt with its own verdict.

- ``preflight``: every image variant gets the crash readiness it should have
  (app/readiness.py): ``kdump`` armed, ``no-kdump`` and ``nmi-ignored`` not
  armed, each for its own reason. Verdict ``readiness-as-expected``.
- ``guarded --variant V``: the guarded trigger (``require_armed``) as the
  server's owner. A guest that is not armed is refused with 409, no action is
  recorded and its console shows no NMI: ``guard-refused``. An armed guest's
  NMI is sent: ``guard-passed``.
- ``capture --variant V``: the hypervisor dumps the guest's memory
  (app/capture.py). The crash dump must be ``verified`` (its VMCOREINFO names
  the guest's kernel), download through the API with the same sha256, and the
  guest must still be running: ``capture-verified``.

As in scenarios/kdump.py, the verdict comes from the API; the console is read
only to know the guest has booted and, for ``guarded``, that no NMI arrived.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from app.client import ClientError
from app.vmcore import read_vmcore, sha256_of
from emulators.guest import Guest
from emulators.guest_image import NMI_LOGGED, ImageVariant, build_image
from scenarios.api import LocalService, ScenarioAPI
from scenarios.kdump import (
    BOOT_TIMEOUT,
    EVENT_TIMEOUT,
    RUN_ERRORS,
    ScenarioResult,
    Verdict,
    default_output,
    keep_console,
    quietly,
    reason_of,
)
from scenarios.progress import Progress
from scenarios.via import Via

SCENARIOS = ("preflight", "guarded", "capture")
# The variants these scenarios boot; kdump-ssh needs a dump collector they do not run.
EXPECTED_READINESS = {
    ImageVariant.KDUMP: ("armed", None),
    ImageVariant.NO_KDUMP: ("not-armed", "kexec_crash_loaded=0"),
    ImageVariant.NMI_IGNORED: ("not-armed", "unknown_nmi_panic=0"),
}
# How long a refused guest's console is watched for an NMI that must not come.
QUIET_SECONDS = 3.0
CAPTURE_TIMEOUT = 120.0


@dataclass
class Booted:
    guest: Guest
    server_id: str
    kernel_release: str | None


def run_scenario(
    scenario: str,
    variant: ImageVariant | str,
    *,
    api: ScenarioAPI | None = None,
    output: Path | None = None,
    progress: Progress | None = None,
) -> ScenarioResult:
    """Run one of ``SCENARIOS``; never raises for a failed run, only reports it."""
    result = ScenarioResult(Via.LIBVIRT, ImageVariant(variant), scenario=scenario)
    result.expected = expected_verdict(scenario, result.variant)
    result.artifacts = output or default_output(f"{scenario}-{result.variant}")
    result.artifacts.mkdir(parents=True, exist_ok=True)
    progress = progress or Progress()
    run = {"preflight": _preflight, "guarded": _guarded, "capture": _capture}[scenario]
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            if api is None:
                with progress.step("starting crashlab serve"):
                    service = stack.enter_context(LocalService(result.artifacts / "service"))
                api = service.api()
                stack.callback(api.close)
            result.api_url = api.url
            with progress.step("logging in to the API"):
                api.login()
            result.verdict, result.reason = run(result, api, stack, progress)
    except RUN_ERRORS as exc:
        result.verdict, result.reason = Verdict.FAILED, reason_of(exc)
    result.seconds.total = time.monotonic() - started
    return result


def expected_verdict(scenario: str, variant: ImageVariant) -> Verdict:
    if scenario == "preflight":
        return Verdict.READINESS_AS_EXPECTED
    if scenario == "capture":
        return Verdict.CAPTURE_VERIFIED
    armed = EXPECTED_READINESS[variant][0] == "armed"
    return Verdict.GUARD_PASSED if armed else Verdict.GUARD_REFUSED


def boot_registered(
    variant: ImageVariant,
    api: ScenarioAPI,
    stack: ExitStack,
    progress: Progress,
    result: ScenarioResult,
) -> Booted:
    """A booted guest of ``variant``, registered as the user's libvirt server."""
    assert result.artifacts is not None
    artifacts = result.artifacts
    with progress.step(f"building the {variant} guest image"):
        image = build_image(variant)
    guest = stack.enter_context(Guest(image))
    stack.callback(keep_console, guest, artifacts / f"console-{variant}.log")
    progress.note(f"guest {guest.name} ({guest.accel}, kernel {image.kernel_release})")
    with progress.step(f"booting the {variant} guest"):
        ready = guest.wait_ready(BOOT_TIMEOUT, on_line=progress.console_line)
    result.accel, result.domain = str(guest.accel), guest.name
    result.seconds.boot = time.monotonic() - guest.started_at
    server_id = api.register(guest.name, "libvirt", {"uri": guest.uri, "domain": guest.name})
    stack.callback(quietly, api.unregister, server_id)
    result.server_id = server_id
    return Booted(guest, server_id, ready.get("kernel"))


def fresh_readiness(api: ScenarioAPI, server_id: str) -> dict[str, Any]:
    """A fresh check; the guest's /init starts its agent before the READY line."""
    return api.user.get_readiness(server_id, refresh=True)


def readiness_as_expected(variant: ImageVariant, readiness: dict[str, Any]) -> str | None:
    """None when the verdict (and its reason) are what ``variant`` should show, else why not."""
    verdict, reason = EXPECTED_READINESS[variant]
    if readiness["verdict"] != verdict:
        return f"{variant}: {readiness['verdict']} ({'; '.join(readiness['reasons'])})"
    if reason is not None and not any(r.startswith(reason) for r in readiness["reasons"]):
        return f"{variant}: not-armed, but not for {reason}: {readiness['reasons']}"
    return None


Outcome = tuple[Verdict, str | None]


def _preflight(
    result: ScenarioResult, api: ScenarioAPI, stack: ExitStack, progress: Progress
) -> Outcome:
    assert result.artifacts is not None
    wrong = []
    for variant in EXPECTED_READINESS:
        with ExitStack() as guest_stack:
            booted = boot_registered(variant, api, guest_stack, progress, result)
            with progress.step(f"checking the {variant} guest's readiness"):
                readiness = fresh_readiness(api, booted.server_id)
            progress.note(f"{variant}: {readiness['verdict']} {readiness['reasons']}")
            if problem := readiness_as_expected(variant, readiness):
                wrong.append(problem)
    if wrong:
        return Verdict.FAILED, "; ".join(wrong)
    return Verdict.READINESS_AS_EXPECTED, None


def _guarded(
    result: ScenarioResult, api: ScenarioAPI, stack: ExitStack, progress: Progress
) -> Outcome:
    assert result.artifacts is not None
    booted = boot_registered(result.variant, api, stack, progress, result)
    console_mark = booted.guest.console.mark()
    try:
        result.request_id = api.user.trigger_crash_dump(booted.server_id, require_armed=True)
    except ClientError as refusal:
        if refusal.status != 409:
            return Verdict.FAILED, f"the guarded trigger answered {refusal.status}: {refusal}"
        result.action_details = str(refusal)
        progress.note(f"refused: {refusal}")
        time.sleep(QUIET_SECONDS)
        booted.guest.console.poll()
        if api.admin.list_actions(booted.server_id):
            return Verdict.FAILED, "the refused trigger recorded an instance action"
        if booted.guest.console.find(NMI_LOGGED, console_mark) is not None:
            return Verdict.FAILED, "the trigger was refused, yet the console shows an NMI"
        return Verdict.GUARD_REFUSED, None
    progress.note(f"trigger_crash_dump accepted: {result.request_id}")
    action = api.wait_for_trigger(booted.server_id, result.request_id, EVENT_TIMEOUT)
    if action is None:
        return Verdict.FAILED, f"the guarded NMI's event did not end within {EVENT_TIMEOUT:g} s"
    event = action["events"][0]
    result.action_result, result.action_details = event["result"], event.get("details")
    if event["result"] != "Success":
        return Verdict.FAILED, f"the guarded NMI was not sent: {event.get('details')}"
    return Verdict.GUARD_PASSED, None


def _capture(
    result: ScenarioResult, api: ScenarioAPI, stack: ExitStack, progress: Progress
) -> Outcome:
    assert result.artifacts is not None
    booted = boot_registered(result.variant, api, stack, progress, result)
    result.guest_kernel_release = booted.kernel_release
    # The expected kernel comes from the readiness check's kernel_release.
    fresh_readiness(api, booted.server_id)
    with progress.step("capturing the guest's memory through the API"):
        dump = api.admin.capture_memory_dump(booted.server_id, then="resume")
        result.dump_id = dump["id"]
        dump = api.admin.wait_for_capture(booted.server_id, dump["id"], CAPTURE_TIMEOUT)
    result.dump_state, result.dump_error = dump["state"], dump.get("error")
    result.request_id = dump["request_id"]
    if dump["state"] != "verified":
        return Verdict.FAILED, f"the capture ended {dump['state']}: {dump.get('error')}"
    out = result.artifacts / "vmcore"
    with progress.step("downloading the vmcore through the API"):
        api.admin.download_vmcore(booted.server_id, dump["id"], out)
    result.vmcore = read_vmcore(out)
    if sha256_of(out) != dump["vmcore"]["sha256"]:
        return Verdict.FAILED, "the downloaded vmcore's sha256 is not the API's"
    release = result.vmcore.vmcoreinfo.get("OSRELEASE")
    if release != booted.kernel_release:
        return Verdict.FAILED, f"the vmcore holds {release}, the guest ran {booted.kernel_release}"
    if dump["vmcore"]["crash_time"] is not None:
        return Verdict.FAILED, "a live capture has no CRASHTIME, yet the API shows one"
    state, _reason_code = booted.guest.domain().state()
    if state != libvirt.VIR_DOMAIN_RUNNING:
        return Verdict.FAILED, f"the guest is no longer running after the capture (state {state})"
    result.dump_saved = True
    return Verdict.CAPTURE_VERIFIED, None
