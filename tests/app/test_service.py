"""The compute API on the fake driver: show, list, trigger, lock, reset state, storm guard."""

from __future__ import annotations

import math
import re
import time

import pytest

from app.config import load_config
from app.store import ActionStart
from drivers.fake import FakeDriver
from tests.app.cloud import FAKE_CLOUD, AppCloud, assert_fault, fake_cloud_config

pytestmark = pytest.mark.fast

ALICE_SERVERS = {
    "alice-active",
    "alice-paused",
    "alice-stopped",
    "alice-error",
    "alice-locked",
    "alice-nonmi",
}


def nmis(cloud: AppCloud, name: str) -> int:
    return FakeDriver.machines[cloud.ids[name]].nmi_count


def test_show_reads_the_live_state(cloud: AppCloud) -> None:
    response = cloud.get("alice", f"/servers/{cloud.ids['alice-paused']}")
    assert response.status_code == 200
    server = response.json()["server"]
    assert (server["name"], server["status"], server["OS-EXT-STS:power_state"]) == (
        "alice-paused",
        "PAUSED",
        3,
    )
    assert server["locked"] is False


def test_a_member_lists_her_project_and_an_admin_every_project(cloud: AppCloud) -> None:
    mine = cloud.get("alice", "/servers").json()["servers"]
    assert {s["name"] for s in mine} == ALICE_SERVERS
    everyone = cloud.get("admin", "/servers", params={"all_tenants": "1"}).json()["servers"]
    assert {s["name"] for s in everyone} == ALICE_SERVERS | {"bob-active"}


def test_another_project_s_server_is_not_found(cloud: AppCloud) -> None:
    server_id = cloud.ids["bob-active"]
    assert_fault(
        cloud.get("alice", f"/servers/{server_id}"),
        404,
        "itemNotFound",
        f"Instance {server_id} could not be found.",
    )


def test_trigger_is_accepted_and_its_event_succeeds(cloud: AppCloud) -> None:
    response = cloud.trigger("alice", "alice-active")
    assert response.status_code == 202
    assert response.content == b""
    # TestClient runs the background NMI before returning.
    event = cloud.event("alice", "alice-active", response.headers["x-openstack-request-id"])
    assert (event["event"], event["result"], event["details"]) == (
        "compute_trigger_crash_dump",
        "Success",
        None,
    )
    assert nmis(cloud, "alice-active") == 1


def test_a_backend_without_nmi_records_an_error_event(cloud: AppCloud) -> None:
    response = cloud.trigger("alice", "alice-nonmi")
    assert response.status_code == 202
    event = cloud.event("admin", "alice-nonmi", response.headers["x-openstack-request-id"])
    assert event["result"] == "Error"
    assert event["details"] == "Triggering crash dump is not supported"


def test_a_stopped_server_refuses_a_trigger(cloud: AppCloud) -> None:
    server_id = cloud.ids["alice-stopped"]
    assert_fault(
        cloud.trigger("alice", "alice-stopped"),
        409,
        "conflictingRequest",
        f"Cannot 'trigger_crash_dump' instance {server_id} while it is in vm_state stopped",
    )


def test_a_reader_may_not_trigger(cloud: AppCloud) -> None:
    assert_fault(
        cloud.trigger("carol", "alice-active"),
        403,
        "forbidden",
        "Policy doesn't allow os_compute_api:servers:trigger_crash_dump to be performed.",
    )
    assert cloud.ids["alice-active"] not in FakeDriver.machines or nmis(cloud, "alice-active") == 0


def test_an_owner_locks_and_unlocks(cloud: AppCloud) -> None:
    assert cloud.action("alice", "alice-active", {"lock": None}).status_code == 202
    server_id = cloud.ids["alice-active"]
    assert cloud.get("alice", f"/servers/{server_id}").json()["server"]["locked"] is True
    assert_fault(
        cloud.trigger("alice", "alice-active"),
        409,
        "conflictingRequest",
        f"Instance {server_id} is locked",
    )
    assert cloud.action("alice", "alice-active", {"unlock": None}).status_code == 202
    assert cloud.get("alice", f"/servers/{server_id}").json()["server"]["locked"] is False


def test_an_owner_may_not_lift_an_admin_s_lock(cloud: AppCloud) -> None:
    # Re-locking as the owner changes nothing: the lock stays the admin's.
    assert cloud.action("alice", "alice-locked", {"lock": None}).status_code == 202
    assert_fault(
        cloud.action("alice", "alice-locked", {"unlock": None}),
        403,
        "forbidden",
        "Policy doesn't allow os_compute_api:os-lock-server:unlock:unlock_override "
        "to be performed.",
    )
    assert cloud.action("admin", "alice-locked", {"unlock": None}).status_code == 202


def test_an_admin_triggers_through_a_lock(cloud: AppCloud) -> None:
    assert cloud.trigger("admin", "alice-locked").status_code == 202
    assert nmis(cloud, "alice-locked") == 1


def test_reset_state_is_for_admins(cloud: AppCloud) -> None:
    server_id = cloud.ids["alice-active"]
    body = {"os-resetState": {"state": "error"}}
    assert_fault(
        cloud.action("alice", "alice-active", body),
        403,
        "forbidden",
        "Policy doesn't allow os_compute_api:os-admin-actions:reset_state to be performed.",
    )
    assert cloud.action("admin", "alice-active", body).status_code == 202
    assert cloud.get("alice", f"/servers/{server_id}").json()["server"]["status"] == "ERROR"
    reset = {"os-resetState": {"state": "active"}}
    assert cloud.action("admin", "alice-active", reset).status_code == 202
    assert cloud.get("alice", f"/servers/{server_id}").json()["server"]["status"] == "ACTIVE"


def test_the_storm_guard_refuses_a_second_nmi(cloud: AppCloud) -> None:
    server_id = cloud.ids["alice-active"]
    started = time.monotonic()
    assert cloud.trigger("alice", "alice-active").status_code == 202
    refused = cloud.trigger("alice", "alice-active")
    span = time.monotonic() - started
    # The message names the seconds since the first NMI, which on a loaded
    # machine can be more than 0: it is bounded by the time both calls took.
    assert refused.status_code == 409
    [(name, fault)] = refused.json().items()
    assert (name, fault["code"]) == ("conflictingRequest", 409)
    elapsed = re.fullmatch(
        rf"A crash dump of instance {server_id} was triggered (\d+) s ago; crashlab waits 60 s "
        "before another NMI so a running kdump is not interrupted.",
        fault["message"],
    )
    assert elapsed is not None, fault["message"]
    assert int(elapsed[1]) <= math.ceil(span)
    assert nmis(cloud, "alice-active") == 1


def test_the_storm_guard_refuses_while_a_dump_runs(cloud: AppCloud) -> None:
    server_id = cloud.ids["alice-active"]
    # A dump another process started and has not finished.
    cloud.store.start_crash_dump(
        server_id,
        start=ActionStart("req-elsewhere", "alice", "alice"),
        event_name="compute_trigger_crash_dump",
        host="crashlab",
        owner="another-process",
        refuse_locked=True,
        cooldown_seconds=60,
    )
    cloud.store.clear_nmi_cooldown(server_id)
    assert_fault(
        cloud.trigger("alice", "alice-active"),
        409,
        "conflictingRequest",
        f"A crash dump of instance {server_id} is still in progress; "
        "crashlab sends one NMI at a time.",
    )
    assert server_id not in FakeDriver.machines or nmis(cloud, "alice-active") == 0


def forced(cloud: AppCloud, user: str, name: str) -> int:
    path = f"/v2.1/crashlab/servers/{cloud.ids[name]}/action"
    body = {"trigger_crash_dump": {"ignore_nmi_guard": True}}
    return cloud.client.post(path, json=body, headers=cloud.headers(user)).status_code


def test_only_an_admin_passes_the_storm_guard(cloud: AppCloud) -> None:
    assert cloud.trigger("alice", "alice-active").status_code == 202
    assert forced(cloud, "alice", "alice-active") == 403
    assert forced(cloud, "admin", "alice-active") == 202
    assert nmis(cloud, "alice-active") == 2


def test_the_tier_runs_the_fake_cloud_as_shipped() -> None:
    shipped = load_config(FAKE_CLOUD)
    assert fake_cloud_config().servers == shipped.servers
    assert [u.name for u in fake_cloud_config().identity.users] == [
        u.name for u in shipped.identity.users
    ]
