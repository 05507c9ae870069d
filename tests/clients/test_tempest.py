"""crashlab's responses against Tempest's own compute response schemas.

tempest.lib's ``ServersClient`` picks the schema module for the requested
microversion (v2_1, v2_3, v2_6, v2_8, v2_9, v2_16) and validates status, body
and the echoed ``X-OpenStack-Nova-API-Version`` on every call. Upstream
``tempest.api.compute.test_versions`` runs unmodified through ``tempest run``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import tempest
from tempest.lib import auth
from tempest.lib import exceptions as lib_exc
from tempest.lib.services.compute import base_compute_client
from tempest.lib.services.compute.servers_client import ServersClient
from tempest.lib.services.compute.versions_client import VersionsClient

from tests.clients.harness import BIN, Cloud, run
from tests.live import PROJECT_OF

VERSIONS = [f"2.{minor}" for minor in range(1, 18)]
USERS = ["admin", "alice", "carol"]
REGION = "RegionOne"


@pytest.fixture(scope="module")
def seeded(cloud: Cloud) -> Cloud:
    """Actions of every kind: a dump that succeeded, one that failed, a lock and an unlock."""
    cloud.trigger("alice-active")
    cloud.trigger("alice-nonmi")
    cloud.set_locked("alice-paused", True)
    cloud.set_locked("alice-paused", False)
    return cloud


@pytest.fixture(scope="module")
def providers(cloud: Cloud) -> dict[str, auth.KeystoneV3AuthProvider]:
    return {
        user: auth.KeystoneV3AuthProvider(
            auth.KeystoneV3Credentials(
                username=user,
                password=f"{user}-secret",
                project_name=PROJECT_OF[user],
                user_domain_name="Default",
                project_domain_name="Default",
            ),
            cloud.server.auth_url,
        )
        for user in USERS
    }


@pytest.fixture
def microversion(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo whatever microversion a test sets, as Tempest's APIMicroversionFixture does."""
    monkeypatch.setattr(base_compute_client, "COMPUTE_MICROVERSION", None)
    yield


def use_microversion(version: str | None) -> None:
    base_compute_client.COMPUTE_MICROVERSION = version


def servers_client(providers: dict[str, auth.KeystoneV3AuthProvider], user: str) -> ServersClient:
    return ServersClient(providers[user], "compute", REGION)


def test_crashlab_advertises_2_1_to_2_17(cloud: Cloud) -> None:
    document = cloud.admin.get("/").json()["version"]

    assert (document["min_version"], document["version"]) == (VERSIONS[0], VERSIONS[-1])


@pytest.mark.usefixtures("microversion")
@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("version", [None, *VERSIONS])
def test_servers_and_instance_actions(
    seeded: Cloud,
    providers: dict[str, auth.KeystoneV3AuthProvider],
    version: str | None,
    user: str,
) -> None:
    use_microversion(version)
    client = servers_client(providers, user)
    scope = {"all_tenants": "1"} if user == "admin" else {}

    listed = client.list_servers(**scope)["servers"]
    detailed = client.list_servers(detail=True, **scope)["servers"]

    assert sorted(s["id"] for s in listed) == sorted(s["id"] for s in detailed)
    assert len(listed) == (7 if user == "admin" else 6)
    for server in detailed:
        shown = client.show_server(server["id"])["server"]
        # The first live look at a server records its power state, which bumps "updated".
        assert {**shown, "updated": None} == {**server, "updated": None}
        actions = client.list_instance_actions(server["id"])["instanceActions"]
        for action in actions:
            shown = client.show_instance_action(server["id"], action["request_id"])
            assert ("events" in shown["instanceAction"]) == (user == "admin")


@pytest.mark.usefixtures("microversion")
@pytest.mark.parametrize("version", [None, *VERSIONS])
def test_lock_and_unlock(
    cloud: Cloud, providers: dict[str, auth.KeystoneV3AuthProvider], version: str | None
) -> None:
    use_microversion(version)
    client = servers_client(providers, "alice")

    # Tempest sends {"lock": {}} where the other clients send null.
    client.lock_server(cloud.ids["alice-paused"])
    client.unlock_server(cloud.ids["alice-paused"])


@pytest.mark.usefixtures("microversion")
def test_trigger_crash_dump_through_the_generic_action(
    cloud: Cloud, providers: dict[str, auth.KeystoneV3AuthProvider]
) -> None:
    client = servers_client(providers, "alice")
    body = {"trigger_crash_dump": None}

    use_microversion("2.16")
    with pytest.raises(lib_exc.NotFound):
        client.action(cloud.ids["alice-active"], "trigger_crash_dump", body=body)
    use_microversion("2.17")
    accepted = client.action(cloud.ids["alice-active"], "trigger_crash_dump", body=body)

    assert accepted.response.status == 202
    assert accepted.response["x-openstack-nova-api-version"] == "2.17"


@pytest.mark.usefixtures("microversion")
@pytest.mark.parametrize("user", USERS)
def test_versions(providers: dict[str, auth.KeystoneV3AuthProvider], user: str) -> None:
    client = VersionsClient(providers[user], "compute", REGION)

    versions = client.list_versions()["versions"]

    assert [v["id"] for v in versions] == ["v2.0", "v2.1"]
    for version in versions:
        [link] = [link for link in version["links"] if link["rel"] == "self"]
        document = client.get_version_by_url(link["href"])["version"]
        assert [link] == [link for link in document["links"] if link["rel"] == "self"]


TEMPEST_CONF = """\
[DEFAULT]
log_dir = {tmp}
log_file = tempest.log

[auth]
use_dynamic_credentials = false
test_accounts_file = {tmp}/accounts.yaml

[identity]
uri_v3 = {auth_url}
auth_version = v3
region = {region}

[identity-feature-enabled]
api_v2 = false

[service_available]
nova = true
neutron = false
glance = false
cinder = false
swift = false

[compute]
min_microversion = 2.1
max_microversion = 2.17

[validation]
run_validation = false

[oslo_concurrency]
lock_path = {tmp}/locks
"""

# Pre-provisioned credentials: BaseV2ComputeTest wants 'primary' and 'project_reader'.
ACCOUNTS = """\
- {{username: alice, password: alice-secret, project_name: alice, roles: [member],
   user_domain_name: Default, project_domain_name: Default}}
- {{username: carol, password: carol-secret, project_name: alice, roles: [reader],
   user_domain_name: Default, project_domain_name: Default}}
"""


def test_tempest_run_test_versions(cloud: Cloud, tmp_path: Path) -> None:
    package = Path(tempest.__file__).parent
    (tmp_path / "tempest.conf").write_text(
        TEMPEST_CONF.format(tmp=tmp_path, auth_url=cloud.server.auth_url, region=REGION)
    )
    (tmp_path / "accounts.yaml").write_text(ACCOUNTS.format())
    (tmp_path / ".stestr.conf").write_text(
        f"[DEFAULT]\ntest_path={package / 'test_discover'}\ntop_dir={package.parent}\n"
    )
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(tmp_path)}

    done = run(
        "tempest", "run", "--config-file", str(tmp_path / "tempest.conf"),
        "--regex", r"^tempest\.api\.compute\.test_versions\.", "--concurrency", "1",
        env=env, cwd=tmp_path,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " - Passed: 2\n" in done.stdout
    assert " - Skipped: 0\n" in done.stdout
    assert " - Failed: 0\n" in done.stdout
