"""Simulated IPMI BMCs on loopback, one process each, that count the NMIs they receive.

Each BMC is pyghmi's own BMC server class (``pyghmi.ipmi.bmc.Bmc``, the class
virtualbmc builds on) speaking real IPMI 2.0 / RMCP+ over UDP. A chassis
control "pulse diagnostic interrupt" appends the BMC's port to the fleet's NMI
log (``emulators/nmi_log.py``), so NMIs are counted per BMC, exactly::

    with IPMIFleet(workdir, count=200) as fleet:       # 200 BMCs of kind "on"
        fleet.ports                  # one UDP port per BMC, all on 127.0.0.1
        fleet.nmis.read()            # Counter of NMIs per port since the last read
    IPMIFleet(workdir, kinds=["on", "mute-status"], latency=0.5)

Kinds:

- ``on``: powered on; every pulse is logged.
- ``off``: powered off; a pulse is logged the same way (and must never arrive).
- ``nodiag``: powered on, ``pulse_diag`` not implemented: pyghmi answers 0xCC.
- ``mute-status``: as ``on``, but never answers Get Chassis Status (the read
  before the pulse), so no NMI can be sent.
- ``mute-first-diag``: as ``on``, but the answer to its first pulse is lost:
  the NMI is logged, nothing is sent back; later pulses are answered.

Every request other than the login answers after ``latency`` seconds, without
blocking the others, as BMCs on a real network do; this is what makes "N at
once" measurably faster than "N in a row".

Child: ``python -m emulators.ipmi_sim <bmcs-file> <nmi-log> <latency> <kind>...``,
which forks one process per BMC (see ``_serve`` for why); stopping it stops
its whole process group.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyghmi.ipmi import bmc

from app.process import announce_ready, hold_lifeline
from emulators.nmi_log import NMILog
from emulators.pyghmi_server import repair_server_sessions
from emulators.simulator import SimulatedFleet, write_bmcs

USERNAME = "admin"
PASSWORD = "password"
ADDRESS = "127.0.0.1"
KINDS = ("on", "off", "nodiag", "mute-status", "mute-first-diag")
# IPMI's chassis commands (netfn 0): Get Chassis Status, Chassis Control.
GET_CHASSIS_STATUS = 1
CHASSIS_CONTROL = 2


class IPMIFleet(SimulatedFleet):
    """``count`` BMCs of kind ``on``, or one BMC per entry of ``kinds``; stopped on exit."""

    kind = "ipmi"
    module = "emulators.ipmi_sim"
    start_timeout = 120

    def __init__(
        self,
        workdir: Path,
        count: int | None = None,
        *,
        kinds: Sequence[str] | None = None,
        latency: float = 0.0,
    ) -> None:
        if (count is None) == (kinds is None):
            raise ValueError("give either count or kinds")
        kinds = list(kinds) if kinds is not None else ["on"] * (count or 0)
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown BMC kinds {unknown}; known: {', '.join(KINDS)}")
        super().__init__(workdir, [str(latency), *kinds])

    def driver_info(self, port: int) -> dict[str, Any]:
        """crashlab's ``ipmi`` driver settings for the BMC on ``port``."""
        return {"address": ADDRESS, "port": port, "username": USERNAME, "password": PASSWORD}

    def ipmitool(self, port: int) -> list[str]:
        """The command line an operator would type to send this BMC an NMI."""
        return [
            "ipmitool", "-I", "lanplus", "-H", ADDRESS, "-p", str(port),
            "-U", USERNAME, "-P", PASSWORD, "chassis", "power", "diag",
        ]  # fmt: skip


class SimulatedBMC(bmc.Bmc):  # type: ignore[misc]
    """One BMC of a kind; its answers come ``latency`` seconds late."""

    def __init__(self, kind: str, nmi_log: NMILog, latency: float) -> None:
        super().__init__({USERNAME: PASSWORD}, port=0, address=ADDRESS)
        # pyghmi routes sessions by self.port; make it the one bound.
        self.port = self.serversocket.getsockname()[1]
        self.kind = kind
        self.nmi_log = nmi_log
        self.latency = latency
        self.mute_diags = 1 if kind == "mute-first-diag" else 0

    def get_power_state(self) -> str:
        return "off" if self.kind == "off" else "on"

    def pulse_diag(self) -> int:
        if self.kind == "nodiag":
            return int(super().pulse_diag())  # NotImplementedError: pyghmi answers 0xCC
        self.nmi_log.append(self.port)
        return 0

    def handle_raw_request(self, request: dict[str, Any], session: Any) -> None:
        command = request["command"] if request["netfn"] == 0 else None
        if command == GET_CHASSIS_STATUS and self.kind == "mute-status":
            return
        if command == CHASSIS_CONTROL and self.mute_diags:
            self.mute_diags -= 1
            self.pulse_diag()
            return
        if self.latency:
            threading.Timer(self.latency, super().handle_raw_request, (request, session)).start()
        else:
            super().handle_raw_request(request, session)


def _serve(bmcs_file: Path, nmi_log: Path, latency: float, kinds: list[str]) -> None:
    """Child process: fork one process per BMC, as vbmcd does, until killed.

    One BMC per process is not only virtualbmc's model: pyghmi's BMC server
    keys sessions by the client's address and, when that address opens a new
    session, forgets the sessions it had with *every* BMC of the process. A
    pyghmi client talks to up to 64 BMCs from one UDP socket, so several BMCs
    in one process drop each other's sessions and crash the loop.
    """
    hold_lifeline()
    repair_server_sessions()
    bmcs = []
    for kind in kinds:
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(reader)
            _serve_one(kind, NMILog(nmi_log), latency, writer)
        os.close(writer)
        with os.fdopen(reader) as pipe:
            bmcs.append((int(pipe.read()), pid))
    write_bmcs(bmcs_file, bmcs)
    announce_ready()
    while True:
        os.wait()


def _serve_one(kind: str, nmi_log: NMILog, latency: float, report: int) -> None:
    """Forked child: one BMC on an ephemeral loopback port; its port goes to ``report``."""
    hold_lifeline()
    server = SimulatedBMC(kind, nmi_log, latency)
    os.write(report, str(server.port).encode())
    os.close(report)
    try:
        server.listen(timeout=float(os.environ.get("SIM_LISTEN", "1")))
    except BaseException:
        traceback.print_exc()  # os._exit would drop it: a BMC must not die silently
        sys.stderr.flush()
    finally:
        os._exit(1)


if __name__ == "__main__":
    bmcs_file, nmi_log, latency, *kinds = sys.argv[1:]
    _serve(Path(bmcs_file), Path(nmi_log), float(latency), kinds)
