"""Host-side memory capture: the hypervisor dumps a guest's memory, no kdump needed.

For servers whose driver declares ``memory_dump`` (libvirt), the extension's
``capture_memory_dump`` has the hypervisor write the guest's memory as a
kdump-compressed (zlib) file, memory only: libvirt's ``coreDumpWithFormat``,
what ``virsh dump --memory-only --format kdump-zlib`` does by hand. A guest
with no kdump, or one stalled too hard to panic, yields a dump all the same.

A capture is an instance action of its own, ``crashlab_capture_memory_dump``,
with two events: the capture, then ``crashlab_verify_dump``. Its crash dump
(target ``host-memory``) goes::

    capturing -> verifying -> verified
         \\            \\----> collected   (terminal: no VMCOREINFO, or no kernel to match)
          \\____________\\---> failed

``verified`` means a kdump-compressed vmcore whose VMCOREINFO ``OSRELEASE``
is the expected kernel's. A live capture has no CRASHTIME, so ``crash_time``
is null and no NMI is involved. ``then`` says what happens to the guest:

- ``resume`` (the default): it keeps running, or stays paused if it was;
- ``nmi``: after the capture, an ordinary trigger_crash_dump, an action of its
  own that is followed like any other;
- ``destroy``: libvirt stops it once its memory is written.

The file is written beside the other vmcores (the crash dump directory), as
``vmcore.partial`` until it is whole; a failed capture leaves no file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app import exceptions as exc
from app.backends import Backends
from app.events import VERIFY_DUMP_EVENT
from app.readiness import expected_kernel
from app.store import CrashDump, Server, Store
from app.vmcore import (
    VmcoreError,
    extract_vmcore,
    has_flattened_dump,
    read_dmesg,
    read_vmcore,
    sha256_of,
)
from drivers.base import DriverError

LOG = logging.getLogger(__name__)

THEN = ("resume", "nmi", "destroy")
PARTIAL = "vmcore.partial"
ORPHANED_DETAILS = "service restarted before the capture finished"
# Captures have a bulkhead of their own beside their backend's (app/backends.py).
CAPTURE_LANE = "capture"


@dataclass(frozen=True)
class PendingCapture:
    """An accepted capture whose hypervisor call is still to run."""

    server: Server
    dump: CrashDump
    event_id: int
    then: str
    # Accepts the trigger_crash_dump of ``then: nmi`` (a PendingCrashDump), or raises APIError.
    accept_nmi: Callable[[], Any] | None = None


def check_free_space(directory: Path, needed: int) -> None:
    """Refuse a capture that cannot fit: the dump can be as large as the guest's memory."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise exc.Conflict(
            f"Not enough free space for a memory dump: {free // 2**20} MiB free in the "
            f"crash dump directory, and the server has {needed // 2**20} MiB of memory. "
            "Nothing was captured."
        )


class CaptureRunner:
    """Runs each accepted capture after its 202 and records its events."""

    def __init__(
        self,
        store: Store,
        backends: Backends,
        directory: Path,
        *,
        host: str,
        timeout: float,
        dispatch_nmi: Callable[[Any], Coroutine[Any, Any, None]],
    ) -> None:
        self.store = store
        self.backends = backends
        self.directory = directory
        self.host = host
        self.timeout = timeout
        self.dispatch_nmi = dispatch_nmi
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, pending: PendingCapture) -> None:
        dump_dir = self.directory / pending.dump.id
        partial = dump_dir / PARTIAL
        started = time.monotonic()
        details = await self._capture(pending, partial)
        if details is not None:
            _remove(partial)
            await self._end(pending, "Error", details, state="failed")
            return
        summary = (
            f"{partial.stat().st_size} bytes written in {time.monotonic() - started:.1f} s; "
            + ("the guest was destroyed" if pending.then == "destroy" else "the guest went on")
        )
        if pending.then == "nmi":
            summary += f"; {await self._then_nmi(pending)}"
        await asyncio.to_thread(
            self.store.finish_event, pending.event_id, result="Success", details=summary
        )
        await asyncio.to_thread(self.store.set_dump_state, pending.dump.id, "verifying")
        await self._verify(pending, partial)

    async def _then_nmi(self, pending: PendingCapture) -> str:
        """The ordinary trigger_crash_dump that follows the capture, as an action of its own."""
        assert pending.accept_nmi is not None
        try:
            nmi = await asyncio.to_thread(pending.accept_nmi)
        except exc.APIError as error:
            return f"then nmi: refused: {error.message}"
        task = asyncio.create_task(self.dispatch_nmi(nmi))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return f"then nmi: trigger_crash_dump {nmi.action.request_id} accepted"

    async def _capture(self, pending: PendingCapture, partial: Path) -> str | None:
        """The hypervisor's call, bounded; None on success, else the event's details."""
        driver = self.backends.driver_for(pending.server)
        partial.parent.mkdir(parents=True, exist_ok=True)
        destroy = pending.then == "destroy"
        try:
            future = self.backends.bulkhead(driver, lane=CAPTURE_LANE).submit(
                lambda: driver.capture_memory_dump(partial, destroy=destroy)
            )
            await asyncio.wait_for(asyncio.wrap_future(future), timeout=self.timeout)
        except TimeoutError:
            await asyncio.to_thread(driver.abort_memory_dump)
            return f"the capture did not finish within {self.timeout:g} s; it was aborted"
        except DriverError as error:
            return error.message
        except OSError as error:
            return f"the dump could not be written: {error.strerror}"
        except Exception as error:
            LOG.exception("capture of %s failed", pending.server.uuid)
            return type(error).__name__
        if not partial.is_file():
            return "the hypervisor reported success but wrote no file"
        return None

    async def _verify(self, pending: PendingCapture, written: Path) -> None:
        assert pending.dump.action_id is not None, "a capture is an action's"
        event_id = await asyncio.to_thread(
            self.store.start_event,
            pending.dump.action_id,
            VERIFY_DUMP_EVENT,
            host=self.host,
            owner=pending.dump.owner or "",
        )
        try:
            state, facts, reason, dmesg = await asyncio.to_thread(
                self._judge, pending.server, written
            )
        except Exception as error:
            LOG.exception("verifying capture %s failed", pending.dump.id)
            state, facts, reason, dmesg = "failed", None, f"verification failed: {error}", ""
        if facts is None:
            _remove(written)  # not a vmcore: nothing worth keeping
        else:
            await asyncio.to_thread(
                self.store.record_vmcore,
                pending.dump.id,
                state="verifying",
                vmcore=facts,
                panic=None,
                stored_bytes=facts["bytes"] + len(dmesg),
            )
        ok = state == "verified"
        details = (
            f"a {facts['format']} vmcore of {facts['kernel_release']}, captured live"
            if ok and facts is not None
            else reason
        )
        await asyncio.to_thread(
            self.store.finish_event,
            event_id,
            result="Success" if ok else "Error",
            details=details,
        )
        # The state after the event: a client that sees a terminal state sees every event ended.
        await asyncio.to_thread(
            self.store.set_dump_state, pending.dump.id, state, error=None if ok else reason
        )

    def _judge(
        self, server: Server, written: Path
    ) -> tuple[str, dict[str, Any] | None, str | None, str]:
        """(state, vmcore facts, reason it is not verified, dmesg).

        QEMU before 8.2 writes kdump-zlib only flattened (makedumpfile's stream
        format); it is restored as the followed dumps are.
        """
        vmcore_path = written.parent / "vmcore"
        try:
            if has_flattened_dump(written):
                extract_vmcore(written, vmcore_path, timeout=self.timeout)
                written.unlink()
            else:
                written.rename(vmcore_path)
            vmcore = read_vmcore(vmcore_path)
        except VmcoreError as error:
            return "failed", None, f"the capture is not a vmcore: {error.message}", ""
        release = vmcore.vmcoreinfo.get("OSRELEASE")
        facts = {
            "format": vmcore.format,
            "bytes": vmcore.bytes,
            "sha256": sha256_of(vmcore.path),
            "kernel_release": release or vmcore.kernel_release or None,
            "build_id": vmcore.build_id,
            "crash_time": None,
        }
        dmesg = read_dmesg(vmcore.path, timeout=self.timeout) if release else ""
        (vmcore_path.parent / "dmesg").write_text(dmesg)
        if vmcore.format != "kdump-compressed":
            return "failed", facts, f"the capture is {vmcore.format}, not kdump-compressed", dmesg
        if release is None:
            return (
                "collected",
                facts,
                "the dump carries no VMCOREINFO, so its kernel cannot be checked: the domain "
                "needs <vmcoreinfo state='on'/> and the guest the qemu_fw_cfg module",
                dmesg,
            )
        expected = expected_kernel(server)
        if expected is None:
            return (
                "collected",
                facts,
                f"the dump holds {release}, but no expected kernel is known: register "
                "expected_kernel_release, or let a readiness check read the guest's",
                dmesg,
            )
        if release != expected:
            return "failed", facts, f"the vmcore's kernel is {release}, expected {expected}", dmesg
        return "verified", facts, None, dmesg

    async def _end(self, pending: PendingCapture, result: str, details: str, state: str) -> None:
        LOG.info("capture %s of %s: %s (%s)", pending.dump.id, pending.server.uuid, result, details)
        await asyncio.to_thread(
            self.store.finish_event, pending.event_id, result=result, details=details
        )
        await asyncio.to_thread(self.store.set_dump_state, pending.dump.id, state, error=details)


def _remove(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    for name in ("vmcore", "dmesg"):
        (partial.parent / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        partial.parent.rmdir()


def new_dump_id() -> str:
    return str(uuid.uuid4())
