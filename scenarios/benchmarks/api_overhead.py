"""What crashlab's API adds on top of one direct ``virDomainInjectNMI``.

Three figures, from the same domain over the same libvirt URI:

- *accept*: POST ``trigger_crash_dump`` until its 202 (the client's wall time);
- *event*: POST until the service finished the ``compute_trigger_crash_dump``
  event (its own ``finish_time``), i.e. until the NMI was really sent;
- *direct*: one ``dom.injectNMI(0)`` on an open connection, no crashlab.

The domain is a running ``nmi-ignored`` guest (its kernel logs the NMI and
carries on, so it can take hundreds) when ``guest`` is asked for, otherwise
the ``test`` domain of libvirt's ``test:///default`` driver, which accepts
``injectNMI`` as a no-op. Triggers are sequential: one finished before the
next is sent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from drivers.uris import DEFAULT_LIBVIRT_URI, TEST_URI
from scenarios.benchmarks.base import Benchmark, Context, Plan, target
from scenarios.benchmarks.service import BenchError, BenchService
from scenarios.benchmarks.stats import median, ms, percentile, ratio

TEST_DOMAIN = "test"
WARMUP = 5


@dataclass(frozen=True)
class Target:
    """The domain both paths send their NMIs to."""

    uri: str
    domain: str
    description: str


def run(service: BenchService, samples: int, *, guest: bool, workdir: Path) -> dict[str, Any]:
    with _target(guest, workdir) as target:
        server_id = service.register(
            "bench-api-overhead",
            "libvirt",
            {
                "uri": target.uri,
                "domain": target.domain,
            },
        )
        accept, event = _through_crashlab(service, server_id, samples)
        direct = _direct(target, samples)
    event_p50 = percentile(event, 0.5)
    direct_p50 = percentile(direct, 0.5)
    return {
        "target": target.description,
        "samples": samples,
        "accept_p50_ms": ms(percentile(accept, 0.5)),
        "accept_p99_ms": ms(percentile(accept, 0.99)),
        "event_p50_ms": ms(event_p50),
        "event_p99_ms": ms(percentile(event, 0.99)),
        "direct_p50_ms": ms(direct_p50),
        "direct_p99_ms": ms(percentile(direct, 0.99)),
        "ratio": ratio(event_p50, direct_p50),
        "event_minus_direct_p50_ms": ms(event_p50 - direct_p50),
        "event_median_ms": ms(median(event)),
    }


def _through_crashlab(
    service: BenchService, server_id: str, samples: int
) -> tuple[list[float], list[float]]:
    accept: list[float] = []
    event: list[float] = []
    for index in range(WARMUP + samples):
        trigger = service.trigger(server_id)
        [finished] = service.wait_finished([trigger], timeout=30)
        if finished.result != "Success":
            raise BenchError(f"trigger_crash_dump failed: {finished.details}")
        if index >= WARMUP:
            accept.append(trigger.accepted_at - trigger.sent_at)
            event.append(finished.seconds)
    return accept, event


def _direct(target: Target, samples: int) -> list[float]:
    conn = libvirt.open(target.uri)
    try:
        domain = conn.lookupByName(target.domain)
        timings = []
        for index in range(WARMUP + samples):
            started = time.perf_counter()
            domain.injectNMI(0)
            if index >= WARMUP:
                timings.append(time.perf_counter() - started)
        return timings
    finally:
        conn.close()


@contextlib.contextmanager
def _target(guest: bool, workdir: Path) -> Iterator[Target]:
    if not guest:
        yield Target(TEST_URI, TEST_DOMAIN, "libvirt test:///default (injectNMI is a no-op)")
        return
    from emulators.guest import Guest
    from emulators.guest_image import ImageVariant, build_image

    image = build_image(ImageVariant.NMI_IGNORED)
    with Guest(image, uri=DEFAULT_LIBVIRT_URI, name_prefix="crashlab-bench") as vm:
        vm.wait_ready()
        yield Target(
            DEFAULT_LIBVIRT_URI,
            vm.name,
            f"nmi-ignored QEMU guest ({vm.accel}) on {DEFAULT_LIBVIRT_URI}",
        )


class APIOverheadBenchmark(Benchmark):
    name = "api_overhead"
    description = "POST -> finished event vs a direct injectNMI"

    def step(self, plan: Plan) -> str:
        return f"API overhead, {plan.samples} triggers"

    def run(self, context: Context) -> dict[str, Any]:
        plan = context.plan
        return run(context.shared, plan.samples, guest=plan.guest, workdir=context.workdir / "api")

    def render(self, api: dict[str, Any]) -> str:
        def row(label: str, key: str) -> str:
            p50, p99 = api[f"{key}_p50_ms"], api[f"{key}_p99_ms"]
            return f"  {label:<22} p50 {p50:8.3f} ms   p99 {p99:8.3f} ms"

        return "\n".join([
            f"API overhead ({api['target']}; {api['samples']} sequential triggers)",
            row("202 accepted", "accept"),
            row("POST -> event finished", "event"),
            row("direct injectNMI", "direct"),
            f"  ratio event/direct {api['ratio']} "
            f"(event - direct: {api['event_minus_direct_p50_ms']} ms)",
        ])  # fmt: skip

    def targets(self, api: dict[str, Any]) -> list[dict[str, Any]]:
        limit = 1.5 * api["direct_p50_ms"] + 5
        return [
            target("202 p50 <= 5 ms", api["accept_p50_ms"] <= 5, f"{api['accept_p50_ms']} ms"),
            target(
                "POST -> finished event p50 <= 1.5 x direct injectNMI p50 + 5 ms",
                api["event_p50_ms"] <= limit,
                f"{api['event_p50_ms']} ms vs limit {limit:.3f} ms",
            ),
        ]


BENCHMARK = APIOverheadBenchmark()
