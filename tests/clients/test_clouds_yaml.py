"""The README's ``clouds.yaml`` for crashlab, read by OSC and openstacksdk."""

from __future__ import annotations

import os
from pathlib import Path

import openstack
import pytest

from tests.clients.harness import BIN, Cloud, run, table

# What the README shows, with crashlab serve's default port replaced.
README_CLOUDS_YAML = """\
clouds:
  crashlab:
    auth:
      auth_url: http://127.0.0.1:8774/identity/v3
      username: alice
      password: alice-secret
      project_name: alice
      user_domain_name: Default
      project_domain_name: Default
    region_name: RegionOne
"""

pytestmark = pytest.mark.filterwarnings("ignore::Warning:openstack.*")


@pytest.fixture(scope="module")
def clouds_yaml(cloud: Cloud, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("openstack") / "clouds.yaml"
    path.write_text(README_CLOUDS_YAML.replace("127.0.0.1:8774", f"127.0.0.1:{cloud.server.port}"))
    return path


def env(cloud: Cloud, clouds_yaml: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(cloud.home),
        "LC_ALL": "C.UTF-8",
        "OS_CLIENT_CONFIG_FILE": str(clouds_yaml),
        **extra,
    }


def test_openstack_with_os_cloud(cloud: Cloud, clouds_yaml: Path) -> None:
    settings = env(cloud, clouds_yaml, OS_CLOUD="crashlab")
    before = cloud.actions("alice-active")

    listed = run("openstack", "server", "list", env=settings)
    dumped = run("openstack", "server", "dump", "create", "alice-active", env=settings)
    events = run("openstack", "server", "event", "list", "alice-active", env=settings)

    assert listed.returncode == 0, listed.stderr
    assert sorted(row[1] for row in table(listed.stdout)[1]) == sorted(
        name for name in cloud.ids if name.startswith("alice-")
    )
    assert (dumped.returncode, dumped.stdout, dumped.stderr) == (0, "", "")
    [action] = cloud.new_actions("alice-active", before)
    assert table(events.stdout)[1][0][:3] == [
        action["request_id"],
        cloud.ids["alice-active"],
        "trigger_crash_dump",
    ]


def test_openstack_with_os_cloud_flag(cloud: Cloud, clouds_yaml: Path) -> None:
    shown = run(
        "openstack", "--os-cloud", "crashlab", "server", "show", "alice-paused",
        "-c", "status", "-f", "value",
        env=env(cloud, clouds_yaml),
    )  # fmt: skip

    assert (shown.returncode, shown.stdout) == (0, "PAUSED\n"), shown.stderr


def test_openstacksdk_with_the_cloud_name(
    cloud: Cloud, clouds_yaml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("OS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds_yaml))
    before = cloud.actions("alice-paused")

    conn = openstack.connect(cloud="crashlab")
    try:
        conn.compute.trigger_server_crash_dump(
            conn.compute.find_server("alice-paused", ignore_missing=False)
        )
    finally:
        conn.close()

    assert [a["action"] for a in cloud.new_actions("alice-paused", before)] == [
        "trigger_crash_dump"
    ]
