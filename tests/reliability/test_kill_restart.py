"""``crashlab serve`` killed with SIGKILL while crash dumps are in flight, then restarted.

Nothing may be lost and nothing repeated:

- every request that got a 202 has its instance action (the action is
  committed before the 202 is sent);
- after the restart no event is left running: those the kill interrupted are
  Error, "service restarted before the result was known";
- no NMI is sent again, by the restart or by an eager user: the fake driver's
  ``nmi_log`` (one line per NMI, written outside the killed process's memory)
  counts exactly the events that succeeded, and the storm guard still holds
  for the servers whose NMI may or may not have gone out.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

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

QUICK, IN_FLIGHT, LATE_WORKERS, LATE_PER_WORKER = 10, 20, 6, 12
DELAY = 3.0
RESTARTED = "service restarted before the result was known"


def _servers(nmi_log: Path) -> list[dict[str, Any]]:
    quick = [fake_server(f"quick-{i}", nmi_log=str(nmi_log)) for i in range(QUICK)]
    slow = [
        fake_server(f"slow-{i}", delay_seconds=DELAY, nmi_log=str(nmi_log))
        for i in range(IN_FLIGHT + LATE_WORKERS * LATE_PER_WORKER)
    ]
    return quick + slow


class LateClients:
    """Workers that keep triggering fresh servers until the service dies under them."""

    def __init__(self, cloud: LiveServer, headers: httpx.Headers) -> None:
        self.cloud = cloud
        self.headers = headers
        self.accepted: dict[str, str] = {}  # request id -> server id
        self.lost = 0  # requests that never got an answer
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(LATE_WORKERS)

    def start(self) -> None:
        for worker in range(LATE_WORKERS):
            self._pool.submit(self._run, worker)

    def _run(self, worker: int) -> None:
        first = IN_FLIGHT + worker * LATE_PER_WORKER
        with httpx.Client(base_url=self.cloud.compute_url, headers=self.headers) as client:
            for index in range(first, first + LATE_PER_WORKER):
                server = config_server_id(f"slow-{index}")
                try:
                    response = trigger(client, server)
                except httpx.HTTPError:
                    with self._lock:
                        self.lost += 1
                    return
                if response.status_code == 202:
                    with self._lock:
                        self.accepted[response.headers["x-openstack-request-id"]] = server
                time.sleep(0.02)

    def join(self) -> None:
        self._pool.shutdown(wait=True)


def test_sigkill_with_actions_in_flight_loses_and_repeats_nothing(
    crashlab_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    nmi_log = tmp_path / "nmi.log"
    cloud = crashlab_server(cloud_config(extra_servers=_servers(nmi_log)))
    accepted: dict[str, str] = {}
    with cloud.client("alice") as alice:
        for i in range(QUICK):
            response = trigger(alice, config_server_id(f"quick-{i}"))
            assert response.status_code == 202
            accepted[response.headers["x-openstack-request-id"]] = config_server_id(f"quick-{i}")
        in_flight = {}
        for i in range(IN_FLIGHT):
            response = trigger(alice, config_server_id(f"slow-{i}"))
            assert response.status_code == 202
            in_flight[response.headers["x-openstack-request-id"]] = config_server_id(f"slow-{i}")
        _wait_for(lambda: len(nmi_lines(nmi_log)) == QUICK, "the quick NMIs")
        late = LateClients(cloud, alice.headers)
        late.start()
        # Kill once a late trigger has its 202, while the other workers are mid-request.
        _wait_for(lambda: bool(late.accepted), "a late trigger's 202")
        cloud.kill()
        late.join()
    accepted.update(in_flight)
    accepted.update(late.accepted)
    sent_before_kill = Counter(nmi_lines(nmi_log))
    assert late.accepted, "no trigger got through before the kill"

    cloud.start()
    time.sleep(DELAY + 0.5)  # long enough for any re-sent NMI to arrive
    with cloud.client("admin") as admin:
        results = {
            request_id: wait_for_action(admin, server, request_id)["events"]
            for request_id, server in accepted.items()
        }
        running = _running_events(admin)
    assert running == [], running

    succeeded: Counter[str] = Counter()
    for request_id, events in results.items():
        [event] = events
        assert event["event"] == "compute_trigger_crash_dump"
        if event["result"] == "Success":
            succeeded[accepted[request_id]] += 1
        else:
            assert event["details"] == RESTARTED, event
    # Every NMI sent is a Success on record, and nothing more was sent after the kill.
    assert Counter(nmi_lines(nmi_log)) == sent_before_kill == succeeded
    assert all(count == 1 for count in succeeded.values())
    interrupted = [accepted[r] for r in in_flight if results[r][0]["result"] == "Error"]
    assert len(interrupted) == IN_FLIGHT

    with cloud.client("alice") as alice:
        # Whether those NMIs went out is unknown, so the guard still holds.
        assert_fault(trigger(alice, interrupted[0]), 409, "was triggered")
        # The restarted service serves new work as usual.
        fresh = config_server_id("alice-active")
        response = alice.post(f"/servers/{fresh}/action", json=TRIGGER)
        assert response.status_code == 202
    with cloud.client("admin") as admin:
        action = wait_for_action(admin, fresh, response.headers["x-openstack-request-id"])
        assert action["events"][0]["result"] == "Success"


def _running_events(admin: httpx.Client) -> list[str]:
    """Every event of every action of every server that has no finish time."""
    servers = admin.get("/servers", params={"all_tenants": "1"}).json()["servers"]
    running = []
    for server in servers:
        actions = admin.get(f"/servers/{server['id']}/os-instance-actions").json()
        for action in actions["instanceActions"]:
            shown = admin.get(
                f"/servers/{server['id']}/os-instance-actions/{action['request_id']}"
            ).json()["instanceAction"]
            running += [action["request_id"] for e in shown["events"] if not e["finish_time"]]
    return running


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
