"""openstacksdk's compute proxy, as a library, against crashlab."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import openstack
import pytest
from openstack import exceptions
from openstack.connection import Connection

from tests.clients.harness import ALICE_SERVERS, Cloud, debug_request
from tests.live import PROJECT_OF

# The SDK's own deprecation notices about its future releases.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:openstack.*")


def connect(cloud: Cloud, user: str, **settings: Any) -> Connection:
    """A connection from explicit settings only: no clouds.yaml, no OS_* variables."""
    return openstack.connect(
        load_yaml_config=False,
        load_envvars=False,
        auth_url=cloud.server.auth_url,
        username=user,
        password=f"{user}-secret",
        project_name=PROJECT_OF[user],
        user_domain_name="Default",
        project_domain_name="Default",
        **settings,
    )


@pytest.fixture(scope="module")
def alice(cloud: Cloud) -> Iterator[Connection]:
    conn = connect(cloud, "alice")
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def admin(cloud: Cloud) -> Iterator[Connection]:
    conn = connect(cloud, "admin")
    yield conn
    conn.close()


def test_servers(cloud: Cloud, alice: Connection) -> None:
    servers = {s.name: s for s in alice.compute.servers()}

    assert {name: s.status for name, s in servers.items()} == ALICE_SERVERS
    assert servers["alice-active"].id == cloud.ids["alice-active"]
    assert servers["alice-stopped"].power_state == 4
    assert servers["alice-paused"].vm_state == "paused"
    assert servers["alice-locked"].is_locked is True


def test_find_server(cloud: Cloud, alice: Connection) -> None:
    by_name = alice.compute.find_server("alice-active")
    by_id = alice.compute.find_server(cloud.ids["alice-active"])

    assert by_name is not None and by_id is not None
    assert by_name.id == by_id.id == cloud.ids["alice-active"]
    assert alice.compute.find_server("bob-active") is None
    with pytest.raises(exceptions.NotFoundException):
        alice.compute.find_server("bob-active", ignore_missing=False)


@pytest.mark.parametrize("version", [None, "2.17", "2.latest"])
def test_trigger_server_crash_dump(
    cloud: Cloud, caplog: pytest.LogCaptureFixture, version: str | None
) -> None:
    settings = {} if version is None else {"compute_api_version": version}
    conn = connect(cloud, "alice", **settings)
    before = cloud.actions("alice-active")
    caplog.set_level(logging.DEBUG, logger="keystoneauth")
    try:
        server = conn.compute.find_server("alice-active", ignore_missing=False)
        conn.compute.trigger_server_crash_dump(server)
    finally:
        conn.close()

    # Without a setting the SDK sends min(Server's 2.100, crashlab's 2.17).
    headers = debug_request(caplog.text, "POST", "/action")
    assert headers["OpenStack-API-Version"] == "compute 2.17"
    [action] = cloud.new_actions("alice-active", before)
    assert action["action"] == "trigger_crash_dump"


def test_trigger_server_crash_dump_conflict(cloud: Cloud, alice: Connection) -> None:
    server_id = cloud.ids["alice-stopped"]

    with pytest.raises(exceptions.ConflictException) as raised:
        alice.compute.trigger_server_crash_dump(server_id)

    assert raised.value.status_code == 409
    assert str(raised.value) == (
        f"ConflictException: 409: Client Error for url: {cloud.server.compute_url}/servers/"
        f"{server_id}/action, Cannot 'trigger_crash_dump' instance {server_id} while it is in "
        "vm_state stopped"
    )


def test_trigger_server_crash_dump_below_2_17(cloud: Cloud) -> None:
    conn = connect(cloud, "alice", compute_api_version="2.16")
    try:
        with pytest.raises(exceptions.NotFoundException) as raised:
            conn.compute.trigger_server_crash_dump(cloud.ids["alice-active"])
    finally:
        conn.close()

    assert raised.value.details == "The resource could not be found."


def test_lock_and_unlock(cloud: Cloud, alice: Connection) -> None:
    server_id = cloud.ids["alice-paused"]
    try:
        alice.compute.lock_server(server_id)
        assert alice.compute.get_server(server_id).is_locked is True
        with pytest.raises(exceptions.ConflictException):
            alice.compute.trigger_server_crash_dump(server_id)
        alice.compute.unlock_server(server_id)
        assert alice.compute.get_server(server_id).is_locked is False
    except (AssertionError, exceptions.SDKException):
        cloud.set_locked("alice-paused", False)
        raise


def test_server_actions(cloud: Cloud, alice: Connection) -> None:
    request_id = cloud.trigger("alice-error")

    actions = list(alice.compute.server_actions(cloud.ids["alice-error"]))

    assert [(a.request_id, a.action) for a in actions] == [
        (a["request_id"], a["action"]) for a in cloud.actions("alice-error")
    ]
    assert actions[0].request_id == request_id
    assert actions[0].server_id == cloud.ids["alice-error"]


def test_get_server_action(cloud: Cloud, alice: Connection, admin: Connection) -> None:
    request_id = cloud.trigger("alice-nonmi")
    server_id = cloud.ids["alice-nonmi"]

    as_member = alice.compute.get_server_action(request_id, server_id)
    as_admin = admin.compute.get_server_action(request_id, server_id)

    for action in (as_member, as_admin):
        assert (action.request_id, action.action, action.message) == (
            request_id,
            "trigger_crash_dump",
            "Error",
        )
    # Below 2.51 Nova shows events to admins only.
    assert as_member.events is None
    [event] = as_admin.events
    assert (event.event, event.result) == ("compute_trigger_crash_dump", "Error")
    assert event.finish_time is not None
