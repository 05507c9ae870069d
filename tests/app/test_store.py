"""app/store.py's decisions, on the fake cloud's inventory in a fresh state file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from app.api.app import create_app
from app.store import (
    ActionStart,
    CaptureInProgress,
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


def start_capture(store: Store, server_id: str, owner: str) -> str:
    dump = store.start_capture(
        server_id,
        start=START,
        dump_id=f"dump-{owner}",
        host="crashlab",
        owner=owner,
        refuse_locked=True,
        options={"then": "resume"},
    )
    return dump.id


def test_one_capture_of_a_server_at_a_time(cloud: AppCloud) -> None:
    server_id = cloud.ids["alice-active"]
    start_capture(cloud.store, server_id, "first")
    with pytest.raises(CaptureInProgress):
        start_capture(cloud.store, server_id, "second")
    with pytest.raises(ServerLocked):
        start_capture(cloud.store, cloud.ids["alice-locked"], "third")


def test_a_dead_process_s_capture_is_failed_never_resumed(cloud: AppCloud) -> None:
    store = cloud.store
    server_id = cloud.ids["alice-active"]
    dump_id = start_capture(store, server_id, "gone")
    # The followed dumps' resumption leaves captures alone: their call died with their caller.
    assert store.claim_orphaned_dumps({"alive"}, "alive") == []
    assert store.fail_orphaned_captures({"alive"}, "service restarted") == 1
    dump = store.get_crash_dump(server_id, dump_id)
    assert dump is not None
    assert (dump.state, dump.error) == ("failed", "service restarted")
    action = store.get_action(server_id, dump.request_id)
    assert action is not None
    assert [(e.event, e.result, e.details) for e in action.events] == [
        ("crashlab_capture_memory_dump", "Error", "service restarted")
    ]
    # A live process's capture is not touched.
    live = start_capture(store, cloud.ids["alice-paused"], "alive")
    assert store.fail_orphaned_captures({"alive"}, "service restarted") == 0
    assert store.get_crash_dump(cloud.ids["alice-paused"], live).state == "capturing"  # type: ignore[union-attr]


def test_a_check_that_cannot_read_the_kernel_keeps_the_release_last_read(cloud: AppCloud) -> None:
    # A capture pauses its guest, so a check during it reads nothing: the expected
    # kernel of the next capture must not be lost with it.
    store, server_id = cloud.store, cloud.ids["alice-active"]
    store.record_readiness(server_id, {"verdict": "armed"}, "6.1.0-99-amd64")
    store.record_readiness(server_id, {"verdict": "unknown"}, None)
    server = store.get_server(server_id)
    assert server is not None
    assert server.readiness == {"verdict": "unknown"}
    assert server.observed_kernel_release == "6.1.0-99-amd64"


def test_a_state_file_from_before_unattributed_dumps_takes_one(tmp_path: Path) -> None:
    """Its crash_dumps table had NOT NULL attribution; opening it rebuilds the table."""
    path = tmp_path / "state.db"
    store = Store(path)
    store.engine.dispose()
    with sqlite3.connect(path) as db:
        ddl = db.execute("SELECT sql FROM sqlite_master WHERE name = 'crash_dumps'").fetchone()[0]
        for column in ("action_id INTEGER", "request_id VARCHAR(64)", "nmi_sent_at DATETIME"):
            ddl = ddl.replace(f"{column},", f"{column} NOT NULL,")
        db.execute("DROP TABLE crash_dumps")
        db.execute(ddl)
        db.execute("CREATE INDEX ix_crash_dumps_state ON crash_dumps (state)")
    reopened = Store(path)
    kept = reopened.add_unattributed_dump(
        "dump-1", "server-1", state="failed", evidence={}, error="no NMI was pending"
    )
    assert kept.request_id is None and kept.action_id is None
    assert reopened.list_crash_dumps("server-1") == [kept]
    assert not reopened.has_pending_dump("server-1")
