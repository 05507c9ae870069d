"""Choose QEMU's accelerator: KVM where it actually works, TCG otherwise.

``/dev/kvm`` existing is not enough: on some nested hosts a direct-kernel guest
under KVM prints nothing at all. So KVM is chosen only after
a probe guest booted under it reaches its READY marker in time (``detect_accel``
in emulators/guest.py, which boots it; this module keeps its verdict). The verdict is
cached per host (kernel, QEMU version, CPU flags) in ``$CRASHLAB_CACHE/accel.json``.
``$CRASHLAB_ACCEL=tcg|kvm`` skips the probe.
"""

from __future__ import annotations

import enum
import grp
import hashlib
import json
import os
import platform
import pwd
import re
import stat
import subprocess
from pathlib import Path

from emulators.guest_image import cache_root

KVM_DEVICE = Path("/dev/kvm")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# Debian's libvirt runs QEMU as this user (member of group kvm) unless qemu.conf says otherwise.
DEFAULT_QEMU_USER = "libvirt-qemu"


class Accel(enum.StrEnum):
    KVM = "kvm"
    TCG = "tcg"

    @property
    def domain_type(self) -> str:
        """The libvirt ``<domain type=...>`` that selects this accelerator."""
        return "kvm" if self is Accel.KVM else "qemu"


_decided: dict[str, Accel] = {}


def decided_accel(uri: str) -> Accel | None:
    """The accelerator for ``uri``'s host if known without booting anything, else None.

    ``$CRASHLAB_ACCEL`` wins; a host without a usable ``/dev/kvm`` is TCG; otherwise
    it is a probe's verdict (``record_verdict``), if one has run on this host.
    """
    if forced := os.environ.get("CRASHLAB_ACCEL"):
        return Accel(forced)
    if not kvm_device_usable():
        return Accel.TCG
    key = host_fingerprint(uri)
    if key not in _decided and (verdict := _read_json(_verdicts_file()).get(key)):
        _decided[key] = Accel(verdict)
    return _decided.get(key)


def record_verdict(uri: str, accel: Accel) -> Accel:
    """Keep a probe's verdict for ``uri``'s host, for this process and the next."""
    key = host_fingerprint(uri)
    cache_file = _verdicts_file()
    verdicts = _read_json(cache_file)
    verdicts[key] = accel.value
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(verdicts, indent=2) + "\n")
    _decided[key] = accel
    return accel


def kvm_device_usable() -> bool:
    """Whether QEMU, run by libvirt as its own user, can open ``/dev/kvm`` read-write."""
    return kvm_access_problem() is None


def kvm_access_problem() -> str | None:
    """Why QEMU's user cannot open ``/dev/kvm``, or None when it can."""
    try:
        node = KVM_DEVICE.stat()
    except OSError:
        return f"there is no {KVM_DEVICE}"
    user = qemu_user()
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return f"QEMU's user {user!r} does not exist"
    groups = set(os.getgrouplist(user, account.pw_gid))
    if account.pw_uid == 0 or _grants_rw(node, account.pw_uid, groups):
        return None
    return (
        f"QEMU's user {user} cannot open {KVM_DEVICE} "
        f"({stat.filemode(node.st_mode)} {_owner(node)})"
    )


def qemu_user() -> str:
    """The ``user`` libvirt's qemu.conf runs QEMU as."""
    try:
        text = QEMU_CONF.read_text()
    except OSError:
        return DEFAULT_QEMU_USER
    found = re.search(r'^\s*user\s*=\s*"([^"]+)"', text, re.M)
    return found.group(1) if found else DEFAULT_QEMU_USER


def _grants_rw(node: os.stat_result, uid: int, groups: set[int]) -> bool:
    mode = node.st_mode
    if node.st_uid == uid:
        return mode & stat.S_IRUSR != 0 and mode & stat.S_IWUSR != 0
    if node.st_gid in groups:
        return mode & stat.S_IRGRP != 0 and mode & stat.S_IWGRP != 0
    return mode & stat.S_IROTH != 0 and mode & stat.S_IWOTH != 0


def _owner(node: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(node.st_uid).pw_name
    except KeyError:
        user = str(node.st_uid)
    try:
        group = grp.getgrgid(node.st_gid).gr_name
    except KeyError:
        group = str(node.st_gid)
    return f"{user}:{group}"


def cached_verdict(uri: str) -> Accel | None:
    """The probe's verdict for this host, if a probe has run; ``$CRASHLAB_ACCEL`` wins."""
    if forced := os.environ.get("CRASHLAB_ACCEL"):
        return Accel(forced)
    verdict = _read_json(_verdicts_file()).get(host_fingerprint(uri))
    return Accel(verdict) if verdict else None


def host_fingerprint(uri: str) -> str:
    """What decides whether KVM works: host kernel, QEMU build and CPU flags."""
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    flags = next(
        (
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ),
        "",
    )
    text = json.dumps([uri, platform.release(), qemu, flags])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _verdicts_file() -> Path:
    return cache_root() / "accel.json"


def _read_json(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
