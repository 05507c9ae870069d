"""Drivers for the servers in the inventory, and the threads that call them.

Driver calls block (libvirt-python, pyghmi, sushy), so they run in one
thread pool sized for many servers at once; there is no global lock, so
different servers are reached in parallel. Every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from app.crypto import SecretBox
from app.store import ServerRecord
from drivers import driver_class
from drivers.base import Driver, DriverError, PowerState

LOG = logging.getLogger(__name__)
T = TypeVar("T")

SECRET_MASK = "******"


class BackendTimeout(DriverError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"the backend did not answer within {seconds:g} s")


def encrypt_secrets(driver: str, info: dict[str, Any], box: SecretBox) -> dict[str, Any]:
    """Driver settings as stored: secret fields encrypted."""
    secret_fields = driver_class(driver).settings_model.secret_fields
    return {k: box.encrypt(str(v)) if k in secret_fields else v for k, v in info.items()}


def masked_settings(driver: str, stored: dict[str, Any]) -> dict[str, Any]:
    """Driver settings as shown to an admin: secrets replaced by a mask."""
    secret_fields = driver_class(driver).settings_model.secret_fields
    return {k: SECRET_MASK if k in secret_fields else v for k, v in stored.items()}


class Backends:
    """Builds, caches and calls the driver of each server."""

    def __init__(self, box: SecretBox, workers: int) -> None:
        self._box = box
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="driver"
        )
        self._drivers: dict[str, tuple[tuple[str, str], Driver]] = {}
        self._lock = threading.Lock()

    def driver_for(self, record: ServerRecord) -> Driver:
        # Cached per server; rebuilt when its driver or settings change.
        key = (record.driver, repr(sorted(record.driver_info.items())))
        with self._lock:
            cached = self._drivers.get(record.uuid)
            if cached is not None and cached[0] == key:
                return cached[1]
        cls = driver_class(record.driver)
        secret_fields = cls.settings_model.secret_fields
        raw = {
            k: self._box.decrypt(v) if k in secret_fields else v
            for k, v in record.driver_info.items()
        }
        driver = cls(record.uuid, cls.parse_settings(raw))
        with self._lock:
            old = self._drivers.get(record.uuid)
            self._drivers[record.uuid] = (key, driver)
        if old is not None:
            self._close(old[1])
        return driver

    def forget(self, server_uuid: str) -> None:
        with self._lock:
            cached = self._drivers.pop(server_uuid, None)
        if cached is not None:
            self._close(cached[1])

    def submit(self, call: Callable[[], T]) -> concurrent.futures.Future[T]:
        return self._pool.submit(call)

    def call(self, call: Callable[[], T], timeout: float) -> T:
        """Run a driver call in the pool; BackendTimeout if it outlives ``timeout``."""
        future = self._pool.submit(call)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise BackendTimeout(timeout) from None

    def power_states(
        self, records: list[ServerRecord], timeout: float
    ) -> dict[str, PowerState | None]:
        """Live power state of each server, read in parallel; None where unknown."""
        futures = {record.uuid: self._pool.submit(self._power_state, record) for record in records}
        done, _ = concurrent.futures.wait(futures.values(), timeout=timeout)
        return {
            uuid: future.result() if future in done else None for uuid, future in futures.items()
        }

    def _power_state(self, record: ServerRecord) -> PowerState | None:
        try:
            return self.driver_for(record).get_power_state()
        except DriverError as exc:
            LOG.info("power state of %s unknown: %s", record.uuid, exc)
        except Exception:
            LOG.exception("power state of %s failed", record.uuid)
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            drivers = [d for _, d in self._drivers.values()]
            self._drivers.clear()
        for driver in drivers:
            self._close(driver)

    @staticmethod
    def _close(driver: Driver) -> None:
        try:
            driver.close()
        except Exception:
            LOG.exception("closing the %s driver failed", driver.name)
