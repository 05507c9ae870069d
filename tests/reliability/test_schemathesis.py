"""Generated requests against a live ``crashlab serve``: schemathesis, as every role.

schemathesis reads /openapi.json and sends valid and invalid requests to every
operation, as admin, as the owner (alice, member), as a reader of the same
project (carol), as a member of another project (bob), and as alice without a
microversion header (2.1). Every check runs: no 5xx, status codes, content
types, headers and bodies as documented, invalid data rejected, valid data
accepted, auth not ignored, Allow headers right.

Path parameters are half the time real ids (config servers, recorded request
ids, live tokens), so requests get past "404 not found" into the handlers.
Server registration runs last, only as admin and alice: admin's junk
registrations would otherwise sit in every later server list. The served
document names no account, so the test, which knows the config's projects
and users, narrows the registration body to them before schemathesis reads it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.config import load_config
from tests.live import LiveServer
from tests.reliability.cloud import TRIGGER, cloud_config, config_server_id

INVENTORY = [
    "register_server_v2_1_crashlab_servers_post",
    "unregister_server_v2_1_crashlab_servers__server_id__delete",
]
EXAMPLES_PER_OPERATION = 30
MIN_REQUESTS = 2000
SEED = "20261125"


@dataclass(frozen=True)
class Run:
    user: str
    version: str | None  # None: no microversion header, so 2.1
    inventory: bool = False  # only the registration operations

    @property
    def label(self) -> str:
        what = "inventory" if self.inventory else f"compute-{self.version or 'default'}"
        return f"{self.user}-{what}"


RUNS = [
    Run("admin", "2.17"),
    Run("alice", "2.17"),
    Run("carol", "2.17"),
    Run("bob", "2.17"),
    Run("alice", None),
    Run("admin", "2.17", inventory=True),
    Run("alice", "2.17", inventory=True),
]


def _schemathesis() -> str:
    return str(Path(sys.executable).with_name("schemathesis"))


def _seed_request_ids(cloud: LiveServer) -> list[str]:
    """Actions to show: a trigger, a lock and an unlock on alice-active, a trigger on bob's."""
    ids = []
    with cloud.client("alice") as alice, cloud.client("bob") as bob:
        server = config_server_id("alice-active")
        for body in (TRIGGER, {"lock": None}, {"unlock": None}):
            response = alice.post(f"/servers/{server}/action", json=body)
            assert response.status_code == 202, response.text
            ids.append(response.headers["x-openstack-request-id"])
        response = bob.post(f"/servers/{config_server_id('bob-active')}/action", json=TRIGGER)
        ids.append(response.headers["x-openstack-request-id"])
    return ids


def _write_config(path: Path, request_ids: list[str], tokens: list[str]) -> None:
    def values(items: list[str]) -> str:
        return json.dumps(items)

    servers = [config_server_id(server["name"]) for server in cloud_config()["servers"]]
    path.write_text(
        f"""
[dictionaries.servers]
values = {values(servers)}
[dictionaries.requests]
values = {values(request_ids)}
[dictionaries.tokens]
values = {values(tokens)}

[parameters]
"path.server_id" = {{ dictionary = "servers", probability = 0.5 }}
"path.request_id" = {{ dictionary = "requests", probability = 0.5 }}
"header.X-Subject-Token" = {{ dictionary = "tokens", probability = 0.5 }}
"""
    )


def _narrowed_document(cloud: LiveServer, path: Path) -> Path:
    """/openapi.json with registrations' project_id and user_id limited to the config's."""
    document = httpx.get(f"{cloud.url}/openapi.json").json()
    identity = load_config(cloud.config_path).identity
    body = document["paths"]["/v2.1/crashlab/servers"]["post"]["requestBody"]
    server = body["content"]["application/json"]["schema"]["properties"]["server"]
    for field, keys in (
        ("project_id", [key for p in identity.projects for key in (p.name, p.project_id)]),
        ("user_id", [key for u in identity.users for key in (u.name, u.user_id)]),
    ):
        server["properties"][field] = {"type": "string", "enum": sorted(keys)}
    path.write_text(json.dumps(document))
    return path


def _run(
    cloud: LiveServer, run: Run, config: Path, document: Path, reports: Path
) -> tuple[Counter[int], str]:
    har = reports / f"{run.label}.har"
    argv = [
        _schemathesis(),
        "--config-file",
        str(config),
        "run",
        str(document),
        "--url",
        cloud.url,
        "--header",
        f"X-Auth-Token: {cloud.token(run.user)}",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(EXAMPLES_PER_OPERATION),
        "--seed",
        SEED,
        # Parallel workers trip a CPython 3.11 ast.parse race inside hypothesis.
        "--workers",
        "1",
        "--report",
        "har",
        "--report-har-path",
        str(har),
        "--no-color",
    ]
    if run.version is not None:
        argv += ["--header", f"OpenStack-API-Version: compute {run.version}"]
    flag = "--include-operation-id" if run.inventory else "--exclude-operation-id"
    for operation_id in INVENTORY:
        argv += [flag, operation_id]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=reports)
    output = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, f"schemathesis as {run.label} failed:\n{output}"
    entries = json.loads(har.read_text())["log"]["entries"]
    return Counter(entry["response"]["status"] for entry in entries), output


def test_generated_requests_as_every_role(
    module_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    cloud = module_server(cloud_config())
    # Tokens of carol's to validate and revoke (never the runs' own tokens).
    tokens = [cloud.token("carol") for _ in range(5)]
    config = tmp_path / "schemathesis.toml"
    _write_config(config, _seed_request_ids(cloud), tokens)
    document = _narrowed_document(cloud, tmp_path / "openapi.json")

    totals: Counter[int] = Counter()
    summary = []
    for run in RUNS:
        statuses, _ = _run(cloud, run, config, document, tmp_path)
        totals += statuses
        summary.append(f"{run.label}: {sum(statuses.values())} requests {dict(statuses)}")
    report = "\n".join(summary)
    print(f"\nschemathesis: {sum(totals.values())} requests\n{report}")

    assert not [s for s in totals if s >= 500], report
    assert sum(totals.values()) >= MIN_REQUESTS, report
    # The runs reached the handlers, not only the 404 and 401 paths.
    for status in (200, 201, 202, 204, 400, 401, 403, 404, 409):
        assert totals[status], f"no {status} in {report}"
    assert "unexpected error" not in cloud.log_path.read_text()
