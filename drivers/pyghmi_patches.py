"""pyghmi's workarounds, all of them: installed by ``install()``, never by an import.

The IPMI driver (drivers/ipmi.py) calls ``install()`` before its first session;
it is idempotent. It checks the installed pyghmi against ``VERIFIED_VERSIONS``
and logs a warning on any other: everything here relies on private pyghmi names,
which tests/drivers/test_ipmi.py pins and exercises against real BMCs, so run
those tests before trusting another version. pyproject.toml bounds pyghmi below
the next minor version for the same reason.

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
It is a subclass used only by the IPMI driver, not a patch of pyghmi;
tests/drivers/test_ipmi.py logs it in to a real virtualbmc.

Two more pyghmi 1.6 behaviours the IPMI driver works around:

- A failed login leaves the session in ``Session.initting_sessions`` when the
  credentials are ``str`` (the key is built from ``str``, removed with ``bytes``),
  and every later login with the same credentials gets that dead session back.
  Credentials are therefore passed as ``bytes``.
- A BMC that never answers RAKP 1 (virtualbmc, for an unknown username) makes
  pyghmi re-login forever. ``NegotiatingSession`` gives up at the caller's deadline.

A re-login's session id and tag: carried forward
-------------------------------------------------
A retry timer that fires during RAKP (a slow BMC, or a busy machine) makes pyghmi
log in again (``_relog``), and ``_initsession`` restarts the console's session id
and the RMCP+ message tag, the two values pyghmi checks to reject stale answers.
A late RAKP 2 of the first attempt then matches the second attempt, fails its
hash, and the login ends "Incorrect password provided" with the right password:
1 of 600 calls with 200 BMCs at once. ``NegotiatingSession._initsession`` keeps
both going forward across attempts (the tag wraps below 256).

A failed login's message: recorded before the login ends
--------------------------------------------------------
``Session._mark_broken`` sets ``logging = False`` and only then ``errormsg``.
Any thread in pyghmi's loop may process a session's answers (see below), so
the thread that ran the failing login's RAKP can be another caller's, and the
login's own thread, waiting for ``logging`` to clear, wakes between the two and
raises ``IpmiException(self.errormsg)`` on a session that has none:
``AttributeError: 'NegotiatingSession' object has no attribute 'errormsg'``
instead of "Incorrect password provided". It took a wrong password and a dead
BMC's login in flight at the same time: 9 of 60 wrong-password logins, with two
dead-BMC logins running beside them. ``NegotiatingSession._mark_broken``
records the message first; tests/drivers/test_ipmi.py runs that mix.

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
holds the answer.

A login has the same race. pyghmi's constructor loops ``while self.logging:
wait_for_rsp()``, an undirected wait, and the thread that runs the login's last
answer ends it (``logging = False``, in ``_req_priv_level``). When that thread
is another caller's, nothing wakes the constructor's thread until some packet
comes in or its timeout ends, and after a login that timeout is the keepalive's,
about 25 s: one serial read waited out its whole 10 s deadline, with the session
logged in. ``NegotiatingSession`` marks its constructor's thread, whose waits
register under the session; ``onlogon`` and ``_mark_broken`` wake them, and a
wait that starts once the login has ended returns at once.

Rejected: capping the wait (a busy poll that starves the machine with hundreds
of BMCs) and replacing pyghmi's I/O thread (far more private code).
tests/drivers/test_ipmi.py pins the names it relies on and measures the stalls
against real pyghmi BMCs.

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
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import threading
import time
from typing import Any, Protocol

from pyghmi.ipmi.private import session as ipmi_session

LOG = logging.getLogger(__name__)

# The pyghmi versions these workarounds were verified against (tests/drivers/test_ipmi.py).
VERIFIED_VERSIONS = frozenset({"1.6.19"})

# Open Session Response (IPMI 2.0 table 13-10): the algorithm byte of each payload.
_AUTH_ALGORITHM = 16
_INTEGRITY_ALGORITHM = 24
_OPEN_SESSION_RESPONSE_LENGTH = 36
_RAKP_HMAC_SHA1 = 1
_HMAC_SHA1_96 = 1

# The RMCP+ message tag wraps below 256, leaving room for an attempt's increments.
_TAG_WRAP = 200

_install_lock = threading.Lock()
_installed = False


def install() -> None:
    """Put pyghmi's workarounds in place, once; the IPMI driver calls it before its sessions."""
    global _installed
    with _install_lock:
        if _installed:
            return
        check_version(importlib.metadata.version("pyghmi"))
        ipmi_session._io_wait = _io_wait
        ipmi_session.KEEPALIVE_SESSIONS = ipmi_session.WAITING_SESSIONS
        _installed = True


def check_version(version: str) -> bool:
    """Whether ``version`` of pyghmi is one these workarounds were verified against;
    logs a warning when it is not."""
    if version in VERIFIED_VERSIONS:
        return True
    LOG.warning(
        "pyghmi %s is installed; crashlab's IPMI workarounds (drivers/pyghmi_patches.py) "
        "were verified against pyghmi %s only: run tests/drivers/test_ipmi.py before relying "
        "on it",
        version,
        ", ".join(sorted(VERIFIED_VERSIONS)),
    )
    return False


class SessionOwner(Protocol):
    """What a session logs in for: the owner's deadline ends the login's retries, and the
    owner is told the session as soon as it exists (its constructor logs in)."""

    deadline: float
    session: NegotiatingSession | None


_session_owner = threading.local()


def own_sessions(owner: SessionOwner) -> None:
    """Sessions this thread creates from now on log in for ``owner``."""
    _session_owner.value = owner


class NegotiatingSession(ipmi_session.Session):  # type: ignore[misc]
    """pyghmi's RMCP+ client session, using the cipher suite the BMC chose.

    See the module docstring. ``login_deadline`` (monotonic seconds) bounds how
    long a login (or re-login) may keep retrying; it is its owner's deadline
    (``own_sessions``).
    """

    login_deadline: float = float("inf")
    open_session_accepted: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # pyghmi's constructor waits in its loop until the login ends (see _io_wait).
        _constructing.session = self
        try:
            super().__init__(*args, **kwargs)
        finally:
            _constructing.session = None

    def login(self) -> None:
        # The first login runs in the calling driver's thread; a later one (pyghmi
        # retrying at a lower privilege) may run in any thread and keeps that owner.
        owner: SessionOwner | None = getattr(_session_owner, "value", None)
        if owner is not None and "login_deadline" not in vars(self):
            owner.session = self
            self.login_deadline = owner.deadline
        super().login()

    def _initsession(self) -> None:
        # pyghmi restarts the console's session id and message tag at every login
        # attempt; carried forward, a late answer to an earlier attempt is told apart.
        attempts = vars(self)
        earlier: tuple[int, int] | None = (
            (attempts["localsid"], attempts["rmcptag"]) if "localsid" in attempts else None
        )
        super()._initsession()
        if earlier is not None:
            self.localsid = earlier[0]
            # One byte on the wire, and an attempt adds a few to it before the next.
            self.rmcptag = earlier[1] % _TAG_WRAP

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

    def onlogon(self, parameter: dict[str, Any]) -> None:
        # Whichever thread ends the login (it ran the last answer), its owner waits in
        # pyghmi's login loop and must wake now, not at the next packet or timer.
        super().onlogon(parameter)
        _wake(_login_waiters, self)

    def process_pktqueue(self) -> None:
        # Any thread in pyghmi's loop may process this session's answer; its
        # caller must wake then, not at its retry timer or deadline.
        super().process_pktqueue()
        _wake(_answer_waiters, self.sockaddr)

    def _mark_broken(self, error: Any = None) -> None:
        # pyghmi ends the login (``logging = False``) before it records why
        # (``errormsg``); a login waiting in another thread can wake in between
        # and read a message that is not there yet. Recorded first.
        self.errormsg = error
        super()._mark_broken(error)
        _wake(_login_waiters, self)

    def _relog(self) -> Any:
        if time.monotonic() > self.login_deadline:
            self.onlogon({"error": "login did not complete before the deadline"})
            return None
        return super()._relog()

    def stop_retrying(self) -> None:
        """Drop what pyghmi would re-send and make its retry timer due now.

        pyghmi's retry timer re-sends ``lastpayload``, if any (``Session._timedout``),
        and a re-login re-sends ``onlogpayload``. Once a logged-in session has
        neither and its timer is due, its waiting thread stops and logs out.
        """
        self.lastpayload = None
        self.onlogpayload = None
        self.expiration = ipmi_session._monotonic_time()
        _wake(_answer_waiters, self.sockaddr)

    def state(self) -> dict[str, Any]:
        """What the session is doing, in pyghmi's terms, for a log line."""
        now = ipmi_session._monotonic_time()
        return {
            "context": self.sessioncontext,
            "logged": bool(self.logged),
            "logging": self.logging,
            "broken": self.broken,
            "seqlun": self.seqlun,
            "sequence": self.sequencenumber,
            "awaiting": self.awaitingresponse,
            "answered": self.lastresponse is not None,
            "resend_pending": self.lastpayload is not None,
            "retry_in": round(getattr(self, "expiration", now) - now, 2),
            "queued": len(self.pktqueue),
        }


def _io_wait(timeout: float, myaddr: Any = None, evq: Any = None) -> None:
    """pyghmi's ``_io_wait``, looking again for what its caller waits for once its waiter
    is queued: the BMC's answer (``myaddr``), or the end of this thread's own login.

    See "Lost wakeups" in the module docstring.
    """
    wakeup = threading.Event()
    if evq is not None:
        evq.append(wakeup)
    deadline = ipmi_session._monotonic_time() + timeout
    login = _own_login() if myaddr is None else None
    waiters, awaited = (_answer_waiters, myaddr) if myaddr is not None else (_login_waiters, login)
    if awaited is not None:
        with _waiters_lock:
            waiters.setdefault(awaited, set()).add(wakeup)
    ipmi_session.ioqueue.append((deadline, wakeup, myaddr))
    try:
        if _answer_arrived(myaddr) or (login is not None and not login.logging):
            return  # the I/O thread sets the queued event later; nobody waits on it
        if deadline < ipmi_session.selectdeadline:
            poke = ipmi_session.iosockets[0]
            poke.sendto(b"\x01", (ipmi_session.myself, poke.getsockname()[1]))
        wakeup.wait()
    finally:
        if awaited is not None:
            _forget(waiters, awaited, wakeup)


# Callers waiting for an answer from a BMC (its address), woken once any thread
# has processed a packet from it (NegotiatingSession.process_pktqueue).
_answer_waiters: dict[Any, set[threading.Event]] = {}

# Callers waiting in pyghmi's login loop for their own session's login to end (the
# session), woken by whichever thread ends it (NegotiatingSession.onlogon, _mark_broken).
_login_waiters: dict[Any, set[threading.Event]] = {}


# The session whose constructor this thread runs: it waits for that session's login.
_constructing = threading.local()


def _own_login() -> NegotiatingSession | None:
    """The session whose login this thread waits for, if any."""
    return getattr(_constructing, "session", None)


# Guards both tables: a waiter is never added to a set that is being dropped.
_waiters_lock = threading.Lock()


def _wake(waiters: dict[Any, set[threading.Event]], awaited: Any) -> None:
    with _waiters_lock:
        waking = list(waiters.get(awaited, ()))
    for wakeup in waking:
        wakeup.set()


def _forget(
    waiters: dict[Any, set[threading.Event]], awaited: Any, wakeup: threading.Event
) -> None:
    with _waiters_lock:
        waiting = waiters.get(awaited)
        if waiting is not None:
            waiting.discard(wakeup)
            if not waiting:
                del waiters[awaited]


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
