"""The background power-state sync, in the spirit of Nova's _sync_power_states.

API reads never call a backend: they read the state this sync stored. Each
pass claims the servers that are due (in the state file, so with several
processes each server is read by one), reads them in their backends'
bulkheads, waits at most ``state_timeout_seconds``, and stores what answered.
A backend that does not answer keeps its last known state and trips its
breaker; it never delays the pass of any other.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app.backends import Backends
from app.config import Config
from app.store import Server, Store
from drivers.base import DriverError

LOG = logging.getLogger(__name__)

# How often due servers are looked for; each is read once per interval.
TICK_SECONDS = 1.0


class PowerStateSync:
    def __init__(self, store: Store, backends: Backends, config: Config) -> None:
        self.store = store
        self.backends = backends
        self.interval = config.power_sync.interval_seconds
        self.timeout = config.backends.state_timeout_seconds

    async def run_once(self) -> int:
        """One pass over the due servers; returns how many answered."""
        due = await asyncio.to_thread(self.store.claim_power_syncs, self.interval)
        reads: dict[asyncio.Future[Any], Server] = {}
        for server in due:
            try:
                reads[asyncio.wrap_future(self.backends.submit_power_state(server))] = server
            except DriverError as error:
                LOG.debug("power state of %s not read: %s", server.uuid, error)
        if not reads:
            return 0
        done, pending = await asyncio.wait(reads, timeout=self.timeout)
        for future in pending:
            future.cancel()
            self.backends.note_no_answer(reads[future])
        states = {}
        for future in done:
            server = reads[future]
            if future.exception() is None:
                states[server.uuid] = int(future.result())
            else:
                LOG.info("power state of %s unknown: %s", server.uuid, future.exception())
        if states:
            await asyncio.to_thread(self.store.record_power_states, states)
        return len(states)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(min(TICK_SECONDS, self.interval))
            try:
                await self.run_once()
            except Exception:
                LOG.exception("power-state sync pass failed")
