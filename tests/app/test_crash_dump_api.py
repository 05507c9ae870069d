"""The crash-dump resource in-process: its shape, its policy, downloads, retention and resumption.

The fake driver has no console and no disk, so a fake server with a
``console-only`` target is followed at once to ``failed`` ("no dump target
configured"); a collected vmcore is put in place through the store, as the
follower records one. The real follower against real guests is in
tests/app/test_crash_dumps.py and tests/scenarios/test_external_guest.py.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from typing import Any

import pytest

from app.store import ActionStart, Server, Store, utcnow
from tests.app.cloud import AppCloud, assert_fault, fake_cloud_config

pytestmark = pytest.mark.fast

CONSOLE_ONLY = {"type": "console-only"}


def with_targets(**targets: dict[str, Any]) -> dict[str, Any]:
    """The fake cloud's servers, those named given a dump target."""
    servers = [s.model_dump(exclude_none=True) for s in fake_cloud_config().servers]
    for server in servers:
        if server["name"] in targets:
            server["dump_target"] = targets[server["name"]]
    return {"servers": servers}


@pytest.fixture
def cloud(start_cloud: Any) -> AppCloud:
    app_cloud: AppCloud = start_cloud(
        **with_targets(**{"alice-active": CONSOLE_ONLY, "bob-active": CONSOLE_ONLY})
    )
    return app_cloud


def dumps_path(cloud: AppCloud, name: str) -> str:
    return f"/crashlab/servers/{cloud.ids[name]}/crash-dumps"


def terminal_dump(cloud: AppCloud, name: str, user: str = "alice") -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        dumps = cloud.get(user, dumps_path(cloud, name)).json()["crash_dumps"]
        if dumps and dumps[0]["state"] in ("verified", "failed"):
            return dict(dumps[0])
        assert time.monotonic() < deadline, dumps
        time.sleep(0.05)


def test_a_console_only_target_fails_with_no_dump_target(cloud: AppCloud) -> None:
    request_id = cloud.trigger("alice", "alice-active").headers["x-openstack-request-id"]
    dump = terminal_dump(cloud, "alice-active")
    assert dump["request_id"] == request_id
    assert dump["server_id"] == cloud.ids["alice-active"]
    assert (dump["state"], dump["target"], dump["error"]) == (
        "failed",
        "console-only",
        "no dump target configured",
    )
    assert dump["vmcore"] is None and dump["panic"] is None
    shown = cloud.get("alice", f"{dumps_path(cloud, 'alice-active')}/{dump['id']}")
    assert shown.json() == {"crash_dump": dump}
    # The fake server has no console: no observe event; the collect event says why.
    path = f"/crashlab/servers/{cloud.ids['alice-active']}/os-instance-actions/{request_id}"
    events = cloud.get("alice", path).json()["instanceAction"]["events"]
    assert [(e["event"], e["result"], e["details"]) for e in events] == [
        ("compute_trigger_crash_dump", "Success", None),
        ("crashlab_collect_dump", "Error", "no dump target configured"),
    ]


def test_a_server_without_a_target_keeps_nova_s_single_event(cloud: AppCloud) -> None:
    response = cloud.trigger("alice", "alice-paused")
    assert response.status_code == 202
    assert cloud.get("alice", dumps_path(cloud, "alice-paused")).json() == {"crash_dumps": []}
    event = cloud.event("alice", "alice-paused", response.headers["x-openstack-request-id"])
    assert event["event"] == "compute_trigger_crash_dump"


def test_dumps_are_listed_newest_first(cloud: AppCloud) -> None:
    first = cloud.trigger("admin", "alice-active").headers["x-openstack-request-id"]
    terminal_dump(cloud, "alice-active")
    body = {"trigger_crash_dump": {"ignore_nmi_guard": True}}
    path = f"/v2.1/crashlab/servers/{cloud.ids['alice-active']}/action"
    second = cloud.client.post(path, json=body, headers=cloud.headers("admin"))
    assert second.status_code == 202, second.text
    deadline = time.monotonic() + 10
    while (
        len(dumps := cloud.get("alice", dumps_path(cloud, "alice-active")).json()["crash_dumps"])
        < 2
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [d["request_id"] for d in dumps] == [second.headers["x-openstack-request-id"], first]


def test_another_project_gets_404_and_a_reader_reads(cloud: AppCloud) -> None:
    cloud.trigger("alice", "alice-active")
    dump = terminal_dump(cloud, "alice-active")
    server_id = cloud.ids["alice-active"]
    for path in (
        dumps_path(cloud, "alice-active"),
        f"{dumps_path(cloud, 'alice-active')}/{dump['id']}",
        f"{dumps_path(cloud, 'alice-active')}/{dump['id']}/vmcore",
    ):
        assert_fault(
            cloud.get("bob", path), 404, "itemNotFound", f"Instance {server_id} could not be found."
        )
    # carol is a reader in alice's project: she reads, and may not trigger.
    assert cloud.get("carol", dumps_path(cloud, "alice-active")).json()["crash_dumps"] == [dump]
    assert cloud.trigger("carol", "alice-active").status_code == 403


def test_an_unknown_dump_and_a_dump_without_vmcore_are_404(cloud: AppCloud) -> None:
    cloud.trigger("alice", "alice-active")
    dump = terminal_dump(cloud, "alice-active")
    server_id = cloud.ids["alice-active"]
    assert_fault(
        cloud.get("alice", f"{dumps_path(cloud, 'alice-active')}/no-such-dump"),
        404,
        "itemNotFound",
        f"Crash dump no-such-dump of instance {server_id} could not be found.",
    )
    assert_fault(
        cloud.get("alice", f"{dumps_path(cloud, 'alice-active')}/{dump['id']}/vmcore"),
        404,
        "itemNotFound",
        f"Crash dump {dump['id']} has no vmcore (state failed).",
    )


def test_policy_yaml_overrides_the_dump_rules(start_cloud: Any, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text('"os_compute_api:crashlab:crash_dumps:list": "rule:context_is_admin"\n')
    cloud = start_cloud(policy_file=str(policy), **with_targets(**{"alice-active": CONSOLE_ONLY}))
    assert_fault(
        cloud.get("alice", dumps_path(cloud, "alice-active")),
        403,
        "forbidden",
        "Policy doesn't allow os_compute_api:crashlab:crash_dumps:list to be performed.",
    )
    assert cloud.get("admin", dumps_path(cloud, "alice-active")).status_code == 200


def put_vmcore(cloud: AppCloud, dump: dict[str, Any], content: bytes) -> None:
    """A collected vmcore, where and as the follower stores one."""
    follower = cloud.client.app.state.follower  # type: ignore[attr-defined]
    directory = follower.dump_dir(dump["id"])
    directory.mkdir(parents=True)
    (directory / "vmcore").write_bytes(content)
    (directory / "dmesg").write_text("[ 1.0] Kernel panic - not syncing: NMI: Not continuing\n")
    facts = {"format": "kdump-compressed", "bytes": len(content)}
    facts["sha256"] = hashlib.sha256(content).hexdigest()
    cloud.store.record_vmcore(
        dump["id"], state="verified", vmcore=facts, panic=None, stored_bytes=len(content)
    )


def test_the_vmcore_downloads_whole_and_by_range(cloud: AppCloud) -> None:
    cloud.trigger("alice", "alice-active")
    dump = terminal_dump(cloud, "alice-active")
    content = bytes(range(256)) * 64
    put_vmcore(cloud, dump, content)
    path = f"{dumps_path(cloud, 'alice-active')}/{dump['id']}/vmcore"
    whole = cloud.get("carol", path)
    assert whole.status_code == 200
    assert whole.content == content
    assert whole.headers["content-type"] == "application/octet-stream"
    assert whole.headers["content-length"] == str(len(content))
    digest = base64.b64encode(hashlib.sha256(content).digest()).decode()
    assert whole.headers["digest"] == f"sha-256={digest}"
    part = cloud.client.get(
        f"/v2.1{path}", headers={**cloud.headers("alice"), "Range": "bytes=100-199"}
    )
    assert part.status_code == 206
    assert part.content == content[100:200]
    dmesg = cloud.get("alice", f"{dumps_path(cloud, 'alice-active')}/{dump['id']}/dmesg")
    assert dmesg.headers["content-type"].startswith("text/plain")
    assert "NMI: Not continuing" in dmesg.text


def test_retention_removes_the_oldest_vmcore_and_keeps_its_record(start_cloud: Any) -> None:
    cloud = start_cloud(
        crash_dumps={"retention_count": 1}, **with_targets(**{"alice-active": CONSOLE_ONLY})
    )
    follower = cloud.client.app.state.follower
    kept = []
    for _ in range(2):
        body = {"trigger_crash_dump": {"ignore_nmi_guard": True}}
        path = f"/v2.1/crashlab/servers/{cloud.ids['alice-active']}/action"
        cloud.client.post(path, json=body, headers=cloud.headers("admin"))
        deadline = time.monotonic() + 10
        while len(cloud.store.list_crash_dumps()) == len(kept):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        dump = terminal_dump(cloud, "alice-active")
        put_vmcore(cloud, dump, b"x" * 1000)
        kept.append(dump)
    follower.prune()
    old, new = kept
    path = f"{dumps_path(cloud, 'alice-active')}/{old['id']}"
    assert_fault(
        cloud.get("alice", f"{path}/vmcore"),
        410,
        "computeFault",
        f"The vmcore of crash dump {old['id']} was removed by the retention policy; "
        "its record remains.",
    )
    assert cloud.get("alice", path).json()["crash_dump"]["removed"] is True
    assert not follower.dump_dir(old["id"]).exists()
    new_path = f"{dumps_path(cloud, 'alice-active')}/{new['id']}/vmcore"
    assert cloud.get("alice", new_path).status_code == 200


def test_removing_a_server_removes_its_dumps_and_their_files(cloud: AppCloud) -> None:
    cloud.trigger("alice", "alice-active")
    dump = terminal_dump(cloud, "alice-active")
    put_vmcore(cloud, dump, b"x" * 100)
    follower = cloud.client.app.state.follower  # type: ignore[attr-defined]
    server_id = cloud.ids["alice-active"]
    path = f"/v2.1/crashlab/servers/{server_id}"
    assert cloud.client.delete(path, headers=cloud.headers("admin")).status_code == 204
    assert cloud.store.list_crash_dumps(server_id) == []
    follower.prune()
    assert not follower.dump_dir(dump["id"]).exists()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            {"type": "floppy"},
            "Invalid dump_target or dump_timeouts: dump_target: Input tag 'floppy' found using "
            "'type' does not match any of the expected tags: 'disk', 'ssh', 'console-only', 'none'",
        ),
        (
            {"type": "disk", "device": "vda"},
            "Invalid dump_target: a disk target of a server whose driver is not libvirt "
            "must name its domain.",
        ),
        (
            {"type": "disk", "device": "vda", "domain": "d", "uri": "qemu+ssh://h/system"},
            "Invalid dump_target or dump_timeouts: uri: a disk target is read on this host: "
            "use qemu:///system or session",
        ),
        (
            {"type": "ssh"},
            "Invalid dump_target: an ssh target needs crashlab's dump collector "
            "(collector.enabled in the config).",
        ),
    ],
)
def test_a_bad_dump_target_is_refused_and_nothing_is_registered(
    cloud: AppCloud, target: dict[str, Any], message: str
) -> None:
    body = {
        "server": {
            "name": "new",
            "project_id": "alice",
            "user_id": "alice",
            "driver": "fake",
            "driver_info": {"power_state": "running"},
            "dump_target": target,
        }
    }
    response = cloud.client.post(
        "/v2.1/crashlab/servers", json=body, headers=cloud.headers("admin")
    )
    assert_fault(response, 400, "badRequest", message)
    assert [s.name for s in cloud.store.list_servers(name="new")] == []


def test_an_orphaned_dump_is_claimed_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    now = utcnow()
    server = Server(
        uuid="00000000-0000-0000-0000-000000000001",
        name="s",
        project_id="p",
        user_id="u",
        driver="fake",
        driver_info={},
        source="api",
        created_at=now,
        updated_at=now,
        last_power_state=1,
        dump_target=CONSOLE_ONLY,
    )
    assert store.add_server(server)
    action = store.start_crash_dump(
        server.uuid,
        start=ActionStart("req-1", "u", "p"),
        event_name="compute_trigger_crash_dump",
        host="h",
        owner="dead",
        refuse_locked=False,
        cooldown_seconds=None,
    )
    event_id = action.events[0].id
    assert store.begin_sending(event_id)
    dump = store.finish_nmi_and_open_dump(
        event_id, dump_id="d1", target="console-only", evidence={}, owner="dead"
    )
    assert dump is not None and dump.state == "waiting"
    # The event already ended: a second opening (a restart's) opens nothing.
    assert (
        store.finish_nmi_and_open_dump(
            event_id, dump_id="d2", target="console-only", evidence={}, owner="x"
        )
        is None
    )
    assert [d.id for d in store.claim_orphaned_dumps({"live"}, "live")] == ["d1"]
    # Claimed by a live owner: nobody claims it again.
    assert store.claim_orphaned_dumps({"live", "other"}, "other") == []
    assert [d.id for d in store.list_crash_dumps(server.uuid)] == ["d1"]
