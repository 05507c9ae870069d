"""The IPMI driver against real BMCs: virtualbmc over libvirt domains, and pyghmi's BMC server.

Nothing here patches pyghmi or libvirt. NMI delivery is counted on a guest's
serial console (its kernel logs each NMI) or by the peer BMC itself.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import libvirt
import pytest
from pyghmi.ipmi.private import constants as ipmi_constants
from pyghmi.ipmi.private import session as ipmi_session

from app.client import wait_for_action
from app.process import free_port
from drivers import pyghmi_patches
from drivers.base import (
    BackendAuthFailed,
    BackendRejected,
    BackendUnreachable,
    DriverError,
    PowerState,
    ServerPoweredOff,
)
from drivers.ipmi import IPMIDriver, IPMISettings
from drivers.pyghmi_patches import NegotiatingSession
from emulators.guest import Guest
from emulators.guest_image import NMI_LOGGED, ImageVariant, build_image
from emulators.ipmi_sim import IPMIFleet
from emulators.vbmc import BMCEndpoint, VirtualBMCs
from scenarios.benchmarks.vbmc_guests import GuestBMCs
from tests.fixtures import (
    LIBVIRT_URI,
    NMI_PANIC,
    IPMIPeers,
    assert_one_nmi_logged,
    bmc_cloud,
    console_count,
    error_events_while_the_api_answers,
    trigger_as,
    trigger_until_panic,
    wait_console_count,
    wait_for_event,
)
from tests.live import REPO, LiveServer

pytestmark = [pytest.mark.bmc, pytest.mark.libvirt]

# A read-only libvirt connection: power state works, injectNMI is refused.
READ_ONLY_URI = "qemu:///system?socket=/var/run/libvirt/libvirt-sock-ro"
POWER_DIAG_LOGGED = "Power diag called for domain"


def _driver(endpoint: BMCEndpoint, **overrides: object) -> IPMIDriver:
    return IPMIDriver("server-1", IPMIDriver.parse_settings(endpoint.driver_info() | overrides))


def _peer(peers: IPMIPeers, port: int, **overrides: object) -> IPMIDriver:
    return _driver(BMCEndpoint("127.0.0.1", port, peers.username, peers.password), **overrides)


def _timed(call: Callable[[], object]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


# -- the cipher-suite workaround, pinned against pyghmi upgrades -------------------------


def test_pyghmi_still_has_the_private_names_the_workaround_uses() -> None:
    """NegotiatingSession overrides these; a pyghmi that renames them must fail here."""
    session = ipmi_session.Session

    def params(function: Callable[..., object]) -> list[str]:
        return list(inspect.signature(function).parameters)

    assert params(session._got_rmcp_response) == ["self", "data"]
    assert params(session._relog) == ["self"]
    assert params(session.login) == ["self"]
    assert params(session.onlogon) == ["self", "parameter"]
    assert params(session.__new__)[:5] == ["cls", "bmc", "userid", "password", "port"]
    assert "keepalive" in params(session.__init__)
    # The hash pyghmi uses is chosen by these attributes, set per login attempt.
    assert "self.attemptedhash = 256" in inspect.getsource(session._initsession)
    assert "self.attemptedhash == 1" in inspect.getsource(session._open_rmcpplus_request)
    assert "self.currhashlib" in inspect.getsource(session._got_rakp2)
    assert "self.integrityalgo = self.attemptedhash" in inspect.getsource(session._got_rakp4)
    assert ipmi_constants.ipmi_completion_codes[0xC0] == "Node Busy"
    for name in ("_got_rmcp_response", "_relog", "login"):
        assert name in vars(NegotiatingSession), f"NegotiatingSession no longer overrides {name}"


def test_a_login_attempt_never_reuses_an_earlier_attempts_session_id_or_tag() -> None:
    """pyghmi's ``_initsession`` restarts both at every attempt, so after a re-login (a
    retry timer during RAKP) a late RAKP 2 of the first attempt matched the second one,
    failed its hash and ended the login "Incorrect password provided": 1 of 600 calls
    at 200 BMCs at once. ``NegotiatingSession`` carries them forward."""
    assert "self.localsid = 2017673555" in inspect.getsource(ipmi_session.Session._initsession)
    assert "self.rmcptag = 1" in inspect.getsource(ipmi_session.Session._initsession)
    session = object.__new__(NegotiatingSession)
    session.maxtimeout, session.logontries = 2, 1  # what _initsession's timer reads
    seen = []
    for _ in range(100):
        session._initsession()
        seen.append((session.localsid, session.rmcptag))
        session.localsid += 1  # an attempt's open session request and RAKP messages
        session.rmcptag += 3
    sids = [sid for sid, _ in seen]
    assert sids == sorted(set(sids)), "a session id came back"
    assert all(0 < tag < 256 - 3 for _, tag in seen)
    assert len({tag for _, tag in seen[-50:]}) == 50, "a recent attempt's tag came back"


def test_pyghmi_still_has_the_private_names_the_lost_wakeup_fix_uses() -> None:
    """drivers/pyghmi_patches.py replaces ``_io_wait``; a pyghmi that reworks its I/O loop
    must fail here."""
    pyghmi_patches.install()
    assert ipmi_session._io_wait is pyghmi_patches._io_wait
    assert list(inspect.signature(pyghmi_patches._io_wait).parameters) == [
        "timeout",
        "myaddr",
        "evq",
    ]
    for name in ("ioqueue", "sessionqueue", "selectdeadline", "iosockets", "myself"):
        assert hasattr(ipmi_session, name), f"pyghmi no longer has session.{name}"
    assert callable(ipmi_session._monotonic_time)
    assert isinstance(ipmi_session.Session.bmc_handlers, dict)
    # Callers reach the replacement through the module global, with these arguments.
    assert "_io_wait(timeout)" in inspect.getsource(ipmi_session._poller)
    assert "_io_wait(timeout, self.sockaddr)" in inspect.getsource(
        ipmi_session.Session.awaitresponse
    )
    # The constructor waits for its login in this loop; the login ends, then says so.
    assert "while self.logging:\n                Session.wait_for_rsp()" in inspect.getsource(
        ipmi_session.Session.__init__
    )
    priv_level = inspect.getsource(ipmi_session.Session._req_priv_level)
    assert priv_level.index("self.logging = False") < priv_level.index("self.onlogon(")
    for name in ("__init__", "onlogon", "_mark_broken", "process_pktqueue"):
        assert name in vars(NegotiatingSession), f"NegotiatingSession no longer overrides {name}"
    # The I/O thread files answers in these queues, and takes (deadline, event, address).
    graball = inspect.getsource(ipmi_session._io_graball)
    assert "relsession.pktqueue.append(rdata)" in graball
    assert "sessionqueue.append(relsession)" in graball
    worker = inspect.getsource(ipmi_session.define_worker)
    assert "workitem = ioqueue.popleft()" in worker
    assert "if workitem[2] is None and sockaddrs:" in worker


def test_pyghmi_still_has_the_private_names_the_single_pulse_uses() -> None:
    """The pulse is sent once: its re-send is timed by ``timeout`` and withdrawn by clearing
    ``lastpayload`` and ``onlogpayload``. A pyghmi that retries otherwise must fail here."""
    assert "timeout" in inspect.signature(ipmi_session.Session.raw_command).parameters
    transmit = inspect.getsource(ipmi_session.Session._xmit_packet)
    assert "self.expiration = timeout + _monotonic_time()" in transmit
    timed_out = inspect.getsource(ipmi_session.Session._timedout)
    assert "if not self.lastpayload:" in timed_out
    assert "self.onlogpayload = self.lastpayload" in timed_out


def test_pyghmi_patches_are_installed_by_the_driver_not_by_an_import() -> None:
    script = textwrap.dedent(
        """
        from pyghmi.ipmi.private import session
        stock = session._io_wait
        from drivers.ipmi import IPMIDriver
        assert session._io_wait is stock, "patched by the import"
        settings = {"address": "127.0.0.1", "username": "u", "password": "p"}
        IPMIDriver("server-1", IPMIDriver.parse_settings(settings))
        patched = session._io_wait
        assert patched is not stock, "not patched by the driver"
        assert session.KEEPALIVE_SESSIONS is session.WAITING_SESSIONS
        from drivers import pyghmi_patches
        pyghmi_patches.install()
        assert session._io_wait is patched, "installed twice"
        """
    )
    # A separate process: this one has the patches installed already.
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_a_pyghmi_version_not_verified_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    installed = importlib.metadata.version("pyghmi")
    assert pyghmi_patches.check_version(installed), f"pyghmi {installed} was not verified"
    with caplog.at_level(logging.WARNING, logger="drivers.pyghmi_patches"):
        assert not pyghmi_patches.check_version("1.7.0")
    assert "pyghmi 1.7.0 is installed" in caplog.text
    assert "verified against pyghmi 1.6.19" in caplog.text


def test_stock_pyghmi_session_cannot_log_in_to_virtualbmc(
    vbmcs: VirtualBMCs, blank_domain: Callable[..., str]
) -> None:
    """Why NegotiatingSession exists. Fails once pyghmi fixes it; then it may go."""
    endpoint = vbmcs.add(blank_domain())
    script = textwrap.dedent(
        f"""
        from pyghmi.ipmi.private.session import Session
        Session(bmc={endpoint.address!r}, userid=b{endpoint.username!r},
                password=b{endpoint.password!r}, port={endpoint.port})
        """
    )
    # A separate process: the failed session would otherwise stay in pyghmi's caches.
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "struct.error: pack expected 32 items for packing (got 20)" in result.stderr


def test_negotiating_session_logs_in_to_virtualbmc_with_suite_3(
    vbmcs: VirtualBMCs, blank_domain: Callable[..., str]
) -> None:
    pyghmi_patches.install()
    endpoint = vbmcs.add(blank_domain())
    session = NegotiatingSession(
        bmc=endpoint.address,
        userid=endpoint.username.encode(),
        password=endpoint.password.encode(),
        port=endpoint.port,
        keepalive=False,
    )
    try:
        assert session.logged
        assert session.currhashlib is hashlib.sha1
        assert session.integrityalgo == 1  # HMAC-SHA1-96
        assert session.raw_command(netfn=0, command=1)["code"] == 0
    finally:
        session.logout()


# -- against virtualbmc in front of libvirt domains ---------------------------------------


def test_power_state_follows_the_domain(
    vbmcs: VirtualBMCs, blank_domain: Callable[..., str], libvirt_conn: libvirt.virConnect
) -> None:
    name = blank_domain()
    driver = _driver(vbmcs.add(name))
    assert driver.get_power_state() == PowerState.RUNNING
    libvirt_conn.lookupByName(name).destroy()
    assert driver.get_power_state() == PowerState.SHUTDOWN


def test_nmi_reaches_the_guest_exactly_once(vbmcs: VirtualBMCs, nmi_logging_guest: Guest) -> None:
    driver = _driver(vbmcs.add(nmi_logging_guest.name))
    assert_one_nmi_logged(nmi_logging_guest, driver.trigger_crash_dump)
    assert vbmcs.log(nmi_logging_guest.name).count(POWER_DIAG_LOGGED) == 1


def test_powered_off_server_is_refused_and_nothing_is_sent(
    vbmcs: VirtualBMCs, blank_domain: Callable[..., str]
) -> None:
    # virtualbmc would answer success and drop the NMI: no silent success.
    name = blank_domain(running=False)
    driver = _driver(vbmcs.add(name))
    with pytest.raises(ServerPoweredOff, match=r"^server is powered off$"):
        driver.trigger_crash_dump()
    assert POWER_DIAG_LOGGED not in vbmcs.log(name)


def test_wrong_password_is_an_auth_failure_that_names_no_password(
    vbmcs: VirtualBMCs, blank_domain: Callable[..., str]
) -> None:
    endpoint = vbmcs.add(blank_domain())
    started = time.monotonic()
    with pytest.raises(BackendAuthFailed, match="Incorrect password") as failure:
        _driver(endpoint, password="not-the-password").trigger_crash_dump()
    assert time.monotonic() - started < 2
    assert f"{endpoint.address}:{endpoint.port}" in str(failure.value)
    assert "not-the-password" not in str(failure.value)
    assert endpoint.password not in str(failure.value)


def test_unknown_user_is_an_auth_failure_within_the_timeout(
    vbmcs: VirtualBMCs, blank_domain: Callable[..., str]
) -> None:
    # virtualbmc never answers RAKP 1 for a user it does not know.
    endpoint = vbmcs.add(blank_domain())
    started = time.monotonic()
    with pytest.raises(BackendAuthFailed, match="user name is probably unknown"):
        _driver(endpoint, username="nobody", timeout=2).trigger_crash_dump()
    assert 2 <= time.monotonic() - started < 2.5


@pytest.mark.parametrize("timeout", [3.0, None], ids=["timeout=3", "default"])
def test_unreachable_bmc_fails_within_the_timeout(
    vbmcs: VirtualBMCs, blank_domain: Callable[..., str], timeout: float | None
) -> None:
    name = blank_domain()
    endpoint = vbmcs.add(name)
    vbmcs.stop(name)
    overrides = {"timeout": timeout} if timeout else {}
    bound = timeout or IPMISettings.model_fields["timeout"].default
    started = time.monotonic()
    with pytest.raises(
        BackendUnreachable, match=f"no answer from BMC at 127.0.0.1:{endpoint.port}"
    ):
        _driver(endpoint, **overrides).trigger_crash_dump()
    elapsed = time.monotonic() - started
    print(f"\nunreachable BMC, timeout {bound:g}s: failed after {elapsed:.2f}s")
    assert elapsed <= bound + 0.5


def test_a_bmc_that_comes_back_is_usable_again(
    vbmcs: VirtualBMCs, blank_domain: Callable[..., str]
) -> None:
    # pyghmi 1.6 would hand back the dead session of the failed login forever.
    name = blank_domain()
    endpoint = vbmcs.add(name)
    vbmcs.stop(name)
    with pytest.raises(BackendUnreachable):
        _driver(endpoint, timeout=2).get_power_state()
    vbmcs.start(name)
    assert _driver(endpoint).get_power_state() == PowerState.RUNNING
    _driver(endpoint).trigger_crash_dump()
    assert vbmcs.log(name).count(POWER_DIAG_LOGGED) == 1


def test_virtualbmc_answers_node_busy_when_libvirt_refuses_the_nmi(
    vbmcs: VirtualBMCs, blank_domain: Callable[..., str]
) -> None:
    endpoint = vbmcs.add(blank_domain(), libvirt_uri=READ_ONLY_URI)
    with pytest.raises(
        BackendRejected,
        match=r"rejected chassis control \(pulse diagnostic interrupt\): "
        r"completion code 0xc0 \(Node Busy\)$",
    ):
        _driver(endpoint).trigger_crash_dump()


def test_virtualbmc_answers_unspecified_for_a_missing_domain(
    vbmcs: VirtualBMCs, blank_domain: Callable[..., str], libvirt_conn: libvirt.virConnect
) -> None:
    # virtualbmc answers 0xC0 to the pulse itself, but the power read comes first.
    name = blank_domain()
    endpoint = vbmcs.add(name)
    domain = libvirt_conn.lookupByName(name)
    domain.destroy()
    domain.undefine()
    with pytest.raises(
        BackendRejected, match=r"rejected get chassis status: completion code 0xff \(Unspecified\)$"
    ):
        _driver(endpoint).trigger_crash_dump()


# -- against pyghmi's own BMC server -------------------------------------------------------


def test_bmc_without_pulse_diag_answers_invalid_data_field(
    ipmi_peers: Callable[..., IPMIPeers],
) -> None:
    peers = ipmi_peers(["nodiag"])
    with pytest.raises(
        BackendRejected, match=r"completion code 0xcc \(Invalid data field in request\)$"
    ):
        _peer(peers, peers.ports[0]).trigger_crash_dump()


def test_peer_powered_off_gets_no_nmi(ipmi_peers: Callable[..., IPMIPeers]) -> None:
    peers = ipmi_peers(["off"])
    driver = _peer(peers, peers.ports[0])
    assert driver.get_power_state() == PowerState.SHUTDOWN
    with pytest.raises(ServerPoweredOff):
        driver.trigger_crash_dump()
    assert peers.nmis() == Counter()


FLEET = 24
LATENCY = 0.2  # seconds per command at each peer BMC


def test_a_fleet_of_bmcs_is_triggered_in_parallel(ipmi_peers: Callable[..., IPMIPeers]) -> None:
    peers = ipmi_peers(["on"] * FLEET, latency=LATENCY)
    drivers = [_peer(peers, port) for port in peers.ports]
    one = _timed(drivers[0].trigger_crash_dump)
    with ThreadPoolExecutor(FLEET) as pool:
        wall = _timed(lambda: list(pool.map(lambda d: d.trigger_crash_dump(), drivers)))
    print(
        f"\none call: {one:.2f}s; {FLEET} at once: {wall:.2f}s ({FLEET} x one = {FLEET * one:.2f}s)"
    )
    assert peers.nmis() == Counter(peers.ports) + Counter([peers.ports[0]])
    assert wall < FLEET * one / 4


def test_a_dead_bmc_does_not_hold_up_the_others(ipmi_peers: Callable[..., IPMIPeers]) -> None:
    peers = ipmi_peers(["on"] * 20, latency=LATENCY)
    live = [_peer(peers, port, timeout=4) for port in peers.ports]
    dead = _peer(peers, free_port(kind=2), timeout=4)  # SOCK_DGRAM; nothing listens there
    finished: dict[IPMIDriver, tuple[float, BaseException | None]] = {}
    started = time.monotonic()

    def trigger(driver: IPMIDriver) -> None:
        try:
            driver.trigger_crash_dump()
            finished[driver] = (time.monotonic() - started, None)
        except DriverError as exc:
            finished[driver] = (time.monotonic() - started, exc)

    with ThreadPoolExecutor(len(live) + 1) as pool:
        list(pool.map(trigger, [dead, *live]))
    slowest_live = max(finished[d][0] for d in live)
    dead_after = finished[dead][0]
    print(
        f"\n20 live BMCs done after {slowest_live:.2f}s; the dead one failed at {dead_after:.2f}s"
    )
    assert all(finished[d][1] is None for d in live)
    assert isinstance(finished[dead][1], BackendUnreachable)
    assert slowest_live < 3
    assert 4 <= finished[dead][0] < 4.5
    assert peers.nmis() == Counter(peers.ports)


STALL = 0.4  # seconds; pyghmi's retry timer, which ends a lost wakeup, is 0.5 s at least


def test_no_call_waits_for_pyghmi_retry_timer(ipmi_peers: Callable[..., IPMIPeers]) -> None:
    """Every answer wakes its caller at once (see "Lost wakeups" in drivers/pyghmi_patches.py).

    With pyghmi's own ``_io_wait``, 10-30 % of these 120 reads took 0.5-1.8 s here
    (12 or more). One stall is allowed, for the scheduler of a busy 2-core machine.
    """
    peers = ipmi_peers(["on"] * 20)
    drivers = [_peer(peers, port) for port in peers.ports]
    one_by_one = [_timed(d.get_power_state) for _ in range(3) for d in drivers]
    with ThreadPoolExecutor(len(drivers)) as pool:
        at_once = [
            t for _ in range(3) for t in pool.map(lambda d: _timed(d.get_power_state), drivers)
        ]
    for name, times in (("one by one", one_by_one), ("20 at once", at_once)):
        ms = sorted(round(t * 1000) for t in times)
        print(f"\n{name}: {len(ms)} reads, median {ms[len(ms) // 2]} ms, slowest {ms[-5:]} ms")
    stalled = [t for t in one_by_one + at_once if t >= STALL]
    assert len(stalled) <= 1, stalled


def test_a_login_ended_by_another_thread_wakes_its_caller(
    ipmi_peers: Callable[..., IPMIPeers],
) -> None:
    """A login whose last answer another thread ran still returns at once.

    Logins to a dead BMC keep two threads in pyghmi's loop, where they run every
    session's answers, the live logins' too. Without the wakeup at the end of a
    login (``NegotiatingSession.onlogon``), 73 of these 500 reads took 0.4-1.8 s
    here; in a serial run, with nothing else in the loop, one waited out its whole
    10 s deadline.
    """
    peers = ipmi_peers(["on"] * 5)
    drivers = [_peer(peers, port) for port in peers.ports]
    dead = BMCEndpoint("127.0.0.1", free_port(socket.SOCK_DGRAM), "crashlab", "secret")
    stop = threading.Event()

    def log_in_to_the_dead_bmc() -> None:
        while not stop.is_set():
            with pytest.raises(BackendUnreachable):
                _driver(dead, timeout=2).get_power_state()

    with ThreadPoolExecutor(2) as beside:
        dead_logins = [beside.submit(log_in_to_the_dead_bmc) for _ in range(2)]
        try:
            times = [_timed(d.get_power_state) for _ in range(100) for d in drivers]
        finally:
            stop.set()
        for login in dead_logins:
            login.result()
    stalled = sorted(round(t, 2) for t in times if t >= STALL)
    print(f"\n{len(times)} reads beside the dead BMC's logins: stalled {stalled}")
    assert len(stalled) <= 1, stalled


# -- end to end --------------------------------------------------------------------------


@pytest.mark.slow
def test_crash_dump_through_virtualbmc_panics_the_guest(vbmcs: VirtualBMCs) -> None:
    with Guest(build_image(ImageVariant.NO_KDUMP)) as guest:
        guest.wait_ready(timeout=180)
        driver = _driver(vbmcs.add(guest.name))
        assert driver.get_power_state() == PowerState.RUNNING
        driver.trigger_crash_dump()
        guest.wait_for(NMI_PANIC, timeout=60)


# -- through crashlab's REST API ----------------------------------------------------------


@pytest.mark.slow
def test_owner_triggers_through_the_api_and_the_guest_panics(
    vbmcs: VirtualBMCs, crashlab_server: Callable[..., LiveServer]
) -> None:
    with Guest(build_image(ImageVariant.NO_KDUMP)) as guest:
        guest.wait_ready(timeout=180)
        endpoint = vbmcs.add(guest.name)
        server = crashlab_server(bmc_cloud({"bm-ipmi": ("ipmi", endpoint.driver_info())}))
        trigger_until_panic(server, guest, "bm-ipmi")
        assert endpoint.password not in server.log_path.read_text()


def test_bad_password_and_dead_bmc_end_in_error_events_while_the_api_answers(
    vbmcs: VirtualBMCs,
    blank_domain: Callable[..., str],
    crashlab_server: Callable[..., LiveServer],
) -> None:
    live, dead = blank_domain(), blank_domain()
    live_endpoint, dead_endpoint = vbmcs.add(live), vbmcs.add(dead)
    vbmcs.stop(dead)
    wrong_password = "wrong-password-42"
    server = crashlab_server(
        bmc_cloud(
            {
                "bm-wrong-password": (
                    "ipmi",
                    live_endpoint.driver_info() | {"password": wrong_password},
                ),
                "bm-dead-bmc": ("ipmi", dead_endpoint.driver_info() | {"timeout": 3}),
            }
        )
    )
    wrong_event, dead_event = error_events_while_the_api_answers(
        server, "bm-wrong-password", "bm-dead-bmc", timeout=3
    )
    assert wrong_event["details"] == (
        f"BMC at 127.0.0.1:{live_endpoint.port} rejected the credentials of user 'crashlab': "
        "Incorrect password provided"
    )
    assert dead_event["details"].startswith(f"no answer from BMC at 127.0.0.1:{dead_endpoint.port}")
    log = server.log_path.read_text()
    assert wrong_password not in log and live_endpoint.password not in log
    assert POWER_DIAG_LOGGED not in vbmcs.log(live)


def test_a_wrong_password_is_said_so_while_a_dead_bmcs_login_runs_beside_it(
    vbmcs: VirtualBMCs, blank_domain: Callable[..., str]
) -> None:
    """pyghmi may end a login in another caller's thread; its message must be there
    when the login's own thread wakes (drivers/pyghmi_patches.py)."""
    endpoint = vbmcs.add(blank_domain())
    dead = BMCEndpoint("127.0.0.1", free_port(socket.SOCK_DGRAM), "crashlab", "secret")

    def error_of(driver: IPMIDriver) -> str:
        with pytest.raises(DriverError) as raised:
            driver.get_power_state()
        return raised.value.message

    seen: Counter[str] = Counter()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(4):
            dead_logins = [pool.submit(error_of, _driver(dead, timeout=3)) for _ in range(2)]
            time.sleep(0.3)  # the dead BMC's logins are retrying in pyghmi's loop
            wrong = [_driver(endpoint, password="wrong-password-42") for _ in range(6)]
            seen.update(message.split(": ", 1)[1] for message in pool.map(error_of, wrong))
            assert all("no answer" in f.result() for f in dead_logins)
    assert seen == Counter({"Incorrect password provided": 24}), seen


API_FLEET = 24


def _crash_dump_through_the_api(server: LiveServer, token: str, server_id: str) -> None:
    """POST trigger_crash_dump and wait until its event is Success."""
    headers = {"X-Auth-Token": token, "OpenStack-API-Version": "compute 2.17"}
    with httpx.Client(base_url=server.compute_url, headers=headers, timeout=30) as client:
        response = client.post(f"/servers/{server_id}/action", json={"trigger_crash_dump": None})
        assert response.status_code == 202, response.text
        request_id = response.headers["x-openstack-request-id"]
        action = wait_for_action(client.get, server_id, request_id, timeout=60, poll=0.1)
        [event] = action["events"]
        assert (event["result"], event["details"]) == ("Success", None)


def test_a_fleet_of_bmcs_is_triggered_through_the_api_in_parallel(
    ipmi_peers: Callable[..., IPMIPeers], crashlab_server: Callable[..., LiveServer]
) -> None:
    peers = ipmi_peers(["on"] * (1 + API_FLEET), latency=LATENCY)
    info: dict[str, object] = {
        "address": "127.0.0.1",
        "username": peers.username,
        "password": peers.password,
    }
    servers = {f"bm-{port}": ("ipmi", info | {"port": port}) for port in peers.ports}
    server = crashlab_server(bmc_cloud(servers))
    token = server.token("alice")
    with server.client("alice") as alice:
        ids = {s["name"]: s["id"] for s in alice.get("/servers").json()["servers"]}
    first, *fleet = (ids[f"bm-{port}"] for port in peers.ports)
    one = _timed(lambda: _crash_dump_through_the_api(server, token, first))
    with ThreadPoolExecutor(API_FLEET) as pool:
        wall = _timed(
            lambda: list(pool.map(lambda i: _crash_dump_through_the_api(server, token, i), fleet))
        )
    print(
        f"\nthrough the API: one trigger {one:.2f}s; {API_FLEET} at once: {wall:.2f}s "
        f"({API_FLEET} x one = {API_FLEET * one:.2f}s)"
    )
    assert peers.nmis() == Counter(peers.ports)
    assert wall < API_FLEET * one / 4


@pytest.mark.slow
def test_virtualbmcs_in_front_of_booted_guests_each_log_one_nmi_per_round(
    tmp_path: Path, crashlab_server: Callable[..., LiveServer]
) -> None:
    """Every guest's BMC triggered at once through the API: each NMI is counted on the
    console of the guest it reached, so "exactly once" holds end to end."""
    with GuestBMCs(tmp_path, uri=LIBVIRT_URI) as guests:
        names = guests.names
        server = crashlab_server(bmc_cloud({n: ("ipmi", guests.driver_info(n)) for n in names}))
        with ThreadPoolExecutor(len(names)) as pool:
            started = time.monotonic()
            triggers = list(pool.map(lambda name: trigger_as(server, "alice", name), names))
            events = list(
                pool.map(lambda t: wait_for_event(server, "alice", *t, timeout=60), triggers)
            )
            wall = time.monotonic() - started
        for guest in guests.guests:
            wait_console_count(guest, NMI_LOGGED, 1, timeout=30)
        time.sleep(1.0)  # a late duplicate would show
        print(f"\n{len(names)} guests booted in {guests.boot_s:.1f}s; one round {wall:.2f}s")
        assert [e["result"] for e in events if e["result"] != "Success"] == [], events
        counts = {guest.name: console_count(guest, NMI_LOGGED) for guest in guests.guests}
        assert counts == dict.fromkeys(names, 1)


# -- many threads against pyghmi's shared session machinery ---------------------------------

FLEET_ROUNDS = 3
SIMULATED_FLEET = 200  # the bench's largest fleet; 100 did not deadlock on this 2-core machine


def test_pyghmi_still_nests_its_two_session_locks_both_ways() -> None:
    """Why drivers/pyghmi_patches.py makes them one lock: a pyghmi that stops nesting them
    may drop it."""
    pyghmi_patches.install()
    send = inspect.getsource(ipmi_session.Session.send_payload)
    assert "with util.protect(KEEPALIVE_SESSIONS):" in send  # ... then _xmit_packet:
    assert "with util.protect(WAITING_SESSIONS):" in inspect.getsource(
        ipmi_session.Session._xmit_packet
    )
    wait = inspect.getsource(ipmi_session.Session.awaitresponse)
    assert "with util.protect(WAITING_SESSIONS):" in wait and "self._timedout()" in wait
    assert ipmi_session.KEEPALIVE_SESSIONS is ipmi_session.WAITING_SESSIONS


def test_rounds_of_a_large_fleet_at_once_deliver_every_nmi(tmp_path: Path) -> None:
    """A power read then a trigger on every BMC at once, round after round, as
    crashlab serve does. pyghmi's two session locks deadlocked here in the first round
    (0 NMIs, then every call failed); later, answers processed by another thread and
    simulated BMCs that crashed lost more. Each round: no error, one NMI per BMC."""
    with IPMIFleet(tmp_path, SIMULATED_FLEET) as fleet:
        drivers = [
            IPMIDriver(f"bm-{port}", IPMIDriver.parse_settings(fleet.driver_info(port)))
            for port in fleet.ports
        ]

        def both(driver: IPMIDriver) -> list[str]:
            errors = []
            for call in (driver.get_power_state, driver.trigger_crash_dump):
                try:
                    call()
                except DriverError as exc:
                    errors.append(repr(exc))
            return errors

        with ThreadPoolExecutor(256) as pool:
            for round_ in range(1, FLEET_ROUNDS + 1):
                started = time.monotonic()
                errors = [e for found in pool.map(both, drivers) for e in found]
                seconds = time.monotonic() - started
                time.sleep(0.3)  # a late duplicate would show
                nmis = fleet.nmis.read()
                print(
                    f"\nround {round_}: {seconds:.2f}s, {len(errors)} errors, {nmis.total()} NMIs"
                )
                assert errors == [], f"round {round_}: {len(errors)} errors, first {errors[:2]}"
                assert nmis == Counter({str(port): 1 for port in fleet.ports})


def test_a_lost_status_answer_is_an_error_that_sent_no_nmi(
    ipmi_peers: Callable[..., IPMIPeers],
) -> None:
    peers = ipmi_peers(["mute-status"])
    with pytest.raises(BackendUnreachable, match="no answer from BMC") as failure:
        _peer(peers, peers.ports[0], timeout=2).trigger_crash_dump()
    assert "stopped at the power status read, nothing sent" in failure.value.message
    assert failure.value.nmi_not_sent
    assert peers.nmis() == Counter()


def test_a_lost_pulse_answer_may_have_sent_the_nmi_and_the_next_call_is_clean(
    ipmi_peers: Callable[..., IPMIPeers],
) -> None:
    """The first pulse's answer is dropped; the BMC answers again at once. The abandoned
    call lets go of the BMC, so the next one starts a fresh session well within its time."""
    peers = ipmi_peers(["mute-first-diag"])
    [port] = peers.ports
    driver = _peer(peers, port, timeout=2)
    with pytest.raises(BackendUnreachable, match=r"sending the diagnostic interrupt") as failure:
        driver.trigger_crash_dump()
    assert not failure.value.nmi_not_sent
    assert peers.nmis() == Counter({port: 1})
    seconds = [_timed(driver.trigger_crash_dump) for _ in range(3)]
    print(f"\nafter the lost answer: {[round(s, 2) for s in seconds]} s")
    assert max(seconds) < 0.5  # not held up by the abandoned call
    time.sleep(1.0)  # no late re-send of the first pulse
    assert peers.nmis() == Counter({port: 4})
