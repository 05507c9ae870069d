"""One tenant floods its own hung BMC: how much slower is another tenant?

The hung BMC is a loopback UDP port that takes IPMI packets and never
answers, behind a server with the longest timeout crashlab allows (60 s).
The admin's clients flood it with reads and triggers, from a child process
(so the flood's threads do not share the measuring client's interpreter). The other tenant reads
and triggers its own server (the in-memory fake driver, so the figures are
crashlab's own cost) in rounds: a GET, then a trigger until its event has
finished. Its p50 and p99 are measured without the flood, then with it, in
the same service; the ratio is the figure (goal: within 2x).
"""

from __future__ import annotations

import multiprocessing
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from app.client import ClientError, wait_for_action
from scenarios.benchmarks.base import Benchmark, Context, Plan, target
from scenarios.benchmarks.service import ADMIN, MICROVERSION, TENANT, BenchError, BenchService
from scenarios.benchmarks.stats import ms, percentile, ratio

FLOOD_CLIENTS = 20
TRIGGER = {"trigger_crash_dump": None}


def run(service: BenchService, seconds: float) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hung_bmc:
        hung_bmc.bind(("127.0.0.1", 0))
        hung = service.register(
            "bench-hung-bmc",
            "ipmi",
            {
                "address": "127.0.0.1",
                "port": hung_bmc.getsockname()[1],
                "username": "admin",
                "password": "never-answered",
                "timeout": 60,
            },
        )
        quiet = service.register("bench-neighbour", "fake", {}, owner=TENANT)
        with service.client(TENANT) as tenant, service.client(ADMIN) as admin:
            alone = _rounds(tenant, quiet, seconds)
            context = multiprocessing.get_context("spawn")
            counted = context.Value("i", 0)
            flood = context.Process(
                target=_flood,
                args=(service.url, admin.headers["X-Auth-Token"], hung, seconds + 2, counted),
            )
            flood.start()
            try:
                time.sleep(2.0)  # the flood is under way, its first reads timed out
                flooded = _rounds(tenant, quiet, seconds)
            finally:
                flood.join(timeout=30)
                if flood.is_alive():
                    flood.kill()
            flood_requests = counted.value
    result: dict[str, Any] = {"flood_clients": FLOOD_CLIENTS, "flood_requests": flood_requests}
    for kind in ("get", "trigger_to_event"):
        for label, samples in (("alone", alone[kind]), ("flooded", flooded[kind])):
            result[f"{kind}_{label}_p50_ms"] = ms(percentile(samples, 0.5))
            result[f"{kind}_{label}_p99_ms"] = ms(percentile(samples, 0.99))
        result[f"{kind}_p99_ratio"] = ratio(
            percentile(flooded[kind], 0.99), percentile(alone[kind], 0.99)
        )
    result["rounds_alone"], result["rounds_flooded"] = len(alone["get"]), len(flooded["get"])
    return result


def _rounds(tenant: httpx.Client, server: str, seconds: float) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"get": [], "trigger_to_event": []}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        _expect(tenant.get(f"/servers/{server}"), 200)
        samples["get"].append(time.monotonic() - started)
        started = time.monotonic()
        accepted = tenant.post(f"/servers/{server}/action", json=TRIGGER)
        _expect(accepted, 202)
        _wait_event(tenant, server, accepted.headers["x-openstack-request-id"])
        samples["trigger_to_event"].append(time.monotonic() - started)
    return samples


def _wait_event(tenant: httpx.Client, server: str, request_id: str) -> None:
    # The tenant reads its own action (crashlab's extension shows members the
    # events), so its polls are in its own share, not the flooding project's.
    try:
        action = wait_for_action(tenant.get, server, request_id, timeout=30, poll=0.002)
    except TimeoutError:
        raise BenchError(f"the neighbour's event {request_id} did not finish within 30 s") from None
    except ClientError as exc:
        raise BenchError(f"the neighbour's event {request_id}: {exc}") from exc
    [event] = action["events"]
    if event["result"] != "Success":
        raise BenchError(f"the neighbour's trigger ended {event}")


def _flood(url: str, token: str, server: str, seconds: float, counted: Any) -> None:
    """In a child process: FLOOD_CLIENTS clients hammer ``server`` for ``seconds``."""
    deadline = time.monotonic() + seconds

    def one_client() -> int:
        sent = 0
        headers = {"X-Auth-Token": token, "OpenStack-API-Version": MICROVERSION}
        with httpx.Client(base_url=url + "/v2.1", headers=headers, timeout=120) as client:
            while time.monotonic() < deadline:
                client.get(f"/servers/{server}")
                client.get("/servers/detail")
                client.post(f"/servers/{server}/action", json=TRIGGER)
                sent += 3
        return sent

    with ThreadPoolExecutor(FLOOD_CLIENTS) as pool:
        counted.value = sum(pool.map(lambda _: one_client(), range(FLOOD_CLIENTS)))


def _expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise BenchError(f"{response.request.url.path}: {response.status_code} {response.text}")


class NoisyNeighbourBenchmark(Benchmark):
    name = "noisy_neighbour"
    description = "another tenant's p50 and p99, alone and under a hung-BMC flood"

    def step(self, plan: Plan) -> str:
        return f"noisy neighbour, {plan.neighbour_s:g} s alone then flooded"

    def run(self, context: Context) -> dict[str, Any]:
        return run(context.shared, context.plan.neighbour_s)

    def render(self, result: dict[str, Any]) -> str:
        lines = [
            f"Noisy neighbour ({result['flood_clients']} clients, {result['flood_requests']} "
            "requests at a hung BMC)"
        ]
        for kind, what in (("get", "GET"), ("trigger_to_event", "trigger to event")):
            lines.append(
                f"  {what}: p50 {result[f'{kind}_alone_p50_ms']} -> "
                f"{result[f'{kind}_flooded_p50_ms']} ms, p99 {result[f'{kind}_alone_p99_ms']} -> "
                f"{result[f'{kind}_flooded_p99_ms']} ms ({result[f'{kind}_p99_ratio']}x)"
            )
        return "\n".join(lines)

    def targets(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            target(
                "another tenant's p99 under a hung-BMC flood within 2x of its p99 alone",
                max(result["get_p99_ratio"], result["trigger_to_event_p99_ratio"]) <= 2,
                f"GET {result['get_p99_ratio']}x, trigger to event "
                f"{result['trigger_to_event_p99_ratio']}x",
            )
        ]


BENCHMARK = NoisyNeighbourBenchmark()
