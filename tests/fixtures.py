"""The fixtures every layer shares, loaded once as a pytest plugin by tests/conftest.py.

Each fixture that starts something stops or removes it afterwards, whatever
happened in the test:

- ``crashlab_server`` / ``fake_cloud``: ``crashlab serve`` child processes;
- ``libvirt_conn``: a test's own connection to qemu:///system;
- ``blank_domain``: a minimal QEMU domain (no OS; SeaBIOS finds nothing to boot
  and waits), enough for power state, and for virtualbmc and sushy-tools to act on;
- ``nmi_logging_guest``: a booted ``nmi-ignored`` guest whose kernel logs every
  NMI on its serial console, so delivery can be counted. One per session;
- ``vbmcs`` / ``sushy_emulator``: the BMC emulators in front of domains;
- ``ipmi_peers``: simulated IPMI BMCs (``emulators/ipmi_sim.py``), one process
  each, counting the NMIs each receives.

The helpers after them call crashlab's REST API as the BMC tests do.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import libvirt
import pytest

from app.client import wait_for_action
from emulators import ipmi_sim
from emulators.guest import Guest
from emulators.guest_image import NMI_LOGGED, GuestImage, ImageVariant, build_image
from emulators.ipmi_sim import IPMIFleet
from emulators.sushy import SushyEmulator
from emulators.vbmc import VirtualBMCs
from tests.domains import BLANK_DOMAIN_XML
from tests.domains import URI as LIBVIRT_URI
from tests.live import LiveServer, fake_cloud_config, started_servers

# libvirt prints every error to stderr; the tests look at the exceptions.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

BLANK_PREFIX = "crashlab-bmctest-"
NMI_PANIC = "Kernel panic - not syncing: NMI"


# -- crashlab serve ------------------------------------------------------------------------


@pytest.fixture
def crashlab_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Factory: start ``crashlab serve`` on a config; every one is stopped after the test."""
    with started_servers(lambda index: tmp_path / f"server{index}") as start:
        yield start


@pytest.fixture
def fake_cloud(crashlab_server: Callable[..., LiveServer]) -> LiveServer:
    """scenarios/fake-cloud.yaml served by a fresh process with a fresh state file."""
    return crashlab_server()


# -- libvirt -------------------------------------------------------------------------------


@pytest.fixture
def libvirt_conn() -> Iterator[libvirt.virConnect]:
    """A connection of this test's own: tests/reliability restarts libvirtd, which
    closes every connection opened before, so none is kept across tests."""
    try:
        conn = libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as exc:
        pytest.fail(
            f"libvirtd is not reachable at {LIBVIRT_URI} (start virtlogd -d; libvirtd -d): {exc}"
        )
    yield conn
    for domain in conn.listAllDomains():
        if domain.name().startswith(BLANK_PREFIX):  # left by a killed run
            _remove(domain)
    conn.close()


class BlankDomains:
    """Blank domains defined (and started) on demand; all removed on exit."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn
        self.names: list[str] = []

    def __enter__(self) -> BlankDomains:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name in self.names:
            with contextlib.suppress(libvirt.libvirtError):  # the test removed it itself
                _remove(self.conn.lookupByName(name))

    def make(self, running: bool = True) -> str:
        name = BLANK_PREFIX + secrets.token_hex(4)
        domain = self.conn.defineXML(BLANK_DOMAIN_XML.format(name=name))
        self.names.append(name)
        if running:
            domain.create()
        return name


@pytest.fixture
def blank_domain(libvirt_conn: libvirt.virConnect) -> Iterator[Callable[..., str]]:
    """Factory: ``blank_domain(running=True)`` returns a domain name. Removed after the test."""
    with BlankDomains(libvirt_conn) as domains:
        yield domains.make


def _remove(domain: libvirt.virDomain) -> None:
    if domain.isActive():
        domain.destroy()
    domain.undefine()


@pytest.fixture(scope="session")
def nmi_logging_guest() -> Iterator[Guest]:
    with Guest(build_image(ImageVariant.NMI_IGNORED)) as guest:
        guest.wait_ready(timeout=180)
        yield guest


def console_count(guest: Guest, text: str) -> int:
    guest.console.poll()
    return guest.console.text().count(text)


def wait_console_count(guest: Guest, text: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while console_count(guest, text) < count:
        assert time.monotonic() < deadline, (
            f"no {text!r} x{count}; console:\n{guest.console.tail()}"
        )
        time.sleep(0.2)


def assert_one_nmi_logged(guest: Guest, trigger: Callable[[], object]) -> None:
    """Call ``trigger``: the guest's kernel logs one more NMI, and no late duplicate follows."""
    before = console_count(guest, NMI_LOGGED)
    trigger()
    wait_console_count(guest, NMI_LOGGED, before + 1)
    time.sleep(1.0)
    assert console_count(guest, NMI_LOGGED) == before + 1


# -- BMC emulators and simulators ----------------------------------------------------------


@pytest.fixture
def vbmcs(tmp_path: Path) -> Iterator[VirtualBMCs]:
    with VirtualBMCs(tmp_path, libvirt_uri=LIBVIRT_URI) as bmcs:
        yield bmcs


@pytest.fixture
def sushy_emulator(tmp_path: Path) -> Iterator[Callable[..., SushyEmulator]]:
    """Factory: start a sushy-emulator (``tls``, ``domains`` as SushyEmulator); stopped after."""
    with ExitStack() as stack:

        def start(*, tls: bool = False, domains: list[str] | None = None) -> SushyEmulator:
            where = tmp_path / f"sushy-{secrets.token_hex(3)}"
            emulator = SushyEmulator(where, libvirt_uri=LIBVIRT_URI, tls=tls, domains=domains)
            return stack.enter_context(emulator)

        yield start


class IPMIPeers:
    """Simulated BMCs of the given kinds (``emulators/ipmi_sim.py``); stopped on exit.

    ``ports`` and ``pids()`` are in the order of the kinds asked for; ``nmis()``
    counts every NMI so far by port. One process per BMC, as on real hardware
    (``emulators/ipmi_sim.py`` says why pyghmi needs it).
    """

    username = ipmi_sim.USERNAME
    password = ipmi_sim.PASSWORD

    def __init__(self, workdir: Path, kinds: list[str], latency: float = 0.0) -> None:
        self.fleet = IPMIFleet(workdir, kinds=kinds, latency=latency)
        self.ports: list[int] = []

    def __enter__(self) -> IPMIPeers:
        self.fleet.__enter__()
        self.ports = self.fleet.ports
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.fleet.close()

    def pids(self) -> list[int]:
        return self.fleet.pids()

    def nmis(self) -> Counter[int]:
        """NMIs received so far, by BMC port."""
        return Counter({int(port): n for port, n in self.fleet.nmis.counts().items()})


@pytest.fixture
def ipmi_peers(tmp_path: Path) -> Iterator[Callable[..., IPMIPeers]]:
    """Factory: ``ipmi_peers(["on", "off", "nodiag"], latency=0.0)``; stopped after the test."""
    with ExitStack() as stack:

        def start(kinds: list[str], latency: float = 0.0) -> IPMIPeers:
            where = tmp_path / f"ipmi-peers-{secrets.token_hex(3)}"
            return stack.enter_context(IPMIPeers(where, kinds, latency))

        yield start


# -- through crashlab's REST API ----------------------------------------------------------


def bmc_cloud(servers: dict[str, tuple[str, dict[str, object]]]) -> dict[str, Any]:
    """The fake cloud's users, with ``servers`` (name -> (driver, driver_info)) owned by alice."""
    return fake_cloud_config(
        servers=[
            {
                "name": name,
                "project_id": "alice",
                "user_id": "alice",
                "driver": driver,
                "driver_info": info,
            }
            for name, (driver, info) in servers.items()
        ]
    )


def trigger_as(server: LiveServer, user: str, name: str) -> tuple[str, str]:
    """POST trigger_crash_dump to the server called ``name``; returns (server id, request id)."""
    with server.client(user) as client:
        [listed] = [s for s in client.get("/servers").json()["servers"] if s["name"] == name]
        response = client.post(f"/servers/{listed['id']}/action", json={"trigger_crash_dump": None})
        assert response.status_code == 202, response.text
        return listed["id"], response.headers["x-openstack-request-id"]


def wait_for_event(
    server: LiveServer, user: str, server_id: str, request_id: str, timeout: float
) -> dict[str, Any]:
    """The trigger_crash_dump event, once finished, with its ``details``."""
    with server.client(user) as client:
        action = wait_for_action(client.get, server_id, request_id, timeout=timeout, poll=0.1)
    [event] = action["events"]
    return dict(event)


def trigger_until_panic(server: LiveServer, guest: Guest, name: str) -> None:
    """Alice triggers the server called ``name``: the guest panics and the event is a Success."""
    server_id, request_id = trigger_as(server, "alice", name)
    guest.wait_for(NMI_PANIC, timeout=60)
    event = wait_for_event(server, "alice", server_id, request_id, timeout=30)
    assert (event["result"], event["details"]) == ("Success", None)


def error_events_while_the_api_answers(
    server: LiveServer, refused: str, silent: str, timeout: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trigger ``refused`` (its BMC refuses the credentials) and ``silent`` (its BMC does not
    answer within ``timeout``): both are accepted at once, the API answers meanwhile, and both
    events are Errors. Returns the two events, read by an admin (the owner's are redacted).
    """
    started = time.monotonic()
    refused_trigger = trigger_as(server, "alice", refused)
    silent_trigger = trigger_as(server, "alice", silent)  # its power read waits up to timeout
    accepted = time.monotonic()
    with server.client("alice") as alice:
        started_get = time.monotonic()
        alice.get("/servers").raise_for_status()
        answered = time.monotonic() - started_get
    refused_event = wait_for_event(server, "admin", *refused_trigger, timeout=10)
    silent_event = wait_for_event(server, "admin", *silent_trigger, timeout=10)
    failed = time.monotonic() - accepted
    print(
        f"\nboth accepted after {accepted - started:.2f}s; API answered in {answered:.2f}s; "
        f"the silent BMC's Error event {failed:.2f}s after it was accepted"
    )
    assert answered < 1
    assert accepted - started < timeout + 1 and failed < timeout + 1
    assert refused_event["result"] == "Error"
    assert silent_event["result"] == "Error"
    return refused_event, silent_event


@pytest.fixture(scope="session")
def images() -> dict[ImageVariant, GuestImage]:
    """Every guest image variant, built once (cached on disk between runs)."""
    return {variant: build_image(variant) for variant in ImageVariant}


def processes_mentioning(path: Path) -> list[int]:
    """PIDs whose command line names ``path`` (read whole from /proc, never truncated)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue  # the process ended meanwhile
    return pids
