"""Vmcores: find one in a flattened stream, restore it, and read what it says of itself.

The crash kernel writes ``makedumpfile -F`` output, a *flattened* stream, to a
raw dump disk (or a pipe). The stream is a 4 KiB header, then blocks of
``(offset, size)`` plus data, both big-endian 64-bit, and an end marker whose
offset and size are -1 (makedumpfile's ``makedumpfile_data_header``). A
stream without its end marker is an incomplete dump. ``makedumpfile -R``
turns a complete stream back into a kdump-compressed dump; it stops at the end
marker, so the disk's trailing zeros are harmless.

What a dump says of itself is read from the dump, never from a tool's
wording: the kernel release from the kdump header's ``utsname``, and
VMCOREINFO (``OSRELEASE``, ``BUILD-ID``, ``CRASHTIME``) from the kdump
sub-header or, for an ELF vmcore, from its ``VMCOREINFO`` note. The kernel
log comes from ``makedumpfile --dump-dmesg``, which needs no debuginfo.

Failures, all subclasses of ``VmcoreError``::

    VmcoreError
     ├── NoDumpOnDisk     the disk holds no flattened dump (the crash kernel wrote nothing)
     ├── RestoreFailed    makedumpfile -R failed
     └── NotAKdumpFile    the restored file is neither kdump-compressed nor an ELF vmcore
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

FLATTENED_SIGNATURE = b"makedumpfile"
FLATTENED_HEADER_BYTES = 4096
KDUMP_SIGNATURE = b"KDUMP   "
DISKDUMP_SIGNATURE = b"DISKDUMP"
ELF_MAGIC = b"\x7fELF"

# struct disk_dump_header begins: char signature[8]; int header_version;
# struct new_utsname { char sysname, nodename, release, version, machine,
# domainname [65]; } (makedumpfile's dump header). Its block_size is at 428.
_HEADER = struct.Struct("<8si" + "65s" * 6)
UTSNAME_FIELDS = ("sysname", "nodename", "release", "version", "machine", "domainname")
_BLOCK_SIZE = struct.Struct("<i")
_BLOCK_SIZE_OFFSET = 428
# struct kdump_sub_header (header_version >= 3): offset_vmcoreinfo and
# size_vmcoreinfo follow phys_base, dump_level, split, start_pfn and end_pfn.
_SUB_HEADER_VMCOREINFO = struct.Struct("<qQ")
_SUB_HEADER_VMCOREINFO_OFFSET = 32
_FLAT_BLOCK = struct.Struct(">qq")
_ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")
_PT_NOTE = 4


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
class FlattenedStream:
    """How far a flattened stream on a disk has got."""

    found: bool  # the disk starts with makedumpfile's signature
    complete: bool  # its end marker was reached
    bytes: int  # how much of the disk the stream covers so far


@dataclass(frozen=True)
class Vmcore:
    """A restored dump and what it says of itself."""

    path: Path
    bytes: int
    format: str
    header_version: int
    kernel_release: str
    kernel_version: str
    machine: str
    vmcoreinfo: dict[str, str] = dataclasses.field(default_factory=dict)
    panic_message: str | None = None

    @property
    def build_id(self) -> str | None:
        return self.vmcoreinfo.get("BUILD-ID")

    @property
    def crash_time(self) -> dt.datetime | None:
        """CRASHTIME, the guest's wall clock at the panic, in UTC."""
        seconds = self.vmcoreinfo.get("CRASHTIME")
        if seconds is None or not seconds.isdigit():
            return None
        return dt.datetime.fromtimestamp(int(seconds), dt.UTC)

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


def scan_flattened(disk: Path) -> FlattenedStream:
    """Walk the stream's blocks up to its end marker, or to where the writing has got."""
    size = disk.stat().st_size
    with disk.open("rb") as f:
        if f.read(len(FLATTENED_SIGNATURE)) != FLATTENED_SIGNATURE:
            return FlattenedStream(found=False, complete=False, bytes=0)
        position = FLATTENED_HEADER_BYTES
        while position + _FLAT_BLOCK.size <= size:
            f.seek(position)
            offset, length = _FLAT_BLOCK.unpack(f.read(_FLAT_BLOCK.size))
            if offset == -1 and length == -1:
                return FlattenedStream(True, True, position + _FLAT_BLOCK.size)
            # Zeros (not yet written) or garbage: the stream ends here for now.
            if length <= 0 or offset < 0 or position + _FLAT_BLOCK.size + length > size:
                break
            position += _FLAT_BLOCK.size + length
    return FlattenedStream(found=True, complete=False, bytes=position)


def extract_vmcore(disk: Path, out: Path, timeout: float | None = None) -> Vmcore:
    """Restore the flattened dump on ``disk`` into ``out`` and read it.

    ``timeout`` bounds each makedumpfile run (RestoreFailed past it).
    """
    if not has_flattened_dump(disk):
        raise NoDumpOnDisk(f"{disk} holds no makedumpfile flattened dump")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    try:
        with disk.open("rb") as stream:
            result = subprocess.run(
                ["makedumpfile", "-R", str(out)],
                stdin=stream,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
    except subprocess.TimeoutExpired:
        raise RestoreFailed(f"makedumpfile -R did not finish within {timeout:g} s") from None
    if result.returncode != 0 or not out.exists():
        raise RestoreFailed(f"makedumpfile -R exited {result.returncode}: {result.stderr.strip()}")
    vmcore = read_vmcore(out)
    return dataclasses.replace(vmcore, panic_message=panic_message(read_dmesg(out, timeout)))


def read_vmcore(path: Path) -> Vmcore:
    """Read a kdump-compressed (or diskdump) file's header, or an ELF vmcore's notes."""
    with path.open("rb") as f:
        head = f.read(_HEADER.size)
    if head.startswith(ELF_MAGIC):
        return _read_elf(path)
    if len(head) < _HEADER.size:
        raise NotAKdumpFile(f"{path} is too short for a kdump header")
    signature, header_version, *utsname = _HEADER.unpack(head)
    formats = {KDUMP_SIGNATURE: "kdump-compressed", DISKDUMP_SIGNATURE: "diskdump"}
    if signature not in formats:
        raise NotAKdumpFile(f"{path} starts with {signature!r}, not a kdump signature")
    uts = dict(zip(UTSNAME_FIELDS, (_cstring(field) for field in utsname), strict=True))
    info = _kdump_vmcoreinfo(path) if header_version >= 3 else {}
    return Vmcore(
        path=path,
        bytes=path.stat().st_size,
        format=formats[signature],
        header_version=header_version,
        # QEMU's own kdump files leave utsname empty; VMCOREINFO names the kernel.
        kernel_release=uts["release"] or info.get("OSRELEASE", ""),
        kernel_version=uts["version"],
        machine=uts["machine"],
        vmcoreinfo=info,
    )


def _kdump_vmcoreinfo(path: Path) -> dict[str, str]:
    with path.open("rb") as f:
        f.seek(_BLOCK_SIZE_OFFSET)
        raw = f.read(_BLOCK_SIZE.size)
        if len(raw) < _BLOCK_SIZE.size:
            return {}
        (block_size,) = _BLOCK_SIZE.unpack(raw)
        f.seek(block_size + _SUB_HEADER_VMCOREINFO_OFFSET)
        raw = f.read(_SUB_HEADER_VMCOREINFO.size)
        if len(raw) < _SUB_HEADER_VMCOREINFO.size:
            return {}
        offset, size = _SUB_HEADER_VMCOREINFO.unpack(raw)
        if offset <= 0 or not 0 < size <= 1 << 20:
            return {}
        f.seek(offset)
        return parse_vmcoreinfo(f.read(size))


def _read_elf(path: Path) -> Vmcore:
    with path.open("rb") as f:
        head = f.read(_ELF64_HEADER.size)
        if len(head) < _ELF64_HEADER.size or head[4] != 2 or head[5] != 1:
            raise NotAKdumpFile(f"{path} is not a little-endian 64-bit ELF vmcore")
        fields = _ELF64_HEADER.unpack(head)
        phoff, phentsize, phnum = fields[5], fields[9], fields[10]
        info: dict[str, str] = {}
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            p_type, _flags, p_offset, _va, _pa, p_filesz, _memsz, _align = _ELF64_PHDR.unpack(
                f.read(_ELF64_PHDR.size)
            )
            if p_type == _PT_NOTE:
                f.seek(p_offset)
                info.update(_elf_vmcoreinfo(f.read(p_filesz)))
    if "OSRELEASE" not in info:
        raise NotAKdumpFile(f"{path} is an ELF file with no VMCOREINFO note")
    return Vmcore(
        path=path,
        bytes=path.stat().st_size,
        format="elf",
        header_version=0,
        kernel_release=info["OSRELEASE"],
        kernel_version="",
        machine="",
        vmcoreinfo=info,
    )


def _elf_vmcoreinfo(notes: bytes) -> dict[str, str]:
    position = 0
    while position + 12 <= len(notes):
        namesz, descsz, _type = struct.unpack_from("<III", notes, position)
        name_at = position + 12
        desc_at = name_at + _aligned(namesz)
        name = notes[name_at : name_at + namesz].rstrip(b"\0")
        if name == b"VMCOREINFO":
            return parse_vmcoreinfo(notes[desc_at : desc_at + descsz])
        position = desc_at + _aligned(descsz)
    return {}


def _aligned(size: int) -> int:
    return (size + 3) & ~3


def parse_vmcoreinfo(raw: bytes) -> dict[str, str]:
    """VMCOREINFO's ``KEY=value`` lines (the kernel's crash_save_vmcoreinfo)."""
    info: dict[str, str] = {}
    for line in raw.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key and "\0" not in key:
            info.setdefault(key, value.strip("\0").strip())
    return info


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_dmesg(path: Path, timeout: float | None = None) -> str:
    """The dumped kernel's log buffer, as ``makedumpfile --dump-dmesg`` extracts it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dmesg"
        try:
            result = subprocess.run(
                ["makedumpfile", "--dump-dmesg", str(path), str(out)],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return ""
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
    """``python -m app.vmcore DUMP_DISK OUT``: restore, verify, print JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m app.vmcore", description=main.__doc__)
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
