"""crashlab's extension: its trigger's body, and event details by role.

- ``POST /crashlab/servers/{id}/action`` takes ``{"trigger_crash_dump": null}``,
  ``{}`` or ``{"ignore_nmi_guard": bool}``; anything else is 400 in Nova's
  wording (who may use which option: test_policy_matrix.py);
- the extension's action view shows each event's details whole to admins and,
  to the server's project, with BMC addresses, user names, libvirt URIs and
  host paths redacted. The servers here point at 127.0.0.1 ports nobody listens
  on, so their events end Error naming where they tried.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from app.process import free_port
from tests.live import LiveServer
from tests.reliability.cloud import (
    assert_fault,
    cloud_config,
    config_server_id,
    fake_server,
    wait_for_action,
)

BMC_USER = "opsuser"
IPMI_PORT = free_port(kind=2)  # UDP
LIBVIRT_PORT = free_port()
LIBVIRT_URI = f"qemu+ssh://{BMC_USER}@127.0.0.1:{LIBVIRT_PORT}/system"
SERVERS = [
    {
        **fake_server("ipmi-nowhere"),
        "driver": "ipmi",
        "driver_info": {
            "address": "127.0.0.1",
            "port": IPMI_PORT,
            "username": BMC_USER,
            "password": "bmc-secret",
            "timeout": 1,
        },
    },
    {
        **fake_server("libvirt-nowhere"),
        "driver": "libvirt",
        "driver_info": {"uri": LIBVIRT_URI, "domain": "alice-guest-7"},
    },
    fake_server("plain"),
]
# What a member must not read, and what the admin's details do hold.
HIDDEN = {
    "ipmi-nowhere": ["127.0.0.1", str(IPMI_PORT)],
    "libvirt-nowhere": [LIBVIRT_URI, BMC_USER, "127.0.0.1", str(LIBVIRT_PORT), "qemu+ssh"],
}


@pytest.fixture(scope="module")
def cloud(module_server: Callable[..., LiveServer]) -> LiveServer:
    return module_server(cloud_config(extra_servers=SERVERS, nmi_guard={"enabled": False}))


@pytest.fixture(scope="module")
def clients(cloud: LiveServer) -> Iterator[dict[str, httpx.Client]]:
    made = {name: cloud.client(name) for name in ("admin", "alice", "carol", "bob")}
    yield made
    for client in made.values():
        client.close()


def _trigger(client: httpx.Client, name: str, body: Any) -> httpx.Response:
    return client.post(f"/crashlab/servers/{config_server_id(name)}/action", json=body)


def _request_id(response: httpx.Response) -> str:
    return response.headers["x-openstack-request-id"]


@pytest.mark.parametrize(
    "options", [None, {}, {"ignore_nmi_guard": False}, {"ignore_nmi_guard": True}]
)
def test_the_trigger_options_are_optional(
    clients: dict[str, httpx.Client], options: dict[str, Any] | None
) -> None:
    response = _trigger(clients["admin"], "plain", {"trigger_crash_dump": options})
    assert response.status_code == 202, response.text
    action = wait_for_action(clients["admin"], config_server_id("plain"), _request_id(response))
    assert action["events"][0]["result"] == "Success"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"trigger_crash_dump": {"ignore_nmi_guard": "yes"}}, "'yes' is not of type 'boolean'"),
        ({"trigger_crash_dump": {"ignore_nmi_guard": 1}}, "1 is not of type 'boolean'"),
        ({"trigger_crash_dump": {"ignore_nmi_guard": None}}, "None is not of type 'boolean'"),
        (
            {"trigger_crash_dump": {"reboot_first": True}},
            "Additional properties are not allowed ('reboot_first' was unexpected)",
        ),
        ({"trigger_crash_dump": []}, "[] is not of type 'object', 'null'"),
        ({"trigger_crash_dump": "force"}, "'force' is not of type 'object', 'null'"),
        ({}, "'trigger_crash_dump' is a required property"),
        ({"trigger_crash_dump": {}, "lock": None}, "Additional properties are not allowed"),
        (None, "None is not of type 'object'"),
    ],
    ids=repr,
)
def test_a_bad_trigger_body_is_400(
    clients: dict[str, httpx.Client], body: Any, message: str
) -> None:
    for who in ("admin", "alice"):
        assert_fault(_trigger(clients[who], "plain", body), 400, message)


def test_members_read_event_details_redacted(clients: dict[str, httpx.Client]) -> None:
    admin = clients["admin"]
    request_ids = {}
    for name in HIDDEN:
        response = _trigger(clients["alice"], name, {"trigger_crash_dump": {}})
        assert response.status_code == 202, response.text
        request_ids[name] = _request_id(response)

    for name, hidden in HIDDEN.items():
        server_id = config_server_id(name)
        whole = wait_for_action(admin, server_id, request_ids[name], timeout=20)["events"][0]
        assert whole["result"] == "Error"
        assert whole["traceback"]
        path = f"/crashlab/servers/{server_id}/os-instance-actions/{request_ids[name]}"
        for who in ("alice", "carol"):  # the owner, and a reader of the same project
            response = clients[who].get(path)
            assert response.status_code == 200, response.text
            [event] = response.json()["instanceAction"]["events"]
            print(f"{name}: admin reads {whole['details']!r}; {who} reads {event['details']!r}")
            assert "traceback" not in event
            assert "[redacted]" in event["details"]
            for secret in hidden:
                assert secret in whole["details"], secret
                assert secret not in event["details"], (who, secret, event["details"])
        assert_fault(clients["bob"].get(path), 404)

    # What is left is the message itself.
    ipmi = clients["alice"].get(
        f"/crashlab/servers/{config_server_id('ipmi-nowhere')}"
        f"/os-instance-actions/{request_ids['ipmi-nowhere']}"
    )
    assert "BMC at [redacted]" in ipmi.json()["instanceAction"]["events"][0]["details"]


def test_details_with_nothing_to_hide_read_the_same(clients: dict[str, httpx.Client]) -> None:
    server_id = config_server_id("alice-nonmi")
    response = clients["alice"].post(
        f"/servers/{server_id}/action", json={"trigger_crash_dump": None}
    )
    assert response.status_code == 202, response.text
    wait_for_action(clients["admin"], server_id, _request_id(response))
    path = f"/crashlab/servers/{server_id}/os-instance-actions/{_request_id(response)}"
    [event] = clients["alice"].get(path).json()["instanceAction"]["events"]
    assert event["details"] == "Triggering crash dump is not supported"
