"""A host-side memory capture through the API, against ``virsh dump`` of the same guest.

*crashlab*: ``capture_memory_dump`` on a no-kdump guest registered over
libvirt, timed from the 202 to ``verified`` (the capture, then reading its
VMCOREINFO and sha256), and the capture event alone.

*virsh*: ``virsh dump --memory-only --format kdump-zlib`` of the same guest,
what an operator types by hand on the hypervisor.

Per guest memory size (256, 512 and 768 MiB): seconds, bytes, and the ratio of
crashlab's 202 to verified against virsh's dump.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from app.client import CAPTURE_RUNNING_STATES
from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.guest import Guest
from emulators.guest_image import ImageVariant, build_image
from scenarios.api import LocalService, ScenarioAPI
from scenarios.benchmarks.base import Benchmark, Context, Plan, target
from scenarios.benchmarks.service import BenchError
from scenarios.benchmarks.stats import median, ratio
from scenarios.readiness_capture import fresh_readiness

MEMORY_MIB = (256, 512, 768)
MAX_ROUNDS = 2
BOOT_TIMEOUT = 180.0
CAPTURE_TIMEOUT = 300.0


def run(repeats: int, workdir: Path) -> dict[str, Any]:
    image = build_image(ImageVariant.NO_KDUMP)
    sizes = {}
    with ExitStack() as stack:
        service = stack.enter_context(LocalService(workdir / "service"))
        api = service.api()
        stack.callback(api.close)
        api.login()
        for memory in MEMORY_MIB:
            with Guest(image, memory_mib=memory) as guest:
                guest.wait_ready(BOOT_TIMEOUT)
                server_id = api.register(
                    guest.name, "libvirt", {"uri": guest.uri, "domain": guest.name}
                )
                fresh_readiness(api, server_id)
                crashlab = [_through_api(api, server_id) for _ in range(repeats)]
                virsh = [_virsh_dump(guest, workdir) for _ in range(repeats)]
                api.unregister(server_id)
            sizes[str(memory)] = _summary(crashlab, virsh)
    return {"rounds": repeats, "memory_mib": sizes}


def _through_api(api: ScenarioAPI, server_id: str) -> dict[str, float]:
    started = time.monotonic()
    dump = api.admin.capture_memory_dump(server_id)
    while dump["state"] in CAPTURE_RUNNING_STATES:
        if time.monotonic() - started > CAPTURE_TIMEOUT:
            raise BenchError(f"the capture {dump['id']} did not end in {CAPTURE_TIMEOUT:g} s")
        time.sleep(0.05)
        dump = api.admin.get_crash_dump(server_id, dump["id"])
    verified = time.monotonic() - started
    if dump["state"] != "verified":
        raise BenchError(f"the capture ended {dump['state']}: {dump['error']}")
    action = api.admin.get_action(server_id, dump["request_id"])
    capture_event = action["events"][0]
    return {
        "to_verified_s": verified,
        "capture_s": _seconds(capture_event["start_time"], capture_event["finish_time"]),
        "bytes": float(dump["vmcore"]["bytes"]),
    }


def _virsh_dump(guest: Guest, workdir: Path) -> dict[str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        out = Path(tmp) / "vmcore"
        started = time.monotonic()
        subprocess.run(
            ["virsh", "-c", DEFAULT_LIBVIRT_URI, "dump", "--memory-only", "--format",
             "kdump-zlib", guest.name, str(out)],
            check=True, capture_output=True,
        )  # fmt: skip
        return {"dump_s": time.monotonic() - started, "bytes": float(out.stat().st_size)}


def _summary(crashlab: list[dict[str, float]], virsh: list[dict[str, float]]) -> dict[str, Any]:
    to_verified = median([r["to_verified_s"] for r in crashlab])
    virsh_s = median([r["dump_s"] for r in virsh])
    return {
        "crashlab_to_verified_s": round(to_verified, 2),
        "crashlab_capture_s": round(median([r["capture_s"] for r in crashlab]), 2),
        "crashlab_bytes": int(median([r["bytes"] for r in crashlab])),
        "virsh_dump_s": round(virsh_s, 2),
        "virsh_bytes": int(median([r["bytes"] for r in virsh])),
        "ratio": ratio(to_verified, virsh_s),
    }


def _seconds(start: str, finish: str) -> float:
    return (dt.datetime.fromisoformat(finish) - dt.datetime.fromisoformat(start)).total_seconds()


class CaptureTimeBenchmark(Benchmark):
    name = "capture_time"
    description = "a memory capture through the API to verified, vs virsh dump, per memory size"
    shares_service = False

    def step(self, plan: Plan) -> str | None:
        if not plan.guest:
            return None
        return f"memory capture at {', '.join(map(str, MEMORY_MIB))} MiB, {_rounds(plan)} rounds"

    def run(self, context: Context) -> dict[str, Any]:
        return run(_rounds(context.plan), context.workdir / self.name)

    def render(self, result: dict[str, Any]) -> str:
        lines = [
            f"memory capture, median of {result['rounds']}: crashlab (202 to verified; the "
            "capture event) vs virsh dump --memory-only --format kdump-zlib",
            f"  {'memory':>8}  {'crashlab':>10}  {'capture':>9}  {'bytes':>11}"
            f"  {'virsh':>8}  {'bytes':>11}  ratio",
        ]
        for memory, row in result["memory_mib"].items():
            lines.append(
                f"  {memory + ' MiB':>8}  {row['crashlab_to_verified_s']:>8.2f} s"
                f"  {row['crashlab_capture_s']:>7.2f} s  {row['crashlab_bytes']:>11}"
                f"  {row['virsh_dump_s']:>6.2f} s  {row['virsh_bytes']:>11}  {row['ratio']}"
            )
        return "\n".join(lines)

    def targets(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            target(
                f"{memory} MiB: capture to verified <= 1.5x virsh dump",
                row["ratio"] <= 1.5,
                f"{row['ratio']}x ({row['crashlab_to_verified_s']} s)",
            )
            for memory, row in result["memory_mib"].items()
        ]


def _rounds(plan: Plan) -> int:
    return max(1, min(plan.scenario_repeats, MAX_ROUNDS))


BENCHMARK = CaptureTimeBenchmark()
