"""The kdump scenario: boot a guest, trigger its crash dump through the API, prove the vmcore.

One run, end to end::

    image  = build_image(variant)                  # cached
    guest  = Guest(image); guest.define()          # libvirt, console to a file
    path   = attach(via, guest)                    # nothing, virtualbmc or sushy-tools
    server = api.register(..., dump_target=...)    # admin extension, owned by the user
    guest.boot()                                   # over ssh: with the key the API handed out
    api.trigger_crash_dump(server)                 # as the user, over HTTP: 202 + request id
    dump   = api.wait_for_dump(server, request)    # crashlab follows it: panic, collect, verify
    vmcore = download(api, dump)                   # through the API, read, its sha256 checked
    verdict                                        # what the API's evidence shows

The verdict is read from the API only (``ApiEvidence``): the instance
action's events, the crash-dump resource crashlab follows after the NMI
(app/follower.py), the server's power state, and the vmcore downloaded
through the API. So the runner works against any crashlab (``--api URL``)
that can reach the guest. The guest's console is read here for two things
only: to know the guest has booted before the trigger, and to show progress.
Each variant expects one verdict; anything else is a failed run.

Where the dump lands follows the path (scenarios/via.py): over libvirt, the
guest's dump disk; behind a BMC (IPMI, Redfish), a kdump guest is registered
with the ``ssh`` target before it boots, and boots the kdump-ssh image with
the key the API handed out, so its crash kernel sends the vmcore to crashlab's
collector and nothing of the guest's own is read for the verdict.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import re
import shutil
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import libvirt

from app.client import ClientError
from app.events import (
    COLLECT_DUMP_EVENT,
    CRASH_DUMP_EVENT,
    OBSERVE_PANIC_EVENT,
    VERIFY_DUMP_EVENT,
)
from app.process import EmulatorStartError
from app.vmcore import Vmcore, VmcoreError, panic_message, read_vmcore, sha256_of
from drivers.base import PowerState
from emulators.guest import Guest, GuestError
from emulators.guest_image import READY_MARKER, ImageBuildError, ImageVariant, build_image
from scenarios.api import LocalService, ScenarioAPI
from scenarios.progress import Progress
from scenarios.via import Attachment, Via, attach, ssh_dump_network

REPO_ROOT = Path(__file__).resolve().parent.parent

BOOT_TIMEOUT = 180.0
# From the 202 to the compute_trigger_crash_dump event's result: the NMI sent or not.
EVENT_TIMEOUT = 60.0
# The phases crashlab follows after the NMI (app/dump_targets.py), fitted to
# each variant under TCG. A kdump guest's crash kernel shows within seconds and
# writes its dump in under a minute. Where no dump can come, the collect phase
# is only how long to wait for one; where no panic can come, so is the panic
# phase: no-kdump panics within milliseconds of the NMI.
# The kdump variant behind a BMC boots the kdump-ssh image (``_run``), on the
# kdump variant's timeouts and verdict: the variant is the guest's setup, the
# image how its dump leaves it.
DUMP_TIMEOUTS: dict[ImageVariant, dict[str, float]] = {
    ImageVariant.KDUMP: {"panic": 60, "collect": 240, "verify": 120},
    ImageVariant.NO_KDUMP: {"panic": 60, "collect": 10, "verify": 60},
    ImageVariant.NMI_IGNORED: {"panic": 10, "collect": 5, "verify": 60},
}
# Beyond the phases' own timeouts: the follower's polls and the last event's finish.
FOLLOW_MARGIN = 60.0
# How the follower words an NMI the guest logged and survived (``_no_panic``
# in app/follower.py); the crash-dump resource has no field of its own for it.
NMI_LOGGED = re.compile(r"logged the NMI")
# A dump seen in any of these states had panicked: each follows the panic, or a
# dump arriving, which only a crash kernel writes.
PANICKED_STATES = frozenset({"panicked", "collecting", "collected", "verified"})


class Verdict(enum.StrEnum):
    DUMP_VERIFIED = "dump-verified"
    PANIC_NO_DUMP = "panic-no-dump"
    NMI_IGNORED = "nmi-ignored"
    # The scenarios before and beyond the NMI (scenarios/readiness_capture.py).
    CAPTURE_VERIFIED = "capture-verified"
    READINESS_AS_EXPECTED = "readiness-as-expected"
    GUARD_REFUSED = "guard-refused"
    GUARD_PASSED = "guard-passed"
    FAILED = "failed"


EXPECTED_VERDICT = {
    ImageVariant.KDUMP: Verdict.DUMP_VERIFIED,
    ImageVariant.NO_KDUMP: Verdict.PANIC_NO_DUMP,
    ImageVariant.NMI_IGNORED: Verdict.NMI_IGNORED,
}


@dataclass
class Seconds:
    boot: float | None = None
    # From the API's events: the NMI's own event, then each phase that followed it.
    nmi: float | None = None
    trigger_to_panic: float | None = None
    panic_to_dump: float | None = None
    verify: float | None = None
    trigger_to_verified: float | None = None
    total: float | None = None


@dataclass(frozen=True)
class Download:
    """The vmcore as downloaded through the API: what it says of itself, and its digest."""

    vmcore: Vmcore | None = None
    sha256: str | None = None
    error: str | None = None


@dataclass
class ApiEvidence:
    """What the API said of one crash dump; the verdict is made from this alone.

    ``action`` is the instance action with its events (crashlab's extension,
    read as admin), ``dump`` the crash-dump resource, ``states`` each state it
    was seen in while followed, ``server`` the server once the dump ended.
    """

    action: dict[str, Any] | None = None
    dump: dict[str, Any] | None = None
    states: list[str] = field(default_factory=list)
    server: dict[str, Any] | None = None
    download: Download | None = None

    def event(self, name: str) -> dict[str, Any] | None:
        events = (self.action or {}).get("events") or []
        return next((e for e in events if e["event"] == name), None)

    def succeeded(self, name: str) -> bool:
        event = self.event(name)
        return event is not None and event.get("result") == "Success"

    @property
    def panic_observed(self) -> bool:
        return self.succeeded(OBSERVE_PANIC_EVENT) or bool(PANICKED_STATES & set(self.states))

    @property
    def nmi_logged(self) -> bool:
        """The guest showed the NMI: it panicked, or logged it and went on."""
        observe = self.event(OBSERVE_PANIC_EVENT) or {}
        return self.panic_observed or bool(NMI_LOGGED.search(observe.get("details") or ""))

    @property
    def dump_saved(self) -> bool:
        return self.succeeded(COLLECT_DUMP_EVENT)

    @property
    def guest_running(self) -> bool:
        power = (self.server or {}).get("OS-EXT-STS:power_state")
        return power == PowerState.RUNNING

    def seconds(self, since: str, since_field: str, until: str) -> float | None:
        """From one event's ``since_field`` time to another's finish, on the API's clock."""
        start, end = self.event(since), self.event(until)
        if start is None or end is None or not start.get(since_field) or not end["finish_time"]:
            return None
        return (_time(end["finish_time"]) - _time(start[since_field])).total_seconds()


@dataclass
class ScenarioResult:
    """Everything one run saw; ``as_dict`` is the ``--json`` report."""

    via: Via
    variant: ImageVariant
    # The server's dump target: "ssh" behind a BMC for the kdump variant, else "disk".
    target: str = "disk"
    server_id: str | None = None
    request_id: str | None = None
    action_result: str | None = None
    action_details: str | None = None
    nmi_received: bool = False
    panicked: bool = False
    dump_saved: bool = False
    dump_id: str | None = None
    dump_state: str | None = None
    dump_error: str | None = None
    vmcore: Vmcore | None = None
    guest_kernel_release: str | None = None
    seconds: Seconds = field(default_factory=Seconds)
    verdict: Verdict = Verdict.FAILED
    reason: str | None = None
    accel: str | None = None
    domain: str | None = None
    api_url: str | None = None
    artifacts: Path | None = None
    # Which scenario ran: "kdump", or one of scenarios/readiness_capture.py's,
    # which set the verdict they expect.
    scenario: str = "kdump"
    expected: Verdict | None = None

    @property
    def expected_verdict(self) -> Verdict:
        return self.expected or EXPECTED_VERDICT[self.variant]

    @property
    def ok(self) -> bool:
        return self.verdict == self.expected_verdict

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "via": self.via.value,
            "variant": self.variant.value,
            "target": self.target,
            "server_id": self.server_id,
            "request_id": self.request_id,
            "action_result": self.action_result,
            "action_details": self.action_details,
            "nmi_received": self.nmi_received,
            "panicked": self.panicked,
            "dump_saved": self.dump_saved,
            "dump_id": self.dump_id,
            "dump_state": self.dump_state,
            "dump_error": self.dump_error,
            "vmcore": self.vmcore.as_dict() if self.vmcore else None,
            "guest_kernel_release": self.guest_kernel_release,
            "seconds": {k: _round(v) for k, v in vars(self.seconds).items()},
            "verdict": self.verdict.value,
            "reason": self.reason,
            "expected_verdict": self.expected_verdict.value,
            "ok": self.ok,
            "accel": self.accel,
            "domain": self.domain,
            "api_url": self.api_url,
            "artifacts": str(self.artifacts) if self.artifacts else None,
        }


# Failures that end a run with verdict "failed" and their message as the reason.
RUN_ERRORS = (
    GuestError,
    libvirt.libvirtError,
    ClientError,
    httpx.HTTPError,
    EmulatorStartError,
    ImageBuildError,
    VmcoreError,
    OSError,
)


def default_output(name: str) -> Path:
    """``var/scenarios/<timestamp>-<name>``: where a run keeps its console, vmcore and logs."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return REPO_ROOT / "var" / "scenarios" / f"{stamp}-{name}"


def run_kdump_scenario(
    via: Via | str,
    variant: ImageVariant | str = ImageVariant.KDUMP,
    *,
    target: str | None = None,
    api: ScenarioAPI | None = None,
    output: Path | None = None,
    progress: Progress | None = None,
) -> ScenarioResult:
    """Run one scenario; never raises for a failed run, only reports it.

    Without ``api`` a ``crashlab serve`` is started for the run. ``output``
    receives the console log, the downloaded vmcore and the emulator's logs.
    ``target`` is the dump target, "disk" or "ssh" (``default_target``).
    """
    result = ScenarioResult(Via(via), ImageVariant(variant))
    result.target = target or default_target(result.via, result.variant)
    if result.target == "ssh" and result.variant is not ImageVariant.KDUMP:
        raise ValueError("the ssh target is for the kdump variant: no other sends a dump")
    result.artifacts = output or default_output(f"{result.via}-{result.variant}")
    result.artifacts.mkdir(parents=True, exist_ok=True)
    progress = progress or Progress()
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            if api is None:
                with progress.step("starting crashlab serve"):
                    service = stack.enter_context(LocalService(result.artifacts / "service"))
                api = service.api()
                stack.callback(api.close)
            result.api_url = api.url
            _run(result, api, stack, progress)
    except RUN_ERRORS as exc:
        result.verdict, result.reason = Verdict.FAILED, reason_of(exc)
    result.seconds.total = time.monotonic() - started
    return result


def _run(result: ScenarioResult, api: ScenarioAPI, stack: ExitStack, progress: Progress) -> None:
    assert result.artifacts is not None
    with progress.step("logging in to the API"):
        api.login()
    over_ssh = result.target == "ssh"
    variant = ImageVariant.KDUMP_SSH if over_ssh else result.variant
    with progress.step(f"building the {variant} guest image"):
        image = build_image(variant)
    guest = Guest(image)
    stack.callback(guest.cleanup)
    guest.define()
    stack.callback(keep_console, guest, result.artifacts / "console.log")
    result.domain, result.accel = guest.name, str(guest.accel)
    progress.note(f"guest {guest.name} ({guest.accel}, kernel {image.kernel_release})")
    with progress.step(f"starting the {result.via} path"):
        attachment = stack.enter_context(
            attach(result.via, guest, result.artifacts, over_ssh=over_ssh)
        )
    if over_ssh:
        # The server's key exists once it is registered; the guest boots with it.
        result.server_id = _register(result, api, attachment, image.kernel_release)
        stack.callback(quietly, api.unregister, result.server_id)
        key = api.dump_target_key(result.server_id)
        guest.dump_network = ssh_dump_network(key, result.artifacts)
    guest.boot()
    with progress.step("booting the guest"):
        ready = guest.wait_ready(BOOT_TIMEOUT, on_line=progress.console_line)
    result.guest_kernel_release = ready.get("kernel")
    result.seconds.boot = _seen(guest, READY_MARKER) - guest.started_at
    if not over_ssh:
        result.server_id = _register(result, api, attachment, result.guest_kernel_release)
        stack.callback(quietly, api.unregister, result.server_id)
    assert result.server_id is not None
    result.request_id = api.trigger_crash_dump(result.server_id)
    progress.note(f"trigger_crash_dump accepted: {result.request_id}")

    evidence = _follow(result, api, guest, progress)
    read_evidence(result, evidence)
    result.verdict, result.reason = decide(result, evidence)


def default_target(via: Via, variant: ImageVariant) -> str:
    """A kdump guest behind a BMC sends its dump over SSH, as bare metal would."""
    return "ssh" if via is not Via.LIBVIRT and variant is ImageVariant.KDUMP else "disk"


def _register(
    result: ScenarioResult, api: ScenarioAPI, attachment: Attachment, kernel: str | None
) -> str:
    assert result.domain is not None
    return api.register(
        result.domain,
        attachment.driver,
        attachment.driver_info,
        dump_target=attachment.dump_target,
        dump_timeouts=DUMP_TIMEOUTS[result.variant],
        expected_kernel_release=kernel,
    )


def _follow(
    result: ScenarioResult, api: ScenarioAPI, guest: Guest, progress: Progress
) -> ApiEvidence:
    """Read from the API what became of the NMI; a missing step is evidence, not an error."""
    assert result.server_id and result.request_id and result.artifacts
    server_id, request_id = result.server_id, result.request_id
    evidence = ApiEvidence()
    with progress.step("waiting for the NMI to be sent"):
        evidence.action = api.wait_for_trigger(server_id, request_id, EVENT_TIMEOUT)
    if not evidence.succeeded(CRASH_DUMP_EVENT):
        return evidence

    def seen(dump: dict[str, Any]) -> None:
        evidence.dump = dump
        evidence.states.append(dump["state"])
        progress.note(f"crash dump {dump['id']}: {dump['state']}")

    def show_console() -> None:
        for line in guest.console.poll():
            progress.console_line(line)

    timeout = sum(DUMP_TIMEOUTS[result.variant].values()) + FOLLOW_MARGIN
    with progress.step("following the crash dump through the API"):
        api.wait_for_dump(server_id, request_id, timeout, on_change=seen, on_poll=show_console)
    evidence.action = api.finished_action(server_id, request_id)
    evidence.server = api.user.find_server(server_id)
    if evidence.dump is not None:
        # The resource as the API last showed it, beside the console and the vmcore.
        (result.artifacts / "crash_dump.json").write_text(json.dumps(evidence.dump, indent=2))
    if evidence.dump is not None and evidence.dump["state"] == "verified":
        with progress.step("downloading the vmcore through the API"):
            evidence.download = download(api, evidence.dump, result.artifacts / "vmcore")
    return evidence


def download(api: ScenarioAPI, dump: dict[str, Any], out: Path) -> Download:
    """The dump's vmcore, downloaded as its owner, read and digested here."""
    try:
        api.user.download_vmcore(dump["server_id"], dump["id"], out)
        vmcore = read_vmcore(out)
    except (ClientError, httpx.HTTPError, VmcoreError, OSError) as exc:
        return Download(error=reason_of(exc))
    message = (dump.get("panic") or {}).get("message")
    vmcore = dataclasses.replace(vmcore, panic_message=panic_message(message or ""))
    return Download(vmcore, sha256_of(out))


def read_evidence(result: ScenarioResult, evidence: ApiEvidence) -> None:
    """Fill the report's fields from what the API said."""
    trigger = evidence.event(CRASH_DUMP_EVENT) or {}
    result.action_result = trigger.get("result")
    result.action_details = trigger.get("details")
    result.nmi_received = evidence.nmi_logged
    result.panicked = evidence.panic_observed
    result.dump_saved = evidence.dump_saved
    if evidence.dump is not None:
        result.dump_id = evidence.dump["id"]
        result.dump_state = evidence.dump["state"]
        result.dump_error = evidence.dump.get("error")
    if evidence.download is not None:
        result.vmcore = evidence.download.vmcore
    result.seconds.nmi = evidence.seconds(CRASH_DUMP_EVENT, "start_time", CRASH_DUMP_EVENT)
    if evidence.succeeded(VERIFY_DUMP_EVENT):
        result.seconds.verify = evidence.seconds(
            COLLECT_DUMP_EVENT, "finish_time", VERIFY_DUMP_EVENT
        )
        result.seconds.trigger_to_verified = evidence.seconds(
            CRASH_DUMP_EVENT, "start_time", VERIFY_DUMP_EVENT
        )
    if evidence.succeeded(OBSERVE_PANIC_EVENT):
        # From the 202 to the event that saw the panic, as from the trigger before.
        seconds = evidence.seconds(CRASH_DUMP_EVENT, "start_time", OBSERVE_PANIC_EVENT)
        result.seconds.trigger_to_panic = None if seconds is None else max(0.0, seconds)
        if evidence.dump_saved:
            result.seconds.panic_to_dump = evidence.seconds(
                OBSERVE_PANIC_EVENT, "finish_time", COLLECT_DUMP_EVENT
            )


def decide(result: ScenarioResult, evidence: ApiEvidence) -> tuple[Verdict, str | None]:
    """The verdict the API's evidence supports, and why when it is ``failed`` or unexpected."""
    trigger = evidence.event(CRASH_DUMP_EVENT) or {}
    if trigger.get("result") != "Success":
        detail = f": {trigger['details']}" if trigger.get("details") else ""
        return Verdict.FAILED, f"action event result {trigger.get('result')}{detail}"
    dump = evidence.dump
    if dump is None:
        return Verdict.FAILED, "the API followed no crash dump after the NMI"
    error = dump.get("error") or "no reason given"
    if dump["state"] == "verified":
        return _check_download(result, evidence, dump)
    if dump["state"] != "failed":
        return Verdict.FAILED, f"the crash dump was still {dump['state']} when the wait ended"
    if evidence.dump_saved:
        return Verdict.FAILED, f"a dump arrived but failed verification: {error}"
    if evidence.panic_observed:
        reason = None
        if result.variant is ImageVariant.KDUMP:
            reason = f"the guest panicked but no dump was collected: {error}"
        return Verdict.PANIC_NO_DUMP, reason
    if evidence.nmi_logged and evidence.guest_running:
        return Verdict.NMI_IGNORED, None
    if evidence.nmi_logged:
        return Verdict.FAILED, "the guest logged the NMI, did not panic, and stopped"
    return Verdict.FAILED, f"no sign that the NMI reached the guest: {error}"


def _check_download(
    result: ScenarioResult, evidence: ApiEvidence, dump: dict[str, Any]
) -> tuple[Verdict, str | None]:
    got = evidence.download
    if got is None or got.vmcore is None:
        why = got.error if got else "it was not downloaded"
        return Verdict.FAILED, f"the API says verified, but its vmcore does not read: {why}"
    vmcore, expected = got.vmcore, (dump.get("vmcore") or {}).get("sha256")
    if got.sha256 != expected:
        return Verdict.FAILED, (
            f"the downloaded vmcore's sha256 is {got.sha256}, the API's is {expected}"
        )
    if vmcore.format != "kdump-compressed":
        return Verdict.FAILED, f"the vmcore is a {vmcore.format} file, not kdump-compressed"
    if vmcore.kernel_release != result.guest_kernel_release:
        return Verdict.FAILED, (
            f"the vmcore's kernel is {vmcore.kernel_release!r}, "
            f"the guest ran {result.guest_kernel_release!r}"
        )
    return Verdict.DUMP_VERIFIED, None


def _time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def _seen(guest: Guest, pattern: str) -> float:
    found = guest.console.find(pattern, 0)
    assert found is not None
    return found[1]


def keep_console(guest: Guest, target: Path) -> None:
    if guest.console_path.exists():
        shutil.copyfile(guest.console_path, target)


def quietly(call: Any, *args: Any) -> None:
    """Best-effort cleanup: a failure here must not hide the run's own result."""
    with suppress(ClientError, OSError):
        call(*args)


def reason_of(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r"\s+", " ", first)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
