"""Runs accepted crash dumps after the 202 and records their events.

This is the part of nova-compute's trigger_crash_dump that crashlab keeps:
call the driver once, never retry (an NMI is not idempotent), and finish the
``compute_trigger_crash_dump`` event as Success or Error, with Nova's
``details`` (the error message, or the class name of an unexpected
exception) and ``traceback`` (frames only).
"""

from __future__ import annotations

import asyncio
import logging
import traceback

from starlette.concurrency import run_in_threadpool

from app.backends import Backends, BackendTimeout
from app.service import ComputeService, PendingCrashDump
from drivers.base import DriverError, may_have_sent_nmi

LOG = logging.getLogger(__name__)

RESTART_DETAILS = "service restarted before the result was known"


class CrashDumpDispatcher:
    def __init__(self, service: ComputeService, backends: Backends, timeout: float) -> None:
        self.service = service
        self.backends = backends
        self.timeout = timeout

    def recover(self) -> int:
        """At start-up: events left running by a dead process become Error."""
        return self.service.store.fail_unfinished_events(RESTART_DETAILS)

    async def run(self, pending: PendingCrashDump) -> None:
        result, details, frames = "Success", None, None
        try:
            # One hop to a driver thread: looking the driver up there too saves one.
            future = self.backends.submit(lambda: self._send_nmi(pending))
            await asyncio.wait_for(asyncio.wrap_future(future), timeout=self.timeout)
        except TimeoutError as error:
            result, details, frames = "Error", str(BackendTimeout(self.timeout)), _frames(error)
        except DriverError as error:
            result, details, frames = "Error", error.message, _frames(error)
            if not may_have_sent_nmi(error):
                await run_in_threadpool(self.service.clear_nmi_cooldown, pending.server.uuid)
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
        await run_in_threadpool(
            self.service.store.finish_event,
            pending.event_id,
            result=result,
            details=details,
            traceback=frames,
        )

    def _send_nmi(self, pending: PendingCrashDump) -> None:
        self.backends.driver_for(pending.server).trigger_crash_dump()


def _frames(error: BaseException) -> str:
    return "".join(traceback.format_tb(error.__traceback__))
