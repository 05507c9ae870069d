"""app/store.py's decisions, on the fake cloud's inventory in a fresh state file."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.api.app import create_app
from app.store import (
    ActionStart,
    DumpCoolingDown,
    DumpInProgress,
    NMIOnItsWay,
    ServerGone,
    ServerLocked,
    Store,
)
from tests.app.cloud import AppCloud, fake_cloud_config

pytestmark = pytest.mark.fast

EVENT = "compute_trigger_crash_dump"
START = ActionStart("req-store-test", "alice", "alice")


def start_dump(
    store: Store, server_id: str, *, refuse_locked: bool = True, cooldown: float | None = 60
) -> int:
    """Record a crash dump; returns its event's id."""
    action = store.start_crash_dump(
        server_id,
        start=START,
        event_name=EVENT,
        host="crashlab",
        owner="this-process",
        refuse_locked=refuse_locked,
        cooldown_seconds=cooldown,
    )
    return int(action.events[0].id)


def test_power_syncs_are_claimed_once_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRASHLAB_SECRET_KEY", "")
    config = fake_cloud_config()
    # No lifespan: the inventory is loaded, and no sync pass has claimed anything yet.
    store = create_app(config, state_file=tmp_path / "state.db").state.service.store
    claimed = store.claim_power_syncs(3600)
    assert sorted(r.name for r in claimed) == sorted(s.name for s in config.servers)
    assert store.claim_power_syncs(3600) == []
    # Another process on the same state file finds none due either.
    assert Store(tmp_path / "state.db").claim_power_syncs(3600) == []


def test_power_syncs_come_due_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRASHLAB_SECRET_KEY", "")
    store = create_app(fake_cloud_config(), state_file=tmp_path / "state.db").state.service.store
    assert len(store.claim_power_syncs(0)) == 7
    assert len(store.claim_power_syncs(0)) == 7


def test_a_gone_server_takes_no_dump(cloud: AppCloud) -> None:
    with pytest.raises(ServerGone):
        start_dump(cloud.store, "00000000-0000-0000-0000-000000000000")


def test_a_locked_server_refuses_only_those_who_must_respect_the_lock(cloud: AppCloud) -> None:
    with pytest.raises(ServerLocked):
        start_dump(cloud.store, cloud.ids["alice-locked"])
    start_dump(cloud.store, cloud.ids["alice-locked"], refuse_locked=False)


def test_the_guard_refuses_a_running_dump_then_a_recent_one(cloud: AppCloud) -> None:
    server_id = cloud.ids["alice-active"]
    event_id = start_dump(cloud.store, server_id)
    with pytest.raises(DumpInProgress):
        start_dump(cloud.store, server_id)
    assert cloud.store.finish_event(event_id, result="Success")
    with pytest.raises(DumpCoolingDown) as cooling:
        start_dump(cloud.store, server_id)
    assert 0 <= cooling.value.elapsed < 60
    # No cooldown (the guard bypassed or off): taken at once.
    start_dump(cloud.store, server_id, cooldown=None)
    assert cloud.store.running_event_count(server_id, EVENT) == 1


def test_a_finished_event_is_not_finished_again(cloud: AppCloud) -> None:
    event_id = start_dump(cloud.store, cloud.ids["alice-active"])
    assert cloud.store.finish_event(event_id, result="Success")
    assert not cloud.store.finish_event(event_id, result="Error", details="too late")


def test_delete_server_removes_its_actions(cloud: AppCloud) -> None:
    server_id = cloud.ids["alice-active"]
    start_dump(cloud.store, server_id)
    assert [a.request_id for a in cloud.store.list_actions(server_id)] == [START.request_id]
    assert cloud.store.delete_server(server_id)
    assert cloud.store.get_server(server_id) is None
    assert cloud.store.list_actions(server_id) == []
    assert cloud.store.get_action(server_id, START.request_id) is None
    assert not cloud.store.delete_server(server_id)


def test_a_server_is_not_deleted_while_its_nmi_is_on_its_way(cloud: AppCloud) -> None:
    server_id = cloud.ids["alice-active"]
    event_id = start_dump(cloud.store, server_id)
    assert cloud.store.begin_sending(event_id)
    with pytest.raises(NMIOnItsWay):
        cloud.store.delete_server(server_id)
    assert cloud.store.finish_event(event_id, result="Success")
    assert cloud.store.delete_server(server_id)
