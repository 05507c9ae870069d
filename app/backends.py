"""Drivers for the servers in the inventory, and the threads that call them.

Driver calls block (libvirt-python, pyghmi, sushy), so they run in threads.
Each backend (one libvirt URI, one BMC) is a bulkhead: it has its own few
threads, a bound on the calls waiting for them, and a circuit breaker for
state reads. A backend that hangs fills only its own bulkhead; every other
backend, and so every other server and tenant, is reached as before. Every
wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from app.config import BackendsConfig
from app.crypto import SecretBox
from app.store import Server
from drivers import driver_class
from drivers.base import BackendUnreachable, Driver, DriverError, PowerState

LOG = logging.getLogger(__name__)
T = TypeVar("T")

SECRET_MASK = "******"


class BackendTimeout(BackendUnreachable):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"the backend did not answer within {seconds:g} s")


class BackendBusy(DriverError):
    """The backend's bulkhead is full: its earlier calls have not returned."""

    nmi_not_sent = True


class BreakerOpen(DriverError):
    """The backend failed its last reads; it is not read again until the breaker resets."""

    nmi_not_sent = True


def encrypt_secrets(driver: str, info: dict[str, Any], box: SecretBox) -> dict[str, Any]:
    """Driver settings as stored: secret fields encrypted."""
    secret_fields = driver_class(driver).settings_model.secret_fields
    return {k: box.encrypt(str(v)) if k in secret_fields else v for k, v in info.items()}


def masked_settings(driver: str, stored: dict[str, Any]) -> dict[str, Any]:
    """Driver settings as shown to an admin: secrets replaced by a mask."""
    secret_fields = driver_class(driver).settings_model.secret_fields
    return {k: SECRET_MASK if k in secret_fields else v for k, v in stored.items()}


class CircuitBreaker:
    """Opens after ``failures`` unanswered reads in a row; lets one probe through
    after ``reset_seconds``, and closes on the first answer."""

    def __init__(self, failures: int, reset_seconds: float) -> None:
        self.failures = failures
        self.reset_seconds = reset_seconds
        self._consecutive = 0
        self._open_until = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            if self._consecutive < self.failures:
                return True
            now = time.monotonic()
            if now < self._open_until:
                return False
            self._open_until = now + self.reset_seconds  # this caller is the probe
            return True

    def record(self, answered: bool) -> None:
        with self._lock:
            if answered:
                self._consecutive = 0
                return
            self._consecutive += 1
            if self._consecutive >= self.failures:
                self._open_until = time.monotonic() + self.reset_seconds


class Bulkhead:
    """One backend's threads, its bound on calls in flight, and its breaker."""

    def __init__(self, backend_id: str, config: BackendsConfig) -> None:
        self.backend_id = backend_id
        self.limit = config.concurrency + config.queue
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset_seconds)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.concurrency, thread_name_prefix="backend"
        )
        self._in_flight = 0
        self._lock = threading.Lock()

    def submit(self, call: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queue ``call`` on this backend's threads; BackendBusy when it is full."""
        with self._lock:
            if self._in_flight >= self.limit:
                raise BackendBusy(
                    f"the backend has {self._in_flight} calls that have not returned; "
                    "nothing was sent"
                )
            self._in_flight += 1
        future = self._executor.submit(call)
        future.add_done_callback(self._done)
        return future

    @property
    def idle(self) -> bool:
        with self._lock:
            return self._in_flight == 0

    def _done(self, _future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._in_flight -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Backends:
    """Builds, caches and calls the driver of each server, each in its backend's bulkhead."""

    def __init__(self, box: SecretBox, config: BackendsConfig) -> None:
        self._box = box
        self.config = config
        self._drivers: dict[str, tuple[tuple[str, str], Driver]] = {}
        self._bulkheads: dict[str, Bulkhead] = {}
        self._lock = threading.Lock()

    def driver_for(self, server: Server) -> Driver:
        # Cached per server; rebuilt when its driver or settings change.
        key = (server.driver, repr(sorted(server.driver_info.items())))
        with self._lock:
            cached = self._drivers.get(server.uuid)
            if cached is not None and cached[0] == key:
                return cached[1]
        cls = driver_class(server.driver)
        secret_fields = cls.settings_model.secret_fields
        raw = {
            k: self._box.decrypt(v) if k in secret_fields else v
            for k, v in server.driver_info.items()
        }
        driver = cls(server.uuid, cls.parse_settings(raw))
        with self._lock:
            old = self._drivers.get(server.uuid)
            self._drivers[server.uuid] = (key, driver)
        if old is not None:
            self._close(old[1])
        return driver

    def evidence_driver(self, server: Server, domain: str | None, uri: str | None) -> Driver | None:
        """The libvirt driver of the domain that holds a server's console and dump disk.

        The disk target's own domain where it names one, else the server's
        own for a libvirt server; None when there is neither.
        """
        if domain is None:
            return self.driver_for(server) if server.driver == "libvirt" else None
        cls = driver_class("libvirt")
        settings = {"domain": domain} if uri is None else {"domain": domain, "uri": uri}
        return cls(server.uuid, cls.parse_settings(settings))

    def bulkhead(self, driver: Driver, lane: str = "") -> Bulkhead:
        """The backend's bulkhead; a ``lane`` is a separate one beside it.

        Memory captures run in their own lane ("capture"): each holds a thread
        for seconds, and must not queue the NMIs and reads of the other servers
        on the same hypervisor behind it.
        """
        key = f"{driver.backend_id}#{lane}" if lane else driver.backend_id
        with self._lock:
            bulkhead = self._bulkheads.get(key)
            if bulkhead is None:
                bulkhead = self._bulkheads[key] = Bulkhead(key, self.config)
            return bulkhead

    def forget(self, server_uuid: str) -> None:
        with self._lock:
            cached = self._drivers.pop(server_uuid, None)
        if cached is not None:
            self._close(cached[1])

    def submit_nmi(self, server: Server) -> concurrent.futures.Future[None]:
        """Send the server's NMI in its backend's bulkhead (no breaker: an NMI is asked for)."""
        driver = self.driver_for(server)
        return self.bulkhead(driver).submit(driver.trigger_crash_dump)

    def submit_power_state(self, server: Server) -> concurrent.futures.Future[PowerState]:
        """Read the server's power state in its bulkhead, if its breaker lets it."""
        driver = self.driver_for(server)
        bulkhead = self.bulkhead(driver)
        if not bulkhead.breaker.allow():
            raise BreakerOpen(
                f"the backend did not answer its last {bulkhead.breaker.failures} reads"
            )
        future = bulkhead.submit(driver.get_power_state)
        future.add_done_callback(lambda done: _record_answer(bulkhead.breaker, done))
        return future

    def power_state(self, server: Server, timeout: float) -> PowerState | None:
        """The live power state, or None if it cannot be read within ``timeout``.

        Only an idle backend is read: while earlier calls to it are still out,
        a caller does not add its wait to theirs, and gets None at once.
        """
        if not self.bulkhead(self.driver_for(server)).idle:
            return None
        try:
            future = self.submit_power_state(server)
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            self.note_no_answer(server)
            LOG.info("power state of %s: no answer within %g s", server.uuid, timeout)
        except DriverError as exc:
            LOG.info("power state of %s unknown: %s", server.uuid, exc)
        except Exception:
            LOG.exception("power state of %s failed", server.uuid)
        return None

    def note_no_answer(self, server: Server) -> None:
        """A read its caller stopped waiting for counts against the backend's breaker
        at once: a hung call may never return to count itself."""
        self.bulkhead(self.driver_for(server)).breaker.record(False)

    def close(self) -> None:
        with self._lock:
            drivers = [d for _, d in self._drivers.values()]
            bulkheads = list(self._bulkheads.values())
            self._drivers.clear()
            self._bulkheads.clear()
        for bulkhead in bulkheads:
            bulkhead.close()
        for driver in drivers:
            self._close(driver)

    @staticmethod
    def _close(driver: Driver) -> None:
        try:
            driver.close()
        except Exception:
            LOG.exception("closing the %s driver failed", driver.name)


def _record_answer(breaker: CircuitBreaker, future: concurrent.futures.Future[Any]) -> None:
    """A reply, even an error reply, is an answer; a cancelled read was counted by its caller."""
    if not future.cancelled():
        breaker.record(not isinstance(future.exception(), BackendUnreachable))
