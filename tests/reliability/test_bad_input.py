"""Bad input, spelled out: sizes, bodies, ids, names, headers, media types.

Each case names the status Nova (or Keystone, under /identity) answers; none
may be a 5xx. tests/reliability/test_schemathesis.py generates thousands more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.live import LiveServer
from tests.reliability.cloud import TRIGGER, assert_fault, cloud_config, config_server_id

ACTIVE = config_server_id("alice-active")
BODY_LIMIT = 8192


@pytest.fixture(scope="module")
def cloud(module_server: Callable[..., LiveServer]) -> LiveServer:
    # The storm guard would turn the repeated valid triggers here into 409s.
    config = cloud_config(max_body_bytes=BODY_LIMIT, nmi_guard={"enabled": False})
    return module_server(config)


def _post(client: httpx.Client, path: str, content: bytes, **headers: str) -> httpx.Response:
    return client.post(
        path, content=content, headers={"Content-Type": "application/json", **headers}
    )


# Sizes


def test_body_at_the_limit_is_read(alice: httpx.Client) -> None:
    body = b'{"trigger_crash_dump": null}'
    response = _post(alice, f"/servers/{ACTIVE}/action", body.ljust(BODY_LIMIT))
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_413(alice: httpx.Client, chunked: bool) -> None:
    body = b'{"trigger_crash_dump": null}'.ljust(BODY_LIMIT + 1)
    content: bytes | Iterator[bytes] = iter([body[:1000], body[1000:]]) if chunked else body
    response = alice.post(
        f"/servers/{ACTIVE}/action",
        content=content,
        headers={"Content-Type": "application/json"},
    )
    assert_fault(response, 413, "Request is too large.")
    assert response.headers["x-openstack-request-id"].startswith("req-")
    assert response.headers["openstack-api-version"] == "compute 2.17"


def test_identity_body_over_the_limit_is_413_in_keystone_format(cloud: LiveServer) -> None:
    response = httpx.post(
        f"{cloud.auth_url}/auth/tokens",
        content=b"{" + b" " * BODY_LIMIT + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert_fault(response, 413, identity=True)


def test_huge_body_is_refused_without_being_read(alice: httpx.Client) -> None:
    """An 8 MiB declared length is refused from the header alone."""
    response = _post(alice, f"/servers/{ACTIVE}/action", b"x" * (8 * 1024 * 1024))
    assert_fault(response, 413)


# Bodies

NOT_JSON = [b"not json", b"{", b"{'single': 'quotes'}", b"\xff\xfe", b'{"a": 1,}', b"[" * 2000]


@pytest.mark.parametrize("content", NOT_JSON, ids=lambda c: repr(c[:12]))
@pytest.mark.parametrize(
    "path",
    [f"/servers/{ACTIVE}/action", f"/crashlab/servers/{ACTIVE}/action", "/crashlab/servers"],
)
def test_non_json_is_400(admin: httpx.Client, path: str, content: bytes) -> None:
    assert_fault(_post(admin, path, content), 400, "Malformed request body")


def test_non_json_to_identity_is_400(cloud: LiveServer) -> None:
    response = httpx.post(
        f"{cloud.auth_url}/auth/tokens",
        content=b"{nope",
        headers={"Content-Type": "application/json"},
    )
    assert_fault(response, 400, "Malformed request body", identity=True)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # Nova's validators.py wording: field, value, then the jsonschema message.
        (
            {"trigger_crash_dump": "x"},
            "Invalid input for field/attribute trigger_crash_dump. Value: x. "
            "'x' is not of type 'null'",
        ),
        ({"trigger_crash_dump": 0}, "0 is not of type 'null'"),
        ({"trigger_crash_dump": {}}, "is not of type 'null'"),
        ({"trigger_crash_dump": [None]}, "is not of type 'null'"),
        ({"trigger_crash_dump": None, "lock": None}, "Malformed request body"),
        ({}, "Malformed request body"),
        ([], "Malformed request body"),
        (["trigger_crash_dump"], "Malformed request body"),
        ("trigger_crash_dump", "Malformed request body"),
        (None, "Malformed request body"),
        (17, "Malformed request body"),
        ({"trigger-crash-dump": None}, "There is no such action: trigger-crash-dump"),
        ({"lock": "now"}, "is not of type 'object', 'null'"),
        ({"os-resetState": {"state": 5}}, "Invalid input for field/attribute state."),
        ({"os-resetState": {"state": "stopped"}}, "'stopped' is not one of ['active', 'error']"),
        ({"os-resetState": None}, "None is not of type 'object'"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_json_of_the_wrong_shape_is_400(admin: httpx.Client, body: object, message: str) -> None:
    response = admin.post(f"/servers/{ACTIVE}/action", json=body)
    assert_fault(response, 400, message)


@pytest.mark.parametrize(
    "content",
    [
        b'{"\\ud800": null}',  # a lone surrogate: valid JSON, not encodable text
        b'{"trigger_crash_dump": "\\udfff"}',
        b'{"trigger_crash_dump": ' + b"[" * 990 + b"]" * 990 + b"}",
        b'{"trigger_crash_dump": ' + b"9" * 5000 + b"}",  # past int-from-string limits
        b'{"trigger_crash_dump": NaN}',
    ],
    ids=["surrogate-key", "surrogate-value", "deep", "huge-int", "nan"],
)
def test_awkward_json_is_400_never_500(admin: httpx.Client, content: bytes) -> None:
    for path in (f"/servers/{ACTIVE}/action", "/crashlab/servers"):
        response = _post(admin, path, content)
        assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"server": {"name": "x"}}, "'project_id' is a required property"),
        (
            {"server": {"name": "", "project_id": "alice", "user_id": "alice", "driver": "fake"}},
            "should be non-empty",
        ),
        (
            {"server": {"name": "x", "project_id": "nobody", "user_id": "alice", "driver": "fake"}},
            "Unknown project 'nobody'",
        ),
        (
            {"server": {"name": "x", "project_id": "alice", "user_id": "alice", "driver": "nope"}},
            "unknown driver 'nope'",
        ),
        (
            {
                "server": {
                    "name": "x",
                    "project_id": "alice",
                    "user_id": "alice",
                    "driver": "fake",
                    "driver_info": {"power_state": "on fire"},
                }
            },
            "Invalid driver_info for driver fake",
        ),
        (
            {
                "server": {
                    "uuid": "not-a-uuid",
                    "name": "x",
                    "project_id": "alice",
                    "user_id": "alice",
                    "driver": "fake",
                }
            },
            "is not a 'uuid'",
        ),
    ],
    ids=["missing", "empty-name", "project", "driver", "driver_info", "uuid"],
)
def test_bad_registrations_are_400(admin: httpx.Client, body: object, message: str) -> None:
    assert_fault(admin.post("/crashlab/servers", json=body), 400, message)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"auth": None},
        {"auth": {"identity": {"methods": ["password"], "password": {"user": "alice"}}}},
        {"auth": {"identity": {"methods": 5, "password": {}}}},
        {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {"user": {"name": 1, "password": "x"}},
                }
            }
        },
    ],
    ids=lambda v: repr(v)[:30],
)
def test_malformed_authentication_is_400(cloud: LiveServer, body: object) -> None:
    response = httpx.post(f"{cloud.auth_url}/auth/tokens", json=body)
    assert_fault(response, 400, identity=True)


@pytest.mark.parametrize(
    "password",
    ["x" * 73, "é" * 40, "", "alice-secret\x00", "alice-secret" + "\u202e"],
    ids=["73-bytes", "80-bytes-utf8", "empty", "nul", "rtl-override"],
)
def test_wrong_passwords_of_any_shape_are_401(cloud: LiveServer, password: str) -> None:
    """bcrypt 5 raises on passwords over 72 bytes; that must read as a wrong password."""
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": "alice", "password": password, "domain": {"id": "default"}}
                },
            }
        }
    }
    response = httpx.post(f"{cloud.auth_url}/auth/tokens", json=body)
    assert_fault(response, 401, identity=True)


# Ids and names

ODD_IDS = [
    "not-a-uuid",
    "1234",
    "00000000-0000-0000-0000-000000000000",
    "{" + ACTIVE + "}",
    "urn:uuid:" + ACTIVE,
    ACTIVE.replace("-", ""),
    ACTIVE + "0",
    "ñé€😀",
    "\u202eevil",
    "%00",
    "..%2F..%2Fetc%2Fpasswd",
    "x" * 4000,
    " ",
    "null",
    "detail2",
]


@pytest.mark.parametrize("server_id", ODD_IDS, ids=lambda v: repr(v)[:20])
def test_odd_server_ids_are_404(alice: httpx.Client, admin: httpx.Client, server_id: str) -> None:
    """Nova's common.get_instance: anything that is not a known uuid is itemNotFound."""
    for client in (alice, admin):
        for method, path, body in (
            ("GET", f"/servers/{server_id}", None),
            ("POST", f"/servers/{server_id}/action", TRIGGER),
            ("GET", f"/servers/{server_id}/os-instance-actions", None),
            ("GET", f"/servers/{server_id}/os-instance-actions/req-x", None),
        ):
            response = client.request(method, path, json=body)
            assert_fault(response, 404)


def test_dashless_uuid_of_a_real_server_is_found_or_404(admin: httpx.Client) -> None:
    """Nova's is_uuid_like accepts it; crashlab may find the server or not, never 500."""
    for server_id in (ACTIVE.replace("-", ""), ACTIVE.upper()):
        assert admin.get(f"/servers/{server_id}").status_code in (200, 404)


@pytest.mark.parametrize("request_id", ["req-ñ", "x" * 3000, "req-%00", "%ff"])
def test_odd_request_ids_are_404(alice: httpx.Client, request_id: str) -> None:
    response = alice.get(f"/servers/{ACTIVE}/os-instance-actions/{request_id}")
    assert_fault(response, 404)


@pytest.mark.parametrize(
    "name", ["ñé€😀", "\u202erevo", "名前", "a\x00b", "' OR 1=1 --", "%", "_", "x" * 300]
)
def test_unicode_names_register_list_and_filter(admin: httpx.Client, name: str) -> None:
    body = {"server": {"name": name, "project_id": "bob", "user_id": "bob", "driver": "fake"}}
    response = admin.post("/crashlab/servers", json=body)
    if len(name) > 255:
        assert_fault(response, 400, "is too long")
        return
    assert response.status_code == 201, response.text
    server_id = response.json()["server"]["uuid"]
    try:
        found = admin.get("/servers", params={"name": name, "all_tenants": "1"}).json()
        assert [s["id"] for s in found["servers"]] == [server_id]
        assert admin.get(f"/servers/{server_id}").json()["server"]["name"] == name
    finally:
        assert admin.delete(f"/crashlab/servers/{server_id}").status_code == 204


@pytest.mark.parametrize(
    "query", ["name=%ff%fe", "name=%00", "name=" + "ñ" * 2000, "all_tenants=%ff"]
)
def test_odd_query_strings_are_not_5xx(alice: httpx.Client, query: str) -> None:
    response = alice.get(f"/servers?{query}")
    # An all_tenants that is no boolean is 400, as in Nova.
    assert response.status_code in (200, 400, 403), response.text


# Headers


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Huge": "a" * 20_000},
        {f"X-Many-{i}": "b" * 1000 for i in range(80)},
        {"X-Auth-Token": "t" * 100_000},
        {"OpenStack-API-Version": "compute " + "2" * 30_000},
    ],
    ids=["one-20k-header", "80-1k-headers", "100k-token", "30k-version"],
)
def test_huge_headers_are_4xx(
    cloud: LiveServer, alice: httpx.Client, headers: dict[str, str]
) -> None:
    for response in (
        alice.get("/servers", headers=headers),
        alice.post(f"/servers/{ACTIVE}/action", json=TRIGGER, headers=headers),
        httpx.get(f"{cloud.url}/", headers=headers),
    ):
        assert 400 <= response.status_code < 500, response.status_code
        # Refused by crashlab after reading the whole head, not cut off by the parser:
        # a head refused unread can reach the client as a connection reset instead.
        assert response.headers.get("x-openstack-request-id"), response.text


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json-patch+json",
        "ñ/ñ",
        "application",
    ],
)
def test_bad_content_type_is_415(admin: httpx.Client, content_type: str) -> None:
    headers = {b"Content-Type": content_type.encode()}
    for path in (f"/servers/{ACTIVE}/action", f"/crashlab/servers/{ACTIVE}/action"):
        response = admin.post(path, content=b'{"trigger_crash_dump": null}', headers=headers)
        assert_fault(response, 415)


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "application/json; charset=utf-8", "APPLICATION/JSON"],
)
def test_json_content_types_are_accepted(alice: httpx.Client, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = alice.post(
        f"/servers/{ACTIVE}/action", content=b'{"trigger_crash_dump": null}', headers=headers
    )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("version", "status", "message"),
    [
        ("compute 2", 400, "is of invalid format"),
        ("compute two.seventeen", 400, "is of invalid format"),
        ("compute 2.017", 400, "is of invalid format"),
        ("compute 3.0", 406, "Minimum is 2.1 and maximum is"),
        ("compute 2.0", 406, "is not supported by the API"),
        ("compute 2.999999999999999999999", 406, "is not supported by the API"),
    ],
)
def test_bad_microversions(alice: httpx.Client, version: str, status: int, message: str) -> None:
    response = alice.get("/servers", headers={"OpenStack-API-Version": version})
    assert_fault(response, status, message)
    assert response.headers["vary"]


def test_unknown_token_shapes_are_401(cloud: LiveServer) -> None:
    for token in ("", ".", "a.b", "x" * 500, "ñ", "id.", ".secret"):
        headers = {b"X-Auth-Token": token.encode()}
        response = httpx.get(f"{cloud.compute_url}/servers", headers=headers)
        assert_fault(response, 401)
