"""Where a fleet's NMIs are counted: a simulator's log (``emulators/nmi_log.py``) or guests."""

from __future__ import annotations

from collections import Counter
from typing import Protocol


class NMISource(Protocol):
    """``read()`` returns the NMIs per endpoint received since the last read."""

    def read(self) -> Counter[str]: ...
