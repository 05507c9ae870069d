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
