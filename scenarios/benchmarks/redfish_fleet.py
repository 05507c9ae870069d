"""N Redfish BMCs through crashlab's ``redfish`` driver vs a ``curl`` loop.

The baseline is the one request an operator sends by hand, one ``curl`` per
BMC: ``POST .../Actions/ComputerSystem.Reset {"ResetType": "Nmi"}``. crashlab
sends that request too, after reading the service root and the system (to
check that Nmi is allowed and the server is on), as Ironic does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emulators.redfish_sim import RedfishFleet
from scenarios.benchmarks import fleet
from scenarios.benchmarks.base import Benchmark, Context, Plan
from scenarios.benchmarks.service import BenchService


def run(
    service: BenchService, sizes: Sequence[int], repeats: int, workdir: Path
) -> list[dict[str, Any]]:
    with RedfishFleet(workdir, max(sizes)) as bmcs:
        peer = fleet.Peer(
            driver="redfish",
            endpoints=[str(port) for port in bmcs.ports],
            nmis=bmcs.nmis,
            driver_info=lambda port: bmcs.driver_info(int(port)),
            command=lambda port: bmcs.curl(int(port)),
        )
        return fleet.run(service, peer, sizes, repeats, baseline_key="curl_s")


class RedfishFleetBenchmark(Benchmark):
    name = "redfish_fleet"
    description = "N Redfish systems at once vs a curl loop (redfish_sim)"

    def step(self, plan: Plan) -> str:
        return f"redfish fleet, N = {', '.join(map(str, plan.sizes))}"

    def run(self, context: Context) -> list[dict[str, Any]]:
        plan = context.plan
        return run(context.shared, plan.sizes, plan.repeats, context.workdir / self.name)

    def render(self, entries: list[dict[str, Any]]) -> str:
        return fleet.render_fleet("Redfish fleet", "curl", "curl_s", entries)

    def errors(self, entries: list[dict[str, Any]]) -> list[str]:
        return fleet.wrong_deliveries(self.name, entries)


BENCHMARK = RedfishFleetBenchmark()
