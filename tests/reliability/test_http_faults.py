"""The edges of the HTTP layer: every error answered in Nova's format, with its ids.

- a request uvicorn cannot parse gets a 400 in Nova's format with a request id,
  from crashlab's own uvicorn protocol (app/api/http_protocol.py);
- an unexpected error gets Nova's 500 with the request-id and version headers,
  which Starlette's outermost error handler could not give it;
- a 405 names, in ``Allow``, every method the path takes;
- a trailing slash is an unknown path, 404 as in Nova, not a redirect;
- ``all_tenants`` is read as Nova's is_all_tenants reads it.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Callable

import httpx
import pytest

from tests.live import LiveServer
from tests.reliability.cloud import assert_fault, cloud_config, config_server_id

ACTIVE = config_server_id("alice-active")
BOBS = config_server_id("bob-active")


@pytest.fixture(scope="module")
def cloud(module_server: Callable[..., LiveServer]) -> LiveServer:
    return module_server(cloud_config())


def _assert_request_id(response: httpx.Response) -> str:
    request_id = response.headers["x-openstack-request-id"]
    assert request_id.startswith("req-"), request_id
    assert response.headers["x-compute-request-id"] == request_id
    return request_id


def _raw(server: LiveServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are, read the answer to the end (the server closes)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return int(status_line.split()[1]), headers, body


MALFORMED = {
    "no request line": b"GARBAGE\r\n\r\n",
    "header without a colon": b"GET /v2.1 HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "space before a colon": b"GET /v2.1 HTTP/1.1\r\nHost : x\r\n\r\n",
    "NUL in the target": b"GET /v2.1\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "HTTP/1.1 without Host": b"GET /v2.1 HTTP/1.1\r\n\r\n",
    "bad Content-Length": b"POST /v2.1 HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n",
    "two Content-Lengths": (
        b"POST /v2.1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    ),
    "unknown Transfer-Encoding": (
        b"POST /v2.1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"
    ),
    "TLS on the plain port": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40),
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_request_uvicorn_cannot_parse_gets_nova_400_with_a_request_id(
    cloud: LiveServer, request_bytes: bytes
) -> None:
    status, headers, body = _raw(cloud, request_bytes)
    assert status == 400
    assert headers["x-openstack-request-id"].startswith("req-")
    assert headers["x-compute-request-id"] == headers["x-openstack-request-id"]
    assert headers["content-type"] == "application/json"
    assert httpx.Response(400, content=body).json() == {
        "badRequest": {"code": 400, "message": "Invalid HTTP request received."}
    }
    # The server still answers the next request.
    assert httpx.get(cloud.url + "/", timeout=5).status_code == 200


def test_an_unexpected_error_is_nova_500_with_its_headers(
    crashlab_server: Callable[..., LiveServer],
) -> None:
    """The state file damaged behind the service's back: a table dropped by another
    SQLite client. The query that needs it fails; the caller gets Nova's 500."""
    server = crashlab_server(cloud_config())
    with sqlite3.connect(server.state_file) as db:
        db.execute("DROP TABLE instance_actions_events")
        db.execute("DROP TABLE instance_actions")
    with server.client("alice") as alice:
        response = alice.get(f"/servers/{ACTIVE}/os-instance-actions")
        message = assert_fault(response, 500, "Unexpected API Error.")
        assert "report this at" in message
        request_id = _assert_request_id(response)
        assert response.headers["openstack-api-version"] == "compute 2.17"
        assert response.headers["x-openstack-nova-api-version"] == "2.17"
        assert response.headers.get_list("vary") == [
            "OpenStack-API-Version",
            "X-OpenStack-Nova-API-Version",
        ]
        # Logged once, with the request id and the cause; the service goes on.
        log = server.log_path.read_text()
        assert f"({request_id})" in log and "no such table" in log, log[-3000:]
        assert "Exception in ASGI application" not in log
        assert alice.get(f"/servers/{ACTIVE}").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", f"/v2.1/servers/{ACTIVE}", "GET"),
        ("DELETE", f"/v2.1/servers/{ACTIVE}", "GET"),
        ("DELETE", "/v2.1/servers", "GET"),
        ("POST", "/v2.1/servers/detail", "GET"),
        ("GET", f"/v2.1/servers/{ACTIVE}/action", "POST"),
        ("POST", f"/v2.1/servers/{ACTIVE}/os-instance-actions", "GET"),
        ("PATCH", f"/v2.1/crashlab/servers/{ACTIVE}", "DELETE, GET"),
        ("PUT", "/v2.1/crashlab/servers", "GET, POST"),
        ("PUT", "/identity/v3/auth/tokens", "DELETE, GET, POST"),
    ],
)
def test_405_allow_names_every_method_of_the_path(
    admin: httpx.Client, method: str, path: str, allow: str
) -> None:
    response = admin.request(method, admin.base_url.join(path))
    identity = path.startswith("/identity")
    assert_fault(response, 405, "Method Not Allowed", identity=identity)
    assert response.headers["allow"] == allow
    _assert_request_id(response)


@pytest.mark.parametrize(
    "path",
    [
        "/v2.1/servers/",
        "/v2.1/servers/detail/",
        f"/v2.1/servers/{ACTIVE}/",
        f"/v2.1/servers/{ACTIVE}/os-instance-actions/",
        "/v2.1/crashlab/servers/",
        "/v2.1/crashlab/drivers/",
        "/identity/v3/auth/tokens/",
    ],
)
def test_a_trailing_slash_is_404_not_a_redirect(admin: httpx.Client, path: str) -> None:
    response = admin.get(admin.base_url.join(path), follow_redirects=False)
    identity = path.startswith("/identity")
    assert_fault(response, 404, "could not be found", identity=identity)
    assert "location" not in response.headers
    _assert_request_id(response)
    if not identity:
        assert response.headers["openstack-api-version"] == "compute 2.17"


@pytest.mark.parametrize(
    ("path", "status"),
    [("/", 200), ("/v2.1/", 200), ("/v2/", 200), ("/identity/", 300), ("/identity/v3/", 200)],
)
def test_the_documented_slashed_paths_still_answer(
    path: str, status: int, cloud: LiveServer
) -> None:
    assert httpx.get(cloud.url + path, timeout=5).status_code == status


def _names(client: httpx.Client, query: str) -> set[str]:
    response = client.get(f"/servers?{query}")
    assert response.status_code == 200, response.text
    return {s["name"] for s in response.json()["servers"]}


# oslo_utils.strutils TRUE_STRINGS and FALSE_STRINGS, in any case and spacing.
TRUE = ["1", "t", "true", "on", "y", "yes", "TRUE", "Yes", "%20on%20"]
FALSE = ["0", "f", "false", "off", "n", "no", "F", "False", "%20no"]


def test_all_tenants_is_read_as_nova_reads_it(admin: httpx.Client, alice: httpx.Client) -> None:
    """Nova's API (is_all_tenants): present and empty is true; any other
    value goes through strutils.bool_from_string(strict=True), and 400 if unrecognised."""
    everyone = _names(admin, "all_tenants=1")
    assert "bob-active" in everyone and "alice-active" in everyone
    for value in TRUE:
        assert _names(admin, f"all_tenants={value}") == everyone, value
    for value in FALSE:
        assert _names(admin, f"all_tenants={value}") == set(), value  # admin's project has none
    assert _names(admin, "all_tenants") == everyone
    assert _names(admin, "all_tenants=") == everyone
    # Nova reads webob's MultiDict, where the last value wins.
    assert _names(admin, "all_tenants=1&all_tenants=f") == set()
    assert _names(admin, "all_tenants=f&all_tenants=1") == everyone

    alices = _names(alice, "")
    for value in FALSE:
        assert _names(alice, f"all_tenants={value}") == alices, value
    assert_fault(alice.get("/servers?all_tenants=t"), 403, "index:get_all_tenants")
    assert_fault(alice.get("/servers/detail?all_tenants"), 403, "detail:get_all_tenants")


@pytest.mark.parametrize("value", ["xyz", "2", "truth", "-1", "%ff"])
@pytest.mark.parametrize("path", ["/servers", "/servers/detail"])
def test_an_unrecognised_all_tenants_is_400(alice: httpx.Client, path: str, value: str) -> None:
    """Nova parses the value before it checks the all-tenants policy: 400 even for a member."""
    response = alice.get(f"{path}?all_tenants={value}")
    message = assert_fault(response, 400, "Invalid input received: Unrecognized value")
    assert message.endswith(
        "acceptable values are: '0', '1', 'f', 'false', 'n', 'no', 'off', 'on', 't', "
        "'true', 'y', 'yes'"
    )
    _assert_request_id(response)
