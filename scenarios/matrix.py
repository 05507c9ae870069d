"""``crashlab scenario all``: every path with kdump, the other two variants over libvirt,
then the scenarios before and beyond the NMI (scenarios/readiness_capture.py)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from app.process import EmulatorStartError
from emulators.guest_image import ImageVariant
from scenarios.api import LocalService, ScenarioAPI
from scenarios.kdump import ScenarioResult, Verdict, default_output, run_kdump_scenario
from scenarios.progress import Progress
from scenarios.readiness_capture import run_scenario
from scenarios.via import Via

MATRIX: tuple[tuple[Via, ImageVariant], ...] = (
    (Via.LIBVIRT, ImageVariant.KDUMP),
    (Via.IPMI, ImageVariant.KDUMP),
    (Via.REDFISH, ImageVariant.KDUMP),
    (Via.LIBVIRT, ImageVariant.NO_KDUMP),
    (Via.LIBVIRT, ImageVariant.NMI_IGNORED),
)
# (scenario, variant): preflight boots every variant itself.
BEYOND_NMI: tuple[tuple[str, ImageVariant], ...] = (
    ("preflight", ImageVariant.KDUMP),
    ("guarded", ImageVariant.NMI_IGNORED),
    ("capture", ImageVariant.NO_KDUMP),
)


def run_matrix(
    *,
    api: ScenarioAPI | None = None,
    output: Path | None = None,
    progress: Progress | None = None,
) -> list[ScenarioResult]:
    """Run ``MATRIX`` one scenario after another against one API service."""
    output = output or default_output("all")
    progress = progress or Progress()
    with ExitStack() as stack:
        if api is None:
            try:
                with progress.step("starting crashlab serve"):
                    service = stack.enter_context(LocalService(output / "service"))
            except EmulatorStartError as exc:
                return [_not_run(via, variant, str(exc)) for via, variant in MATRIX]
            api = service.api()
            stack.callback(api.close)
        results = []
        count = len(MATRIX) + len(BEYOND_NMI)
        for index, (via, variant) in enumerate(MATRIX, start=1):
            progress.prefix = ""
            progress.note(f"[{index}/{count}] {via} / {variant}")
            progress.prefix = "  "
            result = run_kdump_scenario(
                via, variant, api=api, output=output / f"{via}-{variant}", progress=progress
            )
            progress.note(f"verdict: {result.verdict}" + (" (expected)" if result.ok else ""))
            results.append(result)
        for index, (scenario, variant) in enumerate(BEYOND_NMI, start=len(MATRIX) + 1):
            progress.prefix = ""
            progress.note(f"[{index}/{count}] {scenario} / {variant}")
            progress.prefix = "  "
            result = run_scenario(
                scenario,
                variant,
                api=api,
                output=output / f"{scenario}-{variant}",
                progress=progress,
            )
            progress.note(f"verdict: {result.verdict}" + (" (expected)" if result.ok else ""))
            results.append(result)
        progress.prefix = ""
    return results


def _not_run(via: Via, variant: ImageVariant, reason: str) -> ScenarioResult:
    result = ScenarioResult(via, variant)
    result.verdict, result.reason = Verdict.FAILED, reason
    return result
