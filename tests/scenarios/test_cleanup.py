"""A failed scenario leaves nothing behind, whatever phase it fails in.

Each run is a real scenario (libvirtd, a TCG guest, virtualbmc or sushy-tools,
``crashlab serve``) made to fail at one phase: by an error raised where
crashlab's own code would raise it (through the ``Progress`` it is given,
the one seam the runner has), by Ctrl-C, or by killing the BMC emulator.
Afterwards no domain of the run is defined and no process of the run is left.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import libvirt
import pytest

from emulators.guest import GuestTimeout
from scenarios.kdump import Verdict, run_kdump_scenario
from scenarios.progress import Progress
from tests.fixtures import processes_mentioning

pytestmark = [pytest.mark.libvirt, pytest.mark.bmc, pytest.mark.slow]


class FailingProgress(Progress):
    """Progress that runs ``act`` when the step ``phase`` begins (``after=False``) or ends."""

    def __init__(self, phase: str, act: Callable[[], None], *, after: bool = False) -> None:
        super().__init__(quiet=True)
        self.phase, self.act, self.after = phase, act, after
        self.domains: list[str] = []

    def note(self, text: str) -> None:
        if found := re.match(r"guest (crashlab-\S+)", text):
            self.domains.append(found.group(1))

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        if text.startswith(self.phase) and not self.after:
            self.act()
        yield
        if text.startswith(self.phase) and self.after:
            self.act()


def _raise(error: BaseException) -> Callable[[], None]:
    def act() -> None:
        raise error

    return act


def _kill_emulators(output: Path) -> Callable[[], None]:
    def act() -> None:
        pids = processes_mentioning(output / "sushy")
        assert pids, "sushy-tools is running"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    return act


def _defined(conn: libvirt.virConnect, name: str) -> bool:
    return name in {d.name() for d in conn.listAllDomains()}


PHASES = {
    "boot": ("ipmi", "booting the guest", lambda _: _raise(GuestTimeout("READY", 1, "")), False),
    "driver error": ("redfish", "booting the guest", _kill_emulators, True),
    "event timeout": ("ipmi", "waiting for the NMI", lambda _: _raise(TimeoutError("event")), True),
    "ctrl-c": ("redfish", "booting the guest", lambda _: _raise(KeyboardInterrupt()), False),
    "own bug": ("ipmi", "starting the ipmi path", lambda _: _raise(RuntimeError("bug")), True),
}


@pytest.mark.parametrize("phase", PHASES)
def test_a_failure_in_any_phase_leaves_no_domain_and_no_process(
    phase: str, tmp_path: Path, libvirt_conn: libvirt.virConnect
) -> None:
    via, step, make_act, after = PHASES[phase]
    progress = FailingProgress(step, make_act(tmp_path), after=after)
    try:
        result = run_kdump_scenario(via, "nmi-ignored", output=tmp_path, progress=progress)
    except (KeyboardInterrupt, RuntimeError, TimeoutError) as exc:
        outcome = type(exc).__name__
    else:
        outcome = result.verdict
        assert result.verdict is Verdict.FAILED, result.as_dict()
    assert outcome, phase
    assert len(progress.domains) == 1, "the guest was booted"
    assert not _defined(libvirt_conn, progress.domains[0])
    assert not processes_mentioning(tmp_path)
    emulator_dir = tmp_path / ("sushy" if via == "redfish" else "vbmc")
    assert emulator_dir.exists(), "the emulator was started"
