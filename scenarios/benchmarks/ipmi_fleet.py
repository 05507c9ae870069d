"""N IPMI BMCs through crashlab's ``ipmi`` driver vs an ``ipmitool`` loop.

The baseline is what Ironic's ipmitool driver and an operator both run, one
process per BMC: ``ipmitool -I lanplus ... chassis power diag``.

``run_rounds`` is the endurance run: round after round of N BMCs at once, first
in the service the sections before it used (after the API overhead and the
fleets, where a long-running service once lost triggers), then in a fresh one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from emulators.ipmi_sim import IPMIFleet
from scenarios.benchmarks import fleet
from scenarios.benchmarks.base import Context, Plan, target
from scenarios.benchmarks.service import BenchService


@contextmanager
def _fleet(workdir: Path, n: int) -> Iterator[fleet.Peer]:
    with IPMIFleet(workdir, n) as bmcs:
        yield fleet.simulated("ipmi", bmcs, bmcs.ipmitool)


def run_rounds(service: BenchService, n: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """``rounds`` rounds of ``n`` BMCs in ``service``, then as many in a fresh service."""
    with _fleet(workdir, n) as peer:
        long_running = fleet.rounds(service, peer, rounds, "rounds-long-running")
        with BenchService(workdir / "fresh-service") as fresh:
            fresh_rounds = fleet.rounds(fresh, peer, rounds, "rounds-fresh")
    return {"long_running": long_running, "fresh": fresh_rounds}


class IPMIFleetBenchmark(fleet.FleetBenchmark):
    name = "ipmi_fleet"
    description = "N BMCs at once vs an ipmitool loop (ipmi_sim BMCs)"
    title = "IPMI fleet"
    tool = "ipmitool"

    def open_fleet(self, workdir: Path, n: int) -> AbstractContextManager[fleet.Peer]:
        return _fleet(workdir, n)

    def targets(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            target(
                "200 BMCs: >= 20x faster than the ipmitool loop, exactly 200 NMIs",
                entry["ratio"] >= 20 and entry["exact"] and entry["nmis_received"] == 200,
                f"{entry['ratio']}x, {entry['nmis_received']} NMIs, exact={entry['exact']}",
            )
            for entry in entries
            if entry["n"] == 200
        ]


class IPMIRoundsBenchmark(fleet.RoundsBenchmark):
    name = "ipmi_rounds"
    description = "rounds of N BMCs at once, in a long-running and a fresh service"
    title = "IPMI rounds (simulated BMCs)"
    label = "IPMI rounds"

    def step(self, plan: Plan) -> str:
        return f"IPMI rounds, {plan.rounds} x {plan.rounds_n} BMCs here, then in a fresh service"

    def run(self, context: Context) -> dict[str, Any]:
        plan = context.plan
        return run_rounds(context.shared, plan.rounds_n, plan.rounds, context.workdir / self.name)


FLEET = IPMIFleetBenchmark()
ROUNDS = IPMIRoundsBenchmark()
