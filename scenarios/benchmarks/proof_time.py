"""From the 202 to ``verified``, per path and dump target, against bare QEMU's NMI
to the dump saved.

*crashlab*: ``crashlab scenario kdump --via {libvirt,ipmi,redfish} --target
{disk,ssh}``, one run per row per round; its phases come from the API's
events, as its ``--json`` report gives them: the NMI's own event, the panic
seen (the 202 to ``crashlab_observe_panic``, only where crashlab reads a
console: the disk target), the dump written (to ``crashlab_collect_dump``)
and the verification (to ``crashlab_verify_dump``). The libvirt path runs
with both targets, the same guest otherwise, so ssh against disk is one
ratio; behind a BMC the target is ssh. For the ssh rows the upload's own rate
is the collector's throughput: the gate's dd summary, which the crash kernel
prints on its console ("N bytes copied, S s"), over loopback SSH under TCG.

*bare QEMU*: the same guest under ``qemu-system-x86_64`` alone, the NMI sent
over QMP, timed from the NMI to the crash kernel's "dump saved" line
(``scenario_cost.BareQemu``). It proves nothing; the ratio is what the proof
costs on top of the guest's own crash.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from app.process import REPO_ROOT
from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.guest import detect_accel
from emulators.guest_image import ImageVariant, build_image
from scenarios.benchmarks.base import Benchmark, Context, Plan, target
from scenarios.benchmarks.scenario_cost import BareQemu
from scenarios.benchmarks.service import BenchError
from scenarios.benchmarks.stats import median, ratio

# (row, path, dump target)
ROWS = (
    ("libvirt", "libvirt", "disk"),
    ("libvirt-ssh", "libvirt", "ssh"),
    ("ipmi", "ipmi", "ssh"),
    ("redfish", "redfish", "ssh"),
)
# One round is four kdump runs and a bare one: minutes under TCG.
MAX_ROUNDS = 2
PHASES = ("nmi", "trigger_to_panic", "panic_to_dump", "verify", "trigger_to_verified")
# Without a console to read (the ssh target), there is no "panic seen".
REQUIRED_PHASES = ("nmi", "verify", "trigger_to_verified")
UPLOAD_LINE = re.compile(r"(\d+) bytes copied, ([\d.]+) s")


def run(repeats: int, workdir: Path) -> dict[str, Any]:
    image = build_image(ImageVariant.KDUMP)
    accel = detect_accel(image, DEFAULT_LIBVIRT_URI)
    rounds: dict[str, list[dict[str, float | None]]] = {row: [] for row, _, _ in ROWS}
    bare: list[float] = []
    for index in range(repeats):
        for row, path, dump_target in ROWS:
            rounds[row].append(_proof(path, dump_target, workdir / f"{row}-{index}"))
        phases = BareQemu(image, accel, workdir / f"bare-{index}").run()
        bare.append(phases["trigger_to_panic"] + phases["panic_to_dump"])
    bare_s = median(bare)
    paths: dict[str, dict[str, Any]] = {}
    totals: dict[str, float] = {}
    for (row, path, dump_target), measured in zip(ROWS, rounds.values(), strict=True):
        medians = {key: _median_of(measured, key) for key in (*PHASES, "upload_mb_s")}
        total = medians["trigger_to_verified"]
        assert total is not None, "a required phase"
        totals[row] = total
        paths[row] = {"via": path, "target": dump_target, **medians, "ratio": ratio(total, bare_s)}
    disk, ssh = totals["libvirt"], totals["libvirt-ssh"]
    return {
        "accel": str(accel),
        "rounds": repeats,
        "bare_nmi_to_dump_s": round(bare_s, 2),
        "paths": paths,
        "ssh_vs_disk": ratio(ssh, disk),
    }


def _median_of(measured: list[dict[str, float | None]], key: str) -> float | None:
    values = [value for r in measured if (value := r.get(key)) is not None]
    return round(median(values), 2) if values else None


def _proof(path: str, dump_target: str, output: Path) -> dict[str, float | None]:
    command = [
        sys.executable, "-m", "scenarios.cli", "scenario", "kdump", "--via", path,
        "--target", dump_target, "--json", "--quiet", "--output", str(output),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        raise BenchError(f"crashlab scenario printed no report: {done.stderr[-500:]}") from None
    if not report.get("ok"):
        raise BenchError(f"crashlab scenario --via {path} failed: {report.get('reason')}")
    seconds = report["seconds"]
    missing = [phase for phase in REQUIRED_PHASES if seconds.get(phase) is None]
    if missing:
        raise BenchError(f"crashlab scenario --via {path} reported no {', '.join(missing)}")
    measured: dict[str, float | None] = {
        phase: None if seconds.get(phase) is None else float(seconds[phase]) for phase in PHASES
    }
    measured["upload_mb_s"] = _upload_rate(output / "console.log") if dump_target == "ssh" else None
    return measured


def _upload_rate(console: Path) -> float | None:
    """The collector's rate for this upload, in MB/s, from the gate's dd summary."""
    found = UPLOAD_LINE.findall(console.read_text(errors="replace")) if console.exists() else []
    if not found:
        return None
    copied, seconds = found[-1]
    return int(copied) / 1e6 / float(seconds)


class ProofTimeBenchmark(Benchmark):
    name = "proof_time"
    description = "the 202 to verified, per path, vs bare QEMU's NMI to the dump saved"
    shares_service = False

    def step(self, plan: Plan) -> str | None:
        if not plan.scenario_repeats:
            return None
        return (
            "202 to verified over libvirt (disk and ssh), IPMI and Redfish (ssh), "
            f"{_rounds(plan)} rounds"
        )

    def run(self, context: Context) -> dict[str, Any]:
        return run(_rounds(context.plan), context.workdir / self.name)

    def render(self, proof: dict[str, Any]) -> str:
        lines = [
            f"202 to verified ({proof['accel']}), median of {proof['rounds']}; "
            f"bare QEMU NMI to dump saved: {proof['bare_nmi_to_dump_s']:.2f} s",
            f"  {'path':<12}" + "".join(f"  {phase:>19}" for phase in PHASES) + "  ratio  MB/s",
        ]
        for path, phases in proof["paths"].items():
            cells = "".join(f"  {_cell(phases[phase]):>19}" for phase in PHASES)
            lines.append(f"  {path:<12}{cells}  {phases['ratio']}  {phases['upload_mb_s'] or '-'}")
        lines.append(f"  ssh against disk, same guest over libvirt: {proof['ssh_vs_disk']}x")
        return "\n".join(lines)

    def targets(self, proof: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            target(
                f"{path}: 202 to verified <= 2x bare QEMU's NMI to dump",
                phases["ratio"] <= 2.0,
                f"{phases['ratio']}x ({phases['trigger_to_verified']} s)",
            )
            for path, phases in proof["paths"].items()
        ]


def _cell(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def _rounds(plan: Plan) -> int:
    return min(plan.scenario_repeats, MAX_ROUNDS)


BENCHMARK = ProofTimeBenchmark()
