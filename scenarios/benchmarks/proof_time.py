"""From the 202 to ``verified``, per path, against bare QEMU's NMI to the dump saved.

*crashlab*: ``crashlab scenario kdump --via {libvirt,ipmi,redfish}``, one run
per path per round; its phases come from the API's events, as its ``--json``
report gives them: the NMI's own event, the panic seen (the 202 to
``crashlab_observe_panic``), the dump written (to ``crashlab_collect_dump``)
and the verification (to ``crashlab_verify_dump``).

*bare QEMU*: the same guest under ``qemu-system-x86_64`` alone, the NMI sent
over QMP, timed from the NMI to the crash kernel's "dump saved" line
(``scenario_cost.BareQemu``). It proves nothing; the ratio is what the proof
costs on top of the guest's own crash.
"""

from __future__ import annotations

import json
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

PATHS = ("libvirt", "ipmi", "redfish")
# One round is three kdump runs and a bare one: minutes under TCG.
MAX_ROUNDS = 2
PHASES = ("nmi", "trigger_to_panic", "panic_to_dump", "verify", "trigger_to_verified")


def run(repeats: int, workdir: Path) -> dict[str, Any]:
    image = build_image(ImageVariant.KDUMP)
    accel = detect_accel(image, DEFAULT_LIBVIRT_URI)
    rounds: dict[str, list[dict[str, float]]] = {path: [] for path in PATHS}
    bare: list[float] = []
    for index in range(repeats):
        for path in PATHS:
            rounds[path].append(_proof(path, workdir / f"{path}-{index}"))
        phases = BareQemu(image, accel, workdir / f"bare-{index}").run()
        bare.append(phases["trigger_to_panic"] + phases["panic_to_dump"])
    bare_s = median(bare)
    paths = {}
    for path, measured in rounds.items():
        medians = {key: round(median([r[key] for r in measured]), 2) for key in PHASES}
        paths[path] = {**medians, "ratio": ratio(medians["trigger_to_verified"], bare_s)}
    return {
        "accel": str(accel),
        "rounds": repeats,
        "bare_nmi_to_dump_s": round(bare_s, 2),
        "paths": paths,
    }


def _proof(path: str, output: Path) -> dict[str, float]:
    command = [
        sys.executable, "-m", "scenarios.cli", "scenario", "kdump", "--via", path,
        "--json", "--quiet", "--output", str(output),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        raise BenchError(f"crashlab scenario printed no report: {done.stderr[-500:]}") from None
    if not report.get("ok"):
        raise BenchError(f"crashlab scenario --via {path} failed: {report.get('reason')}")
    seconds = report["seconds"]
    missing = [phase for phase in PHASES if seconds.get(phase) is None]
    if missing:
        raise BenchError(f"crashlab scenario --via {path} reported no {', '.join(missing)}")
    return {phase: float(seconds[phase]) for phase in PHASES}


class ProofTimeBenchmark(Benchmark):
    name = "proof_time"
    description = "the 202 to verified, per path, vs bare QEMU's NMI to the dump saved"
    shares_service = False

    def step(self, plan: Plan) -> str | None:
        if not plan.scenario_repeats:
            return None
        return f"202 to verified over libvirt, IPMI and Redfish, {_rounds(plan)} rounds"

    def run(self, context: Context) -> dict[str, Any]:
        return run(_rounds(context.plan), context.workdir / self.name)

    def render(self, proof: dict[str, Any]) -> str:
        lines = [
            f"202 to verified ({proof['accel']}), median of {proof['rounds']}; "
            f"bare QEMU NMI to dump saved: {proof['bare_nmi_to_dump_s']:.2f} s",
            f"  {'path':<8}" + "".join(f"  {phase:>19}" for phase in PHASES) + "  ratio",
        ]
        for path, phases in proof["paths"].items():
            cells = "".join(f"  {phases[phase]:>17.2f} s" for phase in PHASES)
            lines.append(f"  {path:<8}{cells}  {phases['ratio']}")
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


def _rounds(plan: Plan) -> int:
    return min(plan.scenario_repeats, MAX_ROUNDS)


BENCHMARK = ProofTimeBenchmark()
