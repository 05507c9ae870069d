"""The one interface every crashlab backend implements.

A driver is bound to one server: it is built from that server's connection
settings and speaks only to its hypervisor or BMC. It knows nothing of users,
policy or HTTP. Calls are blocking; the service runs them in worker threads.

Failures a driver may raise, all subclasses of ``DriverError``::

    DriverError
     ├── NMINotSupported      the backend cannot send an NMI (Nova's TriggerCrashDumpNotSupported)
     ├── InstanceNotRunning   the hypervisor refused: the domain is not running
     ├── ServerPoweredOff     the BMC reports the server off, so an NMI would be lost
     ├── ServerNotFound       the domain or system no longer exists
     ├── GuestAgentUnavailable  no guest agent answers inside the server
     └── BackendError         the backend itself failed
          ├── BackendUnreachable   no answer within the timeout, or connection refused
          ├── BackendAuthFailed    credentials rejected
          └── BackendRejected      the backend answered with an error (completion code, HTTP status)

Capabilities are declared as data, as Ironic's hardware types declare their
interfaces: ``capabilities = frozenset({"nmi", "power_state"})``. Only a driver
that overrides ``trigger_crash_dump`` declares ``"nmi"``; the base method raises
``NMINotSupported``, as Ironic's ``ManagementInterface.inject_nmi`` does.
Likewise ``"guest_agent"`` (``read_guest_files``) and ``"memory_dump"``
(``memory_bytes``, ``capture_memory_dump``, ``abort_memory_dump``).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError


class DriverError(Exception):
    """Base of every failure a driver reports. ``str()`` is the event detail.

    ``nmi_not_sent`` is True on errors raised before anything reached the
    backend's NMI call, so a retry cannot interrupt a dump in progress. A class
    sets its default; a driver that knows better (a timeout before the NMI was
    sent) sets it on the error.
    """

    nmi_not_sent: bool = False

    def __init__(self, message: str, *, nmi_not_sent: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if nmi_not_sent is not None:
            self.nmi_not_sent = nmi_not_sent

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class NMINotSupported(DriverError):
    nmi_not_sent = True

    def __init__(self, message: str = "Triggering crash dump is not supported") -> None:
        super().__init__(message)


class InstanceNotRunning(DriverError):
    nmi_not_sent = True

    def __init__(self, instance_id: str) -> None:
        super().__init__(f"Instance {instance_id} is not running.")


class ServerPoweredOff(DriverError):
    nmi_not_sent = True

    def __init__(self, message: str = "server is powered off") -> None:
        super().__init__(message)


class ServerNotFound(DriverError):
    nmi_not_sent = True


class GuestAgentUnavailable(DriverError):
    """No guest agent answers: the server has no agent channel, or nothing listens on it."""

    nmi_not_sent = True

    def __init__(self, message: str = "no guest agent") -> None:
        super().__init__(message)


class MemoryDumpNotSupported(DriverError):
    nmi_not_sent = True

    def __init__(self, message: str = "this backend cannot dump a server's memory") -> None:
        super().__init__(message)


class BackendError(DriverError):
    pass


class BackendUnreachable(BackendError):
    pass


class BackendAuthFailed(BackendError):
    nmi_not_sent = True


class BackendRejected(BackendError):
    pass


def may_have_sent_nmi(error: DriverError) -> bool:
    return not error.nmi_not_sent


class PowerState(enum.IntEnum):
    """Nova's power_state values."""

    NOSTATE = 0
    RUNNING = 1
    PAUSED = 3
    SHUTDOWN = 4
    CRASHED = 6
    SUSPENDED = 7


@dataclass(frozen=True)
class SettingsSource:
    """Who hands crashlab a server's settings, which decides what they may hold.

    The operator's config file, and what crashlab stored itself, are trusted.
    The admin API is not: it may set no config-only field (those name files on
    crashlab's host), and may choose a test backend (the fake drivers,
    libvirt's ``test:///default``) only where the config's ``test_drivers`` allows.
    """

    api: bool
    test_drivers: bool

    @property
    def allows_test_backends(self) -> bool:
        return not self.api or self.test_drivers


TRUSTED = SettingsSource(api=False, test_drivers=True)


def settings_source(info: ValidationInfo) -> SettingsSource:
    """The source a validator runs for, as ``Driver.parse_settings`` passes it."""
    source = (info.context or {}).get("source", TRUSTED)
    assert isinstance(source, SettingsSource)
    return source


class DriverSettings(BaseModel):
    """Connection settings of one server; each driver subclasses this.

    Every number is finite (``allow_inf_nan=False``) and each field bounds its own.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Names of fields holding secrets: stored encrypted, never shown.
    secret_fields: ClassVar[frozenset[str]] = frozenset()
    # Names of fields only the config file may set: they name files on crashlab's host.
    config_only_fields: ClassVar[frozenset[str]] = frozenset()
    # True for the settings of a test backend (see SettingsSource).
    test_backend: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _check_source(cls, data: Any, info: ValidationInfo) -> Any:
        source = settings_source(info)
        if not source.api or not isinstance(data, dict):
            return data
        refused = sorted(cls.config_only_fields & data.keys())
        if refused:
            raise PydanticCustomError(
                "config_only", "{field} can be set only in the config file", {"field": refused[0]}
            )
        if cls.test_backend and not source.test_drivers:
            raise PydanticCustomError(
                "test_backend",
                "this is a test driver, and test_drivers is not enabled in the config",
            )
        return data


class Driver:
    """A backend bound to one server.

    Subclasses set ``name``, ``description``, ``capabilities`` and
    ``settings_model``, and implement what their capabilities declare.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()
    settings_model: ClassVar[type[DriverSettings]] = DriverSettings

    def __init__(self, server_id: str, settings: DriverSettings) -> None:
        self.server_id = server_id
        self.settings = settings

    @property
    def backend_id(self) -> str:
        """What this driver talks to; servers behind one backend share its bulkhead."""
        return f"{self.name}:{self.server_id}"

    def get_power_state(self) -> PowerState:
        """Read the server's power state live from the backend."""
        raise NotImplementedError

    def trigger_crash_dump(self) -> None:
        """Send the backend's NMI. Raises ``NMINotSupported`` unless overridden."""
        raise NMINotSupported()

    def read_guest_files(self, paths: Sequence[str]) -> dict[str, bytes | None]:
        """Read small files inside the running guest through its agent.

        A file the guest does not have reads as None. Raises
        ``GuestAgentUnavailable`` unless overridden (capability ``"guest_agent"``).
        """
        raise GuestAgentUnavailable()

    def memory_bytes(self) -> int:
        """The server's memory size: what a memory dump may need on disk."""
        raise MemoryDumpNotSupported()

    def capture_memory_dump(self, path: Path, *, destroy: bool) -> None:
        """Write the server's memory to ``path`` as a kdump-compressed (zlib) dump.

        The file may hold makedumpfile's flattened stream of that dump (QEMU
        before 8.2 writes no other), which ``makedumpfile -R`` restores.
        The server keeps running afterwards, unless ``destroy``. Blocks until
        the dump is written; on failure no file is left at ``path``.
        Raises ``MemoryDumpNotSupported`` unless overridden (capability
        ``"memory_dump"``).
        """
        raise MemoryDumpNotSupported()

    def abort_memory_dump(self) -> None:
        """Stop a ``capture_memory_dump`` in progress, from another thread."""

    def close(self) -> None:
        """Release connections; the driver is not used afterwards."""

    @classmethod
    def parse_settings(
        cls, raw: dict[str, Any], source: SettingsSource = TRUSTED
    ) -> DriverSettings:
        return cls.settings_model.model_validate(raw, context={"source": source})


def is_uuid(value: str) -> bool:
    """Whether ``value`` parses as a UUID (a domain's, a server's)."""
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
