"""N servers at once through crashlab, against the same N one by one with a CLI.

What the IPMI and Redfish fleets share. Each round, for one N:

- *crashlab*: N ``trigger_crash_dump`` calls sent at once; the time runs from
  the first POST to the last ``compute_trigger_crash_dump`` event finishing
  (the service's own ``finish_time``);
- *baseline*: the operator's shell loop, one CLI process per server, in turn.

Both must deliver exactly one NMI to each of the N endpoints, counted by the
simulator; the count is checked after a grace period, so a late duplicate
(a retransmitted request) is caught too. Rounds alternate crashlab and
baseline, so both see the same machine.

``rounds`` is the endurance run: the same N endpoints through crashlab, round
after round in one service, with no baseline. Each crashlab round is recorded
(``round_record``): its ``Error`` events, how many endpoints received how many
NMIs, and its wall time.

``FleetBenchmark`` and ``RoundsBenchmark`` are the benchmarks built on them: a
subclass opens its fleet and names what the report calls it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulators.simulator import SimulatedFleet
from scenarios.benchmarks.base import Benchmark, Context, Plan, target
from scenarios.benchmarks.counter import NMISource
from scenarios.benchmarks.service import BenchService
from scenarios.benchmarks.stats import median, ratio

GRACE_SECONDS = 0.3
# Three times the drivers' default timeout: every event has a result by then, and a
# round that lost an NMI ends soon instead of holding up the rest of the run.
TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Peer:
    """A fleet: its endpoints, how crashlab and the CLI reach each (no CLI: no baseline)."""

    driver: str
    endpoints: list[str]
    nmis: NMISource
    driver_info: Callable[[str], dict[str, Any]]
    command: Callable[[str], list[str]] | None = None


def simulated(driver: str, bmcs: SimulatedFleet, command: Callable[[int], list[str]]) -> Peer:
    """A simulated fleet as a peer: each endpoint is a BMC's port, ``command`` its CLI call."""
    return Peer(
        driver=driver,
        endpoints=[str(port) for port in bmcs.ports],
        nmis=bmcs.nmis,
        driver_info=lambda port: bmcs.driver_info(int(port)),
        command=lambda port: command(int(port)),
    )


@dataclass
class Round:
    seconds: float
    nmis: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    accept_seconds: float = 0.0
    errors: int = 0  # events that ended ``Error``


def run(
    service: BenchService, peer: Peer, sizes: Sequence[int], repeats: int, baseline_key: str
) -> list[dict[str, Any]]:
    """One entry per N: medians of ``repeats`` rounds, the ratio and the NMI counts."""
    servers = _register(service, peer, f"bench-{peer.driver}", max(sizes))
    results = []
    for n in sizes:
        ours: list[Round] = []
        theirs: list[Round] = []
        for _ in range(repeats):
            ours.append(_through_crashlab(service, peer, servers[:n], peer.endpoints[:n]))
            theirs.append(_baseline(peer, peer.endpoints[:n]))
        results.append(_summary(n, ours, theirs, baseline_key, peer.endpoints[:n]))
    return results


def rounds(service: BenchService, peer: Peer, count: int, name: str) -> dict[str, Any]:
    """``count`` rounds of every endpoint at once through crashlab, each recorded."""
    servers = _register(service, peer, name, len(peer.endpoints))
    records = [
        round_record(_through_crashlab(service, peer, servers, peer.endpoints), peer.endpoints)
        for _ in range(count)
    ]
    walls = [r["wall_s"] for r in records]
    return {
        "n": len(peer.endpoints),
        "rounds": records,
        "errors": sum(r["errors"] for r in records),
        "exact": all(r["exact"] for r in records),
        "wall_s": {"min": min(walls), "median": round(median(walls), 3), "max": max(walls)},
    }


def round_record(round_: Round, endpoints: list[str]) -> dict[str, Any]:
    """One round as the report shows it: ``nmis_per_bmc`` maps an NMI count to the
    number of endpoints that received that many (``{"1": n}`` when exact)."""
    per_bmc = Counter(round_.nmis[e] for e in endpoints)
    return {
        "errors": round_.errors,
        "nmis_per_bmc": {str(k): per_bmc[k] for k in sorted(per_bmc)},
        "nmis_received": round_.nmis.total(),
        "wall_s": round(round_.seconds, 3),
        "exact": _exact(round_, endpoints),
        "failures": sorted(set(round_.failures))[:3],
    }


def _register(service: BenchService, peer: Peer, prefix: str, n: int) -> list[str]:
    return [
        service.register(f"{prefix}-{index}", peer.driver, peer.driver_info(endpoint))
        for index, endpoint in enumerate(peer.endpoints[:n])
    ]


def _through_crashlab(
    service: BenchService, peer: Peer, servers: list[str], endpoints: list[str]
) -> Round:
    peer.nmis.read()
    started = time.time()
    triggers = service.trigger_all(servers)
    accepted = max(t.accepted_at for t in triggers)
    nmis = _wait_for_nmis(peer.nmis, len(endpoints))
    events = service.wait_finished(triggers, timeout=TIMEOUT_SECONDS)
    time.sleep(GRACE_SECONDS)
    nmis += peer.nmis.read()
    failures = [f"{e.result}: {e.details}" for e in events if e.result != "Success"]
    errors = sum(e.result == "Error" for e in events)
    seconds = max(e.finished_at for e in events) - started
    return Round(seconds, nmis, failures, accepted - started, errors)


def _baseline(peer: Peer, endpoints: list[str]) -> Round:
    assert peer.command is not None, f"no CLI baseline for {peer.driver}"
    peer.nmis.read()
    failures = []
    started = time.monotonic()
    for endpoint in endpoints:
        done = subprocess.run(peer.command(endpoint), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            failures.append(f"{done.args[0]} exit {done.returncode}: {done.stderr.strip()[:200]}")
    seconds = time.monotonic() - started
    nmis = _wait_for_nmis(peer.nmis, len(endpoints))
    time.sleep(GRACE_SECONDS)
    nmis += peer.nmis.read()
    return Round(seconds, nmis, failures)


def _wait_for_nmis(counter: NMISource, expected: int) -> Counter[str]:
    """Read the simulator's log until ``expected`` NMIs arrived (or the timeout passed)."""
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while sum(seen.values()) < expected and time.monotonic() < deadline:
        seen += counter.read()
        time.sleep(0.005)
    return seen


def _summary(
    n: int, ours: list[Round], theirs: list[Round], baseline_key: str, endpoints: list[str]
) -> dict[str, Any]:
    crashlab_s = median([r.seconds for r in ours])
    baseline_s = median([r.seconds for r in theirs])
    return {
        "n": n,
        "crashlab_s": round(crashlab_s, 3),
        baseline_key: round(baseline_s, 3),
        "ratio": ratio(baseline_s, crashlab_s),
        "nmis_received": _worst_total(ours, n),
        "baseline_nmis_received": _worst_total(theirs, n),
        "exact": all(_exact(r, endpoints) for r in ours + theirs),
        "crashlab_accept_s": round(median([r.accept_seconds for r in ours]), 3),
        "rounds": len(ours),
        "failures": sorted({f for r in ours + theirs for f in r.failures})[:5],
        "per_round": [round_record(r, endpoints) for r in ours],
    }


def _exact(round_: Round, endpoints: list[str]) -> bool:
    """Exactly one NMI at each endpoint, none anywhere else, and no failed call."""
    return not round_.failures and round_.nmis == Counter({e: 1 for e in endpoints})


def _worst_total(rounds: list[Round], n: int) -> int:
    """The NMI total of the round furthest from ``n`` (``n`` when every round was exact)."""
    return max((sum(r.nmis.values()) for r in rounds), key=lambda total: abs(total - n))


# How the fleet and rounds entries are shown and judged, for the modules that measure them


def render_fleet(title: str, tool: str, key: str, entries: list[dict[str, Any]]) -> str:
    rounds_ = entries[0]["rounds"] if entries else 0
    lines = [
        f"{title} (crashlab, N calls at once, vs a sequential {tool} loop; median of {rounds_})",
        f"  {'N':>5}  {'crashlab':>10}  {tool:>10}  {'ratio':>8}  NMIs received (exact)",
    ]
    for e in entries:
        lines.append(
            f"  {e['n']:>5}  {e['crashlab_s']:>8.3f} s  {e[key]:>8.3f} s  {e['ratio']:>7}x  "
            f"{e['nmis_received']} / {e['baseline_nmis_received']} "
            f"({'yes' if e['exact'] else 'NO'})"
        )
    return "\n".join(lines)


def render_rounds(title: str, serves: dict[str, dict[str, Any]]) -> str:
    lines = [f"{title}: every BMC at once, round after round; errors are Error events"]
    for serve, result in serves.items():
        wall = result["wall_s"]
        per_bmc = sorted({json.dumps(r["nmis_per_bmc"]) for r in result["rounds"]})
        walls = " ".join(f"{r['wall_s']:.2f}" for r in result["rounds"])
        lines += [
            f"  {serve.replace('_', '-')} service: {len(result['rounds'])} rounds of "
            f"{result['n']}, {result['errors']} errors, NMIs per BMC {', '.join(per_bmc)} "
            f"(exact: {'yes' if result['exact'] else 'NO'})",
            f"    wall per round min / median / max {wall['min']:.2f} / {wall['median']:.2f} / "
            f"{wall['max']:.2f} s: {walls}",
        ]
    return "\n".join(lines)


def wrong_deliveries(name: str, entries: list[dict[str, Any]]) -> list[str]:
    return [
        f"{name}: N={e['n']}: NMIs not delivered exactly once "
        f"(crashlab {e['nmis_received']}, baseline {e['baseline_nmis_received']}, "
        f"failures {e['failures']})"
        for e in entries
        if not e["exact"]
    ]


def wrong_rounds(name: str, serves: dict[str, dict[str, Any]]) -> list[str]:
    return [
        f"{name}: {serve}: round {index}: NMIs not delivered exactly once "
        f"(NMIs per BMC {r['nmis_per_bmc']}, {r['errors']} Error events, "
        f"failures {r['failures']})"
        for serve, result in serves.items()
        for index, r in enumerate(result["rounds"], 1)
        if not r["exact"]
    ]


def rounds_targets(what: str, serves: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        target(
            f"{what} ({serve.replace('_', '-')} service): 0 errors, one NMI per BMC per round",
            result["exact"] and result["errors"] == 0,
            f"{len(result['rounds'])} rounds of {result['n']}, {result['errors']} errors",
        )
        for serve, result in serves.items()
    ]


class FleetBenchmark(Benchmark):
    """``run`` for each N of the plan; a subclass sets ``title`` and ``tool``, opens its fleet."""

    title = ""  # the rendered table's title; lower-cased, it starts the progress line
    tool = ""  # the baseline's CLI; an entry's ``<tool>_s`` is its median

    def open_fleet(self, workdir: Path, n: int) -> AbstractContextManager[Peer]:
        """``n`` endpoints, serving until the block ends."""
        raise NotImplementedError

    def step(self, plan: Plan) -> str:
        return f"{self.title.lower()}, N = {', '.join(map(str, plan.sizes))}"

    def run(self, context: Context) -> list[dict[str, Any]]:
        plan = context.plan
        with self.open_fleet(context.workdir / self.name, max(plan.sizes)) as peer:
            return run(context.shared, peer, plan.sizes, plan.repeats, f"{self.tool}_s")

    def render(self, entries: list[dict[str, Any]]) -> str:
        return render_fleet(self.title, self.tool, f"{self.tool}_s", entries)

    def errors(self, entries: list[dict[str, Any]]) -> list[str]:
        return wrong_deliveries(self.name, entries)


class RoundsBenchmark(Benchmark):
    """Entries of ``rounds`` by service; a subclass sets ``title``, ``label`` and ``run``."""

    title = ""  # the rendered section's title
    label = ""  # what the targets call it

    def render(self, serves: dict[str, dict[str, Any]]) -> str:
        return render_rounds(self.title, serves)

    def targets(self, serves: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        return rounds_targets(self.label, serves)

    def errors(self, serves: dict[str, dict[str, Any]]) -> list[str]:
        return wrong_rounds(self.name, serves)
