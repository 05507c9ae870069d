"""``crashlab doctor``: is this host ready to boot crashlab's guests and emulators?

Each check gives ``ok``, ``warn`` or ``fail``, a measured figure where one
applies, and a one-line fix. A ``fail`` means a scenario would fail or crawl
here; a ``warn`` (TCG chosen because KVM guests do not boot, little disk) does
not stop one.

The checks that matter most on a new host are the libvirt ones. Without udev,
``/dev/kvm`` stays ``root:root 0600``; libvirt then finds that QEMU's user
cannot use it, treats its QEMU capabilities cache as stale on every call and
re-probes QEMU: each define takes 30-100 s instead of 30 ms, and every later
step (sushy-tools' first GET defines the domain too) runs into its timeout.
``scripts/host`` applies Debian's udev rules by hand.

``CHEAP_CHECKS`` is what ``crashlab scenario`` runs before it boots anything;
on a ready host it takes well under a second.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import libvirt

from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.accel import KVM_DEVICE, Accel, cached_verdict, kvm_access_problem, qemu_user
from emulators.guest_image import ImageVariant, cache_root, image_dir, resolve_inputs

REPO_ROOT = Path(__file__).resolve().parent.parent
APT_PACKAGES_FILE = REPO_ROOT / "scripts" / "apt-packages"
CAPABILITIES_CACHE = Path("/var/cache/libvirt/qemu/capabilities")
# A define on a ready host takes about 30 ms; a capabilities re-probe 30-100 s.
DEFINE_FAIL_SECONDS = 2.0
DEFINE_PATIENCE_SECONDS = 15.0
DOCTOR_DOMAIN_PREFIX = "crashlab-doctor-"
DISK_FAIL_GIB = 1.0
DISK_WARN_GIB = 4.0
VENV_MODULES = ("fastapi", "uvicorn", "libvirt", "pyghmi", "sushy", "virtualbmc", "sushy_tools")
KVM_FIX = "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm, as Debian's udev rule does (scripts/host)"


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's table."""

    name: str
    status: Status
    detail: str
    figure: str | None = None
    fix: str | None = None


def check_libvirtd() -> Check:
    try:
        conn = libvirt.open(DEFAULT_LIBVIRT_URI)
    except libvirt.libvirtError as exc:
        return Check(
            "libvirtd", Status.FAIL, f"{DEFAULT_LIBVIRT_URI} does not answer: {_first_line(exc)}",
            fix="scripts/libvirtd (starts virtlogd and libvirtd)",
        )  # fmt: skip
    try:
        version = conn.getLibVersion()
    finally:
        conn.close()
    major, minor, micro = version // 1_000_000, version // 1000 % 1000, version % 1000
    return Check(
        "libvirtd", Status.OK, f"{DEFAULT_LIBVIRT_URI} answers", f"libvirt {major}.{minor}.{micro}"
    )


def check_define_round_trip() -> Check:
    """Define and undefine a throwaway domain, timed: the capabilities re-probe shows here."""
    name = "define round trip"
    before = _cache_mtimes()
    seconds, error = _time_define_round_trip(DEFINE_PATIENCE_SECONDS)
    if error is not None:
        return Check(name, Status.FAIL, f"libvirt refused: {error}", fix="scripts/libvirtd")
    rewritten = _cache_mtimes() != before
    if seconds is None:
        return Check(
            name, Status.FAIL,
            f"defineXML did not return within {DEFINE_PATIENCE_SECONDS:.0f}s: {_reprobe_cause()}",
            f"> {DEFINE_PATIENCE_SECONDS:.0f} s", KVM_FIX,
        )  # fmt: skip
    figure = f"{seconds * 1000:.0f} ms"
    if seconds > DEFINE_FAIL_SECONDS:
        cause = _reprobe_cause() if rewritten or kvm_access_problem() else "libvirtd is slow"
        return Check(name, Status.FAIL, f"slower than {DEFINE_FAIL_SECONDS:.0f}s: {cause}",
                     figure, KVM_FIX)  # fmt: skip
    return Check(name, Status.OK, "define and undefine of a throwaway domain", figure)


def check_kvm() -> Check:
    problem = kvm_access_problem()
    if problem is not None and KVM_DEVICE.exists():
        return Check(
            "kvm", Status.FAIL,
            f"{problem}; libvirt then re-probes QEMU on every define", fix=KVM_FIX,
        )  # fmt: skip
    if problem is not None:
        return Check("kvm", Status.WARN, f"{problem}: guests run under TCG (slower, works)")
    verdict = cached_verdict(DEFAULT_LIBVIRT_URI)
    if verdict is Accel.TCG:
        return Check(
            "kvm", Status.WARN,
            f"/dev/kvm usable by {qemu_user()}, but a KVM guest did not boot here: TCG is chosen",
            fix=f"none needed; rm {cache_root() / 'accel.json'} to probe again",
        )  # fmt: skip
    if verdict is Accel.KVM:
        return Check("kvm", Status.OK, f"/dev/kvm usable by {qemu_user()}; KVM guests boot")
    return Check(
        "kvm", Status.OK,
        f"/dev/kvm usable by {qemu_user()}; the first scenario probes whether KVM guests boot",
    )  # fmt: skip


def check_apt_packages() -> Check:
    try:
        packages = APT_PACKAGES_FILE.read_text().split()
    except OSError:
        return Check("apt packages", Status.WARN, f"no {APT_PACKAGES_FILE} to check against")
    missing = [p for p in packages if not _dpkg_installed(p)]
    if missing:
        return Check("apt packages", Status.FAIL, "missing: " + " ".join(missing),
                     f"{len(missing)} of {len(packages)}", "scripts/install")  # fmt: skip
    return Check("apt packages", Status.OK, "all installed", f"{len(packages)} packages")


def check_venv() -> Check:
    in_venv = sys.prefix != sys.base_prefix
    missing = [m for m in VENV_MODULES if importlib.util.find_spec(m) is None]
    if missing or not in_venv:
        what = "missing: " + " ".join(missing) if missing else "crashlab runs outside a venv"
        return Check("venv", Status.FAIL if missing else Status.WARN, what, fix="scripts/install")
    return Check("venv", Status.OK, f"{sys.prefix}", f"Python {sys.version.split()[0]}")


def check_guest_images() -> Check:
    cache = cache_root()
    try:
        wanted = [resolve_inputs(variant) for variant in ImageVariant]
    except (OSError, RuntimeError, ValueError) as exc:
        return Check("guest images", Status.FAIL, f"cannot resolve the inputs: {_first_line(exc)}",
                     fix="scripts/install")  # fmt: skip
    missing = [
        i.variant.value for i in wanted if not (image_dir(i, cache) / "manifest.json").exists()
    ]
    if missing:
        return Check(
            "guest images", Status.WARN, f"not built yet: {' '.join(missing)} (built on first use)",
            fix="crashlab image build",
        )  # fmt: skip
    return Check(
        "guest images", Status.OK, f"cached in {cache / 'images'}", f"{len(wanted)} variants"
    )


def check_disk_space() -> Check:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    free_gib = shutil.disk_usage(root).free / 2**30
    figure = f"{free_gib:.1f} GiB free"
    fix = f"free space on the filesystem of {root}, or set CRASHLAB_CACHE elsewhere"
    if free_gib < DISK_FAIL_GIB:
        return Check("disk space", Status.FAIL, f"too little for vmcores in {root}", figure, fix)
    if free_gib < DISK_WARN_GIB:
        return Check("disk space", Status.WARN, f"tight for vmcores in {root}", figure, fix)
    return Check("disk space", Status.OK, f"for vmcores in {root}", figure)


def check_emulators() -> Check:
    """ipmitool runs, and virtualbmc's and sushy-tools' entry points start in a child."""
    problems = []
    if _run(["ipmitool", "-V"]) is not None:
        problems.append("ipmitool does not run")
    bin_dir = Path(sys.executable).parent
    starts = {
        "virtualbmc": [sys.executable, "-c", "from virtualbmc.vbmc import VirtualBMC"],
        "sushy-tools": [str(bin_dir / "sushy-emulator"), "--help"],
    }
    for name, argv in starts.items():
        if (error := _run(argv)) is not None:
            problems.append(f"{name} does not start: {error}")
    if problems:
        return Check("emulators", Status.FAIL, "; ".join(problems), fix="scripts/install")
    return Check("emulators", Status.OK, "ipmitool, virtualbmc and sushy-tools start")


CHEAP_CHECKS: tuple[Callable[[], Check], ...] = (
    check_libvirtd,
    check_kvm,
    check_define_round_trip,
    check_disk_space,
)
ALL_CHECKS: tuple[Callable[[], Check], ...] = (
    check_libvirtd,
    check_define_round_trip,
    check_kvm,
    check_apt_packages,
    check_venv,
    check_guest_images,
    check_disk_space,
    check_emulators,
)


def run_checks(checks: tuple[Callable[[], Check], ...] = ALL_CHECKS) -> list[Check]:
    """Run ``checks`` in order.

    The define round trip is skipped when a check before it failed for a reason
    it would only confirm: libvirtd down, or QEMU unable to use ``/dev/kvm``
    (the define would start a 30-100 s re-probe that keeps libvirtd busy after
    the doctor has left). ``ALL_CHECKS`` times it before the kvm check, so
    ``crashlab doctor`` shows the figure; ``CHEAP_CHECKS`` after, so a
    scenario on such a host stops at once.
    """
    results: list[Check] = []
    for check in checks:
        if check is check_define_round_trip and (skip := _define_skipped_by(results)):
            results.append(Check("define round trip", Status.FAIL, f"skipped: {skip}"))
            continue
        results.append(check())
    return results


def failed(results: list[Check]) -> list[Check]:
    return [c for c in results if c.status is Status.FAIL]


def render_table(results: list[Check]) -> str:
    rows = [[c.name, c.status.value, c.figure or "", c.detail] for c in results]
    widths = [max(len(r[i]) for r in [["check", "", "figure", ""], *rows]) for i in range(3)]
    lines = []
    for check, row in zip(results, rows, strict=True):
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        lines.append("  ".join([*cells, row[3]]))
        if check.fix and check.status is not Status.OK:
            lines.append(" " * (sum(widths) + 6) + f"fix: {check.fix}")
    return "\n".join(lines)


def to_json(results: list[Check]) -> str:
    document = {
        "ok": not failed(results),
        "checks": [{**asdict(c), "status": c.status.value} for c in results],
    }
    return json.dumps(document, indent=2)


def _time_define_round_trip(patience: float) -> tuple[float | None, str | None]:
    """Seconds for a define + undefine, or None past ``patience``; or libvirt's error.

    The call runs in a thread: a re-probing libvirtd cannot be interrupted, so
    past ``patience`` the doctor reports and leaves; the thread undefines the
    domain if the process lives long enough, and the next round trip sweeps
    earlier throwaway domains first.
    """
    outcome: dict[str, float | str] = {}

    def round_trip() -> None:
        started = time.monotonic()
        try:
            conn = libvirt.open(DEFAULT_LIBVIRT_URI)
            try:
                _sweep_doctor_domains(conn)
                name = DOCTOR_DOMAIN_PREFIX + secrets.token_hex(4)
                conn.defineXML(_throwaway_domain_xml(name)).undefine()
            finally:
                conn.close()
        except libvirt.libvirtError as exc:
            outcome["error"] = _first_line(exc)
            return
        outcome["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=round_trip, name="crashlab-doctor-define", daemon=True)
    worker.start()
    worker.join(patience)
    if "error" in outcome:
        return None, str(outcome["error"])
    seconds = outcome.get("seconds")
    return (float(seconds) if seconds is not None else None), None


def _sweep_doctor_domains(conn: libvirt.virConnect) -> None:
    for domain in conn.listAllDomains():
        if domain.name().startswith(DOCTOR_DOMAIN_PREFIX):
            domain.undefine()


def _throwaway_domain_xml(name: str) -> str:
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
    )


def _reprobe_cause() -> str:
    kvm = kvm_access_problem()
    cause = f"{kvm}, so " if kvm else ""
    return f"{cause}libvirt re-probes QEMU's capabilities on every call ({CAPABILITIES_CACHE})"


def _cache_mtimes() -> dict[str, float]:
    try:
        return {p.name: p.stat().st_mtime for p in CAPABILITIES_CACHE.glob("*.xml")}
    except OSError:
        return {}


def _dpkg_installed(package: str) -> bool:
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    ).stdout
    return "ok installed" in status


def _run(argv: list[str]) -> str | None:
    """None when ``argv`` exits 0 within 30 s, else what went wrong, in one line."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return _first_line(exc)
    if done.returncode != 0:
        # A traceback's last line says what failed.
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        return lines[-1]
    return None


def _define_skipped_by(results: list[Check]) -> str | None:
    reasons = {"libvirtd": "libvirtd is down", "kvm": "QEMU cannot use /dev/kvm (see kvm)"}
    for check in failed(results):
        if check.name in reasons:
            return reasons[check.name]
    return None


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
