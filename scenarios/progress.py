"""What a scenario shows while it waits, on stderr (stdout is left to the report).

On a terminal: one status line, redrawn a few times a second, with the step,
the seconds spent in it and the guest's latest console line. Elsewhere (CI
logs, pipes): one line per step and one when it ends, nothing redrawn.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    def __init__(
        self, stream: TextIO | None = None, *, quiet: bool = False, echo_console: bool = False
    ) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.echo_console = echo_console
        self.live = self.stream.isatty() and not quiet
        self.prefix = ""
        self._status = ""
        self._since = 0.0
        self._last_line = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drawn = False

    def note(self, text: str) -> None:
        """A line that stays, e.g. a finished step."""
        if self.quiet:
            return
        with self._lock:
            self._clear()
            self.stream.write(f"{self.prefix}{text}\n")
            self.stream.flush()

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        """Show ``text`` with a running clock until the block ends, then how long it took."""
        self._status, self._since, self._last_line = text, time.monotonic(), ""
        if not self.live:
            self.note(f"{text} ...")
        ticker = threading.Thread(target=self._tick, daemon=True) if self.live else None
        self._stop.clear()
        if ticker:
            ticker.start()
        failed = True
        try:
            yield
            failed = False
        finally:
            self._stop.set()
            if ticker:
                ticker.join()
            seconds = time.monotonic() - self._since
            self.note(f"{text}: {'failed' if failed else 'done'} ({seconds:.1f} s)")

    def console_line(self, line: str) -> None:
        """Feed from ``Guest.wait_for(on_line=...)``."""
        self._last_line = line.strip()
        if self.echo_console and not self.quiet:
            self.note(f"  | {line}")

    def _tick(self) -> None:
        while not self._stop.wait(0.2):
            self._draw()

    def _draw(self) -> None:
        with self._lock:
            elapsed = time.monotonic() - self._since
            text = f"{self.prefix}{self._status} [{elapsed:5.1f} s]"
            if self._last_line:
                text += f"  {self._last_line}"
            width = _terminal_width(self.stream)
            self.stream.write("\r\x1b[K" + text[: width - 1])
            self.stream.flush()
            self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False


def _terminal_width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 100
