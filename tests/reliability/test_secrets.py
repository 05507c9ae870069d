"""Secrets: BMC passwords and users' tokens appear in no response, log or stored event.

BMC servers (ipmi and redfish) are registered with known passwords, through
the config file and through the crashlab extension, in front of real
virtualbmc and sushy-tools (and a Redfish peer that answers garbage). Their
crash dumps succeed or fail (wrong passwords, a dead BMC, a malformed
resource), every failure storing a driver traceback. Then every response body
the service gave, its log, and the SQLite state file (events' details and
tracebacks, and the raw bytes of the database and its WAL) are searched for
every password and every token. Passwords must be stored encrypted with the
configured key.

Every way a registration can be refused (a 4xx) is then tried with every
driver's secret fields filled in, and no secret may come back in any answer or
reach the log.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from app.client import Credentials, request_token
from app.process import free_port
from drivers import driver_class
from emulators.redfish_sim import PeerBehaviour, RedfishPeer
from emulators.sushy import SushyEmulator
from emulators.vbmc import VirtualBMCs
from tests.fixtures import bmc_cloud
from tests.live import LiveServer, fake_cloud_config
from tests.reliability.cloud import config_server_id, trigger, wait_for_action


class Recorder:
    """Every response the tests received, to search afterwards."""

    def __init__(self) -> None:
        self.responses: list[httpx.Response] = []

    def hook(self, response: httpx.Response) -> None:
        response.read()
        self.responses.append(response)

    def client(self, cloud: LiveServer, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=cloud.compute_url,
            headers={"X-Auth-Token": token, "OpenStack-API-Version": "compute 2.17"},
            event_hooks={"response": [self.hook]},
            timeout=30,
        )

    def token(self, cloud: LiveServer, user: str) -> str:
        credentials = Credentials(cloud.auth_url, user, f"{user}-secret", user)
        response = request_token(credentials, timeout=10)
        assert response.status_code == 201, response.text
        self.responses.append(response)
        return response.headers["X-Subject-Token"]

    def texts(self) -> Iterator[tuple[str, str]]:
        """(request line, body and headers but the token the auth response hands out)."""
        for response in self.responses:
            headers = {k: v for k, v in response.headers.items() if k != "x-subject-token"}
            yield f"{response.request.method} {response.request.url}", f"{headers} {response.text}"


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def _ipmi_password() -> str:
    return "ipmi-" + secrets.token_hex(7)  # 19 bytes: IPMI allows 20


@pytest.mark.bmc
@pytest.mark.libvirt
def test_bmc_passwords_and_tokens_appear_in_no_response_log_or_stored_event(
    vbmcs: VirtualBMCs,
    sushy_emulator: Callable[..., SushyEmulator],
    blank_domains: Callable[[], str],
    crashlab_server: Callable[..., LiveServer],
    recorder: Recorder,
) -> None:
    ipmi_domain, redfish_domain = blank_domains(), blank_domains()
    endpoint = vbmcs.add(ipmi_domain, password=_ipmi_password())
    emulator = sushy_emulator(domains=[redfish_domain])
    wrong = {name: _ipmi_password() for name in ("cfg-ipmi", "cfg-redfish", "api-ipmi", "api-rf")}
    peer = RedfishPeer(PeerBehaviour(malformed_root=True, password="peer-" + secrets.token_hex(8)))
    passwords = [endpoint.password, emulator.password, peer.behaviour.password, *wrong.values()]

    def ipmi(password: str, port: int = endpoint.port) -> dict[str, object]:
        info = {"address": "127.0.0.1", "port": port, "username": endpoint.username}
        return info | {"password": password, "timeout": 2}

    def redfish(password: str, address: str = emulator.url) -> dict[str, object]:
        info = {"address": address, "username": emulator.username, "password": password}
        return info | {"system_id": emulator.system_id(redfish_domain), "timeout": 2}

    key = Fernet.generate_key().decode()
    config = bmc_cloud(
        {
            "cfg-ipmi": ("ipmi", ipmi(endpoint.password)),
            "cfg-ipmi-wrong": ("ipmi", ipmi(wrong["cfg-ipmi"])),
            "cfg-redfish": ("redfish", redfish(emulator.password)),
            "cfg-redfish-wrong": ("redfish", redfish(wrong["cfg-redfish"])),
        }
    )
    # A server with an ssh dump target has a private key, read only at its own path.
    config["collector"] = {"enabled": True, "port": free_port()}
    with peer:
        cloud = crashlab_server(config, env={"CRASHLAB_SECRET_KEY": key})
        tokens = [recorder.token(cloud, "admin"), recorder.token(cloud, "alice")]
        with recorder.client(cloud, tokens[0]) as admin, recorder.client(cloud, tokens[1]) as alice:
            registered = _register(
                admin,
                {
                    "api-redfish": ("redfish", redfish(emulator.password)),
                    "api-redfish-wrong": ("redfish", redfish(wrong["api-rf"])),
                    "api-ipmi-dead": ("ipmi", ipmi(wrong["api-ipmi"], port=free_port(kind=2))),
                    "api-redfish-malformed": (
                        "redfish",
                        redfish(peer.behaviour.password, address=peer.url) | {"system_id": None},
                    ),
                },
            )
            # No dump will arrive: its collect phase ends at once, so its action finishes.
            ssh = {"dump_target": {"type": "ssh"}, "dump_timeouts": {"collect": 1}}
            registered |= _register(
                admin, {"api-ssh": ("redfish", redfish(emulator.password))}, ssh
            )
            private_key = _private_key(cloud, tokens[0], registered["api-ssh"])
            _refused_registrations(admin, endpoint.port, passwords)
            ids = {s["name"]: config_server_id(s["name"]) for s in config["servers"]}
            ids |= registered
            results = _trigger_each(admin, alice, ids)
            _read_everything(admin, alice, ids, results)

    print(f"\n{len(recorder.responses)} responses searched; results: {results}")
    assert {name: result for name, (_, result) in results.items()} == {
        "cfg-ipmi": "Success",
        "cfg-ipmi-wrong": "Error",
        "cfg-redfish": "Success",
        "cfg-redfish-wrong": "Error",
        "api-redfish": "Success",
        "api-redfish-wrong": "Error",
        "api-ipmi-dead": "Error",
        "api-redfish-malformed": "Error",
        "api-ssh": "Success",
    }
    secrets_ = {f"password {i}": p for i, p in enumerate(passwords)}
    # Any line of the key's base64 body would betray it.
    secrets_ |= {f"ssh key line {i}": line for i, line in enumerate(private_key.splitlines()[1:-1])}
    secrets_ |= {f"token {i}": t for i, t in enumerate(tokens)}
    secrets_ |= {f"token {i} secret": t.partition(".")[2] for i, t in enumerate(tokens)}
    # The searches look for the right strings: the operator's config file holds some.
    assert endpoint.password in cloud.config_path.read_text()
    for where, text in recorder.texts():
        _assert_none_in(secrets_, text, where)
    log = cloud.log_path.read_text()
    assert "rejected the credentials" in log and "malformed Redfish resource" in log
    _assert_none_in(secrets_, log, "the serve log")
    _assert_stored_safely(cloud.state_file, key, secrets_, ids, passwords)


def _register(
    admin: httpx.Client,
    servers: dict[str, tuple[str, dict[str, object]]],
    dump: dict[str, Any] | None = None,
) -> dict[str, str]:
    ids = {}
    for name, (driver, info) in servers.items():
        body: dict[str, Any] = {"name": name, "project_id": "alice", "user_id": "alice"}
        body["driver"] = driver
        body |= dump or {}
        info = {k: v for k, v in info.items() if v is not None}
        response = admin.post("/crashlab/servers", json={"server": body | {"driver_info": info}})
        assert response.status_code == 201, response.text
        shown = response.json()["server"]["driver_info"]
        secret_fields = driver_class(driver).settings_model.secret_fields & info.keys()
        assert secret_fields and all(shown[field] == "******" for field in secret_fields)
        ids[name] = response.json()["server"]["uuid"]
    return ids


def _private_key(cloud: LiveServer, admin_token: str, server_id: str) -> str:
    """Read outside the recorder: the one response that carries a secret."""
    with httpx.Client(base_url=cloud.compute_url, headers={"X-Auth-Token": admin_token}) as admin:
        response = admin.get(f"/crashlab/servers/{server_id}/dump-target/key")
    assert response.status_code == 200, response.text
    key: str = response.json()["dump_target_key"]["private_key"]
    return key


def _refused_registrations(admin: httpx.Client, port: int, passwords: list[str]) -> None:
    """Bad driver_info is refused with a message that does not repeat the password."""
    too_long = "x" + passwords[0] * 2  # over IPMI's 20 bytes
    passwords.append(too_long)
    for info in (
        {"address": "127.0.0.1", "port": port, "username": "u", "password": too_long},
        {"address": "127.0.0.1", "port": "not-a-port", "username": "u", "password": passwords[0]},
        {"address": "127.0.0.1", "username": "u", "password": passwords[0], "pasword": too_long},
    ):
        body = {"name": "refused", "project_id": "alice", "user_id": "alice", "driver": "ipmi"}
        response = admin.post("/crashlab/servers", json={"server": body | {"driver_info": info}})
        assert response.status_code == 400, response.text


def _trigger_each(
    admin: httpx.Client, alice: httpx.Client, ids: dict[str, str]
) -> dict[str, tuple[str, str]]:
    """name -> (request id, result) once every event has finished."""
    accepted = {}
    for name, server_id in ids.items():
        response = trigger(alice, server_id)
        assert response.status_code == 202, f"{name}: {response.text}"
        accepted[name] = response.headers["x-openstack-request-id"]
    results = {}
    for name, request_id in accepted.items():
        # The NMI's event; an ssh server's follow-up events come after it.
        event = wait_for_action(admin, ids[name], request_id, timeout=20)["events"][0]
        assert event["event"] == "compute_trigger_crash_dump", event
        results[name] = (request_id, event["result"])
        if event["result"] == "Error":
            assert event["details"] and event["traceback"], f"{name}: {event}"
            print(f"{name}: {event['details']}")
    return results


def _read_everything(
    admin: httpx.Client,
    alice: httpx.Client,
    ids: dict[str, str],
    results: dict[str, tuple[str, str]],
) -> None:
    """Every read the API offers on these servers, as the owner and as an admin."""
    for client in (admin, alice):
        for path in ("/servers", "/servers/detail", "/servers/detail?all_tenants=1"):
            client.get(path)
        for name, server_id in ids.items():
            request_id = results[name][0]
            client.get(f"/servers/{server_id}")
            client.get(f"/servers/{server_id}/os-instance-actions")
            client.get(f"/servers/{server_id}/os-instance-actions/{request_id}")
            client.get(f"/crashlab/servers/{server_id}/os-instance-actions/{request_id}")
    assert admin.get("/crashlab/servers").status_code == 200
    for server_id in ids.values():
        assert admin.get(f"/crashlab/servers/{server_id}").status_code == 200


def _assert_none_in(secrets_: dict[str, str], text: str, where: str) -> None:
    found = [name for name, secret in secrets_.items() if secret in text]
    assert not found, f"{', '.join(found)} in {where}"


def _assert_stored_safely(
    state_file: Path,
    key: str,
    secrets_: dict[str, str],
    ids: dict[str, str],
    passwords: list[str],
) -> None:
    with sqlite3.connect(state_file) as db:
        events = db.execute("SELECT details, traceback FROM instance_actions_events").fetchall()
        stored = dict(
            db.execute("SELECT uuid, json_extract(driver_info, '$.password') FROM servers")
        )
    assert any(traceback for _, traceback in events)
    for details, traceback in events:
        _assert_none_in(secrets_, f"{details} {traceback}", "a stored event")
    fernet = Fernet(key)
    for name, server_id in ids.items():
        assert stored[server_id].startswith("gAAAAA"), f"{name}: not a Fernet token"
        assert fernet.decrypt(stored[server_id].encode()).decode() in passwords
    for path in state_file.parent.glob(state_file.name + "*"):  # the database, its WAL
        raw = path.read_bytes()
        found = [name for name, secret in secrets_.items() if secret.encode() in raw]
        assert not found, f"{', '.join(found)} in {path.name}"


def test_tokens_are_random_and_expire(crashlab_server: Callable[..., LiveServer]) -> None:
    config = fake_cloud_config()
    config["identity"]["token_ttl_seconds"] = 2
    cloud = crashlab_server(config)
    first, second = cloud.token("alice"), cloud.token("alice")
    assert first != second
    assert first.partition(".")[2] != second.partition(".")[2]
    issued = time.monotonic()
    for token in (first, second):
        headers = {"X-Auth-Token": token}
        assert httpx.get(cloud.compute_url + "/servers", headers=headers).status_code == 200
    time.sleep(max(0.0, issued + 2.2 - time.monotonic()))
    for token in (first, second):
        response = httpx.get(cloud.compute_url + "/servers", headers={"X-Auth-Token": token})
        assert response.status_code == 401
        assert token not in response.text


def _pem(kind: str, secret: str) -> str:
    return f"-----BEGIN {kind}-----\n{secret}\n-----END {kind}-----\n"


def _secret_registrations() -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, str]]:
    """name -> (driver, valid driver_info) covering every driver's secret fields; the secrets."""
    found = {f"{field} {i}": secrets.token_hex(8) for i, field in enumerate(["password"] * 2)}
    found |= {"ssh_private_key": secrets.token_hex(16), "tls_client_key": secrets.token_hex(16)}
    cert = _pem("CERTIFICATE", "Y2VydA==")
    servers = {
        "ipmi": (
            "ipmi",
            {"address": "127.0.0.1", "username": "u", "password": found["password 0"]},
        ),
        "redfish": (
            "redfish",
            {"address": "https://127.0.0.1", "username": "u", "password": found["password 1"]},
        ),
        "libvirt-ssh": (
            "libvirt",
            {
                "uri": "qemu+ssh://kvm1.example.com/system",
                "domain": "d",
                "ssh_private_key": _pem("OPENSSH PRIVATE KEY", found["ssh_private_key"]),
            },
        ),
        "libvirt-tls": (
            "libvirt",
            {
                "uri": "qemu+tls://kvm1.example.com/system",
                "domain": "d",
                "tls_ca_cert": cert,
                "tls_client_cert": cert,
                "tls_client_key": _pem("PRIVATE KEY", found["tls_client_key"]),
            },
        ),
    }
    return servers, found


def _refusals(driver: str, info: dict[str, Any], duplicate: str) -> Iterator[tuple[str, int, Any]]:
    """(case, status, body) for every way registering this server is refused."""
    server = {"name": "x", "project_id": "alice", "user_id": "alice", "driver": driver}
    server |= {"driver_info": info}
    [secret_field] = driver_class(driver).settings_model.secret_fields & info.keys()
    without_name = {k: v for k, v in server.items() if k != "name"}
    yield "missing name", 400, {"server": without_name}
    yield "extra key", 400, {"server": server | {"flavor": "m1.small"}}
    yield (
        "name not a string",
        400,
        {"server": server | {"name": {secret_field: info[secret_field]}}},
    )
    yield "server a list", 400, {"server": [server]}
    yield "body a list", 400, [{"server": server}]
    yield "bad driver", 400, {"server": server | {"driver": "nope"}}
    yield "unknown field", 400, {"server": server | {"driver_info": info | {"colour": "red"}}}
    misspelt = {k: v for k, v in info.items() if k != secret_field}
    misspelt |= {secret_field.upper(): info[secret_field]}
    yield "misspelt secret", 400, {"server": server | {"driver_info": misspelt}}
    wrong_type = info | {secret_field: [info[secret_field]]}
    yield "secret not a string", 400, {"server": server | {"driver_info": wrong_type}}
    too_long = info | {secret_field: info[secret_field] + "x" * 33000}
    yield "secret too long", 400, {"server": server | {"driver_info": too_long}}
    yield "bad uuid", 400, {"server": server | {"uuid": "not-a-uuid"}}
    yield "unknown project", 400, {"server": server | {"project_id": "nobody"}}
    yield "unknown user", 400, {"server": server | {"user_id": "nobody"}}
    yield "duplicate uuid", 409, {"server": server | {"uuid": duplicate}}
    nan = json.dumps({"server": server | {"driver_info": info | {"timeout": 1.5}}})
    yield "NaN", 400, nan.replace("1.5", "NaN").encode()


def test_no_refused_registration_repeats_a_secret(
    crashlab_server: Callable[..., LiveServer], recorder: Recorder
) -> None:
    cloud = crashlab_server(fake_cloud_config())
    servers, found = _secret_registrations()
    tokens = [recorder.token(cloud, "admin"), recorder.token(cloud, "alice")]
    cases = 0
    with recorder.client(cloud, tokens[0]) as admin, recorder.client(cloud, tokens[1]) as alice:
        for name, (driver, info) in servers.items():
            duplicate = _register(admin, {name: (driver, info)})[name]
            for case, status, body in _refusals(driver, info, duplicate):
                before = admin.get("/crashlab/servers").json()["servers"]
                if isinstance(body, bytes):
                    headers = {"Content-Type": "application/json"}
                    response = admin.post("/crashlab/servers", content=body, headers=headers)
                else:
                    response = admin.post("/crashlab/servers", json=body)
                assert response.status_code == status, f"{name}, {case}: {response.text}"
                assert admin.get("/crashlab/servers").json()["servers"] == before
                cases += 1
            body = {"server": {"name": "x", "project_id": "alice", "user_id": "alice"}}
            body["server"] |= {"driver": driver, "driver_info": info}
            assert alice.post("/crashlab/servers", json=body).status_code == 403
            anonymous = httpx.post(cloud.compute_url + "/crashlab/servers", json=body)
            assert anonymous.status_code == 401
            recorder.hook(anonymous)
            text = admin.get("/crashlab/servers").text
            assert "******" in text
    print(f"\n{cases} refused registrations searched for {len(found)} secrets")
    # A refusal still says which field was wrong, in Nova's words.
    messages = " ".join(r.text for r in recorder.responses if r.status_code == 400)
    assert "Invalid input for field/attribute server. Value: {" in messages
    assert "'******'" in messages
    for where, text in recorder.texts():
        _assert_none_in(found, text, where)
    _assert_none_in(found, cloud.log_path.read_text(), "the serve log")
