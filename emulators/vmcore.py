"""Get the vmcore off a guest's dump disk and prove it is the guest's own.

The crash kernel writes ``makedumpfile -F`` output, a *flattened* stream, to
the raw dump disk. ``makedumpfile -R`` turns it back into a kdump-compressed
dump; it stops at the stream's end marker, so the disk's trailing zeros are
harmless. The dump's kernel release is read from its own header (the
``utsname`` of makedumpfile's ``disk_dump_header``), not from ``file``'s
wording, which changes between releases.

Failures, all subclasses of ``VmcoreError``::

    VmcoreError
     ├── NoDumpOnDisk     the disk holds no flattened dump (the crash kernel wrote nothing)
     ├── RestoreFailed    makedumpfile -R failed
     └── NotAKdumpFile    the restored file has no kdump header
"""

from __future__ import annotations

import dataclasses
import re
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

FLATTENED_SIGNATURE = b"makedumpfile"
KDUMP_SIGNATURE = b"KDUMP   "
DISKDUMP_SIGNATURE = b"DISKDUMP"

# struct disk_dump_header begins: char signature[8]; int header_version;
# struct new_utsname { char sysname, nodename, release, version, machine,
# domainname [65]; } (makedumpfile's dump header).
_HEADER = struct.Struct("<8si" + "65s" * 6)
UTSNAME_FIELDS = ("sysname", "nodename", "release", "version", "machine", "domainname")


class VmcoreError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class NoDumpOnDisk(VmcoreError):
    pass


class RestoreFailed(VmcoreError):
    pass


class NotAKdumpFile(VmcoreError):
    pass


@dataclass(frozen=True)
class Vmcore:
    """A restored dump and what its header says."""

    path: Path
    bytes: int
    format: str
    header_version: int
    kernel_release: str
    kernel_version: str
    machine: str
    panic_message: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "bytes": self.bytes,
            "format": self.format,
            "kernel_release": self.kernel_release,
            "panic_message": self.panic_message,
        }


def has_flattened_dump(disk: Path) -> bool:
    with disk.open("rb") as f:
        return f.read(len(FLATTENED_SIGNATURE)) == FLATTENED_SIGNATURE


def extract_vmcore(disk: Path, out: Path) -> Vmcore:
    """Restore the flattened dump on ``disk`` into ``out`` and read its header."""
    if not has_flattened_dump(disk):
        raise NoDumpOnDisk(f"{disk} holds no makedumpfile flattened dump")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with disk.open("rb") as stream:
        result = subprocess.run(
            ["makedumpfile", "-R", str(out)], stdin=stream, capture_output=True, text=True
        )
    if result.returncode != 0 or not out.exists():
        raise RestoreFailed(f"makedumpfile -R exited {result.returncode}: {result.stderr.strip()}")
    vmcore = read_vmcore(out)
    return dataclasses.replace(vmcore, panic_message=panic_message(read_dmesg(out)))


def read_vmcore(path: Path) -> Vmcore:
    """Parse the diskdump header of a kdump-compressed (or diskdump) file."""
    with path.open("rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise NotAKdumpFile(f"{path} is too short for a kdump header")
    signature, header_version, *utsname = _HEADER.unpack(head)
    formats = {KDUMP_SIGNATURE: "kdump-compressed", DISKDUMP_SIGNATURE: "diskdump"}
    if signature not in formats:
        raise NotAKdumpFile(f"{path} starts with {signature!r}, not a kdump signature")
    uts = dict(zip(UTSNAME_FIELDS, (_cstring(field) for field in utsname), strict=True))
    return Vmcore(
        path=path,
        bytes=path.stat().st_size,
        format=formats[signature],
        header_version=header_version,
        kernel_release=uts["release"],
        kernel_version=uts["version"],
        machine=uts["machine"],
    )


def read_dmesg(path: Path) -> str:
    """The dumped kernel's log buffer, as ``makedumpfile --dump-dmesg`` extracts it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dmesg"
        result = subprocess.run(
            ["makedumpfile", "--dump-dmesg", str(path), str(out)], capture_output=True, text=True
        )
        if result.returncode != 0 or not out.exists():
            return ""
        return out.read_text(errors="replace")


def panic_message(dmesg: str) -> str | None:
    """The reason the kernel gave in its last ``Kernel panic - not syncing:`` line."""
    found = re.findall(r"Kernel panic - not syncing: (.*)", dmesg)
    return found[-1].strip() if found else None


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    """``python -m emulators.vmcore DUMP_DISK OUT``: restore, verify, print JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m emulators.vmcore", description=main.__doc__)
    parser.add_argument("disk", type=Path, help="the raw dump disk the crash kernel wrote")
    parser.add_argument("out", type=Path, help="where to write the kdump-compressed vmcore")
    parser.add_argument("--expect-release", help="fail unless the dump's kernel release is this")
    args = parser.parse_args(argv)
    try:
        vmcore = extract_vmcore(args.disk, args.out)
    except VmcoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(vmcore.as_dict(), indent=2))
    if args.expect_release and vmcore.kernel_release != args.expect_release:
        print(f"error: kernel release {vmcore.kernel_release}, expected {args.expect_release}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
