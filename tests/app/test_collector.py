"""The dump collector through ``crashlab serve``: its real sshd, keys from the API,
and the uploads that kdump-tools' SSH mode makes, sent by OpenSSH's real client.

The servers here are fake-driver servers with an ``ssh`` target: the NMI is the
fake driver's, and the test plays the crash kernel, running kdump-tools' own
commands (app/collector_gate.py lists them) with the key the API hands out.
A real guest's upload is in tests/app/test_ssh_target.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import wait_for_dump
from app.follower import UNATTRIBUTED
from app.process import free_port
from tests.live import LiveServer
from tests.reliability.cloud import (
    cloud_config,
    config_server_id,
    fake_server,
    trigger,
)

pytestmark = pytest.mark.slow

STAMP = "202612031030"
STAMP_DIR = f"/var/crash/10.0.2.15-{STAMP}"


def _config(port: int, nmi_log: Path) -> dict[str, Any]:
    servers = [
        fake_server(name, nmi_log=str(nmi_log)) | {"dump_target": {"type": "ssh"}}
        for name in ("upload-a", "upload-b")
    ]
    for server in servers:
        server["dump_timeouts"] = {"collect": 30}
    return cloud_config(
        extra_servers=servers,
        collector={"enabled": True, "port": port},
        crash_dumps={"stall_seconds": 2},
        nmi_guard={"enabled": False},
    )


class CrashKernel:
    """Runs kdump-tools' SSH-mode commands as a server's crash kernel would."""

    def __init__(self, key: dict[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.identity = workdir / "kdump_id"
        self.identity.write_text(key["private_key"])
        self.identity.chmod(0o600)
        known_hosts = workdir / "known_hosts"
        known_hosts.write_text(f"[{key['host']}]:{key['port']} {key['host_key']}\n")
        self.target = f"{key['user']}@{key['host']}"
        self.options = [
            *("-i", str(self.identity), "-p", str(key["port"])),
            *("-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known_hosts}"),
            *("-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes"),
        ]

    def ssh(self, *command: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ssh", *self.options, self.target, *command],
            input=stdin,
            capture_output=True,
            timeout=30,
        )

    def upload(self, stream: bytes) -> None:
        """mkdir, the dump through dd, then mv: kdump-tools' sequence."""
        assert self.ssh("mkdir", "-p", STAMP_DIR).returncode == 0
        sent = self.ssh("dd", f"of={STAMP_DIR}/dump-incomplete", stdin=stream)
        assert sent.returncode == 0, sent.stderr
        moved = self.ssh("mv", f"{STAMP_DIR}/dump-incomplete", f"{STAMP_DIR}/dump.{STAMP}")
        assert moved.returncode == 0, moved.stderr


def _key(admin: httpx.Client, server_id: str) -> dict[str, Any]:
    response = admin.get(f"/crashlab/servers/{server_id}/dump-target/key")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    key: dict[str, Any] = response.json()["dump_target_key"]
    return key


def _dumps(client: httpx.Client, server_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/crashlab/servers/{server_id}/crash-dumps")
    assert response.status_code == 200, response.text
    dumps: list[dict[str, Any]] = response.json()["crash_dumps"]
    return dumps


def _wait(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


@pytest.fixture
def collecting(
    crashlab_server: Callable[..., LiveServer], tmp_path: Path
) -> tuple[LiveServer, Path]:
    port = free_port()
    return crashlab_server(_config(port, tmp_path / "nmi.log")), tmp_path


def test_the_key_is_for_admins_and_in_no_other_response(
    collecting: tuple[LiveServer, Path],
) -> None:
    cloud, _ = collecting
    server_id = config_server_id("upload-a")
    with cloud.client("admin") as admin, cloud.client("alice") as alice:
        key = _key(admin, server_id)
        assert key["private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        assert key["public_key"].startswith("ssh-ed25519 ")
        denied = alice.get(f"/crashlab/servers/{server_id}/dump-target/key")
        assert denied.status_code == 403, denied.text
        other = admin.get(f"/crashlab/servers/{config_server_id('alice-active')}/dump-target/key")
        assert other.status_code == 404, other.text
        readiness = admin.get(
            f"/crashlab/servers/{server_id}/crash-readiness", params={"refresh": "true"}
        ).json()["crash_readiness"]
        assert readiness["facts"]["dump_target_reachable"]["value"] is True, readiness
        body = key["private_key"].splitlines()[1]
        for path in ("/crashlab/servers", f"/crashlab/servers/{server_id}", "/servers/detail"):
            assert body not in admin.get(path, params={"all_tenants": "1"}).text
    assert body not in cloud.log_tail(10_000)


def test_an_upload_that_stops_is_an_incomplete_dump(collecting: tuple[LiveServer, Path]) -> None:
    cloud, tmp_path = collecting
    server_id = config_server_id("upload-a")
    with cloud.client("admin") as admin, cloud.client("alice") as alice:
        kernel = CrashKernel(_key(admin, server_id), tmp_path / "kernel")
        response = trigger(alice, server_id)
        assert response.status_code == 202
        request_id = response.headers["x-openstack-request-id"]
        assert kernel.ssh("mkdir", "-p", STAMP_DIR).returncode == 0
        partial = kernel.ssh("dd", f"of={STAMP_DIR}/dump-incomplete", stdin=os.urandom(65536))
        assert partial.returncode == 0, partial.stderr

        def failed() -> dict[str, Any] | None:
            for dump in _dumps(alice, server_id):
                if dump["request_id"] == request_id and dump["state"] == "failed":
                    return dump
            return None

        dump = _wait(failed, "the dump to fail")
    assert dump["error"].startswith("incomplete dump: the upload "), dump
    assert "65536 bytes" in dump["error"], dump


def test_back_to_back_dumps_in_one_minute_each_reach_their_own_nmi(
    collecting: tuple[LiveServer, Path],
) -> None:
    cloud, tmp_path = collecting
    server_id = config_server_id("upload-a")
    arrived = []
    with cloud.client("admin") as admin, cloud.client("alice") as alice:
        kernel = CrashKernel(_key(admin, server_id), tmp_path / "kernel")
        for round_ in range(2):
            response = trigger(alice, server_id)
            assert response.status_code == 202
            request_id = response.headers["x-openstack-request-id"]
            # The same stamp both times, as two dumps within one minute have.
            kernel.upload(f"dump {round_} ".encode() * 1000)
            wait_for_dump(alice.get, server_id, request_id, timeout=30)
            path = f"/crashlab/servers/{server_id}/os-instance-actions/{request_id}"
            action = admin.get(path).json()["instanceAction"]
            events = {event["event"]: event for event in action["events"]}
            assert events["crashlab_collect_dump"]["result"] == "Success", events
            arrived.append(events["crashlab_collect_dump"]["details"])
        dumps = _dumps(admin, server_id)
    assert len(dumps) == 2 and len({dump["request_id"] for dump in dumps}) == 2, dumps
    assert all(f"arrived: {STAMP_DIR}/dump.{STAMP}" in details for details in arrived), arrived


def test_a_dump_with_no_nmi_pending_is_kept_for_admins(
    collecting: tuple[LiveServer, Path],
) -> None:
    cloud, tmp_path = collecting
    server_id = config_server_id("upload-b")
    with cloud.client("admin") as admin, cloud.client("alice") as alice:
        kernel = CrashKernel(_key(admin, server_id), tmp_path / "kernel")
        # Two in the same minute: the second lands beside the first as dump.<stamp>.1.
        kernel.upload(b"not a vmcore" * 1000)
        kernel.upload(b"nor this one" * 1000)
        dumps = _wait(
            lambda: len(_dumps(admin, server_id)) == 2 and _dumps(admin, server_id), "both"
        )
        for dump in dumps:
            assert dump["request_id"] is None, dump
            assert dump["target"] == "ssh"
            assert dump["error"].startswith(UNATTRIBUTED), dump
            assert f"{STAMP_DIR}/dump.{STAMP}" in dump["error"], dump
        assert _dumps(alice, server_id) == []
        shown = alice.get(f"/crashlab/servers/{server_id}/crash-dumps/{dumps[0]['id']}")
        assert shown.status_code == 404, shown.text


def test_a_killed_sshd_is_started_again_and_the_next_dump_arrives(
    collecting: tuple[LiveServer, Path],
) -> None:
    cloud, tmp_path = collecting
    server_id = config_server_id("upload-b")
    pid_file = cloud.state_file.parent / "collector" / "sshd" / "sshd.pid"
    first = int(pid_file.read_text())
    os.kill(first, signal.SIGKILL)
    _wait(lambda: pid_file.exists() and int(pid_file.read_text()) != first, "a new sshd")
    with cloud.client("admin") as admin:
        CrashKernel(_key(admin, server_id), tmp_path / "kernel").upload(b"x" * 4096)
        [dump] = _wait(lambda: _dumps(admin, server_id), "the dump after the restart")
    assert dump["request_id"] is None, dump


def test_the_collector_goes_when_crashlab_is_killed(collecting: tuple[LiveServer, Path]) -> None:
    """SIGKILL runs no clean-up: sshd's keeper sees its lifeline break and stops it."""
    cloud, _ = collecting
    pid = int((cloud.state_file.parent / "collector" / "sshd" / "sshd.pid").read_text())
    cloud.kill()
    _wait(lambda: not _alive(pid), "sshd to exit", timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
