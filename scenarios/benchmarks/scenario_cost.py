"""``crashlab scenario kdump --via libvirt`` vs the same guest under bare QEMU.

*crashlab*: the command as a user runs it, in a child process, timed from its
start to its exit: ``crashlab serve`` started, the guest defined in libvirt
and booted, the crash dump triggered over the REST API, the dump followed by
crashlab to a verified vmcore, which the scenario downloads and checks. Its
phases come from its own ``--json`` report, timed by the API's events.

*bare QEMU*: ``qemu-system-x86_64`` run directly with the same kernel,
initramfs, command line, memory, dump disk and accelerator, no libvirt and no
crashlab; the NMI is QMP's ``inject-nmi``; the run ends when the crash
kernel has saved the dump and QEMU has exited. Its phases are read from the
console: the panic's printk time, converted to host time, to the crash
kernel's "dump saved" line.

Rounds alternate the two, so both see the same machine. The ratio of the
medians is what the testbed adds on top of the guest itself.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from app.process import REPO_ROOT
from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.accel import Accel
from emulators.guest import DUMP_DISK_MIB, MEMORY_MIB, Console, detect_accel
from emulators.guest_image import (
    DUMP_FAILED_MARKER,
    DUMP_SAVED_MARKER,
    READY_MARKER,
    GuestImage,
    ImageVariant,
    build_image,
)
from scenarios.benchmarks.base import Benchmark, Context, Plan, target
from scenarios.benchmarks.service import BenchError
from scenarios.benchmarks.stats import median, ratio
from scenarios.kdump import BOOT_TIMEOUT

DUMP_TIMEOUT = 240.0
# The first sign of a panic: its message, or the crash kernel's first line.
PANIC_MOMENT = r"Kernel panic - not syncing|Linux version"
# The kdump guest's panic line, printed or replayed by the crash kernel.
PANIC_TIMESTAMP = r"\[\s*(\d+\.\d+)\] Kernel panic - not syncing"

PHASES = ("boot", "trigger_to_panic", "panic_to_dump", "total")
POLL_SECONDS = 0.02


def run(repeats: int, workdir: Path) -> dict[str, Any]:
    image = build_image(ImageVariant.KDUMP)
    accel = detect_accel(image, DEFAULT_LIBVIRT_URI)
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    for index in range(repeats):
        ours.append(_through_crashlab(workdir / f"crashlab-{index}"))
        theirs.append(BareQemu(image, accel, workdir / f"bare-{index}").run())
    crashlab_s = median([r["total"] for r in ours])
    bare_s = median([r["total"] for r in theirs])
    return {
        "crashlab_s": round(crashlab_s, 2),
        "bare_qemu_s": round(bare_s, 2),
        "ratio": ratio(crashlab_s, bare_s),
        "accel": str(accel),
        "rounds": repeats,
        "phases": {
            "crashlab": _medians(ours),
            "bare_qemu": _medians(theirs),
        },
    }


def _through_crashlab(output: Path) -> dict[str, float]:
    """One ``crashlab scenario kdump --via libvirt``; its wall time and its own phases."""
    command = [
        sys.executable, "-m", "scenarios.cli", "scenario", "kdump", "--via", "libvirt",
        "--json", "--quiet", "--output", str(output),
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    wall = time.monotonic() - started
    try:
        report = json.loads(done.stdout)
    except ValueError:
        raise BenchError(f"crashlab scenario printed no report: {done.stderr[-500:]}") from None
    if not report.get("ok"):
        raise BenchError(f"crashlab scenario failed: {report.get('reason')}")
    seconds = report["seconds"]
    return {
        "boot": seconds["boot"],
        "trigger_to_panic": seconds["trigger_to_panic"],
        "panic_to_dump": seconds["panic_to_dump"],
        "scenario_total": seconds["total"],
        "total": wall,
    }


class BareQemu:
    """One kdump guest under ``qemu-system-x86_64`` alone, crashed over QMP."""

    def __init__(self, image: GuestImage, accel: Accel, workdir: Path) -> None:
        self.image = image
        self.accel = accel
        self.workdir = workdir
        self.console = Console(workdir / "console.log")
        self.qmp_path = workdir / "qmp.sock"
        self.dump_disk = workdir / "dump.img"

    def argv(self) -> list[str]:
        """What libvirt runs for ``emulators.guest.Guest``, less what it adds for itself."""
        cpu = ["-cpu", "host"] if self.accel is Accel.KVM else []
        return [
            "qemu-system-x86_64",
            "-machine", f"pc,accel={self.accel}",
            *cpu,
            "-m", str(MEMORY_MIB),
            "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(self.image.kernel),
            "-initrd", str(self.image.initrd),
            "-append", self.image.cmdline,
            "-drive", f"file={self.dump_disk},format=raw,if=virtio",
            "-serial", f"file:{self.console.path}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip

    def run(self) -> dict[str, float]:
        """Boot, inject the NMI, wait for the dump and QEMU's exit; the phases in seconds."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.dump_disk.open("wb") as disk:
            disk.truncate(DUMP_DISK_MIB * 1024 * 1024)
        log = (self.workdir / "qemu.log").open("wb")
        started = time.monotonic()
        qemu = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            return self._follow(qemu, started)
        finally:
            if qemu.poll() is None:
                qemu.kill()
            qemu.wait()

    def _follow(self, qemu: subprocess.Popen[bytes], started: float) -> dict[str, float]:
        ready_at = self._wait_for(qemu, READY_MARKER, 0, BOOT_TIMEOUT)
        mark = len(self.console.lines)
        with _QMP(self.qmp_path) as qmp:
            triggered_at = time.monotonic()
            qmp.execute("inject-nmi")
        self._wait_for(qemu, f"{DUMP_SAVED_MARKER}|{DUMP_FAILED_MARKER}", mark, DUMP_TIMEOUT)
        saved = self.console.find(DUMP_SAVED_MARKER, mark)
        if saved is None:
            raise BenchError(f"bare QEMU: the crash kernel saved no dump:\n{self.console.tail()}")
        qemu.wait(timeout=60)
        ended = time.monotonic()
        panic_at = self._panic_moment(mark)
        return {
            "boot": ready_at - started,
            # The clock mapping is good to tens of ms; the panic cannot precede the NMI.
            "trigger_to_panic": max(0.0, panic_at - triggered_at),
            "panic_to_dump": saved[1] - panic_at,
            "total": ended - started,
        }

    def _wait_for(
        self, qemu: subprocess.Popen[bytes], pattern: str, start: int, timeout: float
    ) -> float:
        """When a console line matching ``pattern`` was first read (host monotonic clock)."""
        deadline = time.monotonic() + timeout
        while True:
            self.console.poll()
            if found := self.console.find(pattern, start):
                return found[1]
            if qemu.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "qemu.log").read_text(errors="replace")[-500:]
                raise BenchError(
                    f"bare QEMU: no {pattern!r} on the console "
                    f"(exit {qemu.returncode}):\n{self.console.tail()}\n{log}"
                )
            time.sleep(POLL_SECONDS)

    def _panic_moment(self, mark: int) -> float:
        """The panic's printk time, converted to host time by the READY line's uptime.

        The guest's printk clock runs at real time under TCG and KVM alike;
        seeing the panic on the console instead would add the crash kernel's
        decompression, seconds under TCG.
        """
        panic = self.console.find(PANIC_TIMESTAMP, mark)
        ready = self.console.find(READY_MARKER + r".*uptime=(\d+\.\d+)", 0)
        if panic and ready:
            return ready[1] + float(panic[0].group(1)) - float(ready[0].group(1))
        first = self.console.find(PANIC_MOMENT, mark)
        if first is None:
            raise BenchError(f"bare QEMU: no panic on the console:\n{self.console.tail()}")
        return first[1]


class _QMP:
    """The few lines of QMP the bare run needs: negotiate, then execute a command."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX)
        self._file = self._sock.makefile("rwb")

    def __enter__(self) -> _QMP:
        self._sock.connect(str(self.path))
        self._read()  # the greeting
        self.execute("qmp_capabilities")
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        self._sock.close()

    def execute(self, command: str) -> None:
        self._file.write(json.dumps({"execute": command}).encode() + b"\n")
        self._file.flush()
        reply = self._read()
        if "return" not in reply:
            raise BenchError(f"QMP {command} failed: {reply}")

    def _read(self) -> dict[str, Any]:
        """The next reply or greeting; asynchronous events are skipped."""
        while True:
            line = self._file.readline()
            if not line:
                raise BenchError("QMP: QEMU closed the monitor")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message


def _medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(median([r[key] for r in rounds]), 2) for key in rounds[0]}


class ScenarioBenchmark(Benchmark):
    name = "scenario"
    description = "the kdump scenario vs the same guest under bare QEMU"
    shares_service = False

    def step(self, plan: Plan) -> str | None:
        if not plan.scenario_repeats:
            return None
        return f"kdump scenario vs bare QEMU, {plan.scenario_repeats} rounds"

    def run(self, context: Context) -> dict[str, Any]:
        return run(context.plan.scenario_repeats, context.workdir / self.name)

    def render(self, scenario: dict[str, Any]) -> str:
        ours, bare = scenario["phases"]["crashlab"], scenario["phases"]["bare_qemu"]
        lines = [
            f"kdump scenario (--via libvirt, {scenario['accel']}) vs bare QEMU + QMP inject-nmi; "
            f"median of {scenario['rounds']}",
            f"  {'phase':<18}  {'crashlab':>9}  {'bare QEMU':>9}",
        ]
        for phase in PHASES:
            lines.append(f"  {phase:<18}  {ours[phase]:>7.2f} s  {bare[phase]:>7.2f} s")
        lines.append(f"  ratio {scenario['ratio']}")
        return "\n".join(lines)

    def targets(self, scenario: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            target(
                "kdump scenario <= 1.3x bare QEMU",
                scenario["ratio"] <= 1.3,
                f"{scenario['ratio']}x ({scenario['crashlab_s']} s vs {scenario['bare_qemu_s']} s)",
            )
        ]


BENCHMARK = ScenarioBenchmark()
