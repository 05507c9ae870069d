"""A bad config fails at start-up with the offending key named."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.config import ConfigError, load_config
from tests.live import FAKE_CLOUD, REPO, fake_cloud_config


def _identity(**changes: object) -> dict[str, object]:
    """The fake cloud's identity section with keys replaced, or its first user's."""
    identity: dict[str, object] = fake_cloud_config()["identity"]
    users = identity["users"]
    assert isinstance(users, list)
    users[0].update(changes.pop("first_user", {}))
    return {**identity, **changes}


def _write(tmp_path: Path, config: object) -> Path:
    path = tmp_path / "crashlab.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_fake_cloud_loads() -> None:
    config = load_config(FAKE_CLOUD)
    assert {s.name for s in config.servers} >= {"alice-active", "alice-nonmi", "bob-active"}
    assert all(u.password_hash.startswith("$2b$") for u in config.identity.users)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"nmi_guard": {"cooldown_seconds": -1}}, "nmi_guard.cooldown_seconds"),
        ({"max_body_bytes": "big"}, "max_body_bytes"),
        ({"unknown_key": 1}, "unknown_key"),
        ({"public_endpoint": "ftp://crashlab.example"}, "public_endpoint"),
        ({"public_endpoint": "http://crashlab.example:port"}, "public_endpoint"),
        ({"public_endpoint": "http://crashlab.example/?x=1"}, "public_endpoint"),
        (
            {"identity": _identity(security_compliance={"lockout_failure_attempts": 0})},
            "identity.security_compliance.lockout_failure_attempts",
        ),
        (
            {"identity": _identity(security_compliance={"lockout_duration": "1h"})},
            "identity.security_compliance.lockout_duration",
        ),
        (
            {"identity": _identity(first_user={"password_hash": "admin-secret"})},
            "identity.users.0.password_hash",
        ),
        (
            {
                "servers": [
                    {"name": "x", "project_id": "nobody", "user_id": "alice", "driver": "fake"}
                ]
            },
            "servers[0] (x).project_id",
        ),
        (
            {
                "servers": [
                    {"name": "x", "project_id": "alice", "user_id": "alice", "driver": "vmware"}
                ]
            },
            "servers[0] (x).driver: unknown driver 'vmware'",
        ),
        (
            {
                "servers": [
                    {
                        "name": "x",
                        "project_id": "alice",
                        "user_id": "alice",
                        "driver": "libvirt",
                        "driver_info": {"uri": "qemu:///system"},
                    }
                ]
            },
            "servers[0] (x).driver_info: domain",
        ),
        (
            {
                "servers": [
                    {
                        "name": "x",
                        "project_id": "alice",
                        "user_id": "alice",
                        "driver": "fake",
                        "dump_target": {"type": "ssh"},
                    }
                ]
            },
            "servers[0] (x).dump_target: an ssh target needs collector.enabled",
        ),
    ],
)
def test_invalid_config_names_the_key(
    tmp_path: Path, change: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(_write(tmp_path, fake_cloud_config(**change)))


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    path = _write(tmp_path, fake_cloud_config(nmi_guard={"enabled": "sometimes"}))
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--config", str(path), "--port", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "config error" in result.stderr and "nmi_guard.enabled" in result.stderr
