"""crashlab's extension: its trigger's body.

``POST /crashlab/servers/{id}/action`` takes ``{"trigger_crash_dump": null}``,
``{}`` or ``{"ignore_nmi_guard": bool}``; anything else is 400 in Nova's
wording (who may use which option: test_policy_matrix.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.live import LiveServer
from tests.reliability.cloud import (
    assert_fault,
    cloud_config,
    config_server_id,
    fake_server,
    wait_for_action,
)

SERVERS = [fake_server("plain")]


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
            {"trigger_crash_dump": {"require_armed": True}},
            "Additional properties are not allowed ('require_armed' was unexpected)",
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


def _request_id(response: httpx.Response) -> str:
    return response.headers["x-openstack-request-id"]
