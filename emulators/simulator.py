"""What the simulated BMC fleets share: a child process that announces its BMCs.

A fleet's child is ``python -m <module> <bmcs-file> <nmi-log> <args>...``: it
starts its BMCs on loopback, writes ``[{"port": ..., "pid": ...}, ...]`` to
``bmcs-file`` (the pid of the process serving each BMC), and appends one line
per NMI to ``nmi-log`` (``emulators/nmi_log.py``). Stopping the child stops
every BMC: they are in its process group.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

from app.process import EmulatorProcess
from emulators.nmi_log import NMILog


class SimulatedFleet:
    """BMCs in a child process; stopped on exit."""

    kind: ClassVar[str]  # "ipmi", "redfish": names the workdir and the log
    module: ClassVar[str]  # the child's module
    start_timeout: ClassVar[float]

    def __init__(self, workdir: Path, child_args: Sequence[str]) -> None:
        self.root = workdir / f"{self.kind}-sim"
        self.nmis = NMILog(self.root / "nmi.log")
        self.ports: list[int] = []
        self._pids: list[int] = []
        self._child_args = [str(arg) for arg in child_args]
        self._process: EmulatorProcess | None = None

    def __enter__(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        bmcs_file = self.root / "bmcs.json"
        self._process = EmulatorProcess(
            f"{self.kind} simulator",
            [
                sys.executable,
                "-m",
                self.module,
                str(bmcs_file),
                str(self.nmis.path),
                *self._child_args,
            ],
            env=dict(os.environ),
            log_path=self.root / "sim.log",
        )
        self._process.start(timeout=self.start_timeout)
        bmcs = json.loads(bmcs_file.read_text())
        self.ports = [bmc["port"] for bmc in bmcs]
        self._pids = [bmc["pid"] for bmc in bmcs]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def driver_info(self, port: int) -> dict[str, Any]:
        """crashlab's driver settings for the BMC on ``port``."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """The process serving each BMC, in the order of ``ports``."""
        return list(self._pids)

    def close(self) -> None:
        """Stop the simulator; every BMC goes with it."""
        if self._process is not None:
            self._process.stop()
            self._process = None


def write_bmcs(bmcs_file: Path, bmcs: list[tuple[int, int]]) -> None:
    """In the child: announce each BMC's (port, pid)."""
    bmcs_file.write_text(json.dumps([{"port": port, "pid": pid} for port, pid in bmcs]))
