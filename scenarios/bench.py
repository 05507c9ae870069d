"""``crashlab bench``: crashlab against the direct tools, side by side, as ratios.

One run measures every comparison of ``scenarios.benchmarks`` on this machine
and prints medians, percentiles and ratios; ``--json`` prints the same as one
object. Times are reported, never asserted. The exit code is 1 only when a
comparison could not run or saw a wrong result (an NMI lost or duplicated, a
failed event); a missed target is reported in ``targets``, not an error.

``--quick`` is the reduced run for smoke tests: fleets of at most 50, 2 IPMI
rounds of 50 per service, the API overhead against libvirt's
``test:///default``, no guests behind virtualbmc, no kdump scenario.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scenarios.benchmarks import (
    api_overhead,
    footprint,
    ipmi_fleet,
    noisy_neighbour,
    redfish_fleet,
    scenario_cost,
    vbmc_guests,
)
from scenarios.benchmarks.service import BenchError, BenchService
from scenarios.progress import Progress

SECTIONS = (
    "api_overhead",
    "ipmi_fleet",
    "redfish_fleet",
    "ipmi_rounds",
    "vbmc_rounds",
    "noisy_neighbour",
    "scenario",
    "footprint",
)


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
)


def add_bench_parser(commands: Any) -> None:
    """Add ``bench`` to the ``crashlab`` subcommands."""
    bench = commands.add_parser(
        "bench", help="benchmark crashlab against virsh, ipmitool, curl and bare QEMU"
    )
    bench.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    bench.add_argument(
        "--quick", action="store_true", help="fleets up to 50, no kdump scenario (under a minute)"
    )
    bench.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only this comparison (repeatable)"
    )
    bench.add_argument("--output", type=Path, help="keep the logs here (default: a temporary dir)")
    bench.add_argument("--quiet", action="store_true", help="no progress on stderr")
    bench.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    # SIGTERM unwinds like Ctrl-C, so the service, simulators and guests are stopped.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    plan = QUICK if args.quick else FULL
    progress = Progress(quiet=args.quiet)
    sections = tuple(args.only or SECTIONS)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        report = run_bench(plan, sections, args.output, progress)
    else:
        with tempfile.TemporaryDirectory(prefix="crashlab-bench-") as workdir:
            report = run_bench(plan, sections, Path(workdir), progress)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if not report["errors"] else 1


def run_bench(
    plan: Plan, sections: tuple[str, ...], workdir: Path, progress: Progress
) -> dict[str, Any]:
    """Every comparison in ``sections``; a section that failed is null, its error listed."""
    report: dict[str, Any] = {"plan": plan.name, "machine": machine_facts()}
    report.update(dict.fromkeys(SECTIONS))
    errors: list[str] = []

    def measure(name: str, what: str, call: Callable[[], Any]) -> Any:
        try:
            with progress.step(what):
                return call()
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{name}: {exc}")
            return None

    with BenchService(workdir / "service") as service:
        if "api_overhead" in sections:
            report["api_overhead"] = measure(
                "api_overhead",
                f"API overhead, {plan.samples} triggers",
                lambda: api_overhead.run(
                    service, plan.samples, guest=plan.guest, workdir=workdir / "api"
                ),
            )
        for name, module in (("ipmi_fleet", ipmi_fleet), ("redfish_fleet", redfish_fleet)):
            if name in sections:
                report[name] = measure(
                    name,
                    f"{name.replace('_', ' ')}, N = {', '.join(map(str, plan.sizes))}",
                    functools.partial(
                        module.run, service, plan.sizes, plan.repeats, workdir / name
                    ),
                )
                errors += _wrong_deliveries(name, report[name])
        if "ipmi_rounds" in sections:
            report["ipmi_rounds"] = measure(
                "ipmi_rounds",
                f"IPMI rounds, {plan.rounds} x {plan.rounds_n} BMCs here, then in a fresh service",
                lambda: ipmi_fleet.run_rounds(
                    service, plan.rounds_n, plan.rounds, workdir / "ipmi_rounds"
                ),
            )
            errors += _wrong_rounds("ipmi_rounds", report["ipmi_rounds"])
        if "vbmc_rounds" in sections and plan.vbmc_rounds:
            report["vbmc_rounds"] = measure(
                "vbmc_rounds",
                f"virtualbmc rounds, {plan.vbmc_rounds} x {vbmc_guests.GUESTS} booted guests",
                lambda: vbmc_guests.run(
                    service, vbmc_guests.GUESTS, plan.vbmc_rounds, workdir / "vbmc_rounds"
                ),
            )
            errors += _wrong_rounds("vbmc_rounds", report["vbmc_rounds"])
        if "noisy_neighbour" in sections:
            report["noisy_neighbour"] = measure(
                "noisy_neighbour",
                f"noisy neighbour, {plan.neighbour_s:g} s alone then flooded",
                lambda: noisy_neighbour.run(service, plan.neighbour_s),
            )
        loaded_rss_mb = service.rss_mb()
    if "footprint" in sections:
        started = measure(
            "footprint", "start-up", lambda: footprint.startup(plan.starts, workdir / "starts")
        )
        if started is not None:
            startup_s, idle_rss_mb = started
            report["footprint"] = {
                "idle_rss_mb": idle_rss_mb,
                "loaded_rss_mb": loaded_rss_mb,
                "startup_s": startup_s,
                "starts": plan.starts,
                "load": _load_description(report),
            }
    if "scenario" in sections and plan.scenario_repeats:
        report["scenario"] = measure(
            "scenario",
            f"kdump scenario vs bare QEMU, {plan.scenario_repeats} rounds",
            lambda: scenario_cost.run(plan.scenario_repeats, workdir / "scenario"),
        )
    report["targets"] = targets(report)
    report["errors"] = errors
    return report


def _wrong_deliveries(name: str, entries: list[dict[str, Any]] | None) -> list[str]:
    return [
        f"{name}: N={e['n']}: NMIs not delivered exactly once "
        f"(crashlab {e['nmis_received']}, baseline {e['baseline_nmis_received']}, "
        f"failures {e['failures']})"
        for e in entries or []
        if not e["exact"]
    ]


def _wrong_rounds(name: str, serves: dict[str, dict[str, Any]] | None) -> list[str]:
    return [
        f"{name}: {serve}: round {index}: NMIs not delivered exactly once "
        f"(NMIs per BMC {r['nmis_per_bmc']}, {r['errors']} Error events, "
        f"failures {r['failures']})"
        for serve, result in (serves or {}).items()
        for index, r in enumerate(result["rounds"], 1)
        if not r["exact"]
    ]


def _load_description(report: dict[str, Any]) -> str:
    """What the service had done when ``loaded_rss_mb`` was read."""
    triggers = 0
    if report["api_overhead"]:
        triggers += report["api_overhead"]["samples"] + api_overhead.WARMUP
    for name in ("ipmi_fleet", "redfish_fleet"):
        triggers += sum(e["n"] * e["rounds"] for e in report[name] or [])
    for name in ("ipmi_rounds", "vbmc_rounds"):
        if report[name]:
            long_running = report[name]["long_running"]
            triggers += long_running["n"] * len(long_running["rounds"])
    return f"after {triggers} trigger_crash_dump calls (API overhead, fleets, rounds)"


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure it was judged on; null if not measured."""
    found: list[dict[str, Any]] = []
    api = report["api_overhead"]
    if api:
        found.append(
            _target("202 p50 <= 5 ms", api["accept_p50_ms"] <= 5, f"{api['accept_p50_ms']} ms")
        )
        limit = 1.5 * api["direct_p50_ms"] + 5
        found.append(_target(
            "POST -> finished event p50 <= 1.5 x direct injectNMI p50 + 5 ms",
            api["event_p50_ms"] <= limit,
            f"{api['event_p50_ms']} ms vs limit {limit:.3f} ms",
        ))  # fmt: skip
    for entry in report["ipmi_fleet"] or []:
        if entry["n"] == 200:
            found.append(_target(
                "200 BMCs: >= 20x faster than the ipmitool loop, exactly 200 NMIs",
                entry["ratio"] >= 20 and entry["exact"] and entry["nmis_received"] == 200,
                f"{entry['ratio']}x, {entry['nmis_received']} NMIs, exact={entry['exact']}",
            ))  # fmt: skip
    for name, what in (("ipmi_rounds", "IPMI rounds"), ("vbmc_rounds", "virtualbmc rounds")):
        for serve, result in (report[name] or {}).items():
            found.append(_target(
                f"{what} ({serve.replace('_', '-')} service): 0 errors, one NMI per BMC per round",
                result["exact"] and result["errors"] == 0,
                f"{len(result['rounds'])} rounds of {result['n']}, {result['errors']} errors",
            ))  # fmt: skip
    neighbour = report["noisy_neighbour"]
    if neighbour:
        found.append(_target(
            "another tenant's p99 under a hung-BMC flood within 2x of its p99 alone",
            max(neighbour["get_p99_ratio"], neighbour["trigger_to_event_p99_ratio"]) <= 2,
            f"GET {neighbour['get_p99_ratio']}x, trigger to event "
            f"{neighbour['trigger_to_event_p99_ratio']}x",
        ))  # fmt: skip
    scenario = report["scenario"]
    if scenario:
        found.append(_target(
            "kdump scenario <= 1.3x bare QEMU",
            scenario["ratio"] <= 1.3,
            f"{scenario['ratio']}x ({scenario['crashlab_s']} s vs {scenario['bare_qemu_s']} s)",
        ))  # fmt: skip
    return found


def _target(name: str, met: bool, figure: str) -> dict[str, Any]:
    return {"target": name, "met": bool(met), "figure": figure}


def _render_neighbour(result: dict[str, Any]) -> str:
    lines = [
        f"Noisy neighbour ({result['flood_clients']} clients, {result['flood_requests']} "
        "requests at a hung BMC)"
    ]
    for kind, what in (("get", "GET"), ("trigger_to_event", "trigger to event")):
        lines.append(
            f"  {what}: p50 {result[f'{kind}_alone_p50_ms']} -> {result[f'{kind}_flooded_p50_ms']}"
            f" ms, p99 {result[f'{kind}_alone_p99_ms']} -> {result[f'{kind}_flooded_p99_ms']} ms"
            f" ({result[f'{kind}_p99_ratio']}x)"
        )
    return "\n".join(lines)


def machine_facts() -> dict[str, Any]:
    """Where the figures came from."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu[0] if qemu else None,
        "kvm_device": os.access("/dev/kvm", os.R_OK | os.W_OK),
    }


def render(report: dict[str, Any]) -> str:
    """The report as text: one block per comparison, then the targets."""
    blocks = [_render_machine(report)]
    blocks += [
        render_block(report[name])
        for name, render_block in (
            ("api_overhead", _render_api),
            ("ipmi_fleet", lambda e: _render_fleet("IPMI fleet", "ipmitool", "ipmitool_s", e)),
            ("redfish_fleet", lambda e: _render_fleet("Redfish fleet", "curl", "curl_s", e)),
            ("ipmi_rounds", lambda r: _render_rounds("IPMI rounds (simulated BMCs)", r)),
            ("vbmc_rounds", lambda r: _render_rounds("virtualbmc rounds (NMIs on consoles)", r)),
            ("noisy_neighbour", _render_neighbour),
            ("scenario", _render_scenario),
            ("footprint", _render_footprint),
        )
        if report[name]
    ]
    lines = ["Targets"] + [
        f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['figure']}"
        for t in report["targets"]
    ]
    blocks.append("\n".join(lines))
    if report["errors"]:
        blocks.append("\n".join(["Errors"] + [f"  {e}" for e in report["errors"]]))
    return "\n\n".join(blocks)


def _render_machine(report: dict[str, Any]) -> str:
    m = report["machine"]
    accel = (report["scenario"] or {}).get("accel") or (
        "KVM usable" if m["kvm_device"] else "no KVM (TCG)"
    )
    return (
        f"crashlab bench ({report['plan']}): {m['nproc']} x {m['cpu_model']}, "
        f"Linux {m['kernel']}, {m['qemu']}, guests: {accel}"
    )


def _render_api(api: dict[str, Any]) -> str:
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


def _render_fleet(title: str, tool: str, key: str, entries: list[dict[str, Any]]) -> str:
    rounds = entries[0]["rounds"] if entries else 0
    lines = [
        f"{title} (crashlab, N calls at once, vs a sequential {tool} loop; median of {rounds})",
        f"  {'N':>5}  {'crashlab':>10}  {tool:>10}  {'ratio':>8}  NMIs received (exact)",
    ]
    for e in entries:
        lines.append(
            f"  {e['n']:>5}  {e['crashlab_s']:>8.3f} s  {e[key]:>8.3f} s  {e['ratio']:>7}x  "
            f"{e['nmis_received']} / {e['baseline_nmis_received']} "
            f"({'yes' if e['exact'] else 'NO'})"
        )
    return "\n".join(lines)


def _render_rounds(title: str, serves: dict[str, dict[str, Any]]) -> str:
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


def _render_scenario(scenario: dict[str, Any]) -> str:
    ours, bare = scenario["phases"]["crashlab"], scenario["phases"]["bare_qemu"]
    lines = [
        f"kdump scenario (--via libvirt, {scenario['accel']}) vs bare QEMU + QMP inject-nmi; "
        f"median of {scenario['rounds']}",
        f"  {'phase':<18}  {'crashlab':>9}  {'bare QEMU':>9}",
    ]
    for phase in scenario_cost.PHASES:
        lines.append(f"  {phase:<18}  {ours[phase]:>7.2f} s  {bare[phase]:>7.2f} s")
    lines.append(f"  ratio {scenario['ratio']}")
    return "\n".join(lines)


def _render_footprint(fp: dict[str, Any]) -> str:
    return "\n".join([
        "crashlab serve footprint",
        f"  start-up to first 200 on GET /  {fp['startup_s']:.3f} s (median of {fp['starts']})",
        f"  RSS idle                        {fp['idle_rss_mb']:.1f} MiB",
        f"  RSS loaded                      {fp['loaded_rss_mb']:.1f} MiB ({fp['load']})",
    ])  # fmt: skip


if __name__ == "__main__":
    from app.cli import build_parser, run

    sys.exit(run(build_parser(add_bench_parser), ["bench", *sys.argv[1:]]))
