"""Two ``crashlab serve`` processes on one SQLite state file, and races within one.

Every decision that reads then writes is one transaction in the state file
(app/store.py), so it holds across processes: the storm guard, a lock racing
another lock, a trigger racing a DELETE. A process fails the running events
of a sibling only once that sibling is gone (app/leases.py), and each server's
power state is read by one process per interval (app/sync.py).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from cryptography.fernet import Fernet

from app.store import Store
from tests.live import LiveServer
from tests.reliability.cloud import (
    cloud_config,
    config_server_id,
    fake_server,
    nmi_lines,
    trigger,
    wait_for_action,
)

T = TypeVar("T")
RESTARTED = "service restarted before the result was known"


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Callable[..., tuple[LiveServer, LiveServer]]]:
    """Factory: two ``crashlab serve`` processes on one config and one state file."""
    started: list[LiveServer] = []
    env = {"CRASHLAB_SECRET_KEY": Fernet.generate_key().decode()}

    def start(config: dict[str, Any]) -> tuple[LiveServer, LiveServer]:
        config_path = tmp_path / "crashlab.yaml"
        config_path.write_text(yaml.safe_dump(config))
        for name in ("a", "b"):
            server = LiveServer(
                config_path=config_path,
                state_file=tmp_path / "state.db",
                log_path=tmp_path / f"serve-{name}.log",
                env=env,
            )
            started.append(server.start())
        return started[0], started[1]

    yield start
    for server in started:
        server.stop()


def at_once(calls: list[Callable[[], T]]) -> list[T]:
    """Run ``calls`` in threads released together; their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def _clients(a: LiveServer, b: LiveServer, user: str) -> tuple[httpx.Client, httpx.Client]:
    return a.client(user), b.client(user)


def test_the_storm_guard_holds_across_two_processes(
    pair: Callable[..., tuple[LiveServer, LiveServer]], tmp_path: Path
) -> None:
    log = tmp_path / "nmi.log"
    config = cloud_config(
        extra_servers=[fake_server("shared", nmi_log=str(log), delay_seconds=0.3)],
        nmi_guard={"enabled": True, "cooldown_seconds": 0},
    )
    a, b = pair(config)
    server = config_server_id("shared")
    alice_a, alice_b = _clients(a, b, "alice")
    with alice_a, alice_b, a.client("admin") as admin:
        for round_ in range(3):
            responses = at_once(
                [partial(trigger, alice_a if i % 2 else alice_b, server) for i in range(16)]
            )
            accepted = [r for r in responses if r.status_code == 202]
            assert len(accepted) == 1, [r.status_code for r in responses]
            assert sorted({r.status_code for r in responses}) == [202, 409]
            wait_for_action(admin, server, accepted[0].headers["x-openstack-request-id"])
            assert nmi_lines(log) == [server] * (round_ + 1)


def test_a_trigger_racing_a_delete_sends_at_most_one_nmi_and_none_after(
    pair: Callable[..., tuple[LiveServer, LiveServer]], tmp_path: Path
) -> None:
    rounds = 8
    servers = [
        fake_server(f"doomed-{i}", nmi_log=str(tmp_path / f"nmi-{i}.log"), delay_seconds=0.2)
        for i in range(rounds)
    ]
    a, b = pair(cloud_config(extra_servers=servers))
    alice_a, alice_b = _clients(a, b, "alice")
    with alice_a, alice_b, a.client("admin") as admin:
        for i in range(rounds):
            server, log = config_server_id(f"doomed-{i}"), tmp_path / f"nmi-{i}.log"
            triggers: list[Callable[[], Any]] = [
                partial(trigger, alice_a if j % 2 else alice_b, server) for j in range(8)
            ]
            results: list[Any] = at_once([*triggers, partial(_remove, admin, server, log)])
            responses: list[httpx.Response] = results[:-1]
            nmis_at_delete: int = results[-1]
            accepted = [r for r in responses if r.status_code == 202]
            assert len(accepted) <= 1, [r.status_code for r in responses]
            time.sleep(0.5)  # longer than the fake's delay: a late NMI would show
            assert nmis_at_delete == len(nmi_lines(log)) <= len(accepted)
            assert admin.get(f"/crashlab/servers/{server}").status_code == 404


def _remove(admin: httpx.Client, server: str, log: Path) -> int:
    """DELETE the server, waiting out 409s (its NMI on its way); the NMIs sent by then."""
    while admin.delete(f"/crashlab/servers/{server}").status_code == 409:
        time.sleep(0.02)
    return len(nmi_lines(log))


def test_an_admin_lock_racing_an_owner_lock_stays_the_admins(
    pair: Callable[..., tuple[LiveServer, LiveServer]],
) -> None:
    a, b = pair(cloud_config(extra_servers=[fake_server("contested")]))
    server = config_server_id("contested")
    path = f"/servers/{server}/action"
    with a.client("admin") as admin, b.client("alice") as alice:
        for _ in range(10):
            locks = at_once([partial(c.post, path, json={"lock": None}) for c in (admin, alice)])
            assert [r.status_code for r in locks] == [202, 202]
            shown = admin.get(f"/crashlab/servers/{server}").json()["server"]
            assert shown["locked_by"] == "admin"
            assert alice.post(path, json={"unlock": None}).status_code == 403
            assert admin.post(path, json={"unlock": None}).status_code == 202


def test_a_live_siblings_running_event_is_kept_and_a_dead_ones_is_failed(
    pair: Callable[..., tuple[LiveServer, LiveServer]], tmp_path: Path
) -> None:
    log = tmp_path / "nmi.log"
    config = cloud_config(
        extra_servers=[
            fake_server("slow", nmi_log=str(log), delay_seconds=3),
            fake_server("slower", nmi_log=str(log), delay_seconds=10),
        ],
        lease_seconds=3,
    )
    a, b = pair(config)
    slow, slower = config_server_id("slow"), config_server_id("slower")
    with a.client("alice") as alice, b.client("admin") as admin:
        first = trigger(alice, slow).headers["x-openstack-request-id"]
        # b renews, reaps and syncs meanwhile; a's event is a live sibling's.
        action = wait_for_action(admin, slow, first, timeout=10)
        assert action["events"][0]["result"] == "Success", action
        assert nmi_lines(log) == [slow]

        second = trigger(alice, slower).headers["x-openstack-request-id"]
        a.kill()
        started = time.monotonic()
        action = wait_for_action(admin, slower, second, timeout=5)
        event = action["events"][0]
        assert (event["result"], event["details"]) == ("Error", RESTARTED), event
        print(f"the killed process's event was failed {time.monotonic() - started:.2f} s later")
        assert nmi_lines(log) == [slow]


def test_a_reused_uuid_starts_with_no_history(
    crashlab_server: Callable[..., LiveServer],
) -> None:
    cloud = crashlab_server(cloud_config())
    server_id = str(uuid.uuid4())

    def register(owner: str) -> None:
        body = {
            "server": {
                "uuid": server_id,
                "name": "reused",
                "project_id": owner,
                "user_id": owner,
                "driver": "fake",
                "driver_info": {"power_state": "running"},
            }
        }
        response = admin.post("/crashlab/servers", json=body)
        assert response.status_code == 201, response.text

    with cloud.client("admin") as admin, cloud.client("alice") as alice:
        register("alice")
        accepted = trigger(alice, server_id)
        assert accepted.status_code == 202
        wait_for_action(admin, server_id, accepted.headers["x-openstack-request-id"])
        assert admin.delete(f"/crashlab/servers/{server_id}").status_code == 204
        register("bob")
        with cloud.client("bob") as bob:
            listed = bob.get(f"/servers/{server_id}/os-instance-actions")
            assert listed.status_code == 200 and listed.json() == {"instanceActions": []}
        assert admin.get(f"/servers/{server_id}/os-instance-actions").json() == {
            "instanceActions": []
        }


def test_each_server_is_claimed_for_a_power_sync_by_one_store(tmp_path: Path) -> None:
    from app.store import Server, utcnow

    path = tmp_path / "state.db"
    first, second = Store(path), Store(path)
    now = utcnow()
    for index in range(200):
        first.add_server(
            Server(
                uuid=str(uuid.uuid4()),
                name=f"s{index}",
                project_id="p",
                user_id="u",
                driver="fake",
                driver_info={},
                source="api",
                created_at=now,
                updated_at=now,
                last_power_state=0,
            )
        )
    barrier = threading.Barrier(2)

    def claim(store: Store) -> set[str]:
        barrier.wait()
        claimed: set[str] = set()
        for _ in range(20):
            claimed |= {server.uuid for server in store.claim_power_syncs(3600)}
        return claimed

    with ThreadPoolExecutor(2) as pool:
        mine, theirs = pool.map(claim, [first, second])
    assert not mine & theirs
    assert len(mine | theirs) == 200
