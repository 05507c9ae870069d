"""Following a crash dump after its NMI: panic, collection, verification.

After ``compute_trigger_crash_dump`` succeeds, the same instance action gets
up to three more events, in this order:

- ``crashlab_observe_panic``: the console shows the panic (or the crash
  kernel booting) after the NMI. Only where the server has a console.
- ``crashlab_collect_dump``: a complete vmcore arrived at the dump target.
- ``crashlab_verify_dump``: the vmcore is a valid kdump of the expected
  kernel, and it came from this NMI (its CRASHTIME is after the NMI).

Each phase has its own timeout, per server (app/dump_targets.py). A missing
piece of evidence does not stop the next phase: many kernels print nothing
when an NMI panics them (printk from NMI context is deferred, and kexec runs
first), and a vmcore whose own log holds the panic proves it anyway. The
dump's state follows the strongest evidence::

    waiting -> panicked -> collecting -> collected -> verified
       \\___________\\____________\\____________\\______-> failed

A dump is followed by one process at a time, its ``owner``. After a restart,
or when a process dies, a live process claims the dumps it left and resumes
each from its current phase, with the same deadlines: the phases read only
the marks recorded before the NMI, never anything the dead process held.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import shutil
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.backends import Backends
from app.config import CrashDumpsConfig
from app.dump_targets import (
    DiskTarget,
    DomainFiles,
    Evidence,
    SshTarget,
    domain_files,
    fingerprint,
    mark_evidence,
    parse_target,
    parse_timeouts,
    read_console,
)
from app.events import COLLECT_DUMP_EVENT, OBSERVE_PANIC_EVENT, VERIFY_DUMP_EVENT
from app.store import ActionEvent, CrashDump, Server, Store, utcnow
from app.uploads import CLAIMED_STREAM, Upload, claim, scan
from app.vmcore import (
    VmcoreError,
    extract_vmcore,
    read_dmesg,
    scan_flattened,
    sha256_of,
)

LOG = logging.getLogger(__name__)

POLL_SECONDS = 0.5
LOG_TAIL_LINES = 20

PANIC_LINE = re.compile(r"Kernel panic - not syncing: ?(.*)")
# A kernel that boots after the NMI is the crash kernel (kexec runs before printk flushes).
NEW_KERNEL = re.compile(r"Linux version (\S+)")
NMI_IGNORED = re.compile(r"Dazed and confused.*|NMI received for unknown reason.*")
NMI_PANIC = re.compile(r"\bNMI\b")

NO_TARGET = "no dump target configured"
NOTHING_AT_ALL = "no panic seen and no dump arrived"
UNATTRIBUTED = "no crash dump of this server was pending when this dump arrived"


@dataclass(frozen=True)
class Outcome:
    """How a phase ended: its event's result and details."""

    ok: bool
    details: str

    @property
    def result(self) -> str:
        return "Success" if self.ok else "Error"


class CrashDumpFollower:
    """Marks the evidence before each NMI, then follows the dump it causes."""

    def __init__(
        self,
        store: Store,
        backends: Backends,
        config: CrashDumpsConfig,
        directory: Path,
        *,
        owner: str,
        host: str,
        mark_timeout: float,
        uploads: Path | None = None,
    ) -> None:
        self.store = store
        self.backends = backends
        self.config = config
        self.directory = directory
        self.owner = owner
        self.host = host
        self.mark_timeout = mark_timeout
        # The collector's upload directories (app/collector.py); None without a collector.
        self.uploads = uploads
        self._tasks: set[asyncio.Task[None]] = set()

    # Before the NMI

    @staticmethod
    def target_type(server: Server) -> str:
        return parse_target(server.dump_target).type

    async def mark(self, server: Server) -> Evidence:
        """Where to look, and what was there, just before the NMI; bounded."""
        target = parse_target(server.dump_target)
        if isinstance(target, SshTarget):
            if self.uploads is None:
                return Evidence(problem="crashlab's dump collector is not running")
            return Evidence(upload_dir=str(self.uploads / server.uuid))
        device = target.device if isinstance(target, DiskTarget) else None
        domain = target.domain if isinstance(target, DiskTarget) else None
        uri = target.uri if isinstance(target, DiskTarget) else None
        try:
            driver = self.backends.evidence_driver(server, domain, uri)
            if driver is None:
                return Evidence(problem="the server has no console crashlab can read")
            xml_read = self.backends.bulkhead(driver).submit(driver.domain_xml)  # type: ignore[attr-defined]
            xml = await asyncio.wait_for(asyncio.wrap_future(xml_read), self.mark_timeout)
            files: DomainFiles = domain_files(xml)
            return await asyncio.to_thread(mark_evidence, files, device)
        except TimeoutError:
            return Evidence(problem=f"libvirt did not answer within {self.mark_timeout:g} s")
        except Exception as error:
            LOG.info("evidence of %s not marked: %s", server.uuid, error)
            return Evidence(problem=f"the domain could not be read: {error}")

    # After the NMI

    def start(self, dump: CrashDump) -> None:
        task = asyncio.create_task(self.follow(dump))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resume_orphans(self, live_owners: set[str]) -> int:
        """Claim and resume the dumps whose follower is gone."""
        claimed = await asyncio.to_thread(self.store.claim_orphaned_dumps, live_owners, self.owner)
        for dump in claimed:
            LOG.warning("resuming crash dump %s of %s (%s)", dump.id, dump.server_id, dump.state)
            self.start(dump)
        return len(claimed)

    async def keep_resuming(self, live_owners: Callable[[], set[str]], interval: float) -> None:
        """Claim the dumps of processes that died while following them, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.resume_orphans(await asyncio.to_thread(live_owners))
            except Exception:
                LOG.exception("resuming orphaned crash dumps failed")

    async def keep_collecting_unattributed(self, interval: float) -> None:
        """Keep the dumps that arrive with no NMI pending, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.collect_unattributed)
            except Exception:
                LOG.exception("collecting unattributed dumps failed")

    def collect_unattributed(self) -> int:
        """Dumps at the collector of servers with no dump pending, each kept as its own record.

        Such a dump is tied to no request (``request_id`` null), so only admins see it.
        """
        if self.uploads is None:
            return 0
        kept = 0
        for server in self.store.list_servers():
            if not isinstance(parse_target(server.dump_target), SshTarget):
                continue
            arrived = scan(self.uploads / server.uuid).complete
            if arrived and not self.store.has_pending_dump(server.uuid):
                kept += sum(self._keep_unattributed(server, upload) for upload in arrived)
        return kept

    def _keep_unattributed(self, server: Server, upload: Upload) -> int:
        assert self.uploads is not None
        dump_id = str(uuidlib.uuid4())
        where = upload.relative_to(self.uploads / server.uuid)
        error = f"{UNATTRIBUTED}: {where}"
        # The record first: retention removes any dump directory without one.
        self.store.add_unattributed_dump(
            dump_id,
            server.uuid,
            state="collecting",
            evidence=Evidence(upload_dir=str(self.uploads / server.uuid)).as_dict(),
            error=error,
        )
        stream = claim(upload, self.dump_dir(dump_id), dump_id)
        if stream is None:  # the follower of a new NMI took it first
            self.store.forget_crash_dump(dump_id)
            return 0
        timeout = parse_timeouts(server.dump_timeouts).verify
        try:
            restored = restore(stream, self.dump_dir(dump_id), timeout)
        except VmcoreError as failure:
            error = f"{error}; the dump could not be restored: {failure.message}"
            self.store.set_dump_state(dump_id, "failed", error=error)
        else:
            self.store.record_vmcore(
                dump_id,
                state="collected",
                vmcore=restored.facts,
                panic=restored.panic,
                stored_bytes=restored.stored_bytes + stream.stat().st_size,
                error=error,
            )
        LOG.warning(
            "crash dump %s of %s arrived with no NMI pending: %s", dump_id, server.uuid, where
        )
        return 1

    async def follow(self, dump: CrashDump) -> None:
        try:
            await self._follow(dump)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            LOG.exception("following crash dump %s failed", dump.id)
            await asyncio.to_thread(
                self.store.set_dump_state, dump.id, "failed", error=f"crashlab failed: {error}"
            )

    async def _follow(self, dump: CrashDump) -> None:
        server = await asyncio.to_thread(self.store.get_server, dump.server_id)
        if server is None:
            return
        run = _Run(self, dump, server)
        await run.events_so_far()
        panicked = await run.observe_panic()
        collected = await run.collect_dump(panicked)
        if collected:
            await run.verify_dump()
        await asyncio.to_thread(self.prune)

    def prune(self) -> None:
        """Keep the newest vmcores within the retention's count and bytes.

        The files of a dump whose record is gone (its server was removed) go too.
        """
        kept_count = kept_bytes = 0
        removed = []
        dumps = self.store.list_crash_dumps()
        known = {dump.id for dump in dumps}
        if self.directory.is_dir():
            for leftover in self.directory.iterdir():
                if leftover.name not in known:
                    shutil.rmtree(leftover, ignore_errors=True)
        for dump in dumps:
            if dump.removed_at is not None or dump.stored_bytes == 0:
                continue
            kept_count += 1
            kept_bytes += dump.stored_bytes
            if kept_count > self.config.retention_count or kept_bytes > self.config.retention_bytes:
                shutil.rmtree(self.dump_dir(dump.id), ignore_errors=True)
                removed.append(dump.id)
        if removed:
            self.store.mark_dumps_removed(removed)

    def dump_dir(self, dump_id: str) -> Path:
        return self.directory / dump_id

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _Run:
    """One dump's phases, resumable from the events already recorded."""

    def __init__(self, follower: CrashDumpFollower, dump: CrashDump, server: Server) -> None:
        self.f = follower
        self.store = follower.store
        self.dump = dump
        self.server = server
        assert dump.action_id is not None and dump.request_id is not None, "followed: an NMI's"
        self.action_id, self.request_id = dump.action_id, dump.request_id
        self.evidence = Evidence.from_dict(dump.evidence)
        self.target = parse_target(server.dump_target)
        self.timeouts = parse_timeouts(server.dump_timeouts)
        self.events: dict[str, ActionEvent] = {}

    async def events_so_far(self) -> None:
        action = await asyncio.to_thread(
            self.store.get_action, self.dump.server_id, self.request_id
        )
        if action is not None:
            self.events = {event.event: event for event in action.events}

    # Phases

    async def observe_panic(self) -> bool:
        if self.evidence.console is None:
            return self.dump.state != "waiting"
        outcome = await self._phase(
            OBSERVE_PANIC_EVENT, self.timeouts.panic, self._panic_seen, self._no_panic
        )
        if outcome.ok:
            await self._state("panicked")
        return outcome.ok

    async def collect_dump(self, panicked: bool) -> bool:
        if isinstance(self.target, SshTarget):
            return await self._collect_upload(panicked)
        if not isinstance(self.target, DiskTarget):
            await self._phase(COLLECT_DUMP_EVENT, 0, lambda: Outcome(False, NO_TARGET), None)
            await self._state("failed", NO_TARGET)
            return False
        if self.evidence.disk is None:
            problem = self.evidence.problem or "the dump disk could not be found"
            await self._phase(COLLECT_DUMP_EVENT, 0, lambda: Outcome(False, problem), None)
            await self._state("failed", problem)
            return False
        watch = _DiskWatch(self, Path(self.evidence.disk))
        outcome = await self._phase(
            COLLECT_DUMP_EVENT, self.timeouts.collect, watch.poll, lambda: watch.timed_out(panicked)
        )
        if outcome.ok:
            await self._state("collected")
        else:
            await self._state("failed", outcome.details)
        return outcome.ok

    async def _collect_upload(self, panicked: bool) -> bool:
        if self.evidence.upload_dir is None:
            problem = self.evidence.problem or "the server has no upload directory"
            await self._phase(COLLECT_DUMP_EVENT, 0, lambda: Outcome(False, problem), None)
            await self._state("failed", problem)
            return False
        watch = UploadWatch(self, Path(self.evidence.upload_dir))
        outcome = await self._phase(
            COLLECT_DUMP_EVENT, self.timeouts.collect, watch.poll, lambda: watch.timed_out(panicked)
        )
        await self._state(
            "collected" if outcome.ok else "failed", None if outcome.ok else outcome.details
        )
        return outcome.ok

    async def verify_dump(self) -> None:
        verify = _Verification(self)
        outcome = await self._phase(VERIFY_DUMP_EVENT, self.timeouts.verify, verify.run, None)
        # The state after the event: a client that sees a terminal state sees every event ended.
        if outcome.ok:
            await self._state("verified")
        else:
            await self._state("failed", outcome.details)

    # Console

    def _panic_seen(self) -> Outcome | None:
        console = read_console(self.evidence)
        if found := PANIC_LINE.search(console):
            self.store.record_panic(
                self.dump.id, {"message": found.group(0), "log_tail": _tail(console)}
            )
            return Outcome(True, f"the console shows the panic: {found.group(0).strip()}")
        if found := NEW_KERNEL.search(console):
            return Outcome(True, f"the crash kernel booted after the NMI: {found.group(0)}")
        if self.evidence.disk and _written_since(self.evidence):
            return Outcome(True, "the console shows no panic, but the dump disk is being written")
        return None

    def _no_panic(self) -> Outcome:
        console = read_console(self.evidence)
        if found := NMI_IGNORED.search(console):
            return Outcome(
                False,
                f"no panic within {self.timeouts.panic:g} s: the guest logged the NMI "
                f"and went on ({found.group(0).strip()})",
            )
        return Outcome(False, f"no panic seen on the console within {self.timeouts.panic:g} s")

    # Events and state

    async def _phase(
        self,
        name: str,
        timeout: float,
        poll: Callable[[], Outcome | None],
        on_timeout: Callable[[], Outcome] | None,
    ) -> Outcome:
        """Run one phase as one event: poll until an outcome or the deadline.

        A phase whose event already ended (before a restart) is not run
        again; its recorded result stands.
        """
        event = self.events.get(name)
        if event is not None and event.finish_time is not None:
            return Outcome(event.result == "Success", event.details or "")
        if event is None:
            event_id = await asyncio.to_thread(
                self.store.start_event,
                self.action_id,
                name,
                host=self.f.host,
                owner=self.f.owner,
            )
            started = utcnow()
        else:
            event_id, started = event.id, event.start_time
        deadline = started + dt.timedelta(seconds=timeout)
        while True:
            try:
                outcome = await asyncio.wait_for(
                    asyncio.to_thread(poll), max(1.0, (deadline - utcnow()).total_seconds())
                )
            except TimeoutError:
                outcome = Outcome(False, f"did not finish within {timeout:g} s")
            except Exception as error:
                # The event must end whatever happened: a running event is a promise.
                LOG.exception("crash dump %s: %s failed", self.dump.id, name)
                outcome = Outcome(False, f"{name} failed inside crashlab: {error}")
            if outcome is None and utcnow() >= deadline and on_timeout is not None:
                outcome = on_timeout()
            if outcome is not None:
                break
            await asyncio.sleep(POLL_SECONDS)
        await asyncio.to_thread(
            self.store.finish_event, event_id, result=outcome.result, details=outcome.details
        )
        LOG.info("crash dump %s: %s %s: %s", self.dump.id, name, outcome.result, outcome.details)
        return outcome

    async def _state(self, state: str, error: str | None = None) -> None:
        await asyncio.to_thread(self.store.set_dump_state, self.dump.id, state, error=error)


class _DiskWatch:
    """The dump disk, polled: has a new, complete flattened stream arrived?"""

    def __init__(self, run: _Run, disk: Path) -> None:
        self.run = run
        self.disk = disk
        self.last: tuple[int, str | None] | None = None
        self.last_change = utcnow()
        self.collecting = False

    def poll(self) -> Outcome | None:
        if not _written_since(self.run.evidence):
            return None
        stream = scan_flattened(self.disk)
        if not stream.found:
            return None
        if not self.collecting:
            self.collecting = True
            self.run.store.set_dump_state(self.run.dump.id, "collecting")
        now = (stream.bytes, fingerprint(self.disk))
        steady = now == self.last
        if not steady:
            self.last, self.last_change = now, utcnow()
        if stream.complete and steady:
            return Outcome(True, f"a complete dump of {stream.bytes} bytes arrived on the disk")
        stalled = (utcnow() - self.last_change).total_seconds()
        if not stream.complete and stalled >= self.run.f.config.stall_seconds:
            return Outcome(
                False,
                f"incomplete dump: the stream stopped at {stream.bytes} bytes, "
                f"without its end marker, {stalled:.0f} s ago",
            )
        return None

    def timed_out(self, panicked: bool) -> Outcome:
        if self.collecting and self.last is not None:
            return Outcome(False, f"incomplete dump: {self.last[0]} bytes, no end marker in time")
        if not panicked:
            return Outcome(False, NOTHING_AT_ALL)
        return Outcome(False, f"no dump arrived within {self.run.timeouts.collect:g} s")


class UploadWatch:
    """An ssh target's upload directory, polled: has a complete dump arrived since the NMI?

    A dump is this NMI's candidate when it was written after the NMI was sent
    (less the clock skew); its CRASHTIME decides in verification.
    """

    def __init__(self, run: _Run, directory: Path) -> None:
        self.run = run
        self.directory = directory
        assert run.dump.nmi_sent_at is not None
        skew = dt.timedelta(seconds=run.f.config.clock_skew_seconds)
        self.since = run.dump.nmi_sent_at - skew
        self.last: tuple[str, int] | None = None
        self.last_change = utcnow()
        self.collecting = False

    def poll(self) -> Outcome | None:
        claimed = self.run.f.dump_dir(self.run.dump.id) / CLAIMED_STREAM
        if claimed.exists():
            # Claimed before a restart, which came before the event could end.
            return Outcome(True, f"a complete dump of {claimed.stat().st_size} bytes arrived")
        found = scan(self.directory)
        for upload in found.complete:
            if upload.modified < self.since:
                continue
            into = self.run.f.dump_dir(self.run.dump.id)
            if claim(upload, into, self.run.dump.id) is not None:
                where = upload.relative_to(self.directory)
                return Outcome(True, f"a complete dump of {upload.bytes} bytes arrived: {where}")
        fresh = [upload for upload in found.incomplete if upload.modified >= self.since]
        if not fresh:
            return None
        if not self.collecting:
            self.collecting = True
            self.run.store.set_dump_state(self.run.dump.id, "collecting")
        upload = fresh[-1]
        now = (upload.relative_to(self.directory), upload.bytes)
        if now != self.last:
            self.last, self.last_change = now, utcnow()
        stalled = (utcnow() - self.last_change).total_seconds()
        if stalled >= self.run.f.config.stall_seconds:
            return Outcome(
                False,
                f"incomplete dump: the upload {now[0]} stopped at {now[1]} bytes "
                f"{stalled:.0f} s ago",
            )
        return None

    def timed_out(self, panicked: bool) -> Outcome:
        if self.collecting and self.last is not None:
            return Outcome(
                False,
                f"incomplete dump: {self.last[1]} bytes of {self.last[0]}, not complete in time",
            )
        return Outcome(
            False, f"no dump arrived at the collector within {self.run.timeouts.collect:g} s"
        )


@dataclass(frozen=True)
class Restored:
    """What a restored vmcore says of itself."""

    facts: dict[str, Any]
    crash_time: dt.datetime | None
    panic_message: str | None
    panic: dict[str, Any] | None
    stored_bytes: int


def restore(stream: Path, out_dir: Path, timeout: float) -> Restored:
    """Restore a flattened stream into ``out_dir/vmcore`` and read it; VmcoreError if it cannot."""
    vmcore = extract_vmcore(stream, out_dir / "vmcore", timeout=timeout)
    dmesg = read_dmesg(vmcore.path, timeout=timeout)
    (out_dir / "dmesg").write_text(dmesg)
    facts = {
        "format": vmcore.format,
        "bytes": vmcore.bytes,
        "sha256": sha256_of(vmcore.path),
        "kernel_release": vmcore.vmcoreinfo.get("OSRELEASE", vmcore.kernel_release),
        "build_id": vmcore.build_id,
        "crash_time": None if vmcore.crash_time is None else _iso(vmcore.crash_time),
    }
    panic = (
        {
            "message": f"Kernel panic - not syncing: {vmcore.panic_message}",
            "log_tail": _tail(dmesg),
        }
        if vmcore.panic_message
        else None
    )
    return Restored(
        facts, vmcore.crash_time, vmcore.panic_message, panic, vmcore.bytes + len(dmesg)
    )


class _Verification:
    """Restore the stream, read what the vmcore says of itself, and judge it."""

    def __init__(self, dump_run: _Run) -> None:
        self.dump_run = dump_run

    def stream(self) -> Path:
        """The disk, or the upload claimed into the dump's directory."""
        run = self.dump_run
        if run.evidence.disk is not None:
            return Path(run.evidence.disk)
        return run.f.dump_dir(run.dump.id) / CLAIMED_STREAM

    def run(self) -> Outcome:
        run = self.dump_run
        out_dir = run.f.dump_dir(run.dump.id)
        try:
            restored = restore(self.stream(), out_dir, run.timeouts.verify)
        except VmcoreError as error:
            return Outcome(False, f"the dump could not be restored: {error.message}")
        # An upload's stream stays until retention removes the dump: a verification
        # resumed after a restart reads it again. Its bytes count.
        stored = restored.stored_bytes
        if run.evidence.upload_dir is not None:
            stored += self.stream().stat().st_size
        facts = restored.facts
        reason = self.judge(facts, restored.crash_time, restored.panic_message)
        run.store.record_vmcore(
            run.dump.id,
            state="collected",
            vmcore=facts,
            panic=restored.panic,
            stored_bytes=stored,
        )
        if reason:
            return Outcome(False, reason)
        return Outcome(
            True,
            f"a {facts['format']} vmcore of {facts['kernel_release']}, crashed at "
            f"{facts['crash_time']}, panic: {restored.panic_message}",
        )

    def judge(
        self, facts: dict[str, Any], crash_time: dt.datetime | None, panic: str | None
    ) -> str | None:
        run = self.dump_run
        expected = run.server.expected_kernel_release or run.evidence.boot_kernel_release
        if expected is not None and facts["kernel_release"] != expected:
            return f"the vmcore's kernel is {facts['kernel_release']}, expected {expected}"
        skew = dt.timedelta(seconds=run.f.config.clock_skew_seconds)
        assert run.dump.nmi_sent_at is not None
        sent = run.dump.nmi_sent_at.replace(tzinfo=dt.UTC)
        if crash_time is None:
            return "the vmcore has no CRASHTIME, so it cannot be tied to this NMI"
        if crash_time < sent - skew:
            return (
                f"the vmcore crashed at {_iso(crash_time)}, before this NMI was sent at "
                f"{_iso(sent)}: it is from an earlier crash"
            )
        if crash_time > dt.datetime.now(dt.UTC) + skew:
            return f"the vmcore's CRASHTIME {_iso(crash_time)} is in the future"
        if panic is None:
            return "the vmcore's kernel log holds no panic"
        if not NMI_PANIC.search(panic):
            return f"the vmcore's panic was not the NMI's: {panic}"
        return None


def _written_since(evidence: Evidence) -> bool:
    assert evidence.disk is not None
    now = fingerprint(Path(evidence.disk))
    return now is not None and now != evidence.disk_fingerprint


def _tail(text: str) -> list[str]:
    return [line.rstrip("\r") for line in text.splitlines()[-LOG_TAIL_LINES:]]


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
