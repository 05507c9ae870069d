"""The embedded Keystone against a hostile client, over HTTP to real ``crashlab serve``.

- a wrong password costs the same whether or not the user exists;
- Keystone's lockout, counted in the state file, so shared by every process on it;
- tokens in the state file: honoured and revoked by every process, kept over a restart;
- a flood of wrong logins queues on its own thread, not in front of the API,
  and past the queue's bound is refused at once (503);
- requests scoped and checked as Keystone checks them;
- links and catalog URLs from the configured public endpoint or the listening
  address, never from the Host header;
- the unauthenticated OpenAPI document names no user and no project.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import derived_id, load_config
from app.identity import MAX_PENDING_LOGINS
from tests.live import FAKE_CLOUD, LiveServer, fake_cloud_config
from tests.reliability.cloud import assert_fault, config_server_id

GENERIC = "The request you have made requires authentication."
ALICE_ID = derived_id("user", "alice")


def auth_body(
    user: dict[str, Any] | None = None,
    password: str = "alice-secret",
    scope: Any = None,
    methods: Any = ("password",),
) -> dict[str, Any]:
    """A v3 password request; alice in the Default domain unless told otherwise."""
    user = user if user is not None else {"name": "alice", "domain": {"name": "Default"}}
    identity: dict[str, Any] = {
        "methods": list(methods) if isinstance(methods, tuple) else methods,
        "password": {"user": {**user, "password": password}},
    }
    body: dict[str, Any] = {"auth": {"identity": identity}}
    if scope is not None:
        body["auth"]["scope"] = scope
    return body


def login(cloud: LiveServer, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{cloud.auth_url}/auth/tokens", json=body, headers=headers, timeout=30)


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[Callable[[LiveServer], LiveServer]]:
    """Factory: a second ``crashlab serve`` on another server's config and state file."""
    started: list[LiveServer] = []

    def start(first: LiveServer) -> LiveServer:
        server = LiveServer(
            config_path=first.config_path,
            state_file=first.state_file,
            log_path=tmp_path / f"twin{len(started)}.log",
            env=first.env,
        )
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def test_a_wrong_password_costs_the_same_for_a_user_that_does_not_exist(
    fake_cloud: LiveServer,
) -> None:
    times: dict[str, list[float]] = {"alice": [], "mallory": []}
    for _ in range(7):
        for name, samples in times.items():  # interleaved, so noise falls on both
            started = time.perf_counter()
            response = login(
                fake_cloud, auth_body({"name": name, "domain": {"id": "default"}}, "x")
            )
            samples.append(time.perf_counter() - started)
            assert_fault(response, 401, GENERIC, identity=True)
    real, unknown = (statistics.median(samples) for samples in times.values())
    print(f"\nwrong password: alice {real * 1000:.1f} ms, unknown user {unknown * 1000:.1f} ms")
    assert 0.5 < unknown / real < 2, times


def test_lockout_is_keystones_and_shared_by_processes(
    crashlab_server: Callable[..., LiveServer], twin: Callable[[LiveServer], LiveServer]
) -> None:
    config = fake_cloud_config()
    config["identity"]["security_compliance"] = {
        "lockout_failure_attempts": 3,
        "lockout_duration": 3,
    }
    first = crashlab_server(config)
    second = twin(first)
    wrong = auth_body(password="wrong")
    for cloud in (first, second):  # two failures, then a success resets the count
        assert_fault(login(cloud, wrong), 401, GENERIC, identity=True)
    assert login(first, auth_body()).status_code == 201
    for cloud in (first, second, first):  # three more, across both processes
        assert_fault(login(cloud, wrong), 401, GENERIC, identity=True)
    locked = f"The account is locked for user: {ALICE_ID}."
    for cloud in (first, second):  # locked, even with the right password
        assert_fault(login(cloud, auth_body()), 401, locked, identity=True)
        assert_fault(login(cloud, wrong), 401, locked, identity=True)
    # Other users are untouched, and an unknown user is never "locked".
    bob = {"name": "bob", "domain": {"name": "Default"}}
    assert login(second, auth_body(bob, "bob-secret")).status_code == 201
    for _ in range(4):
        response = login(first, auth_body({"name": "mallory", "domain": {"id": "default"}}))
        assert_fault(response, 401, GENERIC, identity=True)
    time.sleep(3.2)  # lockout_duration after the last failure
    assert login(second, auth_body()).status_code == 201
    assert_fault(login(first, wrong), 401, GENERIC, identity=True)


def test_tokens_are_shared_by_processes_and_outlive_a_restart(
    crashlab_server: Callable[..., LiveServer], twin: Callable[[LiveServer], LiveServer]
) -> None:
    first = crashlab_server()
    second = twin(first)
    token, other = first.token("alice"), first.token("alice")
    for cloud in (first, second):
        headers = {"X-Auth-Token": token, "X-Subject-Token": other}
        assert httpx.get(f"{cloud.compute_url}/servers", headers=headers).status_code == 200
        shown = httpx.get(f"{cloud.auth_url}/auth/tokens", headers=headers)
        assert shown.status_code == 200 and shown.json()["token"]["user"]["name"] == "alice"
    headers = {"X-Auth-Token": token, "X-Subject-Token": other}
    assert httpx.delete(f"{second.auth_url}/auth/tokens", headers=headers).status_code == 204
    for cloud in (first, second):
        response = httpx.get(f"{cloud.compute_url}/servers", headers={"X-Auth-Token": other})
        assert_fault(response, 401)
    # A forged secret for a real token id is refused.
    token_id, _, secret = token.partition(".")
    # The secret's first character changed (to one it is not: a random secret may start with x).
    forged = f"{token_id}.{'y' if secret[0] == 'x' else 'x'}{secret[1:]}"
    assert_fault(httpx.get(f"{first.compute_url}/servers", headers={"X-Auth-Token": forged}), 401)
    first.stop()
    second.stop()
    first.start()
    response = httpx.get(f"{first.compute_url}/servers", headers={"X-Auth-Token": token})
    assert response.status_code == 200, response.text


def _flood(cloud: LiveServer, clients: int, each: int) -> list[tuple[int, float, httpx.Response]]:
    """``clients`` threads sending ``each`` wrong logins at once: (status, seconds, response)."""
    results: list[tuple[int, float, httpx.Response]] = []
    gate = threading.Barrier(clients)
    body = auth_body(password="wrong")

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            gate.wait()
            for _ in range(each):
                started = time.perf_counter()
                response = http.post(f"{cloud.auth_url}/auth/tokens", json=body)
                results.append((response.status_code, time.perf_counter() - started, response))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_a_login_flood_does_not_starve_the_api(fake_cloud: LiveServer) -> None:
    with fake_cloud.client("bob") as bob:
        assert bob.get("/servers").status_code == 200
        quiet = [_timed_get(bob) for _ in range(10)]
        flood = threading.Thread(target=lambda: results.extend(_flood(fake_cloud, 20, 5)))
        results: list[tuple[int, float, httpx.Response]] = []
        flood.start()
        time.sleep(0.3)  # let the flood build up
        busy = []
        while flood.is_alive():
            busy.append(_timed_get(bob))
        flood.join()
    assert sorted({status for status, _, _ in results}) == [401], results[:3]
    assert len(results) == 100
    quiet_p50, busy_p50 = statistics.median(quiet), statistics.median(busy)
    print(
        f"\nbob's GET /servers p50: {quiet_p50 * 1000:.1f} ms quiet, "
        f"{busy_p50 * 1000:.1f} ms during 100 wrong logins from 20 clients ({len(busy)} GETs)"
    )
    assert busy_p50 < 0.1, busy


def _timed_get(client: httpx.Client) -> float:
    started = time.perf_counter()
    assert client.get("/servers").status_code == 200
    return time.perf_counter() - started


def test_logins_past_the_queue_are_refused_at_once(fake_cloud: LiveServer) -> None:
    results = _flood(fake_cloud, MAX_PENDING_LOGINS + 16, 1)
    refused = [(seconds, r) for status, seconds, r in results if status == 503]
    assert {status for status, _, _ in results} == {401, 503}, results[:3]
    assert len(refused) >= 8, len(refused)
    for _, response in refused:
        assert_fault(response, 503, "try again", identity=True)
    slowest_refusal = max(seconds for seconds, _ in refused)
    slowest_check = max(seconds for status, seconds, _ in results if status == 401)
    print(f"\n{len(refused)} of {len(results)} refused, slowest in {slowest_refusal:.2f} s")
    assert slowest_refusal < slowest_check
    assert login(fake_cloud, auth_body()).status_code == 201


ALICE = {"name": "alice", "domain": {"name": "Default"}}
ALICE_PROJECT = derived_id("project", "alice")
SCOPES = [
    # (what is asked, status, the message it contains)
    (auth_body(), 201, ""),
    (auth_body({"id": ALICE_ID}), 201, ""),
    (auth_body({"name": "alice", "domain": {"id": "default"}}), 201, ""),
    (auth_body(scope={"project": {"id": ALICE_PROJECT}}), 201, ""),
    (auth_body(scope={"project": {"name": "alice", "domain": {"id": "default"}}}), 201, ""),
    (auth_body(scope={"project": {"name": "alice", "domain": {"name": "Default"}}}), 201, ""),
    (auth_body(methods=["password", "password"]), 201, ""),
    (auth_body(scope={"project": {"name": "bob", "domain": {"id": "default"}}}), 401, GENERIC),
    (auth_body(scope={"project": {"id": derived_id("project", "bob")}}), 401, GENERIC),
    (auth_body(scope={"project": {"name": "nope", "domain": {"id": "default"}}}), 401, GENERIC),
    (auth_body(scope={"project": {"name": "alice", "domain": {"id": "other"}}}), 401, GENERIC),
    (auth_body(scope={"domain": {"id": "default"}}), 401, GENERIC),
    (auth_body(scope={"domain": {"name": "Default"}}), 401, GENERIC),
    (auth_body(scope={"system": {"all": True}}), 401, GENERIC),
    (auth_body(scope="unscoped"), 401, GENERIC),
    (auth_body(scope={"OS-TRUST:trust": {"id": "t"}}), 401, GENERIC),
    (auth_body({"name": "alice", "domain": {"name": "Other"}}), 401, GENERIC),
    (auth_body({"name": "alice", "domain": {"id": "other"}}), 401, GENERIC),
    (auth_body({"id": "alice"}), 401, GENERIC),  # a name is not an id
    (auth_body(methods=[]), 401, GENERIC),
    (
        {"auth": {"identity": {"methods": ["token"], "token": {"id": "x"}}}},
        401,
        "Attempted to authenticate with an unsupported method.",
    ),
    (auth_body(methods=["password", "token"]), 400, "Expecting to find token in identity"),
    (auth_body(methods="password"), 400, "is not of type 'array'"),
    (auth_body(methods="xpasswordx"), 400, "is not of type 'array'"),
    (auth_body({"name": "alice"}), 400, "Expecting to find domain in user"),
    (auth_body({"name": "alice", "domain": {}}), 400, "id or name must be present"),
    (auth_body({"name": "alice", "domain": {"id": ""}}), 400, "find id or name in domain"),
    (auth_body(scope={"project": {"name": "alice"}}), 400, "Expecting to find domain in project"),
    (auth_body(scope={"project": {}}), 400, "id or name must be present"),
    (
        auth_body(scope={"project": {"id": ALICE_PROJECT}, "domain": {"id": "default"}}),
        400,
        "Expecting to find system, project, domain, OS-TRUST:trust or unscoped in scope",
    ),
]


def test_scopes_users_and_methods_as_keystone_checks_them(fake_cloud: LiveServer) -> None:
    for body, status, message in SCOPES:
        response = login(fake_cloud, body)
        if status != 201:
            assert_fault(response, status, message, identity=True)
            continue
        assert response.status_code == 201, (body, response.text)
        token = response.json()["token"]
        assert token["project"] == {
            "id": ALICE_PROJECT,
            "name": "alice",
            "domain": {"id": "default", "name": "Default"},
        }
        assert token["user"]["id"] == ALICE_ID and token["methods"] == ["password"]


def _links(cloud: LiveServer, **headers: str) -> list[str]:
    """Every URL the service gives out: version documents, catalog, server links."""
    urls = []
    for path in ("/", "/v2.1", "/v2", "/identity", "/identity/v3"):
        document = httpx.get(cloud.url + path, headers=headers).json()
        urls += _hrefs(document)
    response = login(cloud, auth_body(), **headers)
    for service in response.json()["token"]["catalog"]:
        urls += [endpoint["url"] for endpoint in service["endpoints"]]
    token = {"X-Auth-Token": response.headers["X-Subject-Token"], **headers}
    server = config_server_id("alice-active")
    for path in ("/servers", "/servers/detail", f"/servers/{server}"):
        urls += _hrefs(httpx.get(cloud.compute_url + path, headers=token).json())
    return urls


def _hrefs(document: Any) -> list[str]:
    if isinstance(document, dict):
        found = [document["href"]] if isinstance(document.get("href"), str) else []
        return found + [h for value in document.values() for h in _hrefs(value)]
    if isinstance(document, list):
        return [h for value in document for h in _hrefs(value)]
    return []


def test_links_ignore_a_forged_host_header(crashlab_server: Callable[..., LiveServer]) -> None:
    cloud = crashlab_server()
    forged = {"Host": "evil.example:666", "X-Forwarded-Host": "evil.example"}
    urls = [u for u in _links(cloud, **forged) if "docs.openstack.org" not in u]
    assert len(urls) > 20
    assert all(u.startswith(cloud.url + "/") for u in urls), urls

    configured = crashlab_server(fake_cloud_config(public_endpoint="https://crashlab.example/"))
    urls = [u for u in _links(configured, **forged) if "docs.openstack.org" not in u]
    assert all(u.startswith("https://crashlab.example/") for u in urls), urls


def test_the_openapi_document_names_no_user_and_no_project(fake_cloud: LiveServer) -> None:
    document = httpx.get(f"{fake_cloud.url}/openapi.json").text
    identity = load_config(FAKE_CLOUD).identity
    names = {u.name for u in identity.users} | {p.name for p in identity.projects}
    ids = {u.user_id for u in identity.users} | {p.project_id for p in identity.projects}
    # "admin" is also a role and a lock owner; every other name must be absent.
    for secret in (names - {"admin"}) | ids:
        assert secret not in document, secret
