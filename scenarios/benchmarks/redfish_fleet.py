"""N Redfish BMCs through crashlab's ``redfish`` driver vs a ``curl`` loop.

The baseline is the one request an operator sends by hand, one ``curl`` per
BMC: ``POST .../Actions/ComputerSystem.Reset {"ResetType": "Nmi"}``. crashlab
sends that request too, after reading the service root and the system (to
check that Nmi is allowed and the server is on), as Ironic does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from emulators.redfish_sim import RedfishFleet
from scenarios.benchmarks import fleet


class RedfishFleetBenchmark(fleet.FleetBenchmark):
    name = "redfish_fleet"
    description = "N Redfish systems at once vs a curl loop (redfish_sim)"
    title = "Redfish fleet"
    tool = "curl"

    @contextmanager
    def open_fleet(self, workdir: Path, n: int) -> Iterator[fleet.Peer]:
        with RedfishFleet(workdir, n) as bmcs:
            yield fleet.simulated("redfish", bmcs, bmcs.curl)


BENCHMARK = RedfishFleetBenchmark()
