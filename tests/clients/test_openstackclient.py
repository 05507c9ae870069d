"""python-openstackclient (``openstack``) as a Nova user runs it against crashlab."""

from __future__ import annotations

import pytest

from tests.clients.harness import (
    ALICE_SERVERS,
    Cloud,
    as_json,
    debug_request,
    show_table,
    table,
)

BOOTED_FROM_VOLUME = "N/A (booted from volume)"


def conflict(cloud: Cloud, name: str, message: str) -> str:
    url = f"{cloud.server.compute_url}/servers/{cloud.ids[name]}/action"
    return f"ConflictException: 409: Client Error for url: {url}, {message}\n"


def stopped_conflict(cloud: Cloud) -> str:
    server_id = cloud.ids["alice-stopped"]
    return conflict(
        cloud,
        "alice-stopped",
        f"Cannot 'trigger_crash_dump' instance {server_id} while it is in vm_state stopped",
    )


def test_server_list(cloud: Cloud) -> None:
    done = cloud.openstack("alice", "server", "list")

    assert done.returncode == 0, done.stderr
    header, rows = table(done.stdout)
    assert header == ["ID", "Name", "Status", "Networks", "Image", "Flavor"]
    # The flavor name is blank: crashlab has no flavors API, and OSC swallows the 404.
    expected = [
        [cloud.ids[name], name, status, "", BOOTED_FROM_VOLUME, ""]
        for name, status in ALICE_SERVERS.items()
    ]
    assert sorted(rows) == sorted(expected)


def test_server_list_long(cloud: Cloud) -> None:
    done = cloud.openstack("alice", "server", "list", "--long")

    assert done.returncode == 0, done.stderr
    header, rows = table(done.stdout)
    assert header == [
        "ID", "Name", "Status", "Task State", "Power State", "Networks", "Image Name",
        "Image ID", "Flavor Name", "Flavor ID", "Availability Zone", "Host", "Properties",
    ]  # fmt: skip
    by_name = {row[1]: row for row in rows}
    assert set(by_name) == set(ALICE_SERVERS)
    assert by_name["alice-paused"] == [
        cloud.ids["alice-paused"], "alice-paused", "PAUSED", "None", "Paused", "",
        BOOTED_FROM_VOLUME, BOOTED_FROM_VOLUME, "", "1", "nova", "", "",
    ]  # fmt: skip
    assert by_name["alice-stopped"][4] == "Shutdown"
    assert by_name["alice-active"][4] == "Running"


def test_server_show_by_name_and_by_id(cloud: Cloud) -> None:
    by_name = as_json(cloud.openstack("alice", "server", "show", "alice-active", "-f", "json"))
    by_id = as_json(
        cloud.openstack("alice", "server", "show", cloud.ids["alice-active"], "-f", "json")
    )

    assert by_name == by_id
    nova = cloud.detail("alice-active")
    assert by_name["id"] == nova["id"]
    assert by_name["name"] == "alice-active"
    assert by_name["status"] == "ACTIVE"
    assert by_name["OS-EXT-STS:vm_state"] == "active"
    assert by_name["OS-EXT-STS:power_state"] == 1
    assert by_name["OS-EXT-STS:task_state"] is None
    assert by_name["locked"] is False
    assert by_name["project_id"] == nova["tenant_id"]
    assert by_name["user_id"] == nova["user_id"]
    assert by_name["hostId"] == nova["hostId"]
    assert by_name["image"] == BOOTED_FROM_VOLUME
    assert by_name["flavor"] == "1"
    assert by_name["security_groups"] == [{"name": "default"}]
    # A member is not allowed the extended server attributes.
    assert by_name["OS-EXT-SRV-ATTR:host"] is None


def test_server_show_table(cloud: Cloud) -> None:
    done = cloud.openstack("alice", "server", "show", "alice-paused")

    assert done.returncode == 0, done.stderr
    shown = show_table(done.stdout)
    assert shown["status"] == "PAUSED"
    assert shown["OS-EXT-STS:power_state"] == "Paused"
    assert shown["OS-EXT-STS:vm_state"] == "paused"
    assert shown["security_groups"] == "name='default'"


def test_server_show_of_another_project_is_not_found(cloud: Cloud) -> None:
    done = cloud.openstack("alice", "server", "show", "bob-active")

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "No Server found for bob-active\n"


def test_dump_create_one_server(cloud: Cloud) -> None:
    before = cloud.actions("alice-active")

    done = cloud.openstack("alice", "server", "dump", "create", "alice-active")

    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    [action] = cloud.new_actions("alice-active", before)
    assert action["action"] == "trigger_crash_dump"
    assert action["user_id"] == cloud.detail("alice-active")["user_id"]
    finished = cloud.finished_action("alice-active", action["request_id"])
    assert finished["message"] is None
    assert [(e["event"], e["result"]) for e in finished["events"]] == [
        ("compute_trigger_crash_dump", "Success")
    ]


def test_dump_create_several_servers(cloud: Cloud) -> None:
    names = ["alice-active", "alice-paused", "alice-error"]
    before = {name: cloud.actions(name) for name in names}

    done = cloud.openstack("alice", "server", "dump", "create", *names)

    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    for name in names:
        assert [a["action"] for a in cloud.new_actions(name, before[name])] == [
            "trigger_crash_dump"
        ]


def test_dump_create_stopped_server_fails_with_nova_409(cloud: Cloud) -> None:
    done = cloud.openstack("alice", "server", "dump", "create", "alice-stopped")

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == stopped_conflict(cloud)


def test_dump_create_stops_at_the_first_error(cloud: Cloud) -> None:
    names = ["alice-paused", "alice-stopped", "alice-active"]
    before = {name: cloud.actions(name) for name in names}

    done = cloud.openstack("alice", "server", "dump", "create", *names)

    assert (done.returncode, done.stderr) == (1, stopped_conflict(cloud))
    assert len(cloud.new_actions("alice-paused", before["alice-paused"])) == 1
    assert cloud.new_actions("alice-active", before["alice-active"]) == []


def test_dump_create_needs_the_member_role(cloud: Cloud) -> None:
    done = cloud.openstack("carol", "server", "dump", "create", "alice-active")

    url = f"{cloud.server.compute_url}/servers/{cloud.ids['alice-active']}/action"
    assert done.returncode == 1
    assert done.stderr == (
        f"ForbiddenException: 403: Client Error for url: {url}, "
        "Policy doesn't allow os_compute_api:servers:trigger_crash_dump to be performed.\n"
    )


def test_lock_and_unlock(cloud: Cloud) -> None:
    server_id = cloud.ids["alice-paused"]
    try:
        locked = cloud.openstack("alice", "server", "lock", "alice-paused")
        assert (locked.returncode, locked.stdout, locked.stderr) == (0, "", "")
        shown = cloud.openstack(
            "alice", "server", "show", "alice-paused", "-c", "locked", "-f", "value"
        )
        assert shown.stdout == "True\n"

        refused = cloud.openstack("alice", "server", "dump", "create", "alice-paused")
        assert (refused.returncode, refused.stderr) == (
            1,
            conflict(cloud, "alice-paused", f"Instance {server_id} is locked"),
        )

        unlocked = cloud.openstack("alice", "server", "unlock", "alice-paused")
        assert (unlocked.returncode, unlocked.stdout, unlocked.stderr) == (0, "", "")
        shown = cloud.openstack("alice", "server", "show", server_id, "-c", "locked", "-f", "value")
        assert shown.stdout == "False\n"
        assert [a["action"] for a in cloud.actions("alice-paused")][:2] == ["unlock", "lock"]
    except AssertionError:
        cloud.set_locked("alice-paused", False)
        raise


def test_owner_cannot_lift_an_admin_lock_but_admin_may_dump(cloud: Cloud) -> None:
    server_id = cloud.ids["alice-locked"]
    url = f"{cloud.server.compute_url}/servers/{server_id}/action"

    refused = cloud.openstack("alice", "server", "unlock", "alice-locked")
    dumped = cloud.openstack("admin", "server", "dump", "create", server_id)

    assert refused.returncode == 1
    assert refused.stderr == (
        f"ForbiddenException: 403: Client Error for url: {url}, Policy doesn't allow "
        "os_compute_api:os-lock-server:unlock:unlock_override to be performed.\n"
    )
    assert (dumped.returncode, dumped.stdout, dumped.stderr) == (0, "", "")


def test_event_list(cloud: Cloud) -> None:
    request_id = cloud.trigger("alice-error")
    actions = cloud.actions("alice-error")

    done = cloud.openstack("alice", "server", "event", "list", "alice-error")
    long = cloud.openstack("alice", "server", "event", "list", "--long", "alice-error")

    header, rows = table(done.stdout)
    assert header == ["Request ID", "Server ID", "Action", "Start Time"]
    # OSC keeps Nova's order: newest first.
    assert rows == [
        [a["request_id"], cloud.ids["alice-error"], a["action"], a["start_time"]] for a in actions
    ]
    assert rows[0][:3] == [request_id, cloud.ids["alice-error"], "trigger_crash_dump"]
    header, rows = table(long.stdout)
    assert header == [
        "Request ID", "Server ID", "Action", "Start Time", "Message", "Project ID", "User ID",
    ]  # fmt: skip
    assert rows[0] == [
        request_id, cloud.ids["alice-error"], "trigger_crash_dump", actions[0]["start_time"],
        "None", actions[0]["project_id"], actions[0]["user_id"],
    ]  # fmt: skip


def test_event_show_as_admin(cloud: Cloud) -> None:
    request_id = cloud.trigger("alice-active")
    server_id = cloud.ids["alice-active"]
    action = cloud.finished_action("alice-active", request_id)

    shown = as_json(
        cloud.openstack("admin", "server", "event", "show", server_id, request_id, "-f", "json")
    )

    [event] = action["events"]
    assert shown == {
        "action": "trigger_crash_dump",
        "events": [
            {
                "details": None, "event": "compute_trigger_crash_dump",
                "finish_time": event["finish_time"], "host": None, "host_id": None,
                "result": "Success", "start_time": event["start_time"], "traceback": None,
            }
        ],
        "id": request_id,
        "message": None,
        "project_id": action["project_id"],
        "request_id": request_id,
        "start_time": action["start_time"],
        "user_id": action["user_id"],
    }  # fmt: skip


def test_event_show_of_a_failed_dump(cloud: Cloud) -> None:
    request_id = cloud.trigger("alice-nonmi")
    server_id = cloud.ids["alice-nonmi"]

    done = cloud.openstack("admin", "server", "event", "show", server_id, request_id)

    assert done.returncode == 0, done.stderr
    shown = show_table(done.stdout)
    assert shown["action"] == "trigger_crash_dump"
    assert shown["message"] == "Error"
    assert "event='compute_trigger_crash_dump'" in shown["events"]
    assert "result='Error'" in shown["events"]


def test_event_show_as_member(cloud: Cloud) -> None:
    request_id = cloud.trigger("alice-active")
    columns = ["-c", "action", "-c", "request_id", "-c", "message", "-f", "json"]

    shown = cloud.openstack(
        "alice", "server", "event", "show", "alice-active", request_id, *columns
    )
    everything = cloud.openstack("alice", "server", "event", "show", "alice-active", request_id)

    assert as_json(shown) == {
        "action": "trigger_crash_dump",
        "request_id": request_id,
        "message": None,
    }
    # Below 2.51 Nova shows events to admins only and leaves the key out for
    # everyone else; OSC 10.5.0 then fails formatting the missing column. A
    # Nova capped at 2.17 fails the same way, so crashlab stays faithful.
    assert (everything.returncode, everything.stderr) == (1, "'NoneType' object is not iterable\n")


@pytest.mark.parametrize("version", [None, "2.17", "2.latest"])
def test_microversion_negotiated_for_dump_create(cloud: Cloud, version: str | None) -> None:
    done = cloud.openstack(
        "alice", "--debug", "server", "dump", "create", "alice-active", version=version
    )

    assert done.returncode == 0, done.stderr[-2000:]
    headers = debug_request(done.stderr, "POST", "/action")
    assert headers["OpenStack-API-Version"] == "compute 2.17"
    assert headers["X-OpenStack-Nova-API-Version"] == "2.17"
    # The SDK's _action blanks Accept; crashlab must not answer 406.
    assert headers["Accept"] == ""


def test_microversion_without_setting_for_list_and_events(cloud: Cloud) -> None:
    listed = cloud.openstack("alice", "--debug", "server", "list")
    events = cloud.openstack("alice", "--debug", "server", "event", "list", "alice-active")

    # Servers (max 2.100) and server actions (max 2.84) both settle on crashlab's 2.17.
    assert debug_request(listed.stderr, "GET", "/servers/detail")["OpenStack-API-Version"] == (
        "compute 2.17"
    )
    assert (
        debug_request(events.stderr, "GET", "/os-instance-actions")["OpenStack-API-Version"]
        == "compute 2.17"
    )


@pytest.mark.parametrize("version", ["2.1", "2.16"])
def test_dump_create_below_2_17_is_not_found(cloud: Cloud, version: str) -> None:
    done = cloud.openstack("alice", "server", "dump", "create", "alice-active", version=version)

    url = f"{cloud.server.compute_url}/servers/{cloud.ids['alice-active']}/action"
    assert (done.returncode, done.stderr) == (
        1,
        f"NotFoundException: 404: Client Error for url: {url}, The resource could not be found.\n",
    )


def test_microversion_above_the_maximum_is_refused_by_the_client(cloud: Cloud) -> None:
    done = cloud.openstack("alice", "server", "dump", "create", "alice-active", version="2.18")

    assert done.returncode == 1
    assert done.stderr.startswith(
        "A default microversion for service compute of 2.18 was requested, but the cloud "
        "only supports a minimum of 2.1 and a maximum of 2.17."
    )
