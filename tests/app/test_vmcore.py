"""Reading vmcores: the kdump header parser and the dump-disk checks."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from app.vmcore import NoDumpOnDisk, NotAKdumpFile, extract_vmcore, read_vmcore

pytestmark = pytest.mark.fast


def kdump_header(release: str, signature: bytes = b"KDUMP   ") -> bytes:
    uts = [b"Linux", b"(none)", release.encode(), b"#1 SMP", b"x86_64", b"(none)"]
    return struct.pack("<8si" + "65s" * 6, signature, 6, *uts) + b"\0" * 4096


def test_reads_kernel_release_from_kdump_header(tmp_path: Path) -> None:
    path = tmp_path / "vmcore"
    path.write_bytes(kdump_header("6.1.0-99-amd64"))
    vmcore = read_vmcore(path)
    assert vmcore.format == "kdump-compressed"
    assert vmcore.kernel_release == "6.1.0-99-amd64"
    assert vmcore.machine == "x86_64"
    assert vmcore.header_version == 6


def test_rejects_a_file_without_kdump_signature(tmp_path: Path) -> None:
    path = tmp_path / "vmcore"
    path.write_bytes(b"\x7fELF" + b"\0" * 1000)
    with pytest.raises(NotAKdumpFile):
        read_vmcore(path)


def test_blank_dump_disk_holds_no_dump(tmp_path: Path) -> None:
    disk = tmp_path / "dump.img"
    with disk.open("wb") as f:
        f.truncate(1024 * 1024)
    with pytest.raises(NoDumpOnDisk):
        extract_vmcore(disk, tmp_path / "vmcore")
