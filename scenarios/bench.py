"""``crashlab bench``: crashlab against the direct tools, side by side, as ratios.

One run measures every comparison of ``scenarios.benchmarks`` on this machine
and prints medians, percentiles and ratios; ``--json`` prints the same as one
object. Times are reported, never asserted. The exit code is 1 only when a
comparison could not run or saw a wrong result (an NMI lost or duplicated, a
failed event); a missed target is reported in ``targets``, not an error.

``--quick`` is the reduced run for smoke tests: fleets of at most 50, 2 IPMI
rounds of 50 per service, the API overhead against libvirt's
``test:///default``, no guests behind virtualbmc, a load of 200 requests, no
kdump scenario. The comparisons are ``scenarios.benchmarks.registry.REGISTRY``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.client import ClientError
from app.process import EmulatorStartError
from scenarios.benchmarks.base import FULL, QUICK, Benchmark, Context, Plan
from scenarios.benchmarks.registry import REGISTRY
from scenarios.benchmarks.service import BenchError, BenchService
from scenarios.progress import Progress

SECTIONS = tuple(benchmark.name for benchmark in REGISTRY)
# What a benchmark may raise when it cannot run or sees a wrong answer; anything
# else is a bug and ends the run.
FAILURES = (BenchError, ClientError, EmulatorStartError, OSError, subprocess.SubprocessError)


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
    """Every comparison in ``sections``; a section that failed is null, its error listed.

    Those that share the long-running service run first, in it; then the
    others, each with its own processes.
    """
    report: dict[str, Any] = {"plan": plan.name, "machine": machine_facts()}
    report.update(dict.fromkeys(SECTIONS))
    errors: list[str] = []
    chosen = [b for b in REGISTRY if b.name in sections]

    def measure(benchmark: Benchmark, context: Context) -> None:
        what = benchmark.step(plan)
        if what is None:
            return
        try:
            with progress.step(what):
                result = benchmark.run(context)
        except FAILURES as exc:
            errors.append(f"{benchmark.name}: {exc}")
            return
        report[benchmark.name] = result
        errors.extend(benchmark.errors(result))

    context = Context(plan, workdir, service=None, report=report)
    with BenchService(workdir / "service") as service:
        context.service = service
        for benchmark in (b for b in chosen if b.shares_service):
            measure(benchmark, context)
        context.loaded_rss_mb = service.rss_mb()
    context.service = None
    for benchmark in (b for b in chosen if not b.shares_service):
        measure(benchmark, context)
    report["targets"] = targets(report)
    report["errors"] = errors
    return report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each measured comparison's targets, each with the figure it was judged on."""
    return [t for b in REGISTRY if report[b.name] for t in b.targets(report[b.name])]


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
    blocks += [b.render(report[b.name]) for b in REGISTRY if report[b.name]]
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


if __name__ == "__main__":
    from app.cli import build_parser, run

    sys.exit(run(build_parser(add_bench_parser), ["bench", *sys.argv[1:]]))
