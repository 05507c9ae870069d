"""Crash readiness and the guarded trigger in-process, on fake servers with a fake guest agent.

The fake driver's ``guest_files`` are what its agent reads; a fake server
without them has no agent. The real guest agent, and captures, against real
libvirt/QEMU guests are in tests/app/test_readiness_capture.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from app import policy as rules
from app.readiness import GUEST_FILES
from drivers.fake import FakeDriver
from tests.app.cloud import AppCloud, assert_fault, fake_cloud_config

pytestmark = pytest.mark.fast

ARMED_FILES = {
    GUEST_FILES["unknown_nmi_panic"]: "1\n",
    GUEST_FILES["panic_on_io_nmi"]: "0\n",
    GUEST_FILES["kexec_crash_loaded"]: "1\n",
    GUEST_FILES["crash_kernel_reserved_bytes"]: "268435456\n",
    GUEST_FILES["crash_kernel_cmdline"]: "console=ttyS0 irqpoll nr_cpus=1 reset_devices\n",
    GUEST_FILES["kernel_release"]: "6.1.0-99-amd64\n",
}
NO_CRASH_KERNEL = {**ARMED_FILES, GUEST_FILES["kexec_crash_loaded"]: "0\n"}
NMI_IGNORED = {**ARMED_FILES, GUEST_FILES["unknown_nmi_panic"]: "0\n"}


def with_agents(**files: dict[str, str]) -> dict[str, Any]:
    """The fake cloud's servers, those named given a fake guest agent reading ``files``."""
    servers = [s.model_dump(exclude_none=True) for s in fake_cloud_config().servers]
    for server in servers:
        if server["name"] in files:
            server["driver_info"] = {**server["driver_info"], "guest_files": files[server["name"]]}
    return {"servers": servers}


AGENTS = {
    "alice-active": ARMED_FILES,
    "alice-paused": NO_CRASH_KERNEL,
    "alice-error": NMI_IGNORED,
}


@pytest.fixture
def cloud(start_cloud: Any) -> AppCloud:
    app_cloud: AppCloud = start_cloud(**with_agents(**AGENTS))
    return app_cloud


def readiness(cloud: AppCloud, user: str, name: str, refresh: bool = True) -> Any:
    path = f"/crashlab/servers/{cloud.ids[name]}/crash-readiness"
    return cloud.get(user, path, params={"refresh": "true"} if refresh else {})


def guarded(cloud: AppCloud, user: str, name: str, **options: bool) -> Any:
    path = f"/v2.1/crashlab/servers/{cloud.ids[name]}/action"
    body = {"trigger_crash_dump": {"require_armed": True, **options}}
    return cloud.client.post(path, json=body, headers=cloud.headers(user))


def nmis(cloud: AppCloud, name: str) -> int:
    machine = FakeDriver.machines.get(cloud.ids[name])
    return 0 if machine is None else machine.nmi_count


def test_an_armed_guest_reads_armed_with_each_fact_and_its_source(cloud: AppCloud) -> None:
    response = readiness(cloud, "alice", "alice-active")
    assert response.status_code == 200, response.text
    shown = response.json()["crash_readiness"]
    assert (shown["verdict"], shown["reasons"]) == ("armed", [])
    facts = shown["facts"]
    assert facts["unknown_nmi_panic"] == {
        "value": 1,
        "source": "guest agent: /proc/sys/kernel/unknown_nmi_panic",
    }
    assert facts["kexec_crash_loaded"]["value"] == 1
    assert facts["crash_kernel_reserved_bytes"]["value"] == 268435456
    assert facts["crash_kernel_cmdline"]["value"].startswith("console=ttyS0 irqpoll")
    assert facts["kernel_release"]["value"] == "6.1.0-99-amd64"
    assert facts["dump_target_reachable"]["value"] is None  # the server has no dump target
    assert facts["capture_verifiable"]["value"] is False  # a fake server has no domain XML
    # The check was stored: a plain read shows it without reaching the backend.
    assert readiness(cloud, "alice", "alice-active", refresh=False).json() == response.json()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("alice-paused", "kexec_crash_loaded=0: no crash kernel is loaded"),
        ("alice-error", "unknown_nmi_panic=0: the kernel logs the NMI and carries on"),
    ],
)
def test_a_guest_missing_a_piece_is_not_armed_and_says_which(
    cloud: AppCloud, name: str, reason: str
) -> None:
    shown = readiness(cloud, "alice", name).json()["crash_readiness"]
    assert shown["verdict"] == "not-armed"
    assert len(shown["reasons"]) == 1 and shown["reasons"][0].startswith(reason)


def test_a_server_without_an_agent_is_unknown(cloud: AppCloud) -> None:
    shown = readiness(cloud, "alice", "alice-locked").json()["crash_readiness"]
    assert shown["verdict"] == "unknown"
    assert shown["reasons"] == ["no guest agent: the fake server has none"]


def test_a_driver_that_cannot_see_inside_is_honestly_unknown(cloud: AppCloud) -> None:
    shown = readiness(cloud, "alice", "alice-nonmi").json()["crash_readiness"]
    assert shown["verdict"] == "unknown"
    assert "cannot see inside the server" in shown["reasons"][0]


def test_readiness_is_the_project_s_to_read(cloud: AppCloud) -> None:
    assert readiness(cloud, "carol", "alice-active").status_code == 200  # a reader
    assert readiness(cloud, "admin", "alice-active").status_code == 200
    server_id = cloud.ids["alice-active"]
    assert_fault(
        readiness(cloud, "bob", "alice-active"),
        404,
        "itemNotFound",
        f"Instance {server_id} could not be found.",
    )


def test_the_guarded_trigger_refuses_a_guest_that_is_not_armed(cloud: AppCloud) -> None:
    server_id = cloud.ids["alice-error"]
    before = cloud.get("alice", f"/servers/{server_id}/os-instance-actions").json()
    assert_fault(
        guarded(cloud, "alice", "alice-error"),
        409,
        "conflictingRequest",
        f"Instance {server_id} is not armed for a crash dump: unknown_nmi_panic=0: the kernel "
        "logs the NMI and carries on (panic_on_io_nmi covers only I/O check NMIs). "
        "Nothing was sent.",
    )
    # Nothing recorded, nothing sent.
    assert cloud.get("alice", f"/servers/{server_id}/os-instance-actions").json() == before
    assert nmis(cloud, "alice-error") == 0


def test_the_guarded_trigger_sends_to_an_armed_guest(cloud: AppCloud) -> None:
    response = guarded(cloud, "alice", "alice-active")
    assert response.status_code == 202, response.text
    request_id = response.headers["x-openstack-request-id"]
    event = cloud.event("alice", "alice-active", request_id)
    assert (event["event"], event["result"]) == ("compute_trigger_crash_dump", "Success")
    assert nmis(cloud, "alice-active") == 1


def test_unknown_is_refused_unless_allowed(cloud: AppCloud) -> None:
    server_id = cloud.ids["alice-locked"]
    refused = guarded(cloud, "admin", "alice-locked")
    assert_fault(
        refused,
        409,
        "conflictingRequest",
        f"The crash readiness of instance {server_id} is unknown: no guest agent: the fake "
        "server has none. Nothing was sent; allow_unknown sends anyway.",
    )
    assert nmis(cloud, "alice-locked") == 0
    assert guarded(cloud, "admin", "alice-locked", allow_unknown=True).status_code == 202
    assert nmis(cloud, "alice-locked") == 1


def test_nova_s_own_action_takes_no_crashlab_option(cloud: AppCloud) -> None:
    response = cloud.action("alice", "alice-error", {"trigger_crash_dump": {"require_armed": True}})
    assert response.status_code == 400, response.text
    assert nmis(cloud, "alice-error") == 0


def test_require_armed_has_a_rule_of_its_own(tmp_path: Path, start_cloud: Any) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(f'"{rules.REQUIRE_ARMED}": "rule:context_is_admin"\n')
    cloud = start_cloud(**with_agents(**AGENTS), policy_file=str(policy_file))
    assert_fault(
        guarded(cloud, "alice", "alice-active"),
        403,
        "forbidden",
        f"Policy doesn't allow {rules.REQUIRE_ARMED} to be performed.",
    )
    assert guarded(cloud, "admin", "alice-active").status_code == 202


def capture(cloud: AppCloud, user: str, name: str) -> Any:
    path = f"/v2.1/crashlab/servers/{cloud.ids[name]}/action"
    return cloud.client.post(
        path, json={"capture_memory_dump": {"then": "resume"}}, headers=cloud.headers(user)
    )


def test_capture_is_admin_only_and_needs_the_memory_dump_capability(cloud: AppCloud) -> None:
    assert_fault(
        capture(cloud, "alice", "alice-active"),
        403,
        "forbidden",
        f"Policy doesn't allow {rules.CAPTURE_MEMORY_DUMP} to be performed.",
    )
    assert_fault(
        capture(cloud, "admin", "alice-active"),
        409,
        "conflictingRequest",
        "Capturing a memory dump is not supported by the fake driver.",
    )


def test_capture_options_are_checked(cloud: AppCloud) -> None:
    path = f"/v2.1/crashlab/servers/{cloud.ids['alice-active']}/action"
    body = {"capture_memory_dump": {"then": "reboot"}}
    response = cloud.client.post(path, json=body, headers=cloud.headers("admin"))
    assert response.status_code == 400, response.text
    assert "reboot" in response.json()["badRequest"]["message"]


def test_the_background_pass_checks_every_server(cloud: AppCloud) -> None:
    # The first pass runs within a tick of the start; a plain read never reaches a backend.
    deadline = time.monotonic() + 10
    while True:
        shown = readiness(cloud, "alice", "alice-paused", refresh=False).json()["crash_readiness"]
        if shown["checked_at"]:
            break
        assert shown["reasons"] == ["not checked yet"]
        assert time.monotonic() < deadline, shown
        time.sleep(0.1)
    assert shown["verdict"] == "not-armed"
