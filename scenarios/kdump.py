"""The kdump scenario: boot a guest, trigger its crash dump through the API, prove the vmcore.

One run, end to end::

    image  = build_image(variant)                  # cached
    guest  = Guest(image)                          # libvirt, console to a file
    path   = attach(via, guest)                    # nothing, virtualbmc or sushy-tools
    server = api.register(...)                     # admin extension, owned by the user
    api.trigger_crash_dump(server)                 # as the user, over HTTP: 202 + request id
    console: NMI -> panic -> crash kernel -> dump  # followed, timed
    vmcore = extract_vmcore(dump disk)             # makedumpfile -R, header parsed
    verdict                                        # what the evidence shows

The verdict is read from evidence only: the console (``nmi_received``,
``panicked``, ``dump_saved``), the action event read back from
os-instance-actions, and the vmcore's own header. Each variant expects one
verdict; anything else is a failed run.
"""

from __future__ import annotations

import enum
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
from app.process import EmulatorStartError
from app.vmcore import Vmcore, VmcoreError, extract_vmcore
from emulators.guest import Guest, GuestError
from emulators.guest_image import (
    CRASH_KERNEL_MARKER,
    DUMP_FAILED_MARKER,
    DUMP_SAVED_MARKER,
    READY_MARKER,
    ImageBuildError,
    ImageVariant,
    build_image,
)
from scenarios.api import LocalService, ScenarioAPI
from scenarios.progress import Progress
from scenarios.via import Via, attach

REPO_ROOT = Path(__file__).resolve().parent.parent

BOOT_TIMEOUT = 180.0
NMI_TIMEOUT = 60.0
# no-kdump prints its panic within milliseconds of the NMI line; wait this long for it.
SETTLE_SECONDS = 5.0
DUMP_TIMEOUT = 240.0
EVENT_TIMEOUT = 60.0

# Console evidence. The kdump guest's own lines come back as CRASHLAB-PANIC-LOG
# lines, replayed by the crash kernel, so the same patterns match them.
NMI_SEEN = r"NMI received for unknown reason|Dazed and confused|NMI: Not continuing"
PANIC_SEEN = rf"Kernel panic - not syncing|{CRASH_KERNEL_MARKER}"
# The first sign of a panic: its message, or the crash kernel's first line.
PANIC_MOMENT = r"Kernel panic - not syncing|Linux version"
PANIC_TIMESTAMP = r"\[\s*(\d+\.\d+)\] Kernel panic - not syncing"
FIRST_SIGN = rf"{NMI_SEEN}|{PANIC_MOMENT}"
DUMP_OUTCOME = rf"{DUMP_SAVED_MARKER}|{DUMP_FAILED_MARKER}"


class Verdict(enum.StrEnum):
    DUMP_VERIFIED = "dump-verified"
    PANIC_NO_DUMP = "panic-no-dump"
    NMI_IGNORED = "nmi-ignored"
    FAILED = "failed"


EXPECTED_VERDICT = {
    ImageVariant.KDUMP: Verdict.DUMP_VERIFIED,
    ImageVariant.NO_KDUMP: Verdict.PANIC_NO_DUMP,
    ImageVariant.NMI_IGNORED: Verdict.NMI_IGNORED,
}


@dataclass
class Seconds:
    boot: float | None = None
    trigger_to_panic: float | None = None
    panic_to_dump: float | None = None
    total: float | None = None


@dataclass
class ScenarioResult:
    """Everything one run saw; ``as_dict`` is the ``--json`` report."""

    via: Via
    variant: ImageVariant
    server_id: str | None = None
    request_id: str | None = None
    action_result: str | None = None
    action_details: str | None = None
    nmi_received: bool = False
    panicked: bool = False
    dump_saved: bool = False
    vmcore: Vmcore | None = None
    guest_kernel_release: str | None = None
    seconds: Seconds = field(default_factory=Seconds)
    verdict: Verdict = Verdict.FAILED
    reason: str | None = None
    accel: str | None = None
    domain: str | None = None
    api_url: str | None = None
    artifacts: Path | None = None

    @property
    def expected_verdict(self) -> Verdict:
        return EXPECTED_VERDICT[self.variant]

    @property
    def ok(self) -> bool:
        return self.verdict == self.expected_verdict

    def as_dict(self) -> dict[str, Any]:
        return {
            "via": self.via.value,
            "variant": self.variant.value,
            "server_id": self.server_id,
            "request_id": self.request_id,
            "action_result": self.action_result,
            "action_details": self.action_details,
            "nmi_received": self.nmi_received,
            "panicked": self.panicked,
            "dump_saved": self.dump_saved,
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
    api: ScenarioAPI | None = None,
    output: Path | None = None,
    progress: Progress | None = None,
) -> ScenarioResult:
    """Run one scenario; never raises for a failed run, only reports it.

    Without ``api`` a ``crashlab serve`` is started for the run. ``output``
    receives the console log, the vmcore and the emulator's logs.
    """
    result = ScenarioResult(Via(via), ImageVariant(variant))
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
        result.verdict, result.reason = Verdict.FAILED, _reason(exc)
    result.seconds.total = time.monotonic() - started
    return result


def _run(result: ScenarioResult, api: ScenarioAPI, stack: ExitStack, progress: Progress) -> None:
    assert result.artifacts is not None
    with progress.step("logging in to the API"):
        api.login()
    with progress.step(f"building the {result.variant} guest image"):
        image = build_image(result.variant)
    guest = stack.enter_context(Guest(image))
    stack.callback(_keep_console, guest, result.artifacts / "console.log")
    result.domain, result.accel = guest.name, str(guest.accel)
    progress.note(f"guest {guest.name} ({guest.accel}, kernel {image.kernel_release})")
    with progress.step(f"starting the {result.via} path"):
        attachment = stack.enter_context(attach(result.via, guest, result.artifacts))
    with progress.step("booting the guest"):
        ready = guest.wait_ready(BOOT_TIMEOUT, on_line=progress.console_line)
    result.guest_kernel_release = ready.get("kernel")
    result.seconds.boot = _seen(guest, READY_MARKER, 0) - guest.started_at

    result.server_id = api.register(guest.name, attachment.driver, attachment.driver_info)
    stack.callback(_quietly, api.unregister, result.server_id)
    mark = guest.console.mark()
    triggered_at = time.monotonic()
    result.request_id = api.trigger_crash_dump(result.server_id)
    progress.note(f"trigger_crash_dump accepted: {result.request_id}")

    _follow_console(result, guest, mark, ready, progress)
    _read_timings(result, guest, mark, triggered_at, ready)
    result.action_result, result.action_details = api.wait_for_event(
        result.server_id, result.request_id, EVENT_TIMEOUT
    )
    if result.dump_saved:
        with progress.step("extracting the vmcore"):
            guest.wait_stopped(60)
            result.vmcore = extract_vmcore(guest.dump_disk, result.artifacts / "vmcore")
    console = "\n".join(guest.console.lines[mark:])
    result.verdict, result.reason = decide(result, guest.is_active(), console)


def _follow_console(
    result: ScenarioResult, guest: Guest, mark: int, ready: dict[str, str], progress: Progress
) -> None:
    """Wait for what the variant leads to; a missing step is evidence, not an error."""
    on_line = progress.console_line
    try:
        with progress.step("waiting for the NMI"):
            guest.wait_for(FIRST_SIGN, NMI_TIMEOUT, on_line, mark)
        if ready.get("kexec_crash_loaded") == "1":
            with progress.step("waiting for the crash kernel to save the dump"):
                guest.wait_for(DUMP_OUTCOME, DUMP_TIMEOUT, on_line, mark)
        else:
            with progress.step("checking whether the guest panics"):
                _wait_quietly(guest, PANIC_SEEN, SETTLE_SECONDS, mark, on_line)
    except GuestError as exc:
        result.reason = _reason(exc)
    console = guest.console
    result.nmi_received = console.find(NMI_SEEN, mark) is not None
    result.panicked = console.find(PANIC_SEEN, mark) is not None
    result.dump_saved = console.find(DUMP_SAVED_MARKER, mark) is not None


def _wait_quietly(guest: Guest, pattern: str, seconds: float, mark: int, on_line: Any) -> None:
    with suppress(GuestError):
        guest.wait_for(pattern, seconds, on_line, mark)


def _read_timings(
    result: ScenarioResult, guest: Guest, mark: int, triggered_at: float, ready: dict[str, str]
) -> None:
    panic_at = _panic_moment(guest, mark, ready) if result.panicked else None
    if panic_at is None:
        return
    # The guest clock maps to the host's only to some tens of milliseconds, so a panic
    # right after the trigger can map to just before it; it cannot have come earlier.
    result.seconds.trigger_to_panic = max(0.0, panic_at - triggered_at)
    dump = guest.console.find(DUMP_SAVED_MARKER, mark)
    if dump is not None:
        result.seconds.panic_to_dump = dump[1] - panic_at


def _panic_moment(guest: Guest, mark: int, ready: dict[str, str]) -> float | None:
    """When the guest panicked, on the host's monotonic clock.

    The guest's printk clock runs at real time under TCG and KVM alike, and
    the READY line carries the guest's uptime, so the panic line's timestamp
    (printed, or replayed by the crash kernel) converts to host time. Seeing
    the panic on the console instead would add the crash kernel's
    decompression, seconds under TCG. Without an uptime, the first console
    sign is the fallback.
    """
    panic = guest.console.find(PANIC_TIMESTAMP, mark)
    ready_line = guest.console.find(READY_MARKER, 0)
    if panic and ready_line and "uptime" in ready:
        return ready_line[1] + float(panic[0].group(1)) - float(ready["uptime"])
    first = guest.console.find(PANIC_MOMENT, mark)
    return first[1] if first else None


def decide(
    result: ScenarioResult, guest_running: bool, console: str = ""
) -> tuple[Verdict, str | None]:
    """The verdict the evidence supports, and why when it is ``failed`` or unexpected."""
    if result.action_result != "Success":
        detail = f": {result.action_details}" if result.action_details else ""
        return Verdict.FAILED, f"action event result {result.action_result}{detail}"
    if result.dump_saved:
        return _check_vmcore(result)
    if result.panicked:
        return Verdict.PANIC_NO_DUMP, _dump_failure(result, console)
    if result.nmi_received and guest_running:
        return Verdict.NMI_IGNORED, None
    if result.nmi_received:
        return Verdict.FAILED, "the guest logged the NMI, did not panic, and stopped"
    return Verdict.FAILED, result.reason or "no NMI reached the guest's console"


def _check_vmcore(result: ScenarioResult) -> tuple[Verdict, str | None]:
    vmcore = result.vmcore
    if vmcore is None:
        return Verdict.FAILED, "the console says the dump was saved, but there is no vmcore"
    if vmcore.format != "kdump-compressed":
        return Verdict.FAILED, f"the vmcore is a {vmcore.format} file, not kdump-compressed"
    if vmcore.kernel_release != result.guest_kernel_release:
        return Verdict.FAILED, (
            f"the vmcore's kernel is {vmcore.kernel_release!r}, "
            f"the guest ran {result.guest_kernel_release!r}"
        )
    return Verdict.DUMP_VERIFIED, None


def _dump_failure(result: ScenarioResult, console: str) -> str | None:
    if result.variant is not ImageVariant.KDUMP:
        return None
    if failed := re.search(rf"{DUMP_FAILED_MARKER}.*", console):
        return f"the crash kernel could not save the dump ({failed.group(0)})"
    return result.reason or "the guest panicked but the crash kernel saved no dump"


def _seen(guest: Guest, pattern: str, start: int) -> float:
    found = guest.console.find(pattern, start)
    assert found is not None
    return found[1]


def _keep_console(guest: Guest, target: Path) -> None:
    if guest.console_path.exists():
        shutil.copyfile(guest.console_path, target)


def _quietly(call: Any, *args: Any) -> None:
    """Best-effort cleanup: a failure here must not hide the run's own result."""
    with suppress(ClientError, OSError):
        call(*args)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r"\s+", " ", first)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
