"""N IPMI BMCs through crashlab's ``ipmi`` driver vs an ``ipmitool`` loop.

The baseline is what Ironic's ipmitool driver and an operator both run, one
process per BMC: ``ipmitool -I lanplus ... chassis power diag``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scenarios.benchmarks import fleet
from scenarios.benchmarks.ipmi_sim import IPMIFleet
from scenarios.benchmarks.service import BenchService


def run(
    service: BenchService, sizes: Sequence[int], repeats: int, workdir: Path
) -> list[dict[str, Any]]:
    with IPMIFleet(workdir, max(sizes)) as bmcs:
        peer = fleet.Peer(
            driver="ipmi",
            endpoints=[str(port) for port in bmcs.ports],
            nmis=bmcs.nmis,
            driver_info=lambda port: bmcs.driver_info(int(port)),
            command=lambda port: bmcs.ipmitool(int(port)),
        )
        return fleet.run(service, peer, sizes, repeats, baseline_key="ipmitool_s")
