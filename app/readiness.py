"""Crash readiness: would an NMI to this server leave a dump behind?

An NMI to a guest that is not armed does the damage (a panic, or a log line)
and yields nothing, so crashlab can check before it sends. The verdict is:

- ``armed``: the NMI panics the guest (``unknown_nmi_panic=1``), a crash
  kernel is loaded with memory reserved for it, and the server's dump target,
  if it has one, is reachable from crashlab;
- ``not-armed``: one of those is known to be missing; ``reasons`` names it;
- ``unknown``: crashlab cannot see inside the server. A libvirt guest without
  the QEMU guest agent is unknown ("no guest agent"); so is every IPMI and
  Redfish server, since a BMC does not show its host's kernel settings.

Facts are read through the guest agent (``guest-file-open``/``read``, the
channel OpenStack enables with ``hw_qemu_guest_agent``), each with where it
was read. The check also says whether a host-side memory capture
(app/capture.py) would be verifiable: the guest kernel publishes VMCOREINFO
to QEMU only when the domain has ``<vmcoreinfo state='on'/>`` and the guest
has loaded ``qemu_fw_cfg``.

API reads never reach a backend: the background ``ReadinessSync`` refreshes
the stored verdict; a refresh asked for, or a guarded trigger, runs one
bounded check of one server in its backend's bulkhead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import Any

from app.backends import Backends
from app.collector import Collector
from app.dump_targets import DiskTarget, SshTarget, domain_files, parse_target
from app.store import Server, Store, utcnow
from drivers import driver_class
from drivers.base import Driver, DriverError, GuestAgentUnavailable

LOG = logging.getLogger(__name__)

ARMED = "armed"
NOT_ARMED = "not-armed"
UNKNOWN = "unknown"

# Where a guest's kdump set-up publishes the command line it gave ``kexec -p``:
# the kernel keeps no copy of a loaded crash kernel's command line.
CRASH_KERNEL_CMDLINE_FILE = "/etc/crashlab/crash-kernel-cmdline"
# Present when QEMU offers the vmcoreinfo entry and the guest's qemu_fw_cfg sees it.
VMCOREINFO_ENTRY = "/sys/firmware/qemu_fw_cfg/by_name/etc/vmcoreinfo/name"

# Each fact read from a file in the guest, and how its text reads as a value.
GUEST_FILES: dict[str, str] = {
    "unknown_nmi_panic": "/proc/sys/kernel/unknown_nmi_panic",
    "panic_on_io_nmi": "/proc/sys/kernel/panic_on_io_nmi",
    "kexec_crash_loaded": "/sys/kernel/kexec_crash_loaded",
    "crash_kernel_reserved_bytes": "/sys/kernel/kexec_crash_size",
    "crash_kernel_cmdline": CRASH_KERNEL_CMDLINE_FILE,
    "kernel_release": "/proc/sys/kernel/osrelease",
}
_INTEGER_FACTS = {
    "unknown_nmi_panic",
    "panic_on_io_nmi",
    "kexec_crash_loaded",
    "crash_kernel_reserved_bytes",
}
AGENT_SOURCE = "guest agent"


@dataclass(frozen=True)
class Readiness:
    verdict: str
    checked_at: str
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def kernel_release(self) -> str | None:
        value = self.facts.get("kernel_release", {}).get("value")
        return value if isinstance(value, str) else None

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> Readiness:
        return cls(**stored)


def never_checked() -> Readiness:
    return Readiness(UNKNOWN, "", reasons=["not checked yet"])


def _fact(value: Any, source: str) -> dict[str, Any]:
    return {"value": value, "source": source}


def check_readiness(
    server: Server, backends: Backends, collector: Collector | None = None
) -> Readiness:
    """Read the facts and judge them; blocking, so run it in a bulkhead."""
    facts: dict[str, dict[str, Any]] = {}
    reasons: list[str] = []
    driver = backends.driver_for(server)
    facts["dump_target_reachable"] = _dump_target_reachable(server, backends, collector)
    if "guest_agent" not in driver.capabilities:
        reasons.append(
            f"the {server.driver} driver cannot see inside the server: a BMC does not show "
            "its host's kernel settings, and crashlab does not guess them"
        )
        return _judged(facts, reasons, UNKNOWN)
    try:
        read = driver.read_guest_files([*GUEST_FILES.values(), VMCOREINFO_ENTRY])
    except GuestAgentUnavailable as error:
        return _judged(facts, [error.message], UNKNOWN)
    for name, path in GUEST_FILES.items():
        facts[name] = _fact(_value(name, read.get(path)), f"{AGENT_SOURCE}: {path}")
    facts["capture_verifiable"] = _capture_verifiable(driver, read.get(VMCOREINFO_ENTRY))
    return _judge(facts)


def _value(name: str, raw: bytes | None) -> Any:
    if raw is None:
        return None
    text = raw.decode(errors="replace").strip()
    if name in _INTEGER_FACTS:
        try:
            return int(text)
        except ValueError:
            return None
    return text


def _judge(facts: dict[str, dict[str, Any]]) -> Readiness:
    """Not armed if any fact is known to be wrong; unknown if one could not be read."""
    missing, unread = [], []
    checks = [
        (
            "unknown_nmi_panic",
            1,
            "unknown_nmi_panic=0: the kernel logs the NMI and carries on "
            "(panic_on_io_nmi covers only I/O check NMIs)",
        ),
        ("kexec_crash_loaded", 1, "kexec_crash_loaded=0: no crash kernel is loaded"),
    ]
    for name, wanted, problem in checks:
        value = facts[name]["value"]
        if value is None:
            unread.append(f"{name} could not be read ({facts[name]['source']})")
        elif value != wanted:
            missing.append(problem)
    reserved = facts["crash_kernel_reserved_bytes"]["value"]
    if reserved == 0:
        missing.append("no memory is reserved for a crash kernel (crashkernel= is not set)")
    reachable = facts["dump_target_reachable"]
    if reachable["value"] is False:
        missing.append(f"the dump target is not reachable: {reachable['source']}")
    if missing:
        return _judged(facts, missing, NOT_ARMED)
    if unread:
        return _judged(facts, unread, UNKNOWN)
    return _judged(facts, [], ARMED)


def _judged(facts: dict[str, dict[str, Any]], reasons: list[str], verdict: str) -> Readiness:
    return Readiness(verdict, utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"), facts, reasons)


def _capture_verifiable(driver: Driver, vmcoreinfo_entry: bytes | None) -> dict[str, Any]:
    """Whether a memory capture would carry VMCOREINFO, so its kernel can be checked."""
    feature = _has_vmcoreinfo_feature(driver)
    published = vmcoreinfo_entry is not None
    return _fact(
        feature and published,
        "libvirt domain XML <vmcoreinfo state='on'/>: "
        f"{'yes' if feature else 'no'}; {AGENT_SOURCE}: {VMCOREINFO_ENTRY}: "
        f"{'present' if published else 'absent'}",
    )


def _has_vmcoreinfo_feature(driver: Driver) -> bool:
    read_xml = getattr(driver, "domain_xml", None)
    if read_xml is None:
        return False
    try:
        root = ET.fromstring(read_xml())
    except (DriverError, ET.ParseError):
        return False
    feature = root.find("./features/vmcoreinfo")
    return feature is not None and feature.get("state", "on") == "on"


def _dump_target_reachable(
    server: Server, backends: Backends, collector: Collector | None
) -> dict[str, Any]:
    """For a disk target: does its domain have the disk, and can crashlab read it?
    For an ssh target: does the collector answer?"""
    target = parse_target(server.dump_target)
    if isinstance(target, SshTarget):
        if collector is None:
            return _fact(False, "crashlab's dump collector is not enabled")
        where = f"the collector at {collector.config.address}:{collector.config.port}"
        return _fact(collector.answers(), f"{where} (sshd's identification)")
    if not isinstance(target, DiskTarget):
        return _fact(None, f"the server's dump target is {target.type}")
    where = f"disk {target.device} of domain {target.domain or 'of the server'}"
    try:
        driver = backends.evidence_driver(server, target.domain, target.uri)
        if driver is None:
            return _fact(False, f"{where}: no libvirt domain to read")
        files = domain_files(driver.domain_xml())  # type: ignore[attr-defined]
    except DriverError as error:
        return _fact(False, f"{where}: {error.message}")
    disk = files.disks.get(target.device)
    if disk is None:
        return _fact(False, f"{where}: the domain has no such disk")
    if not os.access(disk, os.R_OK):
        return _fact(False, f"{where}: {disk} cannot be read on this host")
    return _fact(True, f"{where}: {disk}")


class ReadinessChecker:
    """Runs checks in each server's bulkhead, bounded, and stores what they found."""

    def __init__(
        self, store: Store, backends: Backends, timeout: float, collector: Collector | None = None
    ) -> None:
        self.store = store
        self.backends = backends
        self.timeout = timeout
        self.collector = collector

    def submit(self, server: Server) -> concurrent.futures.Future[Readiness]:
        driver = self.backends.driver_for(server)
        return self.backends.bulkhead(driver).submit(
            lambda: check_readiness(server, self.backends, self.collector)
        )

    def check_now(self, server: Server) -> Readiness:
        """One bounded check of one server, stored; for a refresh or a guarded trigger."""
        try:
            readiness = self.submit(server).result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            readiness = self._no_answer()
        except DriverError as error:
            readiness = _judged({}, [f"the check could not run: {error.message}"], UNKNOWN)
        self.store.record_readiness(server.uuid, readiness.as_dict(), readiness.kernel_release)
        return readiness

    def _no_answer(self) -> Readiness:
        return _judged({}, [f"the check did not answer within {self.timeout:g} s"], UNKNOWN)

    async def check_due(self, interval: float) -> int:
        """One background pass over the servers due a check; returns how many were checked."""
        due = await asyncio.to_thread(self.store.claim_readiness_checks, interval)
        checks: dict[asyncio.Future[Readiness], Server] = {}
        for server in due:
            if "guest_agent" not in driver_class(server.driver).capabilities:
                if server.readiness is None:
                    # Nothing to read; the verdict is known without a call.
                    readiness = await asyncio.to_thread(check_readiness, server, self.backends)
                    await asyncio.to_thread(
                        self.store.record_readiness, server.uuid, readiness.as_dict(), None
                    )
                continue
            try:
                checks[asyncio.wrap_future(self.submit(server))] = server
            except DriverError as error:
                LOG.debug("readiness of %s not checked: %s", server.uuid, error)
        if not checks:
            return 0
        done, pending = await asyncio.wait(checks, timeout=self.timeout)
        for future in pending:
            future.cancel()
        results = {checks[f].uuid: self._no_answer() for f in pending}
        for future in done:
            failure = future.exception()
            results[checks[future].uuid] = (
                future.result()
                if failure is None
                else _judged({}, [f"the check could not run: {failure}"], UNKNOWN)
            )
        for server_uuid, readiness in results.items():
            await asyncio.to_thread(
                self.store.record_readiness,
                server_uuid,
                readiness.as_dict(),
                readiness.kernel_release,
            )
        return len(results)

    async def run_forever(self, interval: float, tick: float) -> None:
        while True:
            await asyncio.sleep(min(tick, interval))
            try:
                await self.check_due(interval)
            except Exception:
                LOG.exception("crash readiness pass failed")


def stored_readiness(server: Server) -> Readiness:
    return never_checked() if server.readiness is None else Readiness.from_dict(server.readiness)


def expected_kernel(server: Server) -> str | None:
    """The kernel a dump of this server should hold: as registered, else as last read."""
    return server.expected_kernel_release or server.observed_kernel_release
