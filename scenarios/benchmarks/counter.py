"""The NMIs a simulator received, read from its log: one line per NMI."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Protocol


class NMISource(Protocol):
    """Where a fleet's NMIs are counted: ``read()`` returns NMIs per endpoint since the last."""

    def read(self) -> Counter[str]: ...


class NMICounter:
    """Reads a simulator's NMI log; each ``read()`` returns only what is new."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def read(self) -> Counter[str]:
        """NMIs per endpoint since the last read (complete lines only)."""
        try:
            with self.path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return Counter()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return Counter(line for line in complete.decode().splitlines() if line)
