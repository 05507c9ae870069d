"""BMC faults against the real emulators, through a live ``crashlab serve``.

- **BMC down**: virtualbmc and sushy-tools stopped. The event is ``Error``
  within the BMC's timeout, while servers behind live BMCs, triggered at the
  same moment, succeed as fast as ever and get exactly one NMI each.
- **Emulator crash mid-request**: the emulator is frozen (SIGSTOP), so the
  trigger's request is certainly in flight when it is killed (SIGKILL). The
  event is ``Error`` with the BMC's address in its details, no event is left
  running, the API answers throughout, and once the emulator is back the
  server is usable again (past the storm guard, as the NMI may have gone out).
  The same holds for a slow peer BMC killed right after the 202, while it
  sits on the trigger's request: it counts the NMIs it gets, and got none.

Wrong BMC passwords, for both drivers, are covered through the REST API in
tests/drivers/test_ipmi.py and tests/drivers/test_redfish.py.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from app.client import wait_for_action
from emulators.sushy import SushyEmulator
from emulators.vbmc import BMCEndpoint, VirtualBMCs
from tests.fixtures import IPMIPeers, bmc_cloud
from tests.live import LiveServer
from tests.reliability.cloud import assert_fault, config_server_id, trigger

pytestmark = [pytest.mark.bmc, pytest.mark.libvirt]

TIMEOUT = 4  # seconds: every BMC's driver_info timeout here
POWER_DIAG_LOGGED = "Power diag called for domain"
RESET_LOGGED = "POST /redfish/v1/Systems/{}/Actions/ComputerSystem.Reset"


def _ipmi(endpoint: BMCEndpoint) -> tuple[str, dict[str, object]]:
    return "ipmi", endpoint.driver_info() | {"timeout": TIMEOUT}


def _redfish(emulator: SushyEmulator, domain: str) -> tuple[str, dict[str, object]]:
    return "redfish", emulator.driver_info() | {
        "system_id": emulator.system_id(domain),
        "timeout": TIMEOUT,
    }


def _resets_logged(emulator: SushyEmulator, domain: str) -> int:
    return emulator.log().count(RESET_LOGGED.format(emulator.system_id(domain)))


def _trigger_all(cloud: LiveServer, token: str, names: list[str]) -> dict[str, tuple[str, float]]:
    """POST trigger_crash_dump to each server at once: name -> (request id, seconds to 202)."""

    def post(name: str) -> tuple[str, float]:
        headers = {"X-Auth-Token": token, "OpenStack-API-Version": "compute 2.17"}
        with httpx.Client(base_url=cloud.compute_url, headers=headers, timeout=30) as client:
            started = time.monotonic()
            response = trigger(client, config_server_id(name))
            assert response.status_code == 202, response.text
            return response.headers["x-openstack-request-id"], time.monotonic() - started

    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(post, names), strict=True))


def _finished_event(
    client: httpx.Client, name: str, request_id: str, timeout: float
) -> dict[str, Any]:
    """The trigger's event once finished, with its details (the extension's view)."""
    action = wait_for_action(
        client.get, config_server_id(name), request_id, timeout=timeout, poll=0.05
    )
    [event] = action["events"]
    return dict(event)


def _took(event: dict[str, Any]) -> float:
    """Seconds from the action being recorded (just before the 202) to the event's result."""
    start = dt.datetime.fromisoformat(event["start_time"])
    return (dt.datetime.fromisoformat(event["finish_time"]) - start).total_seconds()


def _running_events(cloud: LiveServer) -> int:
    with sqlite3.connect(cloud.state_file) as db:
        query = "SELECT COUNT(*) FROM instance_actions_events WHERE finish_time IS NULL"
        count: int = db.execute(query).fetchone()[0]
    return count


def test_bmc_down_is_an_error_within_the_timeout_and_live_bmcs_are_unaffected(
    vbmcs: VirtualBMCs,
    sushy_emulator: Callable[..., SushyEmulator],
    blank_domains: Callable[[], str],
    crashlab_server: Callable[..., LiveServer],
) -> None:
    domains = {name: blank_domains() for name in ("ipmi", "ipmi-down", "redfish", "redfish-down")}
    endpoints = {name: vbmcs.add(domains[name]) for name in ("ipmi", "ipmi-down")}
    emulators = {
        name: sushy_emulator(domains=[domains[name]]) for name in ("redfish", "redfish-down")
    }
    servers = {name: _ipmi(endpoint) for name, endpoint in endpoints.items()}
    servers |= {name: _redfish(emulator, domains[name]) for name, emulator in emulators.items()}
    cloud = crashlab_server(bmc_cloud(servers))
    vbmcs.stop(domains["ipmi-down"])
    emulators["redfish-down"].stop()

    accepted = _trigger_all(cloud, cloud.token("alice"), list(servers))
    with cloud.client("alice") as alice, cloud.client("admin") as admin:
        answered = time.monotonic()
        alice.get("/servers").raise_for_status()
        answered = time.monotonic() - answered
        events = {  # read by an admin: the owner reads details with addresses redacted
            name: _finished_event(admin, name, request_id, timeout=2 * TIMEOUT)
            for name, (request_id, _) in accepted.items()
        }
    print()
    for name, event in events.items():
        print(
            f"{name}: 202 after {accepted[name][1]:.2f}s, {event['result']} "
            f"{_took(event):.2f}s later: {event['details']}"
        )
    print(f"the API answered a listing in {answered:.3f}s meanwhile")

    assert answered < 1
    for name in ("ipmi", "redfish"):  # not held up by the dead BMCs
        assert (events[name]["result"], events[name]["details"]) == ("Success", None)
        assert _took(events[name]) < TIMEOUT
        assert events[name]["finish_time"] < events["ipmi-down"]["finish_time"]
    assert vbmcs.log(domains["ipmi"]).count(POWER_DIAG_LOGGED) == 1
    assert _resets_logged(emulators["redfish"], domains["redfish"]) == 1
    for name in ("ipmi-down", "redfish-down"):
        assert events[name]["result"] == "Error"
        assert _took(events[name]) <= TIMEOUT + 1
    assert events["ipmi-down"]["details"].startswith(
        f"no answer from BMC at 127.0.0.1:{endpoints['ipmi-down'].port}"
    )
    assert events["redfish-down"]["details"] == (
        f"cannot reach BMC at {emulators['redfish-down'].url}: [Errno 111] Connection refused"
    )
    assert _running_events(cloud) == 0


def test_emulator_killed_mid_request_is_an_error_and_nothing_is_left_running(
    vbmcs: VirtualBMCs,
    sushy_emulator: Callable[..., SushyEmulator],
    blank_domains: Callable[[], str],
    crashlab_server: Callable[..., LiveServer],
) -> None:
    domains = {name: blank_domains() for name in ("ipmi", "redfish", "bystander")}
    before = set(vbmcs.pids())
    endpoint = vbmcs.add(domains["ipmi"])
    [vbmc_pid] = set(vbmcs.pids()) - before
    emulator = sushy_emulator(domains=[domains["redfish"]])
    assert emulator.pid is not None
    sushy_pid = emulator.pid
    cloud = crashlab_server(
        bmc_cloud(
            {
                "ipmi": _ipmi(endpoint),
                "redfish": _redfish(emulator, domains["redfish"]),
                "bystander": _ipmi(vbmcs.add(domains["bystander"])),
            }
        )
    )
    with cloud.client("alice") as alice, cloud.client("admin") as admin:
        alice.get("/servers/detail").raise_for_status()  # power states read while BMCs answer

        # Frozen emulators take the requests and never answer: the trigger is in flight.
        os.kill(vbmc_pid, signal.SIGSTOP)
        os.kill(sushy_pid, signal.SIGSTOP)
        try:
            accepted = _trigger_all(cloud, cloud.token("alice"), ["ipmi", "redfish"])
            time.sleep(0.5)
            assert all(not e["finish_time"] for e in _events_now(alice, accepted))
        finally:
            os.kill(vbmc_pid, signal.SIGKILL)
            os.kill(sushy_pid, signal.SIGKILL)
        killed = time.monotonic()

        answered = time.monotonic()
        alice.get("/servers").raise_for_status()
        answered = time.monotonic() - answered
        bystander = _trigger_all(cloud, cloud.token("alice"), ["bystander"])["bystander"]
        events = {  # read by an admin: the owner reads details with addresses redacted
            name: _finished_event(admin, name, request_id, timeout=2 * TIMEOUT)
            for name, (request_id, _) in accepted.items()
        }
        failed_after = time.monotonic() - killed
        bystander_event = _finished_event(alice, "bystander", bystander[0], timeout=2 * TIMEOUT)
        print()
        for name, event in events.items():
            print(
                f"{name}: {event['result']} {_took(event):.2f}s after the 202: {event['details']}"
            )
        print(
            f"all Error {failed_after:.2f}s after the kill; the API answered in {answered:.3f}s; "
            f"a live BMC's trigger: {bystander_event['result']} in {_took(bystander_event):.2f}s"
        )

        assert answered < 1
        assert bystander_event["result"] == "Success"
        assert failed_after <= TIMEOUT + 1
        assert events["ipmi"]["result"] == events["redfish"]["result"] == "Error"
        assert events["ipmi"]["details"].startswith(
            f"no answer from BMC at 127.0.0.1:{endpoint.port}"
        )
        assert events["redfish"]["details"].startswith(f"cannot reach BMC at {emulator.url}: ")
        assert _running_events(cloud) == 0
        assert POWER_DIAG_LOGGED not in vbmcs.log(domains["ipmi"])
        assert _resets_logged(emulator, domains["redfish"]) == 0

        # Back up, and reached without a restart of crashlab. The IPMI call stopped
        # before its pulse, so nothing was sent and the guard let go: the owner triggers
        # again. The Redfish reset may have gone out, so the guard holds for the owner
        # and an admin passes it.
        assert "nothing sent" in events["ipmi"]["details"]
        vbmcs.stop(domains["ipmi"])
        vbmcs.start(domains["ipmi"])
        emulator.stop()
        emulator.start()
        again = trigger(alice, config_server_id("ipmi"))
        assert again.status_code == 202, again.text
        request_id = again.headers["x-openstack-request-id"]
        assert _finished_event(alice, "ipmi", request_id, timeout=2 * TIMEOUT)["result"] == (
            "Success"
        )
        assert_fault(trigger(alice, config_server_id("redfish")), 409, "crash dump")
        forced = admin.post(
            f"/crashlab/servers/{config_server_id('redfish')}/action",
            json={"trigger_crash_dump": {"ignore_nmi_guard": True}},
        )
        assert forced.status_code == 202, forced.text
        request_id = forced.headers["x-openstack-request-id"]
        assert _finished_event(admin, "redfish", request_id, timeout=2 * TIMEOUT)["result"] == (
            "Success"
        )
        assert vbmcs.log(domains["ipmi"]).count(POWER_DIAG_LOGGED) == 1
        assert _resets_logged(emulator, domains["redfish"]) == 1


def _events_now(
    client: httpx.Client, accepted: dict[str, tuple[str, float]]
) -> list[dict[str, Any]]:
    events = []
    for name, (request_id, _) in accepted.items():
        path = f"/crashlab/servers/{config_server_id(name)}/os-instance-actions/{request_id}"
        events += client.get(path).json()["instanceAction"]["events"]
    return events


def test_slow_bmc_killed_right_after_the_202_is_an_error_and_got_no_nmi(
    ipmi_peers: Callable[..., IPMIPeers], crashlab_server: Callable[..., LiveServer]
) -> None:
    peers = ipmi_peers(["on", "on"], latency=1.0)  # each command answers after 1s
    doomed, bystander = peers.ports
    [doomed_pid, _] = peers.pids()
    info: dict[str, object] = {"address": "127.0.0.1", "username": peers.username}
    info |= {"password": peers.password, "timeout": TIMEOUT}
    cloud = crashlab_server(
        bmc_cloud(
            {
                "doomed": ("ipmi", info | {"port": doomed}),
                "bystander": ("ipmi", info | {"port": bystander}),
            }
        )
    )
    token = cloud.token("alice")
    [(request_id, _)] = _trigger_all(cloud, token, ["doomed"]).values()
    os.kill(doomed_pid, signal.SIGKILL)  # the dispatched call is under way: 1s per command
    killed = time.monotonic()
    with cloud.client("alice") as alice, cloud.client("admin") as admin:
        answered = time.monotonic()
        alice.get("/servers").raise_for_status()
        answered = time.monotonic() - answered
        [(other, _)] = _trigger_all(cloud, token, ["bystander"]).values()
        # Read by an admin: the owner reads details with addresses redacted.
        event = _finished_event(admin, "doomed", request_id, timeout=2 * TIMEOUT)
        failed_after = time.monotonic() - killed
        other_event = _finished_event(alice, "bystander", other, timeout=2 * TIMEOUT)
    print(
        f"\nError {failed_after:.2f}s after the kill: {event['details']}; "
        f"the API answered in {answered:.3f}s; the other BMC: {other_event['result']}"
    )
    assert answered < 1
    assert event["result"] == "Error" and failed_after <= TIMEOUT + 1
    assert event["details"].startswith(f"no answer from BMC at 127.0.0.1:{doomed}")
    assert other_event["result"] == "Success"
    assert _running_events(cloud) == 0
    # The slow peer may log its NMI a moment after crashlab read its answer; then
    # nothing more may come (a re-sent pulse would be a second NMI).
    deadline = time.monotonic() + 3
    while not peers.nmis() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)
    assert peers.nmis() == Counter([bystander])
