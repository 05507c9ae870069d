"""python-novaclient, its ``nova`` CLI and its Python API, against crashlab."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from keystoneauth1 import loading, session
from novaclient import api_versions, exceptions
from novaclient import client as nova_client
from novaclient.v2.client import Client as NovaClient

from tests.clients.harness import (
    ALICE_SERVERS,
    NOVA_DEPRECATION,
    REQUEST_ID,
    Cloud,
    debug_request,
    show_table,
    table,
)
from tests.live import PROJECT_OF

POWER_STATE_NAMES = {1: "Running", 3: "Paused", 4: "Shutdown"}


def nova_error(kind: str, message: str, status: int) -> re.Pattern[str]:
    """The last line novaclient prints for an HTTP error."""
    return re.compile(
        rf"ERROR \({kind}\): {re.escape(message)} \(HTTP {status}\) \(Request-ID: {REQUEST_ID}\)\n"
    )


def assert_fails(done_stderr: str, pattern: re.Pattern[str]) -> None:
    assert done_stderr.startswith(NOVA_DEPRECATION)
    assert pattern.fullmatch(done_stderr.removeprefix(NOVA_DEPRECATION)), done_stderr


def test_nova_list(cloud: Cloud) -> None:
    done = cloud.nova("alice", "list")

    assert (done.returncode, done.stderr) == (0, NOVA_DEPRECATION)
    header, rows = table(done.stdout)
    assert header == ["ID", "Name", "Status", "Task State", "Power State", "Networks"]
    # novaclient sorts by name.
    assert rows == [
        [
            cloud.ids[name], name, ALICE_SERVERS[name], "-",
            POWER_STATE_NAMES[cloud.detail(name)["OS-EXT-STS:power_state"]], "",
        ]
        for name in sorted(ALICE_SERVERS)
    ]  # fmt: skip


@pytest.mark.parametrize("by", ["name", "id"])
def test_nova_show(cloud: Cloud, by: str) -> None:
    done = cloud.nova(
        "alice", "show", "alice-active" if by == "name" else cloud.ids["alice-active"]
    )

    assert (done.returncode, done.stderr) == (0, NOVA_DEPRECATION)
    nova = cloud.detail("alice-active")
    assert show_table(done.stdout) == {
        "OS-DCF:diskConfig": "MANUAL",
        "OS-EXT-AZ:availability_zone": "nova",
        "OS-EXT-STS:power_state": "1",
        "OS-EXT-STS:task_state": "-",
        "OS-EXT-STS:vm_state": "active",
        "OS-SRV-USG:launched_at": nova["OS-SRV-USG:launched_at"],
        "OS-SRV-USG:terminated_at": "-",
        "accessIPv4": "",
        "accessIPv6": "",
        "config_drive": "",
        "created": nova["created"],
        # Below 2.47 novaclient looks the flavor up; crashlab has no flavors API.
        "flavor": "Flavor not found (1)",
        "hostId": nova["hostId"],
        "id": cloud.ids["alice-active"],
        "image": "Attempt to boot from volume - no image supplied",
        "key_name": "-",
        "locked": "False",
        "metadata": "{}",
        "name": "alice-active",
        "os-extended-volumes:volumes_attached": "[]",
        "progress": "0",
        "security_groups": "default",
        "status": "ACTIVE",
        "tenant_id": nova["tenant_id"],
        "updated": nova["updated"],
        "user_id": nova["user_id"],
    }


def test_nova_show_of_another_project(cloud: Cloud) -> None:
    done = cloud.nova("alice", "show", "bob-active")

    assert done.returncode == 1
    assert done.stderr == (
        NOVA_DEPRECATION
        + "ERROR (CommandError): No server with a name or ID of 'bob-active' exists.\n"
    )


def test_trigger_crash_dump(cloud: Cloud) -> None:
    before = cloud.actions("alice-active")

    done = cloud.nova("alice", "trigger-crash-dump", "alice-active")

    assert (done.returncode, done.stdout, done.stderr) == (0, "", NOVA_DEPRECATION)
    [action] = cloud.new_actions("alice-active", before)
    assert action["action"] == "trigger_crash_dump"
    events = cloud.finished_action("alice-active", action["request_id"])["events"]
    assert [(e["event"], e["result"]) for e in events] == [
        ("compute_trigger_crash_dump", "Success")
    ]


def test_trigger_crash_dump_of_a_stopped_server(cloud: Cloud) -> None:
    server_id = cloud.ids["alice-stopped"]

    done = cloud.nova("alice", "trigger-crash-dump", "alice-stopped")

    assert (done.returncode, done.stdout) == (1, "")
    message = f"Cannot 'trigger_crash_dump' instance {server_id} while it is in vm_state stopped"
    assert_fails(done.stderr, nova_error("Conflict", message, 409))


def test_trigger_crash_dump_as_a_reader(cloud: Cloud) -> None:
    done = cloud.nova("carol", "trigger-crash-dump", "alice-active")

    message = "Policy doesn't allow os_compute_api:servers:trigger_crash_dump to be performed."
    assert done.returncode == 1
    assert_fails(done.stderr, nova_error("Forbidden", message, 403))


def test_lock_and_unlock(cloud: Cloud) -> None:
    server_id = cloud.ids["alice-paused"]
    try:
        locked = cloud.nova("alice", "lock", "alice-paused")
        assert (locked.returncode, locked.stdout, locked.stderr) == (0, "", NOVA_DEPRECATION)
        assert cloud.detail("alice-paused")["locked"] is True

        refused = cloud.nova("alice", "trigger-crash-dump", "alice-paused")
        assert refused.returncode == 1
        assert_fails(refused.stderr, nova_error("Conflict", f"Instance {server_id} is locked", 409))

        unlocked = cloud.nova("alice", "unlock", server_id)
        assert (unlocked.returncode, unlocked.stdout, unlocked.stderr) == (0, "", NOVA_DEPRECATION)
        assert cloud.detail("alice-paused")["locked"] is False
    except AssertionError:
        cloud.set_locked("alice-paused", False)
        raise


def test_instance_action_list(cloud: Cloud) -> None:
    cloud.trigger("alice-error")
    actions = cloud.actions("alice-error")

    done = cloud.nova("alice", "instance-action-list", "alice-error")

    assert (done.returncode, done.stderr) == (0, NOVA_DEPRECATION)
    header, rows = table(done.stdout)
    assert header == ["Action", "Request_ID", "Message", "Start_Time"]
    # novaclient sorts by Start_Time, oldest first.
    assert rows == [
        [a["action"], a["request_id"], a["message"] or "-", a["start_time"]]
        for a in sorted(actions, key=lambda a: a["start_time"])
    ]


def test_instance_action_as_member_and_admin(cloud: Cloud) -> None:
    request_id = cloud.trigger("alice-nonmi")
    action = cloud.finished_action("alice-nonmi", request_id)
    [event] = action["events"]

    member = cloud.nova("alice", "instance-action", "alice-nonmi", request_id)
    admin = cloud.nova("admin", "instance-action", cloud.ids["alice-nonmi"], request_id)

    common = {
        "action": "trigger_crash_dump",
        "instance_uuid": cloud.ids["alice-nonmi"],
        "message": "Error",
        "project_id": action["project_id"],
        "request_id": request_id,
        "start_time": action["start_time"],
        "user_id": action["user_id"],
    }
    # Below 2.51 only admins see the events (Nova's os-instance-actions:events rule).
    assert show_table(member.stdout) == common
    shown = show_table(admin.stdout)
    assert {k: v for k, v in shown.items() if k != "events"} == common
    assert "'event': 'compute_trigger_crash_dump'" in shown["events"]
    assert "'result': 'Error'" in shown["events"]
    assert f"'finish_time': '{event['finish_time']}'" in shown["events"]


@pytest.mark.parametrize("version", [None, "2.17", "2.latest"])
def test_microversion_negotiated(cloud: Cloud, version: str | None) -> None:
    done = cloud.nova("alice", "--debug", "trigger-crash-dump", "alice-active", version=version)

    assert done.returncode == 0, done.stderr[-2000:]
    headers = debug_request(done.stderr, "POST", "/action")
    assert headers["X-OpenStack-Nova-API-Version"] == "2.17"
    # novaclient adds OpenStack-API-Version only from 2.27.
    assert "OpenStack-API-Version" not in headers


def test_trigger_crash_dump_does_not_exist_below_2_17(cloud: Cloud) -> None:
    done = cloud.nova("alice", "trigger-crash-dump", "alice-active", version="2.16")

    assert done.returncode == 2
    assert done.stderr.endswith(
        "error: argument <subcommand>: invalid choice: 'trigger-crash-dump'\n"
        "Try 'nova help ' for more information.\n"
    )


def test_microversion_above_the_maximum(cloud: Cloud) -> None:
    done = cloud.nova("alice", "list", version="2.18")

    assert done.returncode == 1
    assert done.stderr == NOVA_DEPRECATION + (
        "ERROR (UnsupportedVersion): The specified version isn't supported by server. "
        "The valid version range is '2.1' to '2.17'\n"
    )


# The Python API


@pytest.fixture(scope="module")
def alice_session(cloud: Cloud) -> Iterator[session.Session]:
    auth: Any = loading.get_plugin_loader("password").load_from_options(
        auth_url=cloud.server.auth_url,
        username="alice",
        password="alice-secret",
        project_name=PROJECT_OF["alice"],
        user_domain_name="Default",
        project_domain_name="Default",
    )
    sess = session.Session(auth=auth)
    yield sess
    sess.session.close()


def latest(sess: session.Session) -> NovaClient:
    """``2.latest`` as the nova shell negotiates it."""
    probe = nova_client.Client("2.1", session=sess)
    version = api_versions.discover_version(probe, api_versions.APIVersion("2.latest"))
    client: NovaClient = nova_client.Client(version, session=sess)
    return client


@pytest.mark.parametrize("version", ["2.17", "2.latest"])
def test_python_api_trigger_crash_dump(
    cloud: Cloud, alice_session: session.Session, version: str
) -> None:
    nova = (
        latest(alice_session)
        if version == "2.latest"
        else nova_client.Client(version, session=alice_session)
    )
    before = cloud.actions("alice-active")

    result = nova.servers.trigger_crash_dump(nova.servers.find(name="alice-active"))

    assert nova.api_version == api_versions.APIVersion("2.17")
    assert result == ()
    [action] = cloud.new_actions("alice-active", before)
    assert result.request_ids == [action["request_id"]]
    assert action["action"] == "trigger_crash_dump"


def test_python_api_below_2_17_sends_nothing(cloud: Cloud, alice_session: session.Session) -> None:
    nova = nova_client.Client("2.16", session=alice_session)
    before = cloud.actions("alice-active")

    with pytest.raises(exceptions.VersionNotFoundForAPIMethod):
        nova.servers.trigger_crash_dump(cloud.ids["alice-active"])

    assert cloud.new_actions("alice-active", before) == []


def test_python_api_conflict(cloud: Cloud, alice_session: session.Session) -> None:
    nova = nova_client.Client("2.17", session=alice_session)
    server_id = cloud.ids["alice-stopped"]

    with pytest.raises(exceptions.Conflict) as raised:
        nova.servers.trigger_crash_dump(server_id)

    assert raised.value.code == 409
    assert raised.value.message == (
        f"Cannot 'trigger_crash_dump' instance {server_id} while it is in vm_state stopped"
    )
    assert re.fullmatch(REQUEST_ID, raised.value.request_id or "")
