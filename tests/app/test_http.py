"""app/api/middleware.py and app/api/faults.py: headers, limits, and the fault formats."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.app.cloud import AppCloud, assert_fault, login_body

pytestmark = pytest.mark.fast

REQUEST_ID = re.compile(
    r"^req-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)


def test_every_answer_carries_a_request_id(cloud: AppCloud) -> None:
    for response in (
        cloud.get("alice", "/servers"),
        cloud.client.get("/v2.1/servers"),  # a 401
        cloud.client.get("/identity/v3"),
    ):
        request_id = response.headers["x-openstack-request-id"]
        assert REQUEST_ID.match(request_id), request_id
        assert response.headers["x-compute-request-id"] == request_id
    first, second = (cloud.get("alice", "/servers") for _ in range(2))
    assert first.headers["x-openstack-request-id"] != second.headers["x-openstack-request-id"]


def test_compute_answers_name_their_microversion(cloud: AppCloud) -> None:
    response = cloud.get("alice", "/servers")
    assert response.headers["openstack-api-version"] == "compute 2.17"
    assert response.headers["x-openstack-nova-api-version"] == "2.17"
    assert response.headers.get_list("vary") == [
        "OpenStack-API-Version",
        "X-OpenStack-Nova-API-Version",
    ]
    token = {"X-Auth-Token": cloud.token("alice")}
    default = cloud.client.get("/v2.1/servers", headers=token)
    assert default.headers["openstack-api-version"] == "compute 2.1"
    latest = cloud.client.get(
        "/v2.1/servers", headers={**token, "X-OpenStack-Nova-API-Version": "latest"}
    )
    assert latest.headers["openstack-api-version"] == "compute 2.17"


@pytest.mark.parametrize(
    ("header", "status", "name", "message"),
    [
        (
            "compute 2.x",
            400,
            "badRequest",
            "API Version String 2.x is of invalid format. Must be of format MajorNum.MinorNum.",
        ),
        (
            "compute 2.01",
            400,
            "badRequest",
            "API Version String 2.01 is of invalid format. Must be of format MajorNum.MinorNum.",
        ),
        (
            "compute 2.99",
            406,
            "computeFault",
            "Version 2.99 is not supported by the API. Minimum is 2.1 and maximum is 2.17.",
        ),
    ],
)
def test_a_bad_microversion_is_refused(
    cloud: AppCloud, header: str, status: int, name: str, message: str
) -> None:
    response = cloud.client.get(
        "/v2.1/servers",
        headers={"X-Auth-Token": cloud.token("alice"), "OpenStack-API-Version": header},
    )
    assert_fault(response, status, name, message)
    assert REQUEST_ID.match(response.headers["x-openstack-request-id"])


def test_a_body_over_the_limit_is_413(start_cloud: Callable[..., AppCloud]) -> None:
    cloud = start_cloud(max_body_bytes=1024)
    path = f"/v2.1/servers/{cloud.ids['alice-active']}/action"
    response = cloud.client.post(
        path, content=b"{" + b" " * 1024 + b"}", headers=cloud.headers("alice")
    )
    assert_fault(response, 413, "overLimit", "Request is too large.")
    assert REQUEST_ID.match(response.headers["x-openstack-request-id"])
    fits = cloud.client.post(path, content=b'{"lock": null}', headers=cloud.headers("alice"))
    assert fits.status_code == 202


def test_nova_faults(cloud: AppCloud) -> None:
    assert_fault(
        cloud.action("alice", "alice-active", {"reboot": {"type": "HARD"}}),
        400,
        "badRequest",
        "There is no such action: reboot",
    )
    assert_fault(
        cloud.action("alice", "alice-active", {"lock": None, "unlock": None}),
        400,
        "badRequest",
        "Malformed request body",
    )
    assert_fault(
        cloud.get("alice", "/no-such-collection"),
        404,
        "itemNotFound",
        "The resource could not be found.",
    )
    assert_fault(
        cloud.action("alice", "alice-locked", {"trigger_crash_dump": None}),
        409,
        "conflictingRequest",
        f"Instance {cloud.ids['alice-locked']} is locked",
    )
    response = cloud.client.post(
        f"/v2.1/servers/{cloud.ids['alice-active']}/action",
        content=b"trigger_crash_dump",
        headers={**cloud.headers("alice"), "Content-Type": "text/plain"},
    )
    assert_fault(response, 415, "badMediaType", "Unsupported Content-Type")


def test_trigger_below_its_microversion_is_not_found(cloud: AppCloud) -> None:
    response = cloud.client.post(
        f"/v2.1/servers/{cloud.ids['alice-active']}/action",
        json={"trigger_crash_dump": None},
        headers=cloud.headers("alice", version="2.16"),
    )
    assert_fault(response, 404, "itemNotFound", "The resource could not be found.")


def test_identity_answers_in_keystone_s_format(cloud: AppCloud) -> None:
    wrong = cloud.client.post(
        "/identity/v3/auth/tokens", json=login_body("alice", "not-her-password", "alice")
    )
    assert wrong.status_code == 401
    assert wrong.json() == {
        "error": {
            "code": 401,
            "title": "Unauthorized",
            "message": "The request you have made requires authentication.",
        }
    }
    missing = cloud.client.get("/identity/v3/no-such-thing")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == 404
    assert missing.json()["error"]["title"] == "Not Found"
    malformed = cloud.client.post(
        "/identity/v3/auth/tokens", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.json()["error"]["title"] == "Bad Request"
