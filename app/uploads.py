"""The files kdump-tools leaves in a server's upload directory, found and claimed.

In SSH mode kdump-tools writes, under the server's directory in the collector
(app/collector.py), ``<coredir>/<ip>-<YYYYmmddHHMM>/``:

- ``dump-incomplete`` while the ``makedumpfile -F`` stream is arriving;
- ``dump.<stamp>`` once it is complete (kdump-tools' ``mv``; a second dump in
  the same minute becomes ``dump.<stamp>.1``, app/collector_gate.py);
- ``dmesg.<stamp>``, the panicked kernel's log, copied with scp.

A complete dump is *claimed* by exactly one crash dump record: first renamed,
in place, to a name the gate never lets a key write (a leading dot), which is
atomic, so two claimants cannot both win; then moved into the record's own
directory, where retention (app/follower.py) looks after it.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

COMPLETE = re.compile(r"dump\.(\d{12})(\.\d+)?")
INCOMPLETE = "dump-incomplete"
# What a claimed dump is called in its record's directory.
CLAIMED_STREAM = "upload.flat"
CLAIMED_DMESG = "dmesg.uploaded"
# The gate allows at most this many path components below the server's directory.
MAX_DEPTH = 8


@dataclass(frozen=True)
class Upload:
    """One dump file in an upload directory."""

    path: Path
    bytes: int
    # When it was last written, UTC without a zone (as the store keeps times).
    modified: dt.datetime

    def relative_to(self, directory: Path) -> str:
        return "/" + str(self.path.relative_to(directory))


@dataclass(frozen=True)
class Uploads:
    complete: list[Upload]
    incomplete: list[Upload]


def scan(directory: Path) -> Uploads:
    """The complete and incomplete dumps under ``directory``, oldest first."""
    complete: list[Upload] = []
    incomplete: list[Upload] = []
    for root, dirs, files in os.walk(directory):
        if len(Path(root).relative_to(directory).parts) >= MAX_DEPTH:
            dirs.clear()
        for name in files:
            if COMPLETE.fullmatch(name) or name == INCOMPLETE:
                upload = _upload(Path(root) / name)
                if upload is not None:
                    (incomplete if name == INCOMPLETE else complete).append(upload)
    complete.sort(key=lambda upload: upload.modified)
    incomplete.sort(key=lambda upload: upload.modified)
    return Uploads(complete, incomplete)


def _upload(path: Path) -> Upload | None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    modified = dt.datetime.fromtimestamp(info.st_mtime, dt.UTC).replace(tzinfo=None)
    return Upload(path, info.st_size, modified)


def claim(upload: Upload, into: Path, claimant: str) -> Path | None:
    """Move a complete dump (and its dmesg) into ``into``; None if another claimed it first."""
    held = upload.path.with_name(f".claimed-{claimant}")
    try:
        upload.path.rename(held)
    except FileNotFoundError:
        return None
    into.mkdir(parents=True, exist_ok=True)
    stream = into / CLAIMED_STREAM
    shutil.move(held, stream)
    stamp = COMPLETE.fullmatch(upload.path.name)
    dmesg = upload.path.with_name(f"dmesg.{stamp.group(1)}") if stamp else None
    if dmesg is not None and dmesg.is_file() and not dmesg.is_symlink():
        shutil.move(dmesg, into / CLAIMED_DMESG)
    return stream
