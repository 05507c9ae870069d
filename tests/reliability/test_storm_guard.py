"""The NMI storm guard (beyond Nova): one NMI at a time per server, then a cooldown.

A second NMI while a kdump is running would interrupt it, so crashlab refuses
a trigger_crash_dump while the previous one on that server is in flight or
within ``nmi_guard.cooldown_seconds`` of it, with a 409 in Nova's fault
format. An admin can pass it through the crashlab extension. The fake driver
(``delay_seconds``, ``nmi_log``) shows how many NMIs were really sent.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.live import LiveServer
from tests.reliability.cloud import (
    TRIGGER,
    assert_fault,
    cloud_config,
    config_server_id,
    fake_server,
    nmi_lines,
    trigger,
    wait_for_action,
)

DELAY = 1.0  # how long the fake driver takes to send an NMI
BYPASS = {"trigger_crash_dump": {"ignore_nmi_guard": True}}


@pytest.fixture(scope="module")
def nmi_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nmi") / "nmi.log"


@pytest.fixture(scope="module")
def cloud(module_server: Callable[..., LiveServer], nmi_log: Path) -> LiveServer:
    servers = [
        fake_server(f"slow-{i}", delay_seconds=DELAY, nmi_log=str(nmi_log)) for i in range(4)
    ]
    return module_server(cloud_config(extra_servers=servers))  # the default guard: on, 60 s


def _nmis(nmi_log: Path, server_id: str) -> int:
    return nmi_lines(nmi_log).count(server_id)


def _cooling_down(alice: httpx.Client, admin: httpx.Client, name: str) -> str:
    """The id of server ``name``, once a trigger by alice has finished: its cooldown runs."""
    server = config_server_id(name)
    first = trigger(alice, server)
    wait_for_action(admin, server, first.headers["x-openstack-request-id"])
    return server


def test_second_trigger_while_the_first_is_in_flight_is_409(
    alice: httpx.Client, admin: httpx.Client, nmi_log: Path
) -> None:
    server = config_server_id("slow-0")
    first = trigger(alice, server)
    assert first.status_code == 202
    second = trigger(alice, server)
    message = assert_fault(second, 409, f"A crash dump of instance {server} is still in progress")
    assert "one NMI at a time" in message
    assert second.headers["openstack-api-version"] == "compute 2.17"
    # Admins get no pass on the Nova path: the guard protects the guest, not a policy.
    assert_fault(trigger(admin, server), 409, "still in progress")

    action = wait_for_action(admin, server, first.headers["x-openstack-request-id"])
    assert action["events"][0]["result"] == "Success"
    assert _nmis(nmi_log, server) == 1
    # Only the accepted trigger recorded an action.
    actions = alice.get(f"/servers/{server}/os-instance-actions").json()["instanceActions"]
    assert [a["request_id"] for a in actions] == [first.headers["x-openstack-request-id"]]


def test_trigger_within_the_cooldown_is_409(
    alice: httpx.Client, admin: httpx.Client, nmi_log: Path
) -> None:
    server = _cooling_down(alice, admin, "slow-1")
    message = assert_fault(trigger(alice, server), 409, f"A crash dump of instance {server} was")
    assert "waits 60 s before another NMI so a running kdump is not interrupted" in message
    assert _nmis(nmi_log, server) == 1


def test_a_burst_of_triggers_sends_exactly_one_nmi(
    cloud: LiveServer, alice: httpx.Client, admin: httpx.Client, nmi_log: Path
) -> None:
    """A kdump in progress is never interrupted: 20 clients at once, one NMI."""
    server = config_server_id("slow-2")
    clients = [httpx.Client(base_url=cloud.compute_url, headers=alice.headers) for _ in range(20)]
    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            responses = list(pool.map(lambda c: trigger(c, server), clients))
    finally:
        for client in clients:
            client.close()
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {202: 1, 409: 19}, statuses
    [accepted] = [r for r in responses if r.status_code == 202]
    wait_for_action(admin, server, accepted.headers["x-openstack-request-id"])
    time.sleep(DELAY)  # nothing else is on its way
    assert _nmis(nmi_log, server) == 1


def test_admin_bypasses_the_guard_through_the_extension(
    alice: httpx.Client, admin: httpx.Client, nmi_log: Path
) -> None:
    server = _cooling_down(alice, admin, "slow-3")
    assert_fault(trigger(alice, server), 409)

    path = f"/crashlab/servers/{server}/action"
    # Only admins may pass it (crashlab:nmi_guard:bypass), and only when they ask to.
    assert_fault(alice.post(path, json=BYPASS), 403, "crashlab:nmi_guard:bypass")
    not_asked = {"trigger_crash_dump": {"ignore_nmi_guard": False}}
    assert_fault(admin.post(path, json=not_asked), 409, "was triggered")
    forced = admin.post(path, json=BYPASS)
    assert forced.status_code == 202, forced.text
    assert forced.text == ""
    action = wait_for_action(admin, server, forced.headers["x-openstack-request-id"])
    assert action["action"] == "trigger_crash_dump"
    assert action["events"][0]["result"] == "Success"
    assert _nmis(nmi_log, server) == 2


def test_an_nmi_that_was_never_sent_starts_no_cooldown(
    alice: httpx.Client, admin: httpx.Client
) -> None:
    """NMINotSupported is raised before anything reaches the backend, so a retry is safe."""
    server = config_server_id("alice-nonmi")
    for _ in range(2):
        response = trigger(alice, server)
        assert response.status_code == 202, response.text
        action = wait_for_action(admin, server, response.headers["x-openstack-request-id"])
        assert action["events"][0]["result"] == "Error"
        assert action["events"][0]["details"] == "Triggering crash dump is not supported"


def test_the_cooldown_is_configurable_and_ends(
    crashlab_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    log = tmp_path / "nmi.log"
    servers = [fake_server("short", nmi_log=str(log))]
    cloud = crashlab_server(
        cloud_config(extra_servers=servers, nmi_guard={"enabled": True, "cooldown_seconds": 1.5})
    )
    server = config_server_id("short")
    with cloud.client("alice") as alice:
        first = trigger(alice, server)
        assert first.status_code == 202
        # Finished, so that the next trigger meets the cooldown, not the NMI in flight.
        wait_for_action(alice, server, first.headers["x-openstack-request-id"])
        assert_fault(trigger(alice, server), 409, "waits 1.5 s")
        time.sleep(1.6)
        assert trigger(alice, server).status_code == 202
    deadline = time.monotonic() + 5
    while len(nmi_lines(log)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nmi_lines(log) == [server, server]


def test_the_guard_can_be_disabled(
    crashlab_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    log = tmp_path / "nmi.log"
    servers = [fake_server("unguarded", nmi_log=str(log))]
    cloud = crashlab_server(cloud_config(extra_servers=servers, nmi_guard={"enabled": False}))
    server = config_server_id("unguarded")
    with cloud.client("alice") as alice:
        assert [trigger(alice, server).status_code for _ in range(3)] == [202, 202, 202]
        assert alice.post(f"/servers/{server}/action", json=TRIGGER).status_code == 202
