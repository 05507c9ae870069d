"""Each ``crashlab serve`` process holds a lease in the state file while it lives.

Several processes may share one state file. A process renews its lease every
third of ``lease_seconds``; an event left running by a process whose lease has
lapsed (or, on this host, whose pid is gone) is failed by whichever process
notices first. A live sibling's running events are never touched.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import uuid
from pathlib import Path

from app.capture import ORPHANED_DETAILS as CAPTURE_ORPHANED_DETAILS
from app.events import CRASH_DUMP_EVENT
from app.store import ServiceLease, Store, utcnow

LOG = logging.getLogger(__name__)

ORPHANED_DETAILS = "service restarted before the result was known"


def _pid_started(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/<pid>/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after it do not.
    return int(stat.rpartition(")")[2].split()[19])


class ProcessLease:
    """This process's lease, and the verdict on the others'."""

    def __init__(self, store: Store, lease_seconds: float) -> None:
        self.store = store
        self.lease_seconds = lease_seconds
        self.id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pid_started = _pid_started(self.pid) or 0

    def renew(self) -> None:
        self.store.renew_lease(
            ServiceLease(
                id=self.id,
                host=self.host,
                pid=self.pid,
                pid_started=self.pid_started,
                renewed_at=utcnow(),
            )
        )

    def end(self) -> None:
        self.store.end_lease(self.id)

    def is_live(self, lease: ServiceLease, now: dt.datetime) -> bool:
        if lease.id == self.id:
            return True
        if (now - lease.renewed_at).total_seconds() > self.lease_seconds:
            return False
        # On this host a dead process is known at once, not only when its lease lapses.
        return lease.host != self.host or _pid_started(lease.pid) == lease.pid_started

    def live_owners(self) -> set[str]:
        """The lease ids of the processes alive now, this one's included."""
        now = utcnow()
        return {lease.id for lease in self.store.list_leases() if self.is_live(lease, now)} | {
            self.id
        }

    def fail_orphaned_events(self) -> int:
        """Fail the running NMI events and captures of every process no longer alive."""
        live = self.live_owners()
        captures = self.store.fail_orphaned_captures(live, CAPTURE_ORPHANED_DETAILS)
        return captures + self.store.fail_orphaned_events(live, ORPHANED_DETAILS, CRASH_DUMP_EVENT)

    async def keep(self) -> None:
        """Renew the lease and reap orphaned events, until cancelled."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await asyncio.to_thread(self.renew)
                failed = await asyncio.to_thread(self.fail_orphaned_events)
                if failed:
                    LOG.warning("%d crash dump event(s) of a gone process marked Error", failed)
            except Exception:
                LOG.exception("renewing the service lease failed")
