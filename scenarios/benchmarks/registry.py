"""Every comparison ``crashlab bench`` runs, in the order it measures them: adding a
benchmark is its module and one line here."""

from __future__ import annotations

from scenarios.benchmarks import (
    api_overhead,
    capture_time,
    footprint,
    ipmi_fleet,
    load,
    noisy_neighbour,
    proof_time,
    redfish_fleet,
    scenario_cost,
    vbmc_guests,
)
from scenarios.benchmarks.base import Benchmark

REGISTRY: tuple[Benchmark, ...] = (
    api_overhead.BENCHMARK,
    ipmi_fleet.FLEET,
    redfish_fleet.BENCHMARK,
    ipmi_fleet.ROUNDS,
    vbmc_guests.BENCHMARK,
    noisy_neighbour.BENCHMARK,
    footprint.BENCHMARK,
    load.BENCHMARK,
    scenario_cost.BENCHMARK,
    proof_time.BENCHMARK,
    capture_time.BENCHMARK,
)
