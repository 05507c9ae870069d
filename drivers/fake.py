"""In-memory drivers for API tests, as httpx's MockTransport is for httpx.

They implement the same interface as the real backends and count every NMI
they receive, so tests can assert "exactly once". ``nmi_log`` also appends one
line per NMI to a file, for counts that must survive a killed service; being a
path on crashlab's host, only the config file may set it. They are test
backends: the admin API registers them only where the config enables
``test_drivers``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from drivers.base import (
    Driver,
    DriverSettings,
    GuestAgentUnavailable,
    InstanceNotRunning,
    PowerState,
)

_POWER = {
    "running": PowerState.RUNNING,
    "paused": PowerState.PAUSED,
    "shutdown": PowerState.SHUTDOWN,
}


class FakeSettings(DriverSettings):
    power_state: Literal["running", "paused", "shutdown"] = "running"
    delay_seconds: float = Field(0.0, ge=0, le=60, description="seconds each NMI takes")
    nmi_log: Path | None = None
    guest_files: dict[str, str] | None = Field(
        None, description="what the fake guest agent reads; None: the guest has no agent"
    )

    config_only_fields: ClassVar[frozenset[str]] = frozenset({"nmi_log"})
    test_backend: ClassVar[bool] = True


@dataclass
class FakeMachine:
    power_state: PowerState
    nmi_count: int = 0


class _FakeBase(Driver):
    settings_model = FakeSettings
    capabilities: ClassVar[frozenset[str]] = frozenset({"power_state"})

    # Shared by every driver instance in the process, keyed by server id.
    machines: ClassVar[dict[str, FakeMachine]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, server_id: str, settings: DriverSettings) -> None:
        super().__init__(server_id, settings)
        assert isinstance(settings, FakeSettings)
        self.fake_settings = settings
        with self._lock:
            self.machines.setdefault(server_id, FakeMachine(_POWER[settings.power_state]))

    @property
    def machine(self) -> FakeMachine:
        return self.machines[self.server_id]

    def get_power_state(self) -> PowerState:
        return self.machine.power_state


class FakeDriver(_FakeBase):
    name = "fake"
    description = "In-memory machine that counts the NMIs it receives"
    capabilities = frozenset({"power_state", "nmi", "guest_agent"})

    def read_guest_files(self, paths: Sequence[str]) -> dict[str, bytes | None]:
        files = self.fake_settings.guest_files
        if files is None:
            raise GuestAgentUnavailable("no guest agent: the fake server has none")
        return {path: None if path not in files else files[path].encode() for path in paths}

    def trigger_crash_dump(self) -> None:
        if self.fake_settings.delay_seconds:
            time.sleep(self.fake_settings.delay_seconds)
        if self.machine.power_state == PowerState.SHUTDOWN:
            raise InstanceNotRunning(self.server_id)
        with self._lock:
            self.machine.nmi_count += 1
            if self.fake_settings.nmi_log is not None:
                with self.fake_settings.nmi_log.open("a") as log:
                    log.write(f"{self.server_id}\n")


class FakeNoNMIDriver(_FakeBase):
    """A backend without NMI, like Nova's vmwareapi or zvm drivers."""

    name = "fake-nonmi"
    description = "In-memory machine whose backend cannot send an NMI"
