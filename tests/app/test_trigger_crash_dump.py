"""Nova's trigger_crash_dump, row by row (nova reference §1), over HTTP.

Rows that cannot occur in crashlab are named here so the table stays whole:
"no InstanceMapping" (no cells), "instance.host not set", "task_state not
None" and "never launched" (crashlab servers always have a host, no task
state and a launch time).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from app.client import wait_for_action
from tests.live import LiveServer

UNKNOWN = "6a1e0e5a-0000-4000-8000-000000000000"


@pytest.fixture
def ids(fake_cloud: LiveServer) -> dict[str, str]:
    with fake_cloud.client("admin") as admin:
        servers = admin.get("/servers/detail", params={"all_tenants": "1"}).json()["servers"]
    return {s["name"]: s["id"] for s in servers}


@pytest.fixture
def alice(fake_cloud: LiveServer) -> Iterator[httpx.Client]:
    with fake_cloud.client("alice") as client:
        yield client


def _dump(
    client: httpx.Client, server_id: str, body: object = None, **headers: str
) -> httpx.Response:
    payload = {"trigger_crash_dump": None} if body is None else body
    return client.post(f"/servers/{server_id}/action", json=payload, headers=headers)


def _fault(response: httpx.Response, status: int, name: str, message: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {name: {"code": status, "message": message}}
    assert response.headers["content-type"] == "application/json"


def test_success_is_202_with_an_empty_body_and_a_recorded_action(
    fake_cloud: LiveServer, alice: httpx.Client, ids: dict[str, str]
) -> None:
    server_id = ids["alice-active"]
    response = _dump(alice, server_id)
    assert response.status_code == 202
    assert response.text == ""
    request_id = response.headers["x-openstack-request-id"]
    assert response.headers["x-compute-request-id"] == request_id
    assert response.headers["openstack-api-version"] == "compute 2.17"
    assert response.headers["x-openstack-nova-api-version"] == "2.17"
    [action] = alice.get(f"/servers/{server_id}/os-instance-actions").json()["instanceActions"]
    assert action["action"] == "trigger_crash_dump"
    assert action["request_id"] == request_id
    assert action["instance_uuid"] == server_id
    shown = alice.get(f"/servers/{server_id}").json()["server"]
    assert shown["OS-EXT-STS:vm_state"] == "active"
    assert shown["OS-EXT-STS:task_state"] is None


def test_unknown_server_is_404(alice: httpx.Client) -> None:
    _fault(_dump(alice, UNKNOWN), 404, "itemNotFound", f"Instance {UNKNOWN} could not be found.")


def test_other_projects_server_is_404_for_a_member(
    fake_cloud: LiveServer, ids: dict[str, str]
) -> None:
    server_id = ids["alice-active"]
    with fake_cloud.client("bob") as bob:
        _fault(
            _dump(bob, server_id), 404, "itemNotFound", f"Instance {server_id} could not be found."
        )


def test_policy_denial_is_403_for_a_reader(fake_cloud: LiveServer, ids: dict[str, str]) -> None:
    with fake_cloud.client("carol") as carol:
        _fault(
            _dump(carol, ids["alice-active"]),
            403,
            "forbidden",
            "Policy doesn't allow os_compute_api:servers:trigger_crash_dump to be performed.",
        )


def test_locked_server_is_409_for_the_owner_and_202_for_an_admin(
    fake_cloud: LiveServer, alice: httpx.Client, ids: dict[str, str]
) -> None:
    server_id = ids["alice-locked"]
    _fault(_dump(alice, server_id), 409, "conflictingRequest", f"Instance {server_id} is locked")
    with fake_cloud.client("admin") as admin:
        assert _dump(admin, server_id).status_code == 202


@pytest.mark.parametrize(
    ("name", "expected"),
    [("alice-active", 202), ("alice-paused", 202), ("alice-error", 202), ("alice-stopped", 409)],
)
def test_allowed_vm_states(
    alice: httpx.Client, ids: dict[str, str], name: str, expected: int
) -> None:
    response = _dump(alice, ids[name])
    if expected == 409:
        _fault(
            response,
            409,
            "conflictingRequest",
            f"Cannot 'trigger_crash_dump' instance {ids[name]} while it is in vm_state stopped",
        )
    else:
        assert response.status_code == 202


def test_non_null_value_is_400(alice: httpx.Client, ids: dict[str, str]) -> None:
    _fault(
        _dump(alice, ids["alice-active"], {"trigger_crash_dump": "x"}),
        400,
        "badRequest",
        "Invalid input for field/attribute trigger_crash_dump. Value: x. 'x' is not of type 'null'",
    )


def test_two_top_level_keys_are_a_malformed_body(alice: httpx.Client, ids: dict[str, str]) -> None:
    body = {"trigger_crash_dump": None, "lock": None}
    _fault(_dump(alice, ids["alice-active"], body), 400, "badRequest", "Malformed request body")


def test_unknown_action_is_400(alice: httpx.Client, ids: dict[str, str]) -> None:
    _fault(
        _dump(alice, ids["alice-active"], {"os-crash": None}),
        400,
        "badRequest",
        "There is no such action: os-crash",
    )


@pytest.mark.parametrize("version", ["2.1", "2.16"])
def test_below_2_17_the_action_does_not_exist(
    fake_cloud: LiveServer, ids: dict[str, str], version: str
) -> None:
    with fake_cloud.client("alice", version) as old:
        for body in ({"trigger_crash_dump": None}, {"trigger_crash_dump": "x"}):
            response = _dump(old, ids["alice-active"], body)
            _fault(response, 404, "itemNotFound", "The resource could not be found.")
            assert response.headers["x-openstack-nova-api-version"] == version


def test_default_microversion_is_2_1(fake_cloud: LiveServer, ids: dict[str, str]) -> None:
    token = fake_cloud.token("alice")
    response = httpx.post(
        f"{fake_cloud.compute_url}/servers/{ids['alice-active']}/action",
        json={"trigger_crash_dump": None},
        headers={"X-Auth-Token": token},
    )
    _fault(response, 404, "itemNotFound", "The resource could not be found.")
    assert response.headers["openstack-api-version"] == "compute 2.1"


def test_legacy_header_and_latest(fake_cloud: LiveServer, ids: dict[str, str]) -> None:
    token = fake_cloud.token("alice")
    for headers in (
        {"X-OpenStack-Nova-API-Version": "2.17"},
        {"OpenStack-API-Version": "compute latest"},
        {"X-OpenStack-Nova-API-Version": "latest"},
    ):
        response = httpx.get(
            f"{fake_cloud.compute_url}/servers", headers={"X-Auth-Token": token, **headers}
        )
        assert response.status_code == 200
        assert response.headers["x-openstack-nova-api-version"] == "2.17"
        assert response.headers.get_list("vary") == [
            "OpenStack-API-Version",
            "X-OpenStack-Nova-API-Version",
        ]


def test_version_out_of_range_is_406_and_malformed_is_400(fake_cloud: LiveServer) -> None:
    token = fake_cloud.token("alice")
    url = f"{fake_cloud.compute_url}/servers"
    high = httpx.get(url, headers={"X-Auth-Token": token, "OpenStack-API-Version": "compute 2.18"})
    _fault(
        high,
        406,
        "computeFault",
        "Version 2.18 is not supported by the API. Minimum is 2.1 and maximum is 2.17.",
    )
    bad = httpx.get(url, headers={"X-Auth-Token": token, "OpenStack-API-Version": "compute 2.x"})
    _fault(
        bad,
        400,
        "badRequest",
        "API Version String 2.x is of invalid format. Must be of format MajorNum.MinorNum.",
    )
    assert bad.headers["x-openstack-request-id"].startswith("req-")


@pytest.mark.parametrize("token", [None, "", "bogus", "bogus.token"])
def test_missing_or_bad_token_is_401(
    fake_cloud: LiveServer, ids: dict[str, str], token: str | None
) -> None:
    headers = {"OpenStack-API-Version": "compute 2.17"}
    if token is not None:
        headers["X-Auth-Token"] = token
    response = httpx.post(
        f"{fake_cloud.compute_url}/servers/{ids['alice-active']}/action",
        json={"trigger_crash_dump": None},
        headers=headers,
    )
    _fault(response, 401, "unauthorized", "The request you have made requires authentication.")
    assert response.headers["x-compute-request-id"].startswith("req-")


def test_unsupported_driver_ends_in_an_error_event(
    fake_cloud: LiveServer, alice: httpx.Client, ids: dict[str, str]
) -> None:
    server_id = ids["alice-nonmi"]
    request_id = _dump(alice, server_id).headers["x-openstack-request-id"]
    with fake_cloud.client("admin") as admin:
        action = wait_for_action(
            admin.get, server_id, request_id, timeout=10, poll=0.05, details=False
        )
        assert action["message"] == "Error"
        [event] = action["events"]
        assert event["result"] == "Error"
        assert "NMINotSupported" in event["traceback"]
        detailed = admin.get(
            f"/crashlab/servers/{server_id}/os-instance-actions/{request_id}"
        ).json()
    assert (
        detailed["instanceAction"]["events"][0]["details"]
        == "Triggering crash dump is not supported"
    )
    member_view = alice.get(f"/servers/{server_id}/os-instance-actions/{request_id}").json()
    assert "events" not in member_view["instanceAction"]


@pytest.mark.parametrize("body", [None, {}])
def test_lock_and_unlock_accept_null_and_empty_object(
    alice: httpx.Client, ids: dict[str, str], body: object
) -> None:
    server_id = ids["alice-active"]
    assert alice.post(f"/servers/{server_id}/action", json={"lock": body}).status_code == 202
    assert alice.get(f"/servers/{server_id}").json()["server"]["locked"] is True
    _fault(_dump(alice, server_id), 409, "conflictingRequest", f"Instance {server_id} is locked")
    assert alice.post(f"/servers/{server_id}/action", json={"unlock": body}).status_code == 202
    assert alice.get(f"/servers/{server_id}").json()["server"]["locked"] is False
    actions = [
        a["action"]
        for a in alice.get(f"/servers/{server_id}/os-instance-actions").json()["instanceActions"]
    ]
    assert actions == ["unlock", "lock"]


def test_owner_cannot_lift_an_admin_lock(alice: httpx.Client, ids: dict[str, str]) -> None:
    response = alice.post(f"/servers/{ids['alice-locked']}/action", json={"unlock": None})
    _fault(
        response,
        403,
        "forbidden",
        "Policy doesn't allow os_compute_api:os-lock-server:unlock:unlock_override "
        "to be performed.",
    )


def test_reset_state_is_admin_only_and_sets_error(
    fake_cloud: LiveServer, alice: httpx.Client, ids: dict[str, str]
) -> None:
    server_id = ids["alice-active"]
    body = {"os-resetState": {"state": "error"}}
    _fault(
        alice.post(f"/servers/{server_id}/action", json=body),
        403,
        "forbidden",
        "Policy doesn't allow os_compute_api:os-admin-actions:reset_state to be performed.",
    )
    with fake_cloud.client("admin") as admin:
        assert admin.post(f"/servers/{server_id}/action", json=body).status_code == 202
        assert admin.get(f"/servers/{server_id}").json()["server"]["status"] == "ERROR"
        bad = admin.post(f"/servers/{server_id}/action", json={"os-resetState": {"state": "bogus"}})
        _fault(
            bad,
            400,
            "badRequest",
            "Invalid input for field/attribute state. Value: bogus. "
            "'bogus' is not one of ['active', 'error']",
        )
        back = {"os-resetState": {"state": "active"}}
        assert admin.post(f"/servers/{server_id}/action", json=back).status_code == 202
        assert admin.get(f"/servers/{server_id}").json()["server"]["status"] == "ACTIVE"


def test_actions_are_listed_newest_first(
    fake_cloud: LiveServer, alice: httpx.Client, ids: dict[str, str]
) -> None:
    server_id = ids["alice-paused"]
    for action in ("lock", "unlock", "trigger_crash_dump"):
        assert alice.post(f"/servers/{server_id}/action", json={action: None}).status_code == 202
    listed = alice.get(f"/servers/{server_id}/os-instance-actions").json()["instanceActions"]
    assert [a["action"] for a in listed] == ["trigger_crash_dump", "unlock", "lock"]
    missing = alice.get(f"/servers/{server_id}/os-instance-actions/req-nope")
    _fault(missing, 404, "itemNotFound", "Action req-nope not found")
