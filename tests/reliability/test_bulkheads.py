"""One tenant's hung backend, flooded by that tenant, does not slow another tenant.

Each hung backend is a real listener that takes the connection or the packet
and never answers: a TCP port behind ``qemu+ssh`` (libvirt spawns ssh, which
waits for a banner that never comes), a TCP port behind a Redfish URL, and a
UDP port behind an IPMI address. alice owns a server on it, with the longest
timeout crashlab allows (60 s), and floods it with reads and triggers from 20
clients. Meanwhile bob's server, on another backend, must answer his GETs and
finish his triggers' events within 1 s each.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from app.client import action_path
from tests.live import LiveServer
from tests.reliability.cloud import (
    cloud_config,
    config_server_id,
    fake_server,
    trigger,
    wait_for_action,
)

FLOOD_SECONDS = 6.0
FLOOD_CLIENTS = 20
BOUND_SECONDS = 1.0


@contextmanager
def silent_listener(kind: int) -> Iterator[int]:
    """A loopback port that takes connections (TCP) or packets (UDP) and never answers."""
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(512)  # the kernel completes the handshakes; nobody reads
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _hung_server(kind: str, port: int) -> dict[str, Any]:
    if kind == "libvirt":
        info: dict[str, Any] = {"uri": f"qemu+ssh://127.0.0.1:{port}/system", "domain": "hung"}
    elif kind == "redfish":
        info = {
            "address": f"http://127.0.0.1:{port}",
            "username": "admin",
            "password": "hung-bmc-password",
            "timeout": 60,
        }
    else:
        info = {
            "address": "127.0.0.1",
            "port": port,
            "username": "admin",
            "password": "hung-password",
            "timeout": 60,
        }
    return {
        "name": "hung",
        "project_id": "alice",
        "user_id": "alice",
        "driver": kind,
        "driver_info": info,
    }


def _flood(cloud: LiveServer, server_id: str, stop: threading.Event) -> int:
    """alice's clients read and trigger her hung server until ``stop``; the request count."""
    sent = 0
    with cloud.client("alice") as alice:
        while not stop.is_set():
            alice.get(f"/servers/{server_id}")
            alice.get("/servers/detail")
            trigger(alice, server_id)
            sent += 3
    return sent


def _bob_round(cloud: LiveServer, bob: httpx.Client, admin: httpx.Client, server: str) -> float:
    """One GET and one trigger-to-event of bob's server; the slower of the two, in seconds."""
    started = time.monotonic()
    assert bob.get(f"/servers/{server}").status_code == 200
    read = time.monotonic() - started
    started = time.monotonic()
    response = trigger(bob, server)
    assert response.status_code == 202, response.text
    action = wait_for_action(admin, server, response.headers["x-openstack-request-id"])
    assert action["events"][0]["result"] == "Success", action
    return max(read, time.monotonic() - started)


def _check_one_at_a_time(admin: httpx.Client, server_id: str, kind: str) -> None:
    """The hung server had one trigger in flight at a time, and none sent an NMI.

    libvirt and Redfish wait out their 60 s timeout: the first trigger is still
    in flight. An IPMI login ends sooner: pyghmi gives up on a BMC that does not
    answer its Open Session Request after about 5 s of retries, so each trigger
    ends Error "no answer ... during login" (nothing sent) and the next one is
    accepted; how many depends only on how long the flood ran.
    """
    listed = admin.get(f"/servers/{server_id}/os-instance-actions").json()["instanceActions"]
    events = [
        event
        for action in listed
        for event in admin.get(action_path(server_id, action["request_id"], details=True)).json()[
            "instanceAction"
        ]["events"]
    ]
    running = [e for e in events if e["finish_time"] is None]
    ended = [e for e in events if e["finish_time"] is not None]
    assert {a["action"] for a in listed} == {"trigger_crash_dump"}
    assert len(running) <= 1, events
    if kind != "ipmi":
        assert len(listed) == 1 and running, events
    for event in ended:
        assert event["result"] == "Error", event
        assert "during login" in event["details"], event


@pytest.mark.parametrize("kind", ["libvirt", "redfish", "ipmi"])
def test_a_hung_backend_flooded_by_one_tenant_does_not_slow_another(
    kind: str, crashlab_server: Callable[..., LiveServer]
) -> None:
    socket_kind = socket.SOCK_DGRAM if kind == "ipmi" else socket.SOCK_STREAM
    with silent_listener(socket_kind) as port:
        config = cloud_config(
            extra_servers=[_hung_server(kind, port), fake_server("bob-fast", owner="bob")],
            nmi_guard={"enabled": True, "cooldown_seconds": 0},
            power_sync={"interval_seconds": 1},
        )
        cloud = crashlab_server(config)
        hung, fast = config_server_id("hung"), config_server_id("bob-fast")
        with cloud.client("bob") as bob, cloud.client("admin") as admin:
            quiet = [_bob_round(cloud, bob, admin, fast) for _ in range(3)]
            stop = threading.Event()
            with ThreadPoolExecutor(FLOOD_CLIENTS) as pool:
                floods = [pool.submit(_flood, cloud, hung, stop) for _ in range(FLOOD_CLIENTS)]
                time.sleep(1.0)  # the flood is under way before bob is measured
                loud = []
                deadline = time.monotonic() + FLOOD_SECONDS
                while time.monotonic() < deadline:
                    loud.append(_bob_round(cloud, bob, admin, fast))
                stop.set()
                flood_requests = sum(f.result() for f in floods)
            _check_one_at_a_time(admin, hung, kind)
    print(
        f"{kind}: {flood_requests} flood requests; bob's slowest quiet {max(quiet):.3f} s, "
        f"under the flood median {statistics.median(loud):.3f} s, max {max(loud):.3f} s "
        f"over {len(loud)} rounds"
    )
    assert flood_requests > 100
    assert max(loud) < BOUND_SECONDS, loud
    assert "Traceback" not in cloud.log_path.read_text()


def test_a_projects_requests_beyond_its_share_get_429_and_other_projects_do_not(
    crashlab_server: Callable[..., LiveServer],
) -> None:
    # One request of a project at a time, none waiting: alice's 20 clients at
    # once overlap, so some are refused; bob, alongside, is never refused.
    config = cloud_config(tenant_requests={"concurrency": 1, "queue": 0})
    cloud = crashlab_server(config)
    barrier = threading.Barrier(21)

    def burst(user: str) -> list[httpx.Response]:
        with cloud.client(user) as client:
            barrier.wait()
            return [client.get("/servers/detail") for _ in range(5)]

    with ThreadPoolExecutor(21) as pool:
        alices = [pool.submit(burst, "alice") for _ in range(20)]
        bobs = pool.submit(burst, "bob")
        alice_responses = [r for f in alices for r in f.result()]
        bob_responses = bobs.result()
    assert [r.status_code for r in bob_responses] == [200] * 5
    refused = [r for r in alice_responses if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429) for r in alice_responses)
    print(f"alice: {len(refused)} of {len(alice_responses)} refused; bob: none")
    body = refused[0].json()["overLimit"]
    assert body["code"] == 429 and body["retryAfter"] == "1"
    assert "in flight" in body["message"]
    assert refused[0].headers["retry-after"] == "1"
    assert refused[0].headers["x-openstack-request-id"].startswith("req-")
