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
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scenarios.benchmarks.counter import NMICounter
from scenarios.benchmarks.service import BenchError, BenchService
from scenarios.benchmarks.stats import median, ratio

GRACE_SECONDS = 0.3
# Three times the drivers' default timeout: every event has a result by then, and a
# round that lost an NMI ends soon instead of holding up the rest of the run.
TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Peer:
    """A simulated fleet: its endpoints, how crashlab and the CLI reach each."""

    driver: str
    endpoints: list[str]
    nmis: NMICounter
    driver_info: Callable[[str], dict[str, Any]]
    command: Callable[[str], list[str]]


@dataclass
class Round:
    seconds: float
    nmis: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    accept_seconds: float = 0.0


def run(
    service: BenchService, peer: Peer, sizes: Sequence[int], repeats: int, baseline_key: str
) -> list[dict[str, Any]]:
    """One entry per N: medians of ``repeats`` rounds, the ratio and the NMI counts."""
    servers = [
        service.register(f"bench-{peer.driver}-{index}", peer.driver, peer.driver_info(endpoint))
        for index, endpoint in enumerate(peer.endpoints[: max(sizes)])
    ]
    results = []
    for n in sizes:
        ours: list[Round] = []
        theirs: list[Round] = []
        for _ in range(repeats):
            ours.append(_through_crashlab(service, peer, servers[:n], peer.endpoints[:n]))
            theirs.append(_baseline(peer, peer.endpoints[:n]))
        results.append(_summary(n, ours, theirs, baseline_key, peer.endpoints[:n]))
    return results


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
    seconds = max(e.finished_at for e in events) - started
    return Round(seconds, nmis, failures, accepted - started)


def _baseline(peer: Peer, endpoints: list[str]) -> Round:
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


def _wait_for_nmis(counter: NMICounter, expected: int) -> Counter[str]:
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
    }


def _exact(round_: Round, endpoints: list[str]) -> bool:
    """Exactly one NMI at each endpoint, none anywhere else, and no failed call."""
    return not round_.failures and round_.nmis == Counter({e: 1 for e in endpoints})


def _worst_total(rounds: list[Round], n: int) -> int:
    """The NMI total of the round furthest from ``n`` (``n`` when every round was exact)."""
    return max((sum(r.nmis.values()) for r in rounds), key=lambda total: abs(total - n))


def check(entries: list[dict[str, Any]], name: str) -> None:
    """Raise if any round lost, duplicated or failed an NMI."""
    wrong = [e for e in entries if not e["exact"]]
    if wrong:
        raise BenchError(f"{name}: NMIs not delivered exactly once: {wrong}")
