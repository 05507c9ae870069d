"""What ``crashlab serve`` costs the machine: memory, and the time to start.

- ``startup_s``: from launching ``crashlab serve`` to its first 200 on
  ``GET /``; the median of fresh starts, each with its own empty state;
- ``idle_rss_mb``: its resident memory once started, before any request
  but the login;
- ``loaded_rss_mb``: the same service's resident memory after the load run
  (every trigger the other comparisons sent), read by the caller.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from scenarios.benchmarks import api_overhead
from scenarios.benchmarks.base import Benchmark, Context, Plan
from scenarios.benchmarks.service import BenchService
from scenarios.benchmarks.stats import median

SETTLE_SECONDS = 0.5


def startup(starts: int, workdir: Path) -> tuple[float, float]:
    """Median start-up time and idle RSS of ``starts`` fresh services."""
    seconds: list[float] = []
    rss: list[float] = []
    for index in range(starts):
        with BenchService(workdir / f"start-{index}") as service:
            seconds.append(service.startup_s)
            time.sleep(SETTLE_SECONDS)
            rss.append(service.rss_mb())
    return round(median(seconds), 3), round(median(rss), 1)


class FootprintBenchmark(Benchmark):
    name = "footprint"
    description = "RSS and start-up time of crashlab serve"
    shares_service = False

    def step(self, plan: Plan) -> str:
        return "start-up"

    def run(self, context: Context) -> dict[str, Any]:
        starts = context.plan.starts
        startup_s, idle_rss_mb = startup(starts, context.workdir / "starts")
        return {
            "idle_rss_mb": idle_rss_mb,
            "loaded_rss_mb": context.loaded_rss_mb,
            "startup_s": startup_s,
            "starts": starts,
            "load": _load_description(context.report),
        }

    def render(self, fp: dict[str, Any]) -> str:
        return "\n".join([
            "crashlab serve footprint",
            f"  start-up to first 200 on GET /  {fp['startup_s']:.3f} s (median of {fp['starts']})",
            f"  RSS idle                        {fp['idle_rss_mb']:.1f} MiB",
            f"  RSS loaded                      {fp['loaded_rss_mb']:.1f} MiB ({fp['load']})",
        ])  # fmt: skip


def _load_description(report: dict[str, Any]) -> str:
    """What the long-running service had done when ``loaded_rss_mb`` was read."""
    triggers = 0
    if report.get("api_overhead"):
        triggers += report["api_overhead"]["samples"] + api_overhead.WARMUP
    for name in ("ipmi_fleet", "redfish_fleet"):
        triggers += sum(e["n"] * e["rounds"] for e in report.get(name) or [])
    for name in ("ipmi_rounds", "vbmc_rounds"):
        if report.get(name):
            long_running = report[name]["long_running"]
            triggers += long_running["n"] * len(long_running["rounds"])
    return f"after {triggers} trigger_crash_dump calls (API overhead, fleets, rounds)"


BENCHMARK = FootprintBenchmark()
