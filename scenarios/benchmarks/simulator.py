"""What the simulated BMC fleets share: a child process that announces its ports.

A fleet's child is ``python -m <module> <count> <nmi-log> <ports-file>``: it
starts ``count`` BMCs on loopback, writes their ports to ``ports-file`` as JSON,
and appends one line per NMI to ``nmi-log``. Stopping the child stops every BMC.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from app.process import EmulatorProcess
from scenarios.benchmarks.counter import NMICounter


class SimulatedFleet:
    """``count`` counting BMCs in a child process; stopped on exit."""

    kind: ClassVar[str]  # "ipmi", "redfish": names the workdir and the log
    module: ClassVar[str]  # the child's module
    start_timeout: ClassVar[float]

    def __init__(self, workdir: Path, count: int) -> None:
        self.root = workdir / f"{self.kind}-sim"
        self.count = count
        self.nmis = NMICounter(self.root / "nmi.log")
        self.ports: list[int] = []
        self._process: EmulatorProcess | None = None

    def __enter__(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        ports_file = self.root / "ports.json"
        self._process = EmulatorProcess(
            f"{self.kind} simulator",
            [
                sys.executable,
                "-m",
                self.module,
                str(self.count),
                str(self.nmis.path),
                str(ports_file),
            ],
            env=dict(os.environ),
            log_path=self.root / "sim.log",
        )
        self._process.start(timeout=self.start_timeout)
        self.ports = json.loads(ports_file.read_text())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the simulator; every BMC goes with it."""
        if self._process is not None:
            self._process.stop()
            self._process = None
