"""Where a server's crash dump lands, and where crashlab looks for the evidence of it.

Each server has a ``dump_target`` in the inventory, beside its
``driver_info``. Where the dump lands does not depend on how the NMI is sent:

- ``disk``: a raw dump disk of a libvirt domain. The crash kernel writes
  ``makedumpfile -F`` output to it; crashlab reads and restores it once the
  stream is complete. ``uri`` and ``domain`` default to the server's own for
  libvirt servers; ``device`` is the disk's target dev in the domain XML. The
  disk is read as a file on this host, so the URI must be a local one.
- ``ssh``: the crash kernel sends the dump over SSH, as kdump-tools' SSH mode
  does, to crashlab's collector (app/collector.py), with the server's own key
  (made at registration; ``GET .../dump-target/key``). crashlab reads neither
  the server's disk nor its console: the dump that arrives is the proof.
- ``console-only``: the panic is observed and the dump is ``failed`` with "no
  dump target configured".
- ``none``: Nova's behaviour; nothing is followed after the NMI.

The console, where a server has one, is the serial console of its libvirt
domain (the server's own, or its disk target's): the file of a ``<serial
type='file'>``, or the log file of a serial console. Only what was written
after the NMI is read: ``Evidence`` records, before the NMI is sent, the
console's length and the disk's fingerprint.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from drivers.uris import parse_libvirt_uri

# The dump disk's first bytes fingerprint what it held before the NMI.
_FINGERPRINT_BYTES = 1 << 20
_BOOT_RELEASE = re.compile(r"Linux version (\S+)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DiskTarget(_Strict):
    type: Literal["disk"]
    uri: str | None = Field(
        None,
        max_length=1024,
        description="default: the server's own",
        json_schema_extra={"pattern": "^qemu:///(system|session)$"},
    )
    domain: str | None = Field(None, min_length=1, max_length=255)
    device: str = Field(pattern=r"^[a-z]{2,4}[a-z0-9]{0,4}$", description="e.g. vdb")

    @field_validator("uri")
    @classmethod
    def _local_uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        uri = parse_libvirt_uri(value, allow_test=False)
        if uri.transport != "local":
            raise ValueError("a disk target is read on this host: use qemu:///system or session")
        return str(uri)


class SshTarget(_Strict):
    type: Literal["ssh"]


class ConsoleOnlyTarget(_Strict):
    type: Literal["console-only"]


class NoTarget(_Strict):
    type: Literal["none"]


DumpTarget = Annotated[
    DiskTarget | SshTarget | ConsoleOnlyTarget | NoTarget, Field(discriminator="type")
]
DUMP_TARGET = TypeAdapter(DumpTarget)


class DumpTimeouts(_Strict):
    """How long each phase of following a dump may take, in seconds (defaults fit TCG)."""

    panic: float = Field(90.0, gt=0, le=3600)
    collect: float = Field(300.0, gt=0, le=86400)
    verify: float = Field(120.0, gt=0, le=3600)


def parse_target(
    raw: dict[str, Any] | None,
) -> DiskTarget | SshTarget | ConsoleOnlyTarget | NoTarget:
    return DUMP_TARGET.validate_python({"type": "none"} if raw is None else raw)


def parse_timeouts(raw: dict[str, Any] | None) -> DumpTimeouts:
    return DumpTimeouts.model_validate(raw or {})


@dataclass(frozen=True)
class DomainFiles:
    """The files of a libvirt domain that hold evidence: its console and its disks."""

    console: Path | None
    disks: dict[str, Path]


def domain_files(domain_xml: str) -> DomainFiles:
    """The console file and the disks (by target dev) a domain's XML names."""
    devices = ET.fromstring(domain_xml).find("devices")
    if devices is None:
        return DomainFiles(None, {})
    console = None
    for serial in devices.findall("serial"):
        source, log = serial.find("source"), serial.find("log")
        if serial.get("type") == "file" and source is not None and source.get("path"):
            console = Path(source.get("path", ""))
        elif log is not None and log.get("file"):
            console = Path(log.get("file", ""))
        if console is not None:
            break
    disks = {}
    for disk in devices.findall("disk"):
        target, source = disk.find("target"), disk.find("source")
        path = None if source is None else source.get("file") or source.get("dev")
        if target is not None and target.get("dev") and path:
            disks[target.get("dev", "")] = Path(path)
    return DomainFiles(console, disks)


@dataclass(frozen=True)
class Evidence:
    """Where the follower looks for one dump, as it stood just before the NMI.

    Stored with the dump (as a dict), so a restarted crashlab resumes from the
    same marks. ``problem`` says why a source could not be found.
    """

    console: str | None = None
    console_offset: int = 0
    boot_kernel_release: str | None = None
    disk: str | None = None
    disk_fingerprint: str | None = None
    # An ssh target's upload directory in the collector.
    upload_dir: str | None = None
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Evidence:
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__ if key in raw})


def mark_evidence(files: DomainFiles | None, device: str | None) -> Evidence:
    """The console's length and the disk's fingerprint now, before the NMI."""
    if files is None:
        return Evidence()
    console_offset, boot_release = 0, None
    if files.console is not None and files.console.exists():
        text = files.console.read_bytes()
        console_offset = len(text)
        releases = _BOOT_RELEASE.findall(text.decode(errors="replace"))
        boot_release = releases[-1] if releases else None
    problem, disk = None, None
    if device is not None:
        disk = files.disks.get(device)
        if disk is None:
            problem = f"the domain has no disk {device}"
        elif not disk.exists():
            problem, disk = f"the dump disk {disk} is not on this host", None
    return Evidence(
        console=None if files.console is None else str(files.console),
        console_offset=console_offset,
        boot_kernel_release=boot_release,
        disk=None if disk is None else str(disk),
        disk_fingerprint=None if disk is None else fingerprint(disk),
        problem=problem,
    )


def fingerprint(disk: Path) -> str | None:
    """The disk's modification time and a digest of its first MiB; None if unreadable."""
    try:
        with disk.open("rb") as f:
            head = f.read(_FINGERPRINT_BYTES)
        return f"{disk.stat().st_mtime_ns}:{hashlib.sha256(head).hexdigest()}"
    except OSError:
        return None


def read_console(evidence: Evidence) -> str:
    """What the console received since the NMI."""
    if evidence.console is None:
        return ""
    try:
        with Path(evidence.console).open("rb") as f:
            f.seek(evidence.console_offset)
            return f.read(4 << 20).decode(errors="replace")
    except OSError:
        return ""
