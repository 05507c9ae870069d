"""The BMC emulators and the test peers leave nothing behind: no process, no domain, no ~/.vbmc."""

from __future__ import annotations

import configparser
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import libvirt
import pytest

from emulators.sushy import SushyEmulator
from emulators.vbmc import VirtualBMCs
from tests.domains import domain_exists
from tests.fixtures import LIBVIRT_URI, BlankDomains, IPMIPeers

pytestmark = [pytest.mark.bmc, pytest.mark.libvirt]


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _wait_dead(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def test_virtualbmc_config_lives_in_the_workdir(
    tmp_path: Path, blank_domain: Callable[..., str]
) -> None:
    name = blank_domain()
    with VirtualBMCs(tmp_path) as bmcs:
        endpoint = bmcs.add(name)
        config = configparser.ConfigParser()
        config.read(bmcs.config_file)
        assert Path(config["default"]["config_dir"]).is_relative_to(tmp_path)
        assert Path(config["default"]["pid_file"]).is_relative_to(tmp_path)
        assert int(config["default"]["server_port"]) != 50891  # vbmcd's default ZMQ port
        domain_config = bmcs.config_dir / name / "config"
        assert stat.S_IMODE(domain_config.stat().st_mode) == 0o600  # it holds the password
        saved = configparser.ConfigParser()
        saved.read(domain_config)
        assert saved["VirtualBMC"]["port"] == str(endpoint.port)
        assert endpoint.address == "127.0.0.1" and endpoint.password not in repr(endpoint)
    assert not (Path.home() / ".vbmc" / name).exists()


def test_virtualbmc_processes_end_with_the_context_even_on_error(
    tmp_path: Path, blank_domain: Callable[..., str]
) -> None:
    names = [blank_domain(), blank_domain()]
    with pytest.raises(RuntimeError, match="boom"), VirtualBMCs(tmp_path) as bmcs:
        for name in names:
            bmcs.add(name)
        pids = bmcs.pids()
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        raise RuntimeError("boom")
    assert _wait_dead(pids, timeout=0) == []


def test_stopping_one_bmc_leaves_the_others(
    tmp_path: Path, blank_domain: Callable[..., str]
) -> None:
    first, second = blank_domain(), blank_domain()
    with VirtualBMCs(tmp_path) as bmcs:
        bmcs.add(first)
        bmcs.add(second)
        bmcs.stop(first)
        assert not bmcs.is_running(first) and bmcs.is_running(second)
        bmcs.start(first)
        assert bmcs.is_running(first)


def test_sushy_emulator_ends_with_the_context_even_on_error(
    tmp_path: Path, blank_domain: Callable[..., str]
) -> None:
    name = blank_domain()
    pids: list[int] = []
    with (
        pytest.raises(RuntimeError, match="boom"),
        SushyEmulator(tmp_path, libvirt_uri=LIBVIRT_URI, domains=[name]) as emulator,
    ):
        assert emulator.pid is not None and _alive(emulator.pid)
        pids.append(emulator.pid)
        assert httpx.get(f"{emulator.url}/redfish/v1/Systems").status_code == 401
        raise RuntimeError("boom")
    assert _wait_dead(pids, timeout=0) == []


def test_ipmi_peers_end_with_the_context(tmp_path: Path) -> None:
    with IPMIPeers(tmp_path / "peers", ["on", "off"]) as peers:
        pids = peers.pids()
        assert len(pids) == 2 and all(_alive(pid) for pid in pids) and len(peers.ports) == 2
    assert _wait_dead(pids, timeout=0) == []


def test_blank_domains_are_removed_even_on_error(libvirt_conn: libvirt.virConnect) -> None:
    with pytest.raises(RuntimeError, match="boom"), BlankDomains(libvirt_conn) as domains:
        names = [domains.make(), domains.make(running=False)]
        assert all(domain_exists(libvirt_conn, name) for name in names)
        raise RuntimeError("boom")
    assert not any(domain_exists(libvirt_conn, name) for name in names)


def test_emulators_die_when_their_parent_is_killed(
    tmp_path: Path, blank_domain: Callable[..., str]
) -> None:
    # SIGKILL runs no atexit hook: the lifeline pipe is what ends the children.
    name = blank_domain()
    script = textwrap.dedent(
        f"""
        import json, os, signal
        from emulators.sushy import SushyEmulator
        from emulators.vbmc import VirtualBMCs
        bmcs = VirtualBMCs({str(tmp_path)!r}).__enter__()
        bmcs.add({name!r})
        sushy = SushyEmulator({str(tmp_path)!r}, domains=[{name!r}]).__enter__()
        print(json.dumps(bmcs.pids() + [sushy.pid]), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == -9, result.stderr
    pids = json.loads(result.stdout)
    assert len(pids) == 2
    assert _wait_dead(pids) == []


# The fixtures themselves: the first test records what they started, the second checks.
_pids_started_by_fixtures: list[int] = []
_domains_started_by_fixtures: list[str] = []


def test_fixtures_start_peers(
    vbmcs: VirtualBMCs,
    sushy_emulator: Callable[..., SushyEmulator],
    ipmi_peers: Callable[..., IPMIPeers],
    blank_domain: Callable[..., str],
) -> None:
    names = [blank_domain(), blank_domain(running=False)]
    vbmcs.add(names[0])
    emulator = sushy_emulator(tls=True)
    peers = ipmi_peers(["on"])
    pids = [*vbmcs.pids(), emulator.pid, *peers.pids()]
    _pids_started_by_fixtures.extend(pid for pid in pids if pid is not None)
    _domains_started_by_fixtures.extend(names)
    assert len(_pids_started_by_fixtures) == 3
    assert all(_alive(pid) for pid in _pids_started_by_fixtures)


def test_fixtures_left_nothing_behind(libvirt_conn: libvirt.virConnect) -> None:
    if not _pids_started_by_fixtures:
        pytest.skip("runs after test_fixtures_start_peers")
    assert _wait_dead(_pids_started_by_fixtures, timeout=0) == []
    assert not any(domain_exists(libvirt_conn, n) for n in _domains_started_by_fixtures)
