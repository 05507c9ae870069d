"""virtualbmc in front of booted guests: IPMI rounds whose NMIs land in real kernels.

A fleet of 200 domains does not fit on a small machine, so this one is small
guests of the ``nmi-ignored`` variant: their kernel logs each NMI on the serial
console (``NMI_LOGGED``) and carries on, so the same guests take round after
round and every NMI is counted where it landed. Each guest has its own
virtualbmc BMC (``emulators/vbmc.py``), as each server in a rack has its own::

    with GuestBMCs(workdir, count=24) as fleet:
        fleet.names                  # the guests' domain names
        fleet.driver_info(name)      # crashlab's ``ipmi`` settings for that guest's BMC
        fleet.nmis.read()            # Counter of NMIs per guest since the last read

The guests boot at once, not one by one. Leaving the block stops every BMC and
removes every domain, also when a boot failed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.guest import Guest, detect_accel
from emulators.guest_image import NMI_LOGGED, ImageVariant, build_image
from emulators.vbmc import VirtualBMCs
from scenarios.benchmarks import fleet
from scenarios.benchmarks.base import Context, Plan
from scenarios.benchmarks.service import BenchService

GUESTS = 24
# The nmi-ignored variant reserves no crash kernel; 256 MiB boots it with room to spare.
GUEST_MEMORY_MIB = 256
BOOT_TIMEOUT = 300.0
# Under TCG on a busy host, the kernel's early check that timer interrupts arrive can
# time out against its own delay loop and panic ("IO-APIC + timer doesn't work");
# with 24 guests booting at once on 2 vCPUs it did. The check proves nothing here.
EXTRA_CMDLINE = "no_timer_check"


class ConsoleNMIs:
    """The NMIs the guests logged on their consoles; each ``read()`` returns only what is new.

    It keeps its own place in each console, so others may read the same consoles.
    """

    def __init__(self, guests: list[Guest]) -> None:
        self.guests = guests
        self._seen: dict[str, int] = {}

    def read(self) -> Counter[str]:
        found: Counter[str] = Counter()
        for guest in self.guests:
            guest.console.poll()
            lines = guest.console.lines
            start, self._seen[guest.name] = self._seen.get(guest.name, 0), len(lines)
            if count := sum(NMI_LOGGED in line for line in lines[start:]):
                found[guest.name] = count
        return found


class GuestBMCs:
    """``count`` booted ``nmi-ignored`` guests, each behind its own virtualbmc; removed on exit."""

    def __init__(
        self,
        workdir: Path,
        count: int = GUESTS,
        *,
        uri: str = DEFAULT_LIBVIRT_URI,
        memory_mib: int = GUEST_MEMORY_MIB,
        boot_timeout: float = BOOT_TIMEOUT,
    ) -> None:
        self.workdir = workdir
        self.count = count
        self.uri = uri
        self.memory_mib = memory_mib
        self.boot_timeout = boot_timeout
        self.guests: list[Guest] = []
        self.nmis = ConsoleNMIs(self.guests)
        self.boot_s = 0.0
        self._bmcs = VirtualBMCs(workdir, libvirt_uri=uri)
        self._stack = ExitStack()

    @property
    def names(self) -> list[str]:
        return [guest.name for guest in self.guests]

    def driver_info(self, name: str) -> dict[str, Any]:
        """crashlab's ``ipmi`` driver settings for the BMC of guest ``name``."""
        return self._bmcs.endpoint(name).driver_info()

    # Domains created at once; their boots still overlap.
    STARTS_AT_ONCE = 2

    def __enter__(self) -> GuestBMCs:
        self._starting = threading.BoundedSemaphore(self.STARTS_AT_ONCE)
        with ExitStack() as stack:
            image = build_image(ImageVariant.NMI_IGNORED, extra_cmdline=EXTRA_CMDLINE)
            accel = detect_accel(image, self.uri)  # once here, not once per guest thread
            stack.enter_context(self._bmcs)
            self.guests[:] = [
                Guest(image, uri=self.uri, accel=accel, memory_mib=self.memory_mib)
                for _ in range(self.count)
            ]
            for guest in self.guests:
                stack.push(guest)  # its exit removes the domain, whether or not it started
            started = time.monotonic()
            with ThreadPoolExecutor(self.count) as pool:
                list(pool.map(self._boot, self.guests))
            self.boot_s = time.monotonic() - started
            self.nmis.read()  # the NMIs before now are not the rounds'
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def _boot(self, guest: Guest) -> None:
        # libvirt starts the domains one QEMU at a time: 24 creates at once made the
        # last wait for all the others, past the bound a single create is allowed.
        with self._starting:
            guest.start()
        guest.wait_ready(timeout=self.boot_timeout)
        self._bmcs.add(guest.name)


def run(service: BenchService, count: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """``rounds`` rounds of ``count`` guests' BMCs at once through ``service``."""
    with GuestBMCs(workdir, count) as guests:
        peer = fleet.Peer("ipmi", guests.names, guests.nmis, guests.driver_info)
        result = fleet.rounds(service, peer, rounds, "vbmc-guest")
        return {"long_running": result | {"boot_s": round(guests.boot_s, 1)}}


class VBMCRoundsBenchmark(fleet.RoundsBenchmark):
    name = "vbmc_rounds"
    description = "rounds of booted guests behind virtualbmc, NMIs counted on their consoles"
    title = "virtualbmc rounds (NMIs on consoles)"
    label = "virtualbmc rounds"

    def step(self, plan: Plan) -> str | None:
        if not plan.vbmc_rounds:
            return None
        return f"virtualbmc rounds, {plan.vbmc_rounds} x {GUESTS} booted guests"

    def run(self, context: Context) -> dict[str, Any]:
        return run(context.shared, GUESTS, context.plan.vbmc_rounds, context.workdir / self.name)


BENCHMARK = VBMCRoundsBenchmark()
