"""The crashlab CLI against a live service, with credentials from OS_* variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.live import REPO, LiveServer


def _crashlab(server: LiveServer, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OS_AUTH_URL": server.auth_url,
        "OS_USERNAME": user,
        "OS_PASSWORD": f"{user}-secret",
        "OS_PROJECT_NAME": "alice" if user in ("alice", "carol") else user,
    }
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_server_list_shows_the_projects_servers(fake_cloud: LiveServer) -> None:
    result = _crashlab(fake_cloud, "alice", "server", "list")
    assert result.returncode == 0, result.stderr
    for name in ("alice-active", "alice-stopped", "alice-locked"):
        assert name in result.stdout
    assert "bob-active" not in result.stdout


def test_trigger_crash_wait_prints_the_event_result(fake_cloud: LiveServer) -> None:
    ok = _crashlab(fake_cloud, "alice", "trigger-crash", "alice-active", "--wait", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["event"]["result"] == "Success"
    assert report["request_id"].startswith("req-")

    failed = _crashlab(fake_cloud, "alice", "trigger-crash", "alice-nonmi", "--wait")
    assert failed.returncode == 1
    assert failed.stdout.strip() == (
        "compute_trigger_crash_dump: Error (Triggering crash dump is not supported)"
    )

    listed = _crashlab(fake_cloud, "alice", "action", "list", "alice-active")
    assert report["request_id"] in listed.stdout and "trigger_crash_dump" in listed.stdout
    shown = _crashlab(fake_cloud, "alice", "action", "show", "alice-active", report["request_id"])
    assert json.loads(shown.stdout)["events"][0]["result"] == "Success"


def test_refusals_print_novas_message(fake_cloud: LiveServer) -> None:
    result = _crashlab(fake_cloud, "alice", "trigger-crash", "alice-stopped")
    assert result.returncode == 1
    assert "while it is in vm_state stopped (HTTP 409) (Request-ID: req-" in result.stderr
    missing = _crashlab(fake_cloud, "alice", "trigger-crash", "bob-active")
    assert "No server with a name or ID of 'bob-active' exists." in missing.stderr


def test_missing_credentials_are_named(fake_cloud: LiveServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "server", "list"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "OS_AUTH_URL" in result.stderr and "OS_PASSWORD" in result.stderr
