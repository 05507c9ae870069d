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
from scenarios.benchmarks.base import Benchmark, Context, Plan, target
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


class IPMIFleetBenchmark(Benchmark):
    name = "ipmi_fleet"
    description = "N BMCs at once vs an ipmitool loop (ipmi_sim BMCs)"

    def step(self, plan: Plan) -> str:
        return f"ipmi fleet, N = {', '.join(map(str, plan.sizes))}"

    def run(self, context: Context) -> list[dict[str, Any]]:
        plan = context.plan
        return run(context.shared, plan.sizes, plan.repeats, context.workdir / self.name)

    def render(self, entries: list[dict[str, Any]]) -> str:
        return fleet.render_fleet("IPMI fleet", "ipmitool", "ipmitool_s", entries)

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

    def errors(self, entries: list[dict[str, Any]]) -> list[str]:
        return fleet.wrong_deliveries(self.name, entries)


class IPMIRoundsBenchmark(Benchmark):
    name = "ipmi_rounds"
    description = "rounds of N BMCs at once, in a long-running and a fresh service"

    def step(self, plan: Plan) -> str:
        return f"IPMI rounds, {plan.rounds} x {plan.rounds_n} BMCs here, then in a fresh service"

    def run(self, context: Context) -> dict[str, Any]:
        plan = context.plan
        return run_rounds(context.shared, plan.rounds_n, plan.rounds, context.workdir / self.name)

    def render(self, serves: dict[str, dict[str, Any]]) -> str:
        return fleet.render_rounds("IPMI rounds (simulated BMCs)", serves)

    def targets(self, serves: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        return fleet.rounds_targets("IPMI rounds", serves)

    def errors(self, serves: dict[str, dict[str, Any]]) -> list[str]:
        return fleet.wrong_rounds(self.name, serves)


FLEET = IPMIFleetBenchmark()
ROUNDS = IPMIRoundsBenchmark()
