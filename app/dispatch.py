"""Runs accepted crash dumps after the 202 and records their events.

This is the part of nova-compute's trigger_crash_dump that crashlab keeps:
call the driver once, never retry (an NMI is not idempotent), and finish the
``compute_trigger_crash_dump`` event as Success or Error, with Nova's
``details`` (the error message, or the class name of an unexpected
exception) and ``traceback`` (frames only).

Before the driver is called the event is marked as sending, in the state
file, and only if its server still exists: a server deleted after the 202
gets no NMI, and one is not deleted while its NMI is on its way.

For a server with a dump target, the follower (app/follower.py) first marks
where the evidence will show (the console's length, the dump disk's
fingerprint), and the NMI's Success opens its crash dump in the same
transaction that ends the event: one NMI, one dump, even across a crash.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid
from functools import partial

from starlette.concurrency import run_in_threadpool

from app.backends import Backends, BackendTimeout
from app.dump_targets import Evidence
from app.follower import CrashDumpFollower
from app.service import PendingCrashDump
from app.store import Store
from drivers.base import DriverError, may_have_sent_nmi

LOG = logging.getLogger(__name__)

REMOVED_DETAILS = "the server was removed before the NMI was sent; nothing was sent"


class CrashDumpDispatcher:
    """Sends each accepted NMI through ``backends`` and records its event in ``store``."""

    def __init__(
        self, store: Store, backends: Backends, follower: CrashDumpFollower, timeout: float
    ) -> None:
        self.store = store
        self.backends = backends
        self.follower = follower
        self.timeout = timeout

    async def run(self, pending: PendingCrashDump) -> None:
        if not await run_in_threadpool(self.store.begin_sending, pending.event_id):
            # Deleted with its server (or already ended): there is nothing to record.
            LOG.info("trigger_crash_dump %s: %s", pending.action.request_id, REMOVED_DETAILS)
            return
        follows = self.follower.target_type(pending.server) != "none"
        # Where the dump will show, marked before the NMI: only what comes after it counts.
        evidence = await self.follower.mark(pending.server) if follows else Evidence()
        result, details, frames = "Success", None, None
        future = None
        try:
            future = self.backends.submit_nmi(pending.server)
            await asyncio.wait_for(asyncio.wrap_future(future), timeout=self.timeout)
        except TimeoutError as error:
            result, details, frames = "Error", str(BackendTimeout(self.timeout)), _frames(error)
            if future is not None and future.cancelled():
                # It waited behind the backend's earlier calls and never ran.
                details += "; nothing was sent"
                await run_in_threadpool(self.store.clear_nmi_cooldown, pending.server.uuid)
        except DriverError as error:
            result, details, frames = "Error", error.message, _frames(error)
            if not may_have_sent_nmi(error):
                await run_in_threadpool(self.store.clear_nmi_cooldown, pending.server.uuid)
        except Exception as error:
            # Nova records the class name of a non-Nova exception as details.
            LOG.exception("trigger_crash_dump of %s failed", pending.server.uuid)
            result, details, frames = "Error", type(error).__name__, _frames(error)
        LOG.info(
            "trigger_crash_dump %s on %s: %s%s",
            pending.action.request_id,
            pending.server.uuid,
            result,
            f" ({details})" if details else "",
        )
        if result == "Success" and follows:
            await self._open_dump(pending, evidence)
            return
        await run_in_threadpool(
            self.store.finish_event,
            pending.event_id,
            result=result,
            details=details,
            traceback=frames,
        )

    async def _open_dump(self, pending: PendingCrashDump, evidence: Evidence) -> None:
        dump = await run_in_threadpool(
            partial(
                self.store.finish_nmi_and_open_dump,
                pending.event_id,
                dump_id=str(uuid.uuid4()),
                target=self.follower.target_type(pending.server),
                evidence=evidence.as_dict(),
                owner=self.follower.owner,
            )
        )
        if dump is not None:
            self.follower.start(dump)


def _frames(error: BaseException) -> str:
    return "".join(traceback.format_tb(error.__traceback__))
