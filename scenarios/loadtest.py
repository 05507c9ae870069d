"""Load: many clients trigger crash dumps on many fake servers, then the record is audited.

    python -m scenarios.loadtest                       # 1,000 requests, 50 clients, 200 servers
    python -m scenarios.loadtest --requests 200 --clients 20 --servers 40 --json

It starts ``crashlab serve`` as a child process on loopback (fake driver, the
NMI storm guard off so a server can be triggered again at once, every NMI
appended to an ``nmi_log``) and drives it from this process: ``--clients``
asyncio workers, each sending ``trigger_crash_dump`` requests round-robin
over the servers until ``--requests`` have been sent. Then it checks what
the service recorded:

- no 5xx;
- every 202 has exactly one ``trigger_crash_dump`` instance action, with
  exactly one ``compute_trigger_crash_dump`` event, finished as Success;
- the fake driver received exactly one NMI per 202, on the right server.

It reports the figures (p50/p90/p99/max latency of the 202, requests per
second over the load phase) and exits 1 if any check failed. Times are
reported, never asserted: tests/reliability/test_load.py runs the full load
and asserts only the checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.client import ClientError, Credentials, request_token, wait_for_action
from app.config import ID_NAMESPACE
from app.events import CRASH_DUMP_EVENT
from app.identity import hash_password
from app.process import EmulatorStartError
from scenarios.serve import ServeProcess

USER, PROJECT = "loader", "load"
MICROVERSION = "compute 2.17"
AUDIT_CLIENTS = 20


class LoadError(Exception):
    """The service could not be started or driven."""


@dataclass(frozen=True)
class Sample:
    """One trigger_crash_dump request as the client saw it."""

    server_id: str
    status: int  # 0: no HTTP answer
    request_id: str
    seconds: float
    error: str = ""  # with status 0: what the client saw instead, e.g. "ReadTimeout: ..."


@dataclass
class Audit:
    """What the service recorded for the accepted requests."""

    accepted: int = 0
    missing_actions: list[str] = field(default_factory=list)
    duplicate_actions: list[str] = field(default_factory=list)
    wrong_events: list[str] = field(default_factory=list)
    unfinished_events: list[str] = field(default_factory=list)
    failed_events: list[str] = field(default_factory=list)
    nmis_sent: int = 0
    nmis_misplaced: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.missing_actions
            or self.duplicate_actions
            or self.wrong_events
            or self.unfinished_events
            or self.failed_events
            or self.nmis_misplaced
            or self.nmis_sent != self.accepted
        )


@dataclass
class Report:
    requests: int
    clients: int
    servers: int
    statuses: dict[int, int]
    server_errors: int
    no_answer: int
    no_answer_errors: list[str]
    seconds: float
    requests_per_second: float
    latency_ms: dict[str, float]
    audit: Audit

    @property
    def ok(self) -> bool:
        return (
            self.server_errors == 0
            and self.no_answer == 0
            and self.statuses.get(202, 0) == self.requests
            and self.audit.ok
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def text(self) -> str:
        return render(self.as_dict())


def render(report: dict[str, Any]) -> str:
    """A report (``Report.as_dict()``) as text."""
    lat = report["latency_ms"]
    audit = report["audit"]
    return "\n".join(
        [
            f"crashlab load: {report['requests']} trigger_crash_dump requests, "
            f"{report['clients']} clients, {report['servers']} fake servers",
            f"  statuses        {dict(sorted(report['statuses'].items()))}",
            f"  5xx             {report['server_errors']}",
            f"  throughput      {report['requests_per_second']:.0f} req/s "
            f"({report['seconds']:.2f} s)",
            f"  latency (202)   p50 {lat['p50']:.1f} ms  p90 {lat['p90']:.1f} ms  "
            f"p99 {lat['p99']:.1f} ms  max {lat['max']:.1f} ms",
            f"  audit           {audit['accepted']} accepted, "
            f"{len(audit['missing_actions'])} without an action, "
            f"{len(audit['duplicate_actions'])} with several, "
            f"{len(audit['unfinished_events'])} events unfinished, "
            f"{len(audit['failed_events'])} failed, "
            f"{audit['nmis_sent']} NMIs sent ({audit['nmis_misplaced']} misplaced)",
            f"  result          {'OK' if report['ok'] else 'FAILED'}",
        ]
    )


def server_id(index: int) -> str:
    """The uuid crashlab derives for the config server ``load-<index>``."""
    return str(uuid.uuid5(ID_NAMESPACE, f"server:load-{index}"))


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest rank: the smallest sample with ``fraction`` of all at or below it."""
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


# The service


@contextmanager
def serve(workdir: Path, servers: int, password: str) -> Iterator[tuple[str, Path]]:
    """``crashlab serve`` with ``servers`` fake servers; yields its URL and the NMI log."""
    nmi_log = workdir / "nmi.log"
    config = {
        "nmi_guard": {"enabled": False},
        "identity": {
            "users": [
                {
                    "name": USER,
                    "password_hash": hash_password(password, rounds=4),
                    "project": PROJECT,
                    "roles": ["member"],
                }
            ]
        },
        "servers": [
            {
                "name": f"load-{i}",
                "project_id": PROJECT,
                "user_id": USER,
                "driver": "fake",
                "driver_info": {"nmi_log": str(nmi_log)},
            }
            for i in range(servers)
        ],
    }
    service = ServeProcess.in_workdir(
        workdir, config, env={"CRASHLAB_SECRET_KEY": ""}, log_level="warning"
    )
    try:
        service.start(timeout=60)
    except EmulatorStartError as exc:
        raise LoadError(str(exc)) from exc
    try:
        yield service.url, nmi_log
    finally:
        service.stop()


def login(url: str, password: str) -> str:
    response = request_token(Credentials(f"{url}/identity/v3", USER, password, PROJECT))
    if response.status_code != 201:
        raise LoadError(f"login failed: {response.status_code} {response.text}")
    return response.headers["X-Subject-Token"]


# The load


async def load(
    url: str, token: str, servers: int, requests: int, clients: int
) -> tuple[list[Sample], float]:
    """Send ``requests`` triggers from ``clients`` workers; the samples and the wall time."""
    headers = {"X-Auth-Token": token, "OpenStack-API-Version": MICROVERSION}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    samples: list[Sample] = []
    next_index = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for index in next_index:
            target = server_id(index % servers)
            started = time.perf_counter()
            try:
                response = await client.post(
                    f"/servers/{target}/action", json={"trigger_crash_dump": None}
                )
                status = response.status_code
                request_id = response.headers.get("x-openstack-request-id", "")
            except httpx.HTTPError as exc:
                status, request_id, error = 0, "", f"{type(exc).__name__}: {exc}"
            else:
                error = ""
            elapsed = time.perf_counter() - started
            samples.append(Sample(target, status, request_id, elapsed, error))

    async with httpx.AsyncClient(
        base_url=f"{url}/v2.1", headers=headers, limits=limits, timeout=60
    ) as client:
        await client.get("/")  # open a connection before the clock starts
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return samples, time.perf_counter() - started


# The audit


def audit(
    url: str, token: str, samples: list[Sample], nmi_log: Path | None, timeout: float = 60
) -> Audit:
    headers = {"X-Auth-Token": token, "OpenStack-API-Version": MICROVERSION}
    accepted = [s for s in samples if s.status == 202]
    result = Audit(accepted=len(accepted))
    by_server: dict[str, list[str]] = {}
    for sample in accepted:
        by_server.setdefault(sample.server_id, []).append(sample.request_id)
    limits = httpx.Limits(max_connections=AUDIT_CLIENTS)
    with (
        httpx.Client(base_url=f"{url}/v2.1", headers=headers, limits=limits, timeout=60) as client,
        ThreadPoolExecutor(AUDIT_CLIENTS) as pool,
    ):

        def check_server(server: str, request_ids: list[str]) -> None:
            listed = client.get(f"/servers/{server}/os-instance-actions")
            recorded = Counter(
                a["request_id"]
                for a in listed.json()["instanceActions"]
                if a["action"] == "trigger_crash_dump"
            )
            for request_id in request_ids:
                if recorded[request_id] == 0:
                    result.missing_actions.append(request_id)
                elif recorded[request_id] > 1:
                    result.duplicate_actions.append(request_id)

        def check_event(server: str, request_id: str) -> None:
            try:
                action = wait_for_action(
                    client.get, server, request_id, timeout=timeout, poll=0.01, max_poll=0.1
                )
            except ClientError:
                return  # reported as a missing action
            except TimeoutError:
                result.unfinished_events.append(request_id)
                return
            events = action["events"]
            if len(events) != 1 or events[0]["event"] != CRASH_DUMP_EVENT:
                result.wrong_events.append(request_id)
            elif events[0]["result"] != "Success":
                result.failed_events.append(f"{request_id}: {events[0]['details']}")

        list(pool.map(check_server, by_server, by_server.values()))
        list(
            pool.map(check_event, [s.server_id for s in accepted], [s.request_id for s in accepted])
        )
    if nmi_log is not None:
        sent = Counter(nmi_log.read_text().split()) if nmi_log.exists() else Counter()
        expected = Counter(s.server_id for s in accepted)
        result.nmis_sent = sum(sent.values())
        result.nmis_misplaced = sum(((sent - expected) + (expected - sent)).values())
    else:
        result.nmis_sent = result.accepted
    return result


def run(requests: int, clients: int, servers: int, workdir: Path) -> Report:
    password = "load-secret"
    with serve(workdir, servers, password) as (url, nmi_log):
        token = login(url, password)
        samples, seconds = asyncio.run(load(url, token, servers, requests, clients))
        checked = audit(url, token, samples, nmi_log)
    statuses = Counter(s.status for s in samples)
    latencies = [s.seconds * 1000 for s in samples if s.status == 202] or [math.nan]
    return Report(
        requests=requests,
        clients=clients,
        servers=servers,
        statuses=dict(statuses),
        server_errors=sum(n for status, n in statuses.items() if status >= 500),
        no_answer=statuses.get(0, 0),
        no_answer_errors=[f"{s.error} after {s.seconds:.2f}s" for s in samples if s.status == 0],
        seconds=round(seconds, 3),
        requests_per_second=round(requests / seconds, 1),
        latency_ms={
            "p50": round(percentile(latencies, 0.50), 2),
            "p90": round(percentile(latencies, 0.90), 2),
            "p99": round(percentile(latencies, 0.99), 2),
            "max": round(max(latencies), 2),
        },
        audit=checked,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scenarios.loadtest", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--servers", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--workdir", type=Path, help="keep the service's files here")
    args = parser.parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run(args.requests, args.clients, args.servers, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="crashlab-load-") as tmp:
            report = run(args.requests, args.clients, args.servers, Path(tmp))
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
