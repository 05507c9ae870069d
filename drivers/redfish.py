"""Redfish BMCs, reached with sushy: ``ComputerSystem.Reset`` with ``ResetType=Nmi``.

This is what Ironic's redfish management interface sends for ``inject_nmi``.
Before sending, the driver reads the ComputerSystem once and checks two things:

- **Nmi is allowed.** A BMC publishes the reset types it accepts in
  ``ResetType@Redfish.AllowableValues`` or in an ``@Redfish.ActionInfo``
  resource. A published list without ``Nmi`` raises ``NMINotSupported``. A BMC
  that publishes neither leaves it unknown; sushy then reports *every* type as
  allowed, and the driver sends the reset and lets the BMC decide, as Ironic does.
- **The server is on.** BMC emulators answer 204 for a powered-off system
  without sending anything, so ``PowerState: Off`` raises ``ServerPoweredOff``.

Authentication is HTTP basic auth; TLS is verified (against ``ca_bundle`` if
given) unless ``verify_tls`` is false. Each call runs with a deadline
(drivers/deadline.py): the caller waits at most ``timeout`` seconds, whatever
sushy's retries do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import requests
import sushy
from pydantic import Field, field_validator
from sushy import auth as sushy_auth
from sushy import exceptions as sushy_exceptions

from drivers.base import (
    BackendAuthFailed,
    BackendError,
    BackendRejected,
    BackendUnreachable,
    Driver,
    DriverError,
    DriverSettings,
    NMINotSupported,
    PowerState,
    ServerNotFound,
    ServerPoweredOff,
)
from drivers.deadline import Call, DeadlineExceeded
from drivers.uris import REDFISH_ROOT_PATHS, check_http_url

T = TypeVar("T")

RESET_ACTION = "#ComputerSystem.Reset"
NMI = sushy.RESET_NMI.value  # "Nmi"
_PUBLISHED_VALUES = ("ResetType@Redfish.AllowableValues", "@Redfish.ActionInfo")

_POWER = {
    sushy.PowerState.ON: PowerState.RUNNING,
    sushy.PowerState.POWERING_ON: PowerState.RUNNING,
    sushy.PowerState.OFF: PowerState.SHUTDOWN,
    sushy.PowerState.POWERING_OFF: PowerState.SHUTDOWN,
    sushy.PowerState.PAUSED: PowerState.PAUSED,
}


class RedfishSettings(DriverSettings):
    """How to reach one server's Redfish service."""

    address: str = Field(
        description="BMC URL, e.g. https://10.0.0.5 (optionally ending /redfish/v1)"
    )
    system_id: str | None = Field(
        None,
        description="ComputerSystem id or path; optional when the BMC lists exactly one system",
    )
    username: str = Field(max_length=255)
    password: str = Field(max_length=255)
    verify_tls: bool = True
    ca_bundle: str | None = Field(
        None, description="CA certificate file to verify the BMC with, instead of the system's"
    )
    timeout: float = Field(10.0, gt=0, le=60, description="seconds to wait for the BMC")

    secret_fields: ClassVar[frozenset[str]] = frozenset({"password"})
    config_only_fields: ClassVar[frozenset[str]] = frozenset({"ca_bundle"})

    @field_validator("address")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return check_http_url(value, paths=REDFISH_ROOT_PATHS)


class RedfishDriver(Driver):
    """A bare-metal server behind a Redfish BMC, as Ironic's ``redfish`` hardware type."""

    name: ClassVar[str] = "redfish"
    description: ClassVar[str] = "Redfish BMC (sushy): ComputerSystem.Reset Nmi"
    capabilities: ClassVar[frozenset[str]] = frozenset({"nmi", "power_state"})
    settings_model: ClassVar[type[DriverSettings]] = RedfishSettings

    settings: RedfishSettings

    @property
    def backend_id(self) -> str:
        return f"redfish:{self.settings.address}"

    def get_power_state(self) -> PowerState:
        return self._call(lambda call: self._power_state(self._system()), "reading the power state")

    def trigger_crash_dump(self) -> None:
        self._call(self._reset_nmi, "sending ComputerSystem.Reset (Nmi)")

    def _reset_nmi(self, call: Call) -> None:
        system = self._system()
        self._check_nmi_allowed(system)
        if self._power_state(system) == PowerState.SHUTDOWN:
            raise ServerPoweredOff("server is powered off")
        call.start_action()  # a call its caller no longer waits for must not reset late
        system.reset_system(sushy.RESET_NMI)

    def _check_nmi_allowed(self, system: Any) -> None:
        action = ((system.json or {}).get("Actions") or {}).get(RESET_ACTION)
        if action is None:
            raise NMINotSupported(
                f"Redfish system {system.path} has no ComputerSystem.Reset action"
            )
        if not any(action.get(key) for key in _PUBLISHED_VALUES):
            return  # nothing published: unknown, so try and let the BMC answer
        allowed = sorted(value.value for value in system.get_allowed_reset_system_values())
        if NMI not in allowed:
            raise NMINotSupported(
                f"Redfish system {system.path} does not accept ResetType Nmi "
                f"(allowed: {', '.join(allowed) or 'none'})"
            )

    def _power_state(self, system: Any) -> PowerState:
        return _POWER.get(system.power_state, PowerState.NOSTATE)

    def _system(self) -> Any:
        root = self._root()
        system_id = self.settings.system_id
        if system_id is None:
            return root.get_system()
        if not system_id.startswith("/"):
            collection = (
                (root.json or {}).get("Systems", {}).get("@odata.id", "/redfish/v1/Systems")
            )
            system_id = f"{collection.rstrip('/')}/{system_id}"
        return root.get_system(system_id)

    def _root(self) -> Any:
        s = self.settings
        return sushy.Sushy(
            f"{s.address}/redfish/v1/",
            auth=sushy_auth.BasicAuth(username=s.username, password=s.password),
            verify=(s.ca_bundle or True) if s.verify_tls else False,
            read_timeout=s.timeout,
            connect_timeout=s.timeout,
            server_side_retries=1,
            server_side_retries_delay=0.5,
        )

    def _call(self, operation: Callable[[Call], T], doing: str) -> T:
        """Run ``operation`` in its own thread; give up after ``timeout`` seconds."""
        call = Call(self.settings.timeout, doing)
        try:
            return call.run(
                lambda: self._translate_errors(operation, call),
                f"redfish {self.settings.address}",
            )
        except DeadlineExceeded:
            raise self._no_answer(doing) from None

    def _translate_errors(self, operation: Callable[[Call], T], call: Call) -> T:
        try:
            return operation(call)
        except DriverError:
            raise
        except sushy_exceptions.SushyError as exc:
            raise self._error(exc, call.doing) from None
        except requests.RequestException as exc:
            raise BackendUnreachable(
                f"cannot reach BMC at {self.settings.address}: {_reason(exc)}"
            ) from None
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            # sushy reads a resource's fields as it uses them: a malformed one fails there.
            raise BackendError(
                f"BMC at {self.settings.address} sent a malformed Redfish resource: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    def _no_answer(self, doing: str) -> BackendUnreachable:
        return BackendUnreachable(
            f"no answer from BMC at {self.settings.address} "
            f"within {self.settings.timeout:g}s ({doing})"
        )

    def _error(self, exc: sushy_exceptions.SushyError, doing: str) -> DriverError:
        url = self.settings.address
        if isinstance(exc, sushy_exceptions.ConnectionError):
            cause = exc.__context__
            if isinstance(cause, requests.exceptions.SSLError):
                return BackendError(f"TLS with BMC at {url} failed: {_reason(cause)}")
            if isinstance(cause, requests.exceptions.Timeout):
                # sushy's read timeout and the caller's deadline are the same wait.
                return self._no_answer(doing)
            return BackendUnreachable(f"cannot reach BMC at {url}: {_reason(cause or exc)}")
        if isinstance(exc, sushy_exceptions.AccessError):
            return BackendAuthFailed(
                f"BMC at {url} rejected the credentials of user {self.settings.username!r} "
                f"(HTTP {exc.status_code})"
            )
        if isinstance(exc, sushy_exceptions.ResourceNotFoundError):
            if self.settings.system_id:
                return ServerNotFound(f"BMC at {url} has no system {self.settings.system_id!r}")
            return ServerNotFound(f"BMC at {url} has no Redfish resource {exc.message}")
        if isinstance(exc, sushy_exceptions.UnknownDefaultError):
            return ServerNotFound(
                f"BMC at {url} does not list exactly one system; set system_id to choose one"
            )
        if isinstance(exc, sushy_exceptions.HTTPError):
            return BackendRejected(
                f"BMC at {url} answered HTTP {exc.status_code}: {exc.detail or exc.code}"
            )
        if isinstance(exc, sushy_exceptions.MissingActionError):
            return NMINotSupported(f"BMC at {url}: {exc}")
        return BackendError(f"Redfish exchange with BMC at {url} failed: {exc}")


def _reason(exc: BaseException) -> str:
    """The useful words in a requests/urllib3 error, without the wrapping reprs."""
    text = str(exc)
    for pattern in _REASONS:
        match = re.search(pattern, text)
        if match:
            return match.group(1).strip()
    return text[:300]


_REASONS = (
    r"\[SSL[^\]]*\] ([^(]+)",  # certificate verify failed: self-signed certificate
    r"Failed to establish a new connection: ([^'\"]+)",  # [Errno 111] Connection refused
    r"(Read timed out)",
    r"(Connection to \S+ timed out)",
    r"(Connection aborted)",
    r"(Remote end closed connection without response)",
)
