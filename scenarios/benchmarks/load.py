"""The load run (scenarios/loadtest.py) as a benchmark: many clients, then the audit.

It runs in a service of its own, with its fake servers in the config. The
audit's checks (no 5xx; one action, one finished event and one NMI per 202)
are the target; a failed check is a wrong result.
"""

from __future__ import annotations

from typing import Any

from scenarios import loadtest
from scenarios.benchmarks.base import Benchmark, Context, Plan, target
from scenarios.benchmarks.service import BenchError


class LoadBenchmark(Benchmark):
    name = "load"
    description = "many clients trigger crash dumps on many fake servers; the record is audited"
    shares_service = False

    def step(self, plan: Plan) -> str:
        return (
            f"load, {plan.load_requests} requests from {plan.load_clients} clients "
            f"on {plan.load_servers} servers"
        )

    def run(self, context: Context) -> dict[str, Any]:
        plan = context.plan
        workdir = context.workdir / self.name
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            report = loadtest.run(plan.load_requests, plan.load_clients, plan.load_servers, workdir)
        except loadtest.LoadError as exc:
            raise BenchError(str(exc)) from exc
        return report.as_dict()

    def render(self, report: dict[str, Any]) -> str:
        return loadtest.render(report)

    def targets(self, report: dict[str, Any]) -> list[dict[str, Any]]:
        latency = report["latency_ms"]
        return [
            target(
                "load: no 5xx; one action, one finished event and one NMI per 202",
                report["ok"],
                f"{report['requests']} requests, {report['requests_per_second']} req/s, "
                f"202 p99 {latency['p99']} ms",
            )
        ]

    def errors(self, report: dict[str, Any]) -> list[str]:
        if report["ok"]:
            return []
        audit = report["audit"]
        return [
            f"load: {report['server_errors']} 5xx, {report['no_answer']} unanswered, "
            f"{len(audit['missing_actions'])} without an action, "
            f"{len(audit['duplicate_actions'])} with several, "
            f"{len(audit['unfinished_events'])} events unfinished, "
            f"{len(audit['failed_events'])} failed, {audit['nmis_sent']} NMIs sent "
            f"for {audit['accepted']} accepted ({audit['nmis_misplaced']} misplaced)"
        ]


BENCHMARK = LoadBenchmark()
