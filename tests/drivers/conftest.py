"""Real peers for the BMC drivers; each fixture cleans up after itself.

- ``blank_domain``: a minimal QEMU domain (no OS; SeaBIOS finds nothing to boot
  and waits), enough for power state, and for virtualbmc and sushy-tools to act on.
- ``nmi_logging_guest``: a booted ``nmi-ignored`` guest whose kernel logs every
  NMI on its serial console, so delivery can be counted. One per session.
- ``vbmcs`` / ``sushy_emulator``: the BMC emulators in front of domains.
- ``ipmi_peers``: pyghmi's own BMC server (``tests/drivers/ipmi_peer.py``), one
  child process per BMC, counting the NMIs each receives.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import libvirt
import pytest

from app.client import wait_for_action
from app.process import EmulatorProcess
from emulators.guest import Guest
from emulators.guest_image import ImageVariant, build_image
from emulators.sushy import SushyEmulator
from emulators.vbmc import VirtualBMCs
from tests.domains import BLANK_DOMAIN_XML
from tests.domains import URI as LIBVIRT_URI
from tests.drivers import ipmi_peer
from tests.live import LiveServer, fake_cloud_config

# libvirt prints every error to stderr; the tests look at the exceptions.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

BLANK_PREFIX = "crashlab-bmctest-"
NMI_PANIC = "Kernel panic - not syncing: NMI"
# Peer BMC processes started at once (each start is mostly a Python import).
_PEER_STARTERS = 4


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[libvirt.virConnect]:
    conn = libvirt.open(LIBVIRT_URI)
    yield conn
    conn.close()
    # A new connection: libvirtd may have been restarted since (tests/reliability does).
    conn = libvirt.open(LIBVIRT_URI)
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
            try:
                _remove(self.conn.lookupByName(name))
            except libvirt.libvirtError:
                pass  # the test removed it itself

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
    """BMCs served by ``tests/drivers/ipmi_peer.py``, one child process each; stopped on exit.

    ``ports`` are in the order of the kinds asked for. One process per BMC, as
    on real hardware: pyghmi's BMC server keeps its sessions in class-level
    state keyed by the client's address, and a login from a client address it
    has seen drops every session of that address in the process. pyghmi's
    client talks to many BMCs from one UDP socket, so BMCs sharing a process
    would drop each other's sessions when logins overlap.
    """

    username = ipmi_peer.USERNAME
    password = ipmi_peer.PASSWORD

    def __init__(self, workdir: Path, kinds: list[str], latency: float = 0.0) -> None:
        workdir.mkdir(parents=True)
        self.nmi_log = workdir / "nmi.log"
        self.ports: list[int] = []
        self._ports_files = [workdir / f"ports-{index}.json" for index in range(len(kinds))]
        self.processes = [
            EmulatorProcess(
                f"ipmi peer {index} ({kind})",
                [
                    sys.executable,
                    "-m",
                    "tests.drivers.ipmi_peer",
                    str(ports_file),
                    str(self.nmi_log),
                    str(latency),
                    kind,
                ],
                env=dict(os.environ),
                log_path=workdir / f"peer-{index}.log",
            )
            for index, (kind, ports_file) in enumerate(zip(kinds, self._ports_files, strict=True))
        ]

    def __enter__(self) -> IPMIPeers:
        try:
            with ThreadPoolExecutor(_PEER_STARTERS) as pool:
                list(pool.map(lambda process: process.start(), self.processes))
        except BaseException:
            self.__exit__()
            raise
        self.ports = [json.loads(f.read_text())[0] for f in self._ports_files]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self.processes:
            process.stop()

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def nmis(self) -> Counter[int]:
        """NMIs received so far, by BMC port."""
        if not self.nmi_log.exists():
            return Counter()
        return Counter(int(line) for line in self.nmi_log.read_text().split())


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
