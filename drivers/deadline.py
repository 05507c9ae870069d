"""One driver call with a deadline: how the BMC drivers (drivers/ipmi.py, drivers/redfish.py) wait.

A BMC library's own retries and timers can keep a call going far longer than
its caller may wait. So each call runs in a daemon thread of its own and the
caller waits at most ``timeout`` seconds, whatever the library does; a dead
BMC costs only the calls made to it.

A call its caller stopped waiting for may still be running, and must not act
late: it checks ``give_up_if_abandoned`` before each step, and the step that
acts on the server begins with ``start_action``. The caller's giving up and
that step's start are decided under one lock, so the action never begins after
the caller was told nothing was sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from drivers.base import BackendUnreachable

T = TypeVar("T")


class DeadlineExceeded(Exception):
    """The caller stopped waiting; ``action_started``: whether the action may have begun."""

    def __init__(self, action_started: bool) -> None:
        super().__init__("the caller stopped waiting")
        self.action_started = action_started

    def __repr__(self) -> str:
        return f"DeadlineExceeded(action_started={self.action_started})"


class Call:
    """One driver call: ``doing`` names it in errors, ``phases`` say when each step began.

    ``phases`` holds (step, seconds into the call), so a call that gave up can
    log where it was.
    """

    def __init__(self, timeout: float, doing: str) -> None:
        self.timeout = timeout
        self.doing = doing
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.phases: list[tuple[str, float]] = []
        # Guards the hand-off: the caller gives up, or the action begins.
        self._lock = threading.Lock()
        self.abandoned = False
        self.action_started = False

    def run(self, operation: Callable[[], T], thread_name: str) -> T:
        """``operation``'s result or error, from a thread of its own; ``DeadlineExceeded``
        once ``timeout`` seconds have passed without one."""
        outcome: list[tuple[bool, Any]] = []
        done = threading.Event()

        def work() -> None:
            try:
                outcome.append((True, operation()))
            except BaseException as exc:  # handed to the waiting caller
                outcome.append((False, exc))
            finally:
                done.set()

        threading.Thread(target=work, name=thread_name, daemon=True).start()
        if not done.wait(self.timeout):
            raise DeadlineExceeded(self.abandon())
        ok, value = outcome[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def enter(self, phase: str) -> None:
        self.phases.append((phase, round(time.monotonic() - self.started, 3)))

    def give_up_if_abandoned(self) -> None:
        """Stop a call its caller no longer waits for: it must not act late."""
        if self.abandoned or time.monotonic() > self.deadline:
            raise BackendUnreachable("the caller stopped waiting", nmi_not_sent=True)

    def start_action(self) -> None:
        """Mark the action (the NMI) as begun, unless the caller already gave up."""
        with self._lock:
            self.give_up_if_abandoned()
            self.action_started = True

    def abandon(self) -> bool:
        """The caller stops waiting; returns whether the action may have begun."""
        with self._lock:
            self.abandoned = True
            return self.action_started
