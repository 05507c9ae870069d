"""The NMIs simulated BMCs received: a shared log, one line per NMI naming the BMC.

Each NMI is one short ``O_APPEND`` write, atomic across processes, so the
count survives the BMC that wrote it and is exact.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path


class NMILog:
    """Writes and reads one log; ``read()`` returns only what is new since the last."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def append(self, endpoint: str | int) -> None:
        with self.path.open("a") as log:
            log.write(f"{endpoint}\n")

    def counts(self) -> Counter[str]:
        """Every NMI logged so far, by endpoint."""
        return _count(self._complete_lines(0))

    def read(self) -> Counter[str]:
        """NMIs by endpoint since the last read (complete lines only)."""
        data = self._complete_lines(self._offset)
        self._offset += len(data)
        return _count(data)

    def _complete_lines(self, offset: int) -> bytes:
        try:
            with self.path.open("rb") as log:
                log.seek(offset)
                data = log.read()
        except FileNotFoundError:
            return b""
        return data[: data.rfind(b"\n") + 1]


def _count(data: bytes) -> Counter[str]:
    return Counter(line for line in data.decode().splitlines() if line)
