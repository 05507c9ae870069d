"""IPMI BMCs over RMCP+ (lanplus), reached with pyghmi: chassis control 4.

``trigger_crash_dump`` sends Chassis Control (netfn 0x00, cmd 0x02) with
directive 4, "pulse diagnostic interrupt": the bytes ``ipmitool chassis power
diag`` sends, and what Ironic's ipmitool driver sends for ``inject_nmi``. It
reads Get Chassis Status first: BMC emulators answer success for a powered-off
server without sending anything, so an off server raises ``ServerPoweredOff``.

pyghmi's workarounds
--------------------
pyghmi 1.6 cannot log in to virtualbmc, loses wakeups, and deadlocks its own
session tables under many threads. drivers/pyghmi_patches.py repairs each and
says how: this driver logs in with its ``NegotiatingSession``, passes the
credentials as ``bytes``, and installs the rest (``pyghmi_patches.install``)
when an ``IPMIDriver`` is created.

Threads and time
----------------
pyghmi runs one I/O thread for all sessions; callers wait on it, so calls to
different BMCs proceed in parallel. Each call runs with a deadline
(drivers/deadline.py): the caller waits at most ``timeout`` seconds, whatever
pyghmi's own retry timers do. Calls to one BMC are serialized
(pyghmi allows one command in flight per session), and each call logs in and
out, so no session outlives it and a restarted BMC needs nothing special. A
call its caller abandoned is released at once (``_release``): its logged-in
session loses its payload and its timer, so its thread logs out and the next
call to that BMC logs in afresh instead of waiting for pyghmi's timers. A call
that gives up logs its steps (when each began) and its session's state.

Errors and the NMI
------------------
Every error raised before the pulse went out (login, the status read, the
wait for the BMC's lock) says ``nmi_not_sent``, so the storm guard does not
hold the server. Only a pulse whose answer did not come back may have sent
the NMI. The caller's giving up and the pulse's start are decided under one
lock (drivers/deadline.py ``Call.start_action``), so a pulse never goes out
after the caller said "not sent".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from pydantic import Field, field_validator
from pyghmi import exceptions as pyghmi_exceptions
from pyghmi.ipmi.private import constants as ipmi_constants

from drivers import pyghmi_patches
from drivers.base import (
    BackendAuthFailed,
    BackendError,
    BackendRejected,
    BackendUnreachable,
    Driver,
    DriverError,
    DriverSettings,
    PowerState,
    ServerPoweredOff,
)
from drivers.deadline import Call, DeadlineExceeded
from drivers.pyghmi_patches import NegotiatingSession
from drivers.uris import check_host

T = TypeVar("T")
LOG = logging.getLogger(__name__)

NETFN_CHASSIS = 0x00
CMD_GET_CHASSIS_STATUS = 0x01
CMD_CHASSIS_CONTROL = 0x02
PULSE_DIAGNOSTIC_INTERRUPT = 0x04
# pyghmi reports its own retry timeout as this pseudo completion code.
_PYGHMI_TIMEOUT = 0xFFFF

# Login errors (pyghmi's words) that mean the BMC refused these credentials.
_AUTH_ERRORS = (
    "Incorrect password",
    "Unauthorized name",
    "Invalid role",
    "Unauthorized role",
    "privilege",
    "Invalid user name",
)


class IPMISettings(DriverSettings):
    """How to reach one server's BMC."""

    address: str = Field(min_length=1, description="BMC host: a DNS name or an IP address")
    port: int = Field(623, ge=1, le=65535)
    username: str = Field(max_length=16)  # IPMI 2.0 user names are 16 bytes at most
    password: str = Field(max_length=20)  # RAKP passwords are 20 bytes at most
    timeout: float = Field(10.0, gt=0, le=60, description="seconds to wait for the BMC")

    secret_fields: ClassVar[frozenset[str]] = frozenset({"password"})

    @field_validator("address")
    @classmethod
    def _host(cls, value: str) -> str:
        return check_host(value)


class IPMICall(Call):
    """One IPMI driver call; ``session`` is its pyghmi session once one exists."""

    def __init__(self, timeout: float, doing: str) -> None:
        super().__init__(timeout, doing)
        self.session: NegotiatingSession | None = None


# How a call's step reads in an error: where a call that gave up before the pulse stopped.
_STEP_TEXT = {
    "waiting for the BMC's lock": "waiting for an earlier call to this BMC",
    "login": "the login",
    "chassis status": "the power status read",
}

# When pyghmi may re-send the pulse: this long after the caller's deadline.
_RESEND_AFTER_DEADLINE = 1.0


def _release(session: NegotiatingSession | None, pulse_sent: bool) -> None:
    """Let a call its caller abandoned end now, so the next call gets the BMC.

    A logged-in session, or one whose pulse went out, stops retrying
    (``NegotiatingSession.stop_retrying``): its waiting thread logs out and frees
    the BMC's lock. A session still logging in keeps its payload (its login
    ends at the call's deadline: ``NegotiatingSession._relog``).
    """
    if session is None or not (pulse_sent or (session.logged and not session.logging)):
        return
    session.stop_retrying()


_bmc_locks: dict[tuple[str, int], threading.Lock] = {}
_bmc_locks_guard = threading.Lock()


def _bmc_lock(address: str, port: int) -> threading.Lock:
    with _bmc_locks_guard:
        return _bmc_locks.setdefault((address, port), threading.Lock())


class IPMIDriver(Driver):
    """A bare-metal server behind an IPMI BMC (lanplus), as Ironic's ``ipmi`` hardware type."""

    name: ClassVar[str] = "ipmi"
    description: ClassVar[str] = "IPMI BMC (lanplus, pyghmi): chassis control pulse diag"
    capabilities: ClassVar[frozenset[str]] = frozenset({"nmi", "power_state"})
    settings_model: ClassVar[type[DriverSettings]] = IPMISettings

    settings: IPMISettings

    def __init__(self, server_id: str, settings: DriverSettings) -> None:
        super().__init__(server_id, settings)
        pyghmi_patches.install()
        self.bmc = f"{self.settings.address}:{self.settings.port}"

    @property
    def backend_id(self) -> str:
        return f"ipmi:{self.bmc}"

    def get_power_state(self) -> PowerState:
        on = self._call(self._chassis_power_on, "reading the power state")
        return PowerState.RUNNING if on else PowerState.SHUTDOWN

    def trigger_crash_dump(self) -> None:
        self._call(self._pulse_diag, "sending the diagnostic interrupt")

    def _pulse_diag(self, call: IPMICall, session: NegotiatingSession) -> None:
        if not self._chassis_power_on(call, session):
            raise ServerPoweredOff("server is powered off")
        call.enter("pulse")
        call.start_action()
        # Sent once. pyghmi re-sends a command still unanswered after 0.5-1 s,
        # and a BMC that executes both pulses twice: a second NMI can interrupt
        # the kdump the first one started. The only re-send is now due after the
        # caller's deadline, and an abandoned call withdraws it (_release).
        response = session.raw_command(
            netfn=NETFN_CHASSIS,
            command=CMD_CHASSIS_CONTROL,
            data=[PULSE_DIAGNOSTIC_INTERRUPT],
            timeout=max(call.deadline - time.monotonic(), 0) + _RESEND_AFTER_DEADLINE,
        )
        self._check(response, "chassis control (pulse diagnostic interrupt)")

    def _chassis_power_on(self, call: IPMICall, session: NegotiatingSession) -> bool:
        call.enter("chassis status")
        response = session.raw_command(netfn=NETFN_CHASSIS, command=CMD_GET_CHASSIS_STATUS)
        self._check(response, "get chassis status")
        if not response.get("data"):
            raise BackendRejected(f"BMC at {self.bmc} sent an empty chassis status")
        return bool(response["data"][0] & 0x01)

    def _check(self, response: dict[str, Any], command: str) -> None:
        code = response.get("code", 0)
        if code == 0:
            return
        if code == _PYGHMI_TIMEOUT:
            raise BackendUnreachable(f"BMC at {self.bmc} stopped answering during {command}")
        meaning = ipmi_constants.ipmi_completion_codes.get(code, "unknown completion code")
        raise BackendRejected(
            f"BMC at {self.bmc} rejected {command}: completion code {code:#04x} ({meaning})"
        )

    def _call(self, operation: Callable[[IPMICall, NegotiatingSession], T], doing: str) -> T:
        """Run ``operation`` on a fresh session, giving up after ``timeout`` seconds."""
        call = IPMICall(self.settings.timeout, doing)
        try:
            return call.run(lambda: self._with_session(call, operation), f"ipmi {self.bmc}")
        except DeadlineExceeded as exceeded:
            # Read the session before _release lets its thread log it out: a logged-out
            # session would read as a login that never completed.
            error = self._timed_out(call, nmi_not_sent=not exceeded.action_started)
            state = call.session.state() if call.session is not None else {}
            _release(call.session, exceeded.action_started)
            LOG.warning(
                "IPMI call to BMC at %s gave up after %gs (%s): steps %s, session %s",
                self.bmc,
                self.settings.timeout,
                doing,
                call.phases,
                state,
            )
            raise error from None
        except DriverError as error:
            if not call.action_started:
                error.nmi_not_sent = True
            raise

    def _with_session(
        self, call: IPMICall, operation: Callable[[IPMICall, NegotiatingSession], T]
    ) -> T:
        call.enter("waiting for the BMC's lock")
        with _bmc_lock(self.settings.address, self.settings.port):
            call.give_up_if_abandoned()
            call.enter("login")
            pyghmi_patches.own_sessions(call)
            session = self._login()
            call.session = session
            try:
                return operation(call, session)
            except DriverError:
                raise
            except pyghmi_exceptions.IpmiException as exc:
                raise BackendUnreachable(
                    f"lost the session with BMC at {self.bmc}: {exc}"
                ) from None
            except Exception as exc:
                raise BackendError(
                    f"IPMI exchange with BMC at {self.bmc} failed: {type(exc).__name__}: {exc}"
                ) from None
            finally:
                if session.logged:
                    session.logout()

    def _login(self) -> NegotiatingSession:
        s = self.settings
        try:
            return NegotiatingSession(
                bmc=s.address,
                userid=s.username.encode(),
                password=s.password.encode(),
                port=s.port,
                keepalive=False,
            )
        except pyghmi_exceptions.IpmiException as exc:
            raise self._login_failed(str(exc) if exc.args and exc.args[0] else "") from None
        except OSError as exc:
            raise BackendUnreachable(f"cannot reach BMC at {self.bmc}: {exc}") from None
        except Exception as exc:
            raise BackendError(
                f"IPMI login to BMC at {self.bmc} failed: {type(exc).__name__}: {exc}"
            ) from None

    def _login_failed(self, reason: str) -> DriverError:
        if any(marker in reason for marker in _AUTH_ERRORS):
            return BackendAuthFailed(
                f"BMC at {self.bmc} rejected the credentials of user "
                f"{self.settings.username!r}: {reason}"
            )
        if reason and "deadline" not in reason:
            return BackendError(f"IPMI login to BMC at {self.bmc} failed: {reason}")
        return BackendUnreachable(f"no answer from BMC at {self.bmc} during login")

    def _timed_out(self, call: IPMICall, *, nmi_not_sent: bool) -> DriverError:
        t, doing = self.settings.timeout, call.doing
        session = call.session
        step = call.phases[-1][0] if call.phases else "pulse"
        if (
            step == "login"
            and session is not None
            and session.open_session_accepted
            and not session.logged
        ):
            # The BMC answers but never finishes the login: virtualbmc does this
            # for a user name it does not know (real BMCs answer "Unauthorized name").
            return BackendAuthFailed(
                f"BMC at {self.bmc} did not complete the login of user "
                f"{self.settings.username!r} within {t:g}s; the user name is probably unknown"
            )
        where = (
            doing if step == "pulse" else f"{doing}; stopped at {_STEP_TEXT[step]}, nothing sent"
        )
        return BackendUnreachable(
            f"no answer from BMC at {self.bmc} within {t:g}s ({where})", nmi_not_sent=nmi_not_sent
        )
