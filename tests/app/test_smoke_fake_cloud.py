"""The issue's "done when" list, over plain HTTP against scenarios/fake-cloud.yaml."""

from __future__ import annotations

import time

from tests.live import LiveServer


def _ids(server: LiveServer) -> dict[str, str]:
    with server.client("admin") as admin:
        servers = admin.get("/servers/detail", params={"all_tenants": "1"}).json()["servers"]
    return {s["name"]: s["id"] for s in servers}


def _trigger(server: LiveServer, user: str, server_id: str, version: str = "2.17") -> int:
    with server.client(user, version) as client:
        return client.post(
            f"/servers/{server_id}/action", json={"trigger_crash_dump": None}
        ).status_code


def test_done_when_list(fake_cloud: LiveServer) -> None:
    ids = _ids(fake_cloud)
    assert _trigger(fake_cloud, "alice", ids["alice-active"]) == 202
    assert _trigger(fake_cloud, "alice", ids["alice-paused"]) == 202
    assert _trigger(fake_cloud, "alice", ids["alice-stopped"]) == 409
    assert _trigger(fake_cloud, "alice", ids["alice-locked"]) == 409
    assert _trigger(fake_cloud, "admin", ids["alice-locked"]) == 202
    assert _trigger(fake_cloud, "bob", ids["alice-error"]) == 404
    assert _trigger(fake_cloud, "carol", ids["alice-error"]) == 403
    assert _trigger(fake_cloud, "alice", ids["alice-error"], "2.16") == 404
    assert _trigger(fake_cloud, "alice", ids["alice-nonmi"]) == 202

    with fake_cloud.client("admin") as admin:
        deadline = time.monotonic() + 10
        while True:
            actions = admin.get(f"/servers/{ids['alice-nonmi']}/os-instance-actions").json()
            action = actions["instanceActions"][0]
            if action["message"] == "Error" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert action["action"] == "trigger_crash_dump"
        assert action["message"] == "Error"
        shown = admin.get(
            f"/servers/{ids['alice-nonmi']}/os-instance-actions/{action['request_id']}"
        ).json()["instanceAction"]
    [event] = shown["events"]
    assert event["event"] == "compute_trigger_crash_dump"
    assert event["result"] == "Error"
