"""Who may do what to which server: a table of users x servers x calls.

The expected outcome of each cell is derived here from Nova's code, not from
crashlab's answers:

- the instance is looked up project-scoped unless the caller is admin
  (``common.get_instance``): another project's member gets 404;
- then the call's policy rule (Nova's policy modules at HEAD, enforce_new_defaults):
  trigger_crash_dump, lock and unlock are PROJECT_MEMBER_OR_ADMIN, reset_state
  is ADMIN, instance-actions list and show are PROJECT_READER_OR_ADMIN, and
  a failed rule is 403;
- trigger_crash_dump then checks the lock (admins pass, owners do not: 409)
  and vm_state (ACTIVE, PAUSED, RESCUED, RESIZED, ERROR; STOPPED is 409);
- lock by the owner of an already locked server changes nothing
  (compute/api.py ``lock``); unlock of an admin's lock by the owner needs
  ``unlock_override`` (ADMIN), so 403;
- below 2.51, an action's events are shown only if ``os-instance-actions:events``
  (ADMIN) passes;
- crashlab's extension trigger (``/crashlab/servers/{id}/action``, beyond Nova)
  has its own rule, ``crashlab:servers:trigger_crash_dump``, defaulting to
  PROJECT_MEMBER_OR_ADMIN as Nova's does, and each option its own:
  ``ignore_nmi_guard: true`` needs ``crashlab:nmi_guard:bypass`` (ADMIN). The
  rules come after the lookup and before the lock and state checks, as Nova's;
- no token, or an expired one, is 401 before anything else.

Every cell gets a server of its own, registered through the extension and put
in its state by an admin, so no cell sees another's side effects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.live import LiveServer
from tests.reliability.cloud import TRIGGER, cloud_config, config_server_id, fake_server, user

USERS = ["admin", "owner", "other-project", "reader", "no-token", "expired"]
KINDS = ["active", "paused", "stopped", "error", "locked", "non-nmi"]
CALLS = [
    "trigger_crash_dump",
    "crashlab-trigger",
    "crashlab-bypass",
    "lock",
    "unlock",
    "os-resetState",
    "list",
    "show",
    "events",
]
TRIGGERS = ("trigger_crash_dump", "crashlab-trigger", "crashlab-bypass")
EXTENSION_BODY = {
    "crashlab-trigger": {"trigger_crash_dump": {}},
    "crashlab-bypass": {"trigger_crash_dump": {"ignore_nmi_guard": True}},
}
LOGIN = {"admin": "admin", "owner": "alice", "other-project": "bob", "reader": "carol"}
# The config servers an expired token is tried on (that service has no admin left to set up).
CONFIG_SERVER = {
    "active": "alice-active",
    "paused": "alice-paused",
    "stopped": "alice-stopped",
    "error": "alice-error",
    "locked": "alice-locked",
    "non-nmi": "alice-nonmi",
}
TOKEN_TTL = 2


@dataclass(frozen=True)
class Outcome:
    status: int
    locked_by: str | None | bool = False  # False: not checked
    events_shown: bool | None = None  # None: not checked


def expected(who: str, kind: str, call: str) -> Outcome:
    """Nova's answer; see the module docstring for where each rule comes from."""
    if who in ("no-token", "expired"):
        return Outcome(401)
    if who == "other-project":
        return Outcome(404)
    admin = who == "admin"
    member = who in ("admin", "owner")
    locked_before = "admin" if kind == "locked" else None
    if call in TRIGGERS:
        if not member or (call == "crashlab-bypass" and not admin):
            return Outcome(403)
        if kind == "locked" and not admin:
            return Outcome(409)
        if kind == "stopped":
            return Outcome(409)
        return Outcome(202)
    if call == "lock":
        if not member:
            return Outcome(403, locked_by=locked_before)
        if admin:
            return Outcome(202, locked_by="admin")
        return Outcome(202, locked_by=locked_before or "owner")
    if call == "unlock":
        if not member:
            return Outcome(403, locked_by=locked_before)
        if locked_before == "admin" and not admin:
            return Outcome(403, locked_by="admin")  # unlock_override is ADMIN
        return Outcome(202, locked_by=None)
    if call == "os-resetState":
        return Outcome(202) if admin else Outcome(403)
    if call in ("list", "show"):
        return Outcome(200)
    if call == "events":
        return Outcome(200, events_shown=admin)
    raise AssertionError(call)


DRIVER_INFO = {
    "active": ("fake", "running"),
    "paused": ("fake", "paused"),
    "stopped": ("fake", "shutdown"),
    "error": ("fake", "running"),
    "locked": ("fake", "running"),
    "non-nmi": ("fake-nonmi", "running"),
}


@dataclass
class Cell:
    server_id: str
    action_request_id: str  # an action to show: resetState, or a trigger with an event


@pytest.fixture(scope="module")
def cloud(module_server: Callable[..., LiveServer]) -> LiveServer:
    # The storm guard is crashlab's, not Nova's; each cell has its own server anyway.
    return module_server(cloud_config(nmi_guard={"enabled": False}))


@pytest.fixture(scope="module")
def expired_cloud(module_server: Callable[..., LiveServer]) -> LiveServer:
    config = cloud_config()
    config["identity"]["token_ttl_seconds"] = TOKEN_TTL
    return module_server(config)


@pytest.fixture(scope="module")
def clients(cloud: LiveServer, expired_cloud: LiveServer) -> Iterator[dict[str, httpx.Client]]:
    made = {who: cloud.client(name) for who, name in LOGIN.items()}
    made["no-token"] = httpx.Client(
        base_url=cloud.compute_url, headers={"OpenStack-API-Version": "compute 2.17"}
    )
    expired = expired_cloud.client("alice")
    assert expired.get("/servers").status_code == 200  # valid until it expires
    time.sleep(TOKEN_TTL + 0.5)
    made["expired"] = expired
    yield made
    for client in made.values():
        client.close()


def _setup(admin: httpx.Client, kind: str, label: str, *, trigger: bool) -> Cell:
    """A fresh server of this kind, and an action on it to show (a trigger if asked and
    the state allows one, so that it has an event)."""
    driver, power = DRIVER_INFO[kind]
    body = {
        "server": {
            "name": label,
            "project_id": "alice",
            "user_id": "alice",
            "driver": driver,
            "driver_info": {"power_state": power},
        }
    }
    response = admin.post("/crashlab/servers", json=body)
    assert response.status_code == 201, response.text
    server_id = response.json()["server"]["uuid"]
    state = "error" if kind == "error" else "active"
    response = _call(admin, server_id, {"os-resetState": {"state": state}})
    assert response.status_code == 202, response.text
    request_id = response.headers["x-openstack-request-id"]
    if kind == "locked":
        assert _call(admin, server_id, {"lock": None}).status_code == 202
    if trigger and kind != "stopped":
        response = _call(admin, server_id, TRIGGER)
        assert response.status_code == 202, response.text
        request_id = response.headers["x-openstack-request-id"]
    return Cell(server_id, request_id)


def _call(client: httpx.Client, server_id: str, body: dict[str, Any]) -> httpx.Response:
    return client.post(f"/servers/{server_id}/action", json=body)


def _perform(client: httpx.Client, cell: Cell, call: str) -> httpx.Response:
    server = cell.server_id
    if call == "trigger_crash_dump":
        return _call(client, server, TRIGGER)
    if call in EXTENSION_BODY:
        return client.post(f"/crashlab/servers/{server}/action", json=EXTENSION_BODY[call])
    if call in ("lock", "unlock"):
        return _call(client, server, {call: None})
    if call == "os-resetState":
        return _call(client, server, {"os-resetState": {"state": "error"}})
    if call == "list":
        return client.get(f"/servers/{server}/os-instance-actions")
    assert call in ("show", "events")
    return client.get(f"/servers/{server}/os-instance-actions/{cell.action_request_id}")


def _actions(admin: httpx.Client, server_id: str) -> list[dict[str, Any]]:
    response = admin.get(f"/servers/{server_id}/os-instance-actions")
    actions: list[dict[str, Any]] = response.json()["instanceActions"]
    return actions


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("who", USERS)
@pytest.mark.parametrize("call", CALLS)
def test_policy_matrix(clients: dict[str, httpx.Client], call: str, who: str, kind: str) -> None:
    admin, client = clients["admin"], clients[who]
    want = expected(who, kind, call)
    if who == "expired":
        cell = Cell(
            config_server_id(CONFIG_SERVER[kind]), "req-00000000-0000-0000-0000-000000000000"
        )
    else:
        cell = _setup(admin, kind, f"{call}-{who}-{kind}", trigger=call == "events")
    response = _perform(client, cell, call)

    assert response.status_code == want.status, response.text
    if who == "expired":
        return
    if want.status >= 400:
        assert list(response.json()) == [
            {401: "unauthorized", 403: "forbidden", 404: "itemNotFound", 409: "conflictingRequest"}[
                want.status
            ]
        ]
    if want.locked_by is not False:
        shown = admin.get(f"/crashlab/servers/{cell.server_id}").json()["server"]
        assert shown["locked_by"] == want.locked_by
    if want.events_shown is not None:
        action = response.json()["instanceAction"]
        assert ("events" in action) == want.events_shown, action
        if want.events_shown and kind != "stopped":
            assert [e["event"] for e in action["events"]] == ["compute_trigger_crash_dump"]
    if want.status == 403 and call in EXTENSION_BODY:
        # The first rule that fails is named: a reader's is the trigger's own.
        trigger_rule = "crashlab:servers:trigger_crash_dump"
        failed = trigger_rule if who == "reader" else "crashlab:nmi_guard:bypass"
        assert f"Policy doesn't allow {failed} to be performed." in response.text
    if call in TRIGGERS:
        # Nova records the action only once every check has passed.
        request_id = response.headers["x-openstack-request-id"]
        recorded = [a["request_id"] for a in _actions(admin, cell.server_id)]
        assert (request_id in recorded) == (want.status == 202)
    if call == "os-resetState" and want.status == 202:
        server = admin.get(f"/servers/{cell.server_id}").json()["server"]
        assert server["status"] == "ERROR"


# A custom policy.yaml: trigger_crash_dump by the server's own user only.


def _client(cloud: LiveServer, who: str) -> httpx.Client:
    token = cloud.token(who, project="alice" if who == "dave" else None)
    headers = {"X-Auth-Token": token, "OpenStack-API-Version": "compute 2.17"}
    return httpx.Client(base_url=cloud.compute_url, headers=headers)


OWNER_ONLY = '"os_compute_api:servers:trigger_crash_dump": "user_id:%(user_id)s"\n'


def _two_user_project(policy_file: str | None) -> dict[str, Any]:
    config = cloud_config(
        extra_servers=[{**fake_server("dave-server"), "user_id": "dave"}],
        nmi_guard={"enabled": False},
    )
    config["identity"]["users"].append(user("dave", "alice", ["member"]))
    if policy_file is not None:
        config["policy_file"] = policy_file
    return config


@pytest.mark.parametrize("policy", ["default", "owner-only"])
def test_policy_file_changes_trigger_crash_dump_only(
    crashlab_server: Callable[..., LiveServer], tmp_path: Any, policy: str
) -> None:
    """Nova's test_trigger_crash_dump_*_overridden_policy_pass_with_same_user and
    *_failed_with_other_user: the target carries user_id, so a user_id rule works."""
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(OWNER_ONLY)
    cloud = crashlab_server(_two_user_project(str(policy_path) if policy == "owner-only" else None))
    alices, daves = config_server_id("alice-active"), config_server_id("dave-server")
    owner_only = policy == "owner-only"
    # (user, server) -> status: with the default rule any member of the project,
    # or an admin, may; with user_id:%(user_id)s only the server's own user, and
    # admin loses its pass because the whole rule was replaced.
    table = {
        ("alice", alices): 202,
        ("alice", daves): 403 if owner_only else 202,
        ("dave", daves): 202,
        ("dave", alices): 403 if owner_only else 202,
        ("carol", alices): 403,
        ("admin", alices): 403 if owner_only else 202,
        ("bob", alices): 404,
    }
    for (who, server_id), status in table.items():
        with _client(cloud, who) as client:
            response = _call(client, server_id, TRIGGER)
            assert response.status_code == status, (who, server_id, response.text)
            if status == 403:
                assert "os_compute_api:servers:trigger_crash_dump" in response.text
            # Other rules are untouched: a project member may still lock.
            if who in ("alice", "dave"):
                assert _call(client, server_id, {"lock": None}).status_code == 202
                assert _call(client, server_id, {"unlock": None}).status_code == 202


# Custom rules for the extension's trigger: each rule is its own.
EXTENSION_POLICIES = {
    "admin-trigger": '"crashlab:servers:trigger_crash_dump": "rule:context_is_admin"\n',
    "member-bypass": '"crashlab:nmi_guard:bypass": "rule:project_member_or_admin"\n',
}


@pytest.mark.parametrize("policy", EXTENSION_POLICIES)
def test_policy_file_changes_the_extension_trigger_rules_only(
    crashlab_server: Callable[..., LiveServer], tmp_path: Any, policy: str
) -> None:
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(EXTENSION_POLICIES[policy])
    config = cloud_config(nmi_guard={"enabled": False})
    config["policy_file"] = str(policy_path)
    cloud = crashlab_server(config)
    server = config_server_id("alice-active")
    path = f"/crashlab/servers/{server}/action"
    admin_only = policy == "admin-trigger"
    with _client(cloud, "alice") as alice, _client(cloud, "admin") as admin:
        plain = alice.post(path, json=EXTENSION_BODY["crashlab-trigger"])
        bypass = alice.post(path, json=EXTENSION_BODY["crashlab-bypass"])
        if admin_only:
            assert (plain.status_code, bypass.status_code) == (403, 403)
            for response in (plain, bypass):
                assert "crashlab:servers:trigger_crash_dump" in response.text
        else:
            assert (plain.status_code, bypass.status_code) == (202, 202)
        # Nova's rule is untouched, and so is the admin's way in.
        assert _call(alice, server, TRIGGER).status_code == 202
        assert admin.post(path, json=EXTENSION_BODY["crashlab-bypass"]).status_code == 202
