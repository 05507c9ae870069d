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
