"""What a benchmark is, what a run hands it, and how much of it a run does.

A benchmark is one object in ``scenarios.benchmarks.registry.REGISTRY``: its ``name`` is
its key in the report, ``run(context)`` measures and returns that entry (plain
JSON data), ``render(result)`` prints it, ``targets(result)`` judges it and
``errors(result)`` lists the wrong results (an NMI lost or duplicated) that
make ``crashlab bench`` exit 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scenarios.benchmarks.service import BenchService


@dataclass(frozen=True)
class Plan:
    """How much of each comparison one run does."""

    name: str
    samples: int
    sizes: tuple[int, ...]
    repeats: int
    starts: int
    scenario_repeats: int
    guest: bool
    rounds: int  # IPMI rounds per service, each of ``rounds_n`` BMCs at once
    rounds_n: int
    vbmc_rounds: int  # rounds of vbmc_guests.GUESTS guests behind virtualbmc
    neighbour_s: float  # seconds of the neighbour's rounds, alone and then flooded
    load_requests: int  # the load run: requests, clients and fake servers
    load_clients: int
    load_servers: int


FULL = Plan(
    "full",
    samples=200,
    sizes=(10, 50, 200),
    repeats=3,
    starts=3,
    scenario_repeats=3,
    guest=True,
    rounds=10,
    rounds_n=200,
    vbmc_rounds=3,
    neighbour_s=15.0,
    load_requests=1000,
    load_clients=50,
    load_servers=200,
)
QUICK = Plan(
    "quick",
    samples=50,
    sizes=(10, 50),
    repeats=1,
    starts=1,
    scenario_repeats=0,
    guest=False,
    rounds=2,
    rounds_n=50,
    vbmc_rounds=0,
    neighbour_s=5.0,
    load_requests=200,
    load_clients=20,
    load_servers=40,
)


@dataclass
class Context:
    """What one run hands each benchmark."""

    plan: Plan
    workdir: Path  # the run's; each benchmark keeps its files in a folder of its name
    service: BenchService | None  # the long-running service, for the benchmarks that share it
    report: dict[str, Any] = field(default_factory=dict)  # the entries measured so far
    loaded_rss_mb: float = 0.0  # the long-running service's RSS once they were done

    @property
    def shared(self) -> BenchService:
        assert self.service is not None, "this benchmark does not share the service"
        return self.service


class Benchmark:
    """One comparison; a subclass sets ``name`` and ``description`` and overrides ``run``."""

    name = ""
    description = ""
    shares_service = True  # runs in the long-running service, before ``footprint`` reads it

    def step(self, plan: Plan) -> str | None:
        """The progress line for this plan; None when the plan leaves it out."""
        return self.description

    def run(self, context: Context) -> Any:
        raise NotImplementedError

    def render(self, result: Any) -> str:
        raise NotImplementedError

    def targets(self, result: Any) -> list[dict[str, Any]]:
        return []

    def errors(self, result: Any) -> list[str]:
        return []


def target(name: str, met: bool, figure: str) -> dict[str, Any]:
    """A target as the report lists it: what, whether it was met, the figure judged."""
    return {"target": name, "met": bool(met), "figure": figure}
