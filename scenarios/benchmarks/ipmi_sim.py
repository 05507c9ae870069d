"""Simulated IPMI BMCs on loopback that count the NMIs they receive.

Each BMC is pyghmi's own BMC server class (``pyghmi.ipmi.bmc.Bmc``, the class
virtualbmc builds on) speaking real IPMI 2.0 / RMCP+ over UDP, with
``pulse_diag`` implemented: chassis control directive 4 appends the BMC's port
to a shared log, one line per NMI, so a count survives the BMC and is exact.
Power is always on, so the driver's "is it on?" check passes.

The BMCs run apart from the service, one process per BMC as virtualbmc runs
them (see ``_serve`` for why that matters)::

    with IPMIFleet(workdir, count=200) as fleet:
        fleet.ports                  # one UDP port per BMC, all on 127.0.0.1
        fleet.nmis.read()            # Counter of NMIs per port since the last read

Child: ``python -m scenarios.benchmarks.ipmi_sim <count> <nmi-log> <ports-file>``,
which forks the BMCs; stopping it stops its whole process group.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from app.process import announce_ready, hold_lifeline
from emulators.pyghmi_server import repair_server_sessions
from scenarios.benchmarks.simulator import SimulatedFleet

USERNAME = "admin"
PASSWORD = "password"
ADDRESS = "127.0.0.1"


class IPMIFleet(SimulatedFleet):
    """``count`` counting BMCs in child processes; all stopped on exit."""

    kind = "ipmi"
    module = "scenarios.benchmarks.ipmi_sim"
    start_timeout = 120

    def driver_info(self, port: int) -> dict[str, Any]:
        """crashlab's ``ipmi`` driver settings for the BMC on ``port``."""
        return {"address": ADDRESS, "port": port, "username": USERNAME, "password": PASSWORD}

    def ipmitool(self, port: int) -> list[str]:
        """The command line an operator would type to send this BMC an NMI."""
        return [
            "ipmitool",
            "-I",
            "lanplus",
            "-H",
            ADDRESS,
            "-p",
            str(port),
            "-U",
            USERNAME,
            "-P",
            PASSWORD,
            "chassis",
            "power",
            "diag",
        ]


def _serve(count: int, nmi_log: Path, ports_file: Path) -> None:
    """Child process: fork one process per BMC, as vbmcd does, until killed.

    One BMC per process is not only virtualbmc's model: pyghmi's BMC server
    keys sessions by the client's address and, when that address opens a new
    session, forgets the sessions it had with *every* BMC of the process. A
    pyghmi client talks to up to 64 BMCs from one UDP socket, so several BMCs
    in one process drop each other's sessions and crash the loop.
    """
    hold_lifeline()
    from pyghmi.ipmi import bmc  # imported once, shared by the forked children

    repair_server_sessions()

    ports = []
    for _ in range(count):
        reader, writer = os.pipe()
        if os.fork() == 0:
            os.close(reader)
            _serve_one(bmc.Bmc, nmi_log, writer)
        os.close(writer)
        with os.fdopen(reader) as pipe:
            ports.append(int(pipe.read()))
    ports_file.write_text(json.dumps(ports))
    announce_ready()
    while True:
        os.wait()


def _serve_one(base: type[Any], nmi_log: Path, report: int) -> None:
    """Forked child: one BMC on an ephemeral loopback port; its port goes to ``report``."""
    hold_lifeline()

    class CountingBMC(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__({USERNAME: PASSWORD}, port=0, address=ADDRESS)
            # pyghmi routes sessions by self.port; make it the one bound.
            self.port = self.serversocket.getsockname()[1]

        def get_power_state(self) -> str:
            return "on"

        def pulse_diag(self) -> int:
            # O_APPEND writes of one short line are atomic across processes.
            with nmi_log.open("a") as log:
                log.write(f"{self.port}\n")
            return 0

    server = CountingBMC()
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
    _serve(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
