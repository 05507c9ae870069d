"""IPMI BMCs over RMCP+ (lanplus), reached with pyghmi: chassis control 4.

``trigger_crash_dump`` sends Chassis Control (netfn 0x00, cmd 0x02) with
directive 4, "pulse diagnostic interrupt": the bytes ``ipmitool chassis power
diag`` sends, and what Ironic's ipmitool driver sends for ``inject_nmi``. It
reads Get Chassis Status first: BMC emulators answer success for a powered-off
server without sending anything, so an off server raises ``ServerPoweredOff``.

Cipher suites: negotiated, not forced
-------------------------------------
pyghmi 1.6 proposes cipher suite 17 (SHA-256) in the RMCP+ Open Session Request
and falls back to suite 3 (SHA-1) only when the BMC refuses with a non-zero
status. virtualbmc (pyghmi's own BMC server) accepts with status 0 but answers
with the suite-3 algorithms, which per IPMI 2.0 §13.17 are the ones the session
uses; pyghmi ignores them, hashes RAKP 2 with SHA-256 and dies with
``struct.error: pack expected 32 items``. ``NegotiatingSession`` reads the
algorithms the BMC chose and switches to SHA-1 before RAKP 1, so

- a BMC that accepts suite 17 keeps SHA-256 (standard BMCs are not downgraded);
- a BMC that refuses suite 17 takes pyghmi's own fallback, unchanged;
- a BMC that answers with suite-3 algorithms (virtualbmc) works.

Rejected: forcing suite 3 for every BMC (downgrades real hardware), a per-server
"suite" setting (operators must know an emulator quirk), and retrying after the
failure (it surfaces as a ``struct.error`` inside pyghmi and costs a timeout).
It is a subclass used only by this driver, not a patch of pyghmi. It relies on
private pyghmi names; tests/drivers/test_ipmi.py pins them and logs in to a real
virtualbmc, so a pyghmi upgrade that moves them fails the tests, not production.

Two more pyghmi 1.6 behaviours this driver works around:

- A failed login leaves the session in ``Session.initting_sessions`` when the
  credentials are ``str`` (the key is built from ``str``, removed with ``bytes``),
  and every later login with the same credentials gets that dead session back.
  Credentials are therefore passed as ``bytes``.
- A BMC that never answers RAKP 1 (virtualbmc, for an unknown username) makes
  pyghmi re-login forever. ``NegotiatingSession`` gives up at the caller's deadline.

Lost wakeups: pyghmi's ``_io_wait`` replaced
--------------------------------------------
A caller waiting for a BMC's answer checks its queue (``sessionqueue`` in
``_poller``, the session's reply in ``awaitresponse``), finds nothing, and calls
``_io_wait``: it queues an event in ``ioqueue``, pokes the I/O thread with a
1-byte packet and waits. The I/O thread sets a queued event only when the same
loop pass that takes it from ``ioqueue`` also received a packet (from that BMC,
for a directed wait). If the answer arrives between the caller's check and its
queuing, the I/O thread files the answer, finds ``ioqueue`` empty, then wakes
for the poke alone (skipped: shorter than 4 bytes) and parks the event until
its deadline, the session's retry timer (0.5 to 1 s, then a retransmission),
or, for an undirected wait, until some other packet comes in, although the
answer is already queued. 10-15 % of calls stalled that way.

The replacement ``_io_wait`` queues the event exactly as pyghmi's does, then
looks again: an answer that came in before the event was queued is in
``sessionqueue`` (undirected waits) or in the BMC's session's ``pktqueue``
(directed waits), and the caller returns at once; the event queued for nothing
is set later by the I/O thread and dropped. Any answer arriving after the
event was queued wakes it, as before.

Any thread in pyghmi's loop (``wait_for_rsp``, run by every login) processes
every session's packets, so an answer may be taken from ``pktqueue`` and handled
by another caller's thread while its own caller queues its event: nothing wakes
that caller until its retry timer, which for the pulse is after the deadline (a
third of the pulses at 200 BMCs ended "no answer" although the NMI arrived).
Directed waiters are therefore also registered by BMC address, and
``NegotiatingSession.process_pktqueue`` wakes them once it has handled a packet,
whichever thread ran it; a waiter also returns at once if its session already
holds the answer. Rejected: capping the wait (a busy poll that starves the
machine with hundreds of BMCs) and replacing pyghmi's I/O thread (far more
private code). tests/drivers/test_ipmi.py pins the names it relies on and
measures the stalls against real pyghmi BMCs.

One lock for pyghmi's session tables
------------------------------------
pyghmi 1.6 guards its retry table and its keepalive table with two module
locks and takes them in both orders: ``send_payload`` holds
``KEEPALIVE_SESSIONS`` and ``_xmit_packet`` then takes ``WAITING_SESSIONS``;
``awaitresponse`` and ``wait_for_rsp`` hold ``WAITING_SESSIONS`` and a due retry
(``_timedout``) then sends, taking ``KEEPALIVE_SESSIONS``. pyghmi's own model is
one thread (or greenthreads); with the service's driver threads, one thread
re-sending while another sends deadlocks both, and then every thread that
touches either table, for good: 200 BMCs at once did it in the first round (4
runs out of 4), every later call of that ``crashlab serve`` ended "no answer",
and the owners of the two locks were those two stacks. The two names are made
one ``RLock``, so no order exists to invert; the cost is contention between
two short critical sections.

Threads and time
----------------
pyghmi runs one I/O thread for all sessions; callers wait on it, so calls to
different BMCs proceed in parallel. Each call runs in its own daemon thread and
the caller waits at most ``timeout`` seconds, whatever pyghmi's own retry timers
do; a dead BMC costs only the calls made to it. Calls to one BMC are serialized
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
lock (``_Call``), so a pulse never goes out after the caller said "not sent".
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from pydantic import Field, field_validator
from pyghmi import exceptions as pyghmi_exceptions
from pyghmi.ipmi.private import constants as ipmi_constants
from pyghmi.ipmi.private import session as ipmi_session

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
from drivers.uris import check_host

T = TypeVar("T")
LOG = logging.getLogger(__name__)

NETFN_CHASSIS = 0x00
CMD_GET_CHASSIS_STATUS = 0x01
CMD_CHASSIS_CONTROL = 0x02
PULSE_DIAGNOSTIC_INTERRUPT = 0x04
# pyghmi reports its own retry timeout as this pseudo completion code.
_PYGHMI_TIMEOUT = 0xFFFF

# Open Session Response (IPMI 2.0 table 13-10): the algorithm byte of each payload.
_AUTH_ALGORITHM = 16
_INTEGRITY_ALGORITHM = 24
_OPEN_SESSION_RESPONSE_LENGTH = 36
_RAKP_HMAC_SHA1 = 1
_HMAC_SHA1_96 = 1

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


class NegotiatingSession(ipmi_session.Session):  # type: ignore[misc]
    """pyghmi's RMCP+ client session, using the cipher suite the BMC chose.

    See the module docstring. ``login_deadline`` (monotonic seconds) bounds how
    long a login (or re-login) may keep retrying; it is the calling driver's deadline.
    """

    login_deadline: float = float("inf")
    open_session_accepted: bool = False

    def login(self) -> None:
        # The first login runs in the calling driver's thread; a later one (pyghmi
        # retrying at a lower privilege) may run in any thread and keeps that call.
        call = getattr(_current_call, "value", None)
        if call is not None and "login_deadline" not in vars(self):
            call.session = self
            self.login_deadline = call.deadline
        super().login()

    def _got_rmcp_response(self, data: bytearray) -> Any:
        if self._accepted(data):
            self.open_session_accepted = True
            if self._bmc_chose_sha1(data):
                self.attemptedhash = _RAKP_HMAC_SHA1
                self.currhashlib = hashlib.sha1
                self.currhashlen = 12  # HMAC-SHA1-96
        return super()._got_rmcp_response(data)

    def _accepted(self, data: bytearray) -> bool:
        return len(data) >= 2 and data[0] == self.rmcptag and data[1] == 0

    def _bmc_chose_sha1(self, data: bytearray) -> bool:
        return (
            len(data) >= _OPEN_SESSION_RESPONSE_LENGTH
            and data[_AUTH_ALGORITHM] == _RAKP_HMAC_SHA1
            and data[_INTEGRITY_ALGORITHM] == _HMAC_SHA1_96
        )

    def process_pktqueue(self) -> None:
        # Any thread in pyghmi's loop may process this session's answer; its
        # caller must wake then, not at its retry timer or deadline.
        super().process_pktqueue()
        _wake_answer_waiters(self.sockaddr)

    def _relog(self) -> Any:
        if time.monotonic() > self.login_deadline:
            self.onlogon({"error": "login did not complete before the deadline"})
            return None
        return super()._relog()


def _io_wait(timeout: float, myaddr: Any = None, evq: Any = None) -> None:
    """pyghmi's ``_io_wait``, looking again for the answer once its waiter is queued.

    See "Lost wakeups" in the module docstring.
    """
    wakeup = threading.Event()
    if evq is not None:
        evq.append(wakeup)
    deadline = ipmi_session._monotonic_time() + timeout
    if myaddr is not None:
        _answer_waiters.setdefault(myaddr, set()).add(wakeup)
    ipmi_session.ioqueue.append((deadline, wakeup, myaddr))
    try:
        if _answer_arrived(myaddr):
            return  # the I/O thread sets the queued event later; nobody waits on it
        if deadline < ipmi_session.selectdeadline:
            poke = ipmi_session.iosockets[0]
            poke.sendto(b"\x01", (ipmi_session.myself, poke.getsockname()[1]))
        wakeup.wait()
    finally:
        if myaddr is not None:
            _answer_waiters.get(myaddr, set()).discard(wakeup)


# Callers waiting for an answer from a BMC (its address), woken once any thread
# has processed a packet from it (NegotiatingSession.process_pktqueue).
_answer_waiters: dict[Any, set[threading.Event]] = {}


def _wake_answer_waiters(bmc: Any) -> None:
    for wakeup in list(_answer_waiters.get(bmc, ())):
        wakeup.set()


def _answer_arrived(bmc: Any) -> bool:
    """Whether a packet is queued for any session (``bmc`` None), or one from ``bmc`` is
    queued or already answered its caller's command."""
    if bmc is None:
        return bool(ipmi_session.sessionqueue)
    sessions = list(ipmi_session.Session.bmc_handlers.get(bmc, {}).values())
    return any(
        s.pktqueue or (getattr(s, "awaitingresponse", False) and s.lastresponse is not None)
        for s in sessions
    )


ipmi_session._io_wait = _io_wait
ipmi_session.KEEPALIVE_SESSIONS = ipmi_session.WAITING_SESSIONS


class _Call:
    """One driver call running in its own thread, with a deadline.

    ``phases`` records when each step began (seconds into the call), so a call
    that gives up logs where it was.
    """

    def __init__(self, timeout: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.session: NegotiatingSession | None = None
        self.phases: list[tuple[str, float]] = []
        # Guards the hand-off below: the caller gives up, or the pulse goes out.
        self._lock = threading.Lock()
        self.abandoned = False
        # Only the pulse's re-send is withdrawn: clearing a login's payload
        # would leave its session logging forever, handed to every later call.
        self.pulse_sent = False

    def enter(self, phase: str) -> None:
        self.phases.append((phase, round(time.monotonic() - self.started, 3)))

    def give_up_if_abandoned(self) -> None:
        """Stop a call its caller no longer waits for: it must not act late."""
        if self.abandoned or time.monotonic() > self.deadline:
            raise BackendUnreachable("the caller stopped waiting", nmi_not_sent=True)

    def start_pulse(self) -> None:
        """Mark the pulse as sent, unless the caller already gave up."""
        with self._lock:
            self.give_up_if_abandoned()
            self.pulse_sent = True

    def abandon(self) -> bool:
        """The caller stops waiting; returns whether the pulse may have gone out."""
        with self._lock:
            self.abandoned = True
            return self.pulse_sent


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

    pyghmi's retry timer re-sends ``lastpayload``, if any (``Session._timedout``),
    and a re-login re-sends ``onlogpayload``. Once a logged-in session has
    neither and its timer is due, its waiting thread stops, logs out and frees
    the BMC's lock. A session still logging in keeps its payload (its login
    ends at the call's deadline: ``NegotiatingSession._relog``).
    """
    if session is None or not (pulse_sent or (session.logged and not session.logging)):
        return
    session.lastpayload = None
    session.onlogpayload = None
    session.expiration = ipmi_session._monotonic_time()
    _wake_answer_waiters(session.sockaddr)


def _session_state(session: NegotiatingSession | None) -> dict[str, Any]:
    """What a call's pyghmi session was doing, for the log line of a call that gave up."""
    if session is None:
        return {}
    now = ipmi_session._monotonic_time()
    return {
        "context": session.sessioncontext,
        "logged": bool(session.logged),
        "logging": session.logging,
        "broken": session.broken,
        "seqlun": session.seqlun,
        "sequence": session.sequencenumber,
        "awaiting": session.awaitingresponse,
        "answered": session.lastresponse is not None,
        "resend_pending": session.lastpayload is not None,
        "retry_in": round(getattr(session, "expiration", now) - now, 2),
        "queued": len(session.pktqueue),
    }


_current_call = threading.local()
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
        self.bmc = f"{self.settings.address}:{self.settings.port}"

    @property
    def backend_id(self) -> str:
        return f"ipmi:{self.bmc}"

    def get_power_state(self) -> PowerState:
        on = self._call(self._chassis_power_on, "reading the power state")
        return PowerState.RUNNING if on else PowerState.SHUTDOWN

    def trigger_crash_dump(self) -> None:
        self._call(self._pulse_diag, "sending the diagnostic interrupt")

    def _pulse_diag(self, session: NegotiatingSession) -> None:
        if not self._chassis_power_on(session):
            raise ServerPoweredOff("server is powered off")
        call: _Call = _current_call.value
        call.enter("pulse")
        call.start_pulse()
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

    def _chassis_power_on(self, session: NegotiatingSession) -> bool:
        _current_call.value.enter("chassis status")
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

    def _call(self, operation: Callable[[NegotiatingSession], T], doing: str) -> T:
        """Run ``operation`` on a fresh session, giving up after ``timeout`` seconds."""
        call = _Call(self.settings.timeout)
        outcome: list[tuple[bool, Any]] = []
        done = threading.Event()

        def run() -> None:
            _current_call.value = call
            try:
                outcome.append((True, self._with_session(operation)))
            except BaseException as exc:  # handed to the waiting caller
                outcome.append((False, exc))
            finally:
                done.set()

        threading.Thread(target=run, name=f"ipmi {self.bmc}", daemon=True).start()
        if not done.wait(self.settings.timeout):
            pulse_sent = call.abandon()
            # Read the session before _release lets its thread log it out: a logged-out
            # session would read as a login that never completed.
            error = self._timed_out(call, doing, nmi_not_sent=not pulse_sent)
            state = _session_state(call.session)
            _release(call.session, pulse_sent)
            LOG.warning(
                "IPMI call to BMC at %s gave up after %gs (%s): steps %s, session %s",
                self.bmc,
                self.settings.timeout,
                doing,
                call.phases,
                state,
            )
            raise error
        ok, value = outcome[0]
        if ok:
            return value  # type: ignore[no-any-return]
        if isinstance(value, DriverError) and not call.pulse_sent:
            value.nmi_not_sent = True
        raise value

    def _with_session(self, operation: Callable[[NegotiatingSession], T]) -> T:
        call: _Call = _current_call.value
        call.enter("waiting for the BMC's lock")
        with _bmc_lock(self.settings.address, self.settings.port):
            call.give_up_if_abandoned()
            call.enter("login")
            session = self._login()
            call.session = session
            try:
                return operation(session)
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

    def _timed_out(self, call: _Call, doing: str, *, nmi_not_sent: bool) -> DriverError:
        t = self.settings.timeout
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
