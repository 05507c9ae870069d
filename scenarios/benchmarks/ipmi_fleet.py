"""N IPMI BMCs through crashlab's ``ipmi`` driver vs an ``ipmitool`` loop.

The baseline is what Ironic's ipmitool driver and an operator both run, one
process per BMC: ``ipmitool -I lanplus ... chassis power diag``.

``run_rounds`` is the endurance run: round after round of N BMCs at once, first
in the service the sections before it used (after the API overhead and the
fleets, where a long-running service once lost triggers), then in a fresh one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emulators.ipmi_sim import IPMIFleet
from scenarios.benchmarks import fleet
from scenarios.benchmarks.service import BenchService


def run(
    service: BenchService, sizes: Sequence[int], repeats: int, workdir: Path
) -> list[dict[str, Any]]:
    with IPMIFleet(workdir, max(sizes)) as bmcs:
        return fleet.run(service, _peer(bmcs), sizes, repeats, baseline_key="ipmitool_s")


def run_rounds(service: BenchService, n: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """``rounds`` rounds of ``n`` BMCs in ``service``, then as many in a fresh service."""
    with IPMIFleet(workdir, n) as bmcs:
        peer = _peer(bmcs)
        long_running = fleet.rounds(service, peer, rounds, "rounds-long-running")
        with BenchService(workdir / "fresh-service") as fresh:
            fresh_rounds = fleet.rounds(fresh, peer, rounds, "rounds-fresh")
    return {"long_running": long_running, "fresh": fresh_rounds}


def _peer(bmcs: IPMIFleet) -> fleet.Peer:
    return fleet.Peer(
        driver="ipmi",
        endpoints=[str(port) for port in bmcs.ports],
        nmis=bmcs.nmis,
        driver_info=lambda port: bmcs.driver_info(int(port)),
        command=lambda port: bmcs.ipmitool(int(port)),
    )
