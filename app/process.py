"""Child processes (the BMC emulators, ``crashlab serve``), and the guarantees around them.

Every child runs as ``python -m <module> ...`` in its own session (process
group). Three things make sure none outlives crashlab:

- ``EmulatorProcess.stop()`` kills the whole group (SIGTERM, then SIGKILL);
- an ``atexit`` hook stops whatever is still running when the interpreter exits;
- a *lifeline*: the child's stdin is a pipe crashlab never writes to. The child
  watches it (``hold_lifeline``) and exits on EOF, which the kernel delivers
  when crashlab dies, even by SIGKILL, when no ``atexit`` hook runs.

A program that is not crashlab's own (the collector's sshd) cannot watch its
lifeline, so it runs under ``lifeline_argv``: ``python -m app.process -- argv``
starts it, holds the lifeline for it, and stops it when the lifeline breaks or
a signal arrives.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

READY_LINE = "CRASHLAB-EMULATOR-READY"
REPO_ROOT = Path(__file__).resolve().parent.parent

_running: weakref.WeakSet[EmulatorProcess] = weakref.WeakSet()


class EmulatorStartError(RuntimeError):
    """A child exited or did not become ready; carries its log tail."""


def free_port(kind: int = socket.SOCK_STREAM, address: str = "127.0.0.1") -> int:
    """A port the kernel reports free now. Callers retry if it is taken by the time they bind."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


def hold_lifeline() -> None:
    """In the child: exit as soon as the parent's end of stdin closes."""
    _on_lifeline_break(lambda: os._exit(0))


def _on_lifeline_break(then: Callable[[], None]) -> None:
    """Run ``then`` in a thread of its own once stdin reaches EOF (the parent is gone)."""

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        then()

    threading.Thread(target=watch, name="crashlab-lifeline", daemon=True).start()


def announce_ready() -> None:
    """In the child: tell the parent it is serving, then send stdout to the log."""
    sys.stdout.write(READY_LINE + "\n")
    sys.stdout.flush()
    os.dup2(2, 1)


class EmulatorProcess:
    """One child process, in its own process group, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_path: Path):
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def popen(self) -> subprocess.Popen[bytes] | None:
        """The running child, None once stopped."""
        return self._popen

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(
        self, ready: Callable[[], bool] | None = None, timeout: float = 30.0, poll: float = 0.1
    ) -> None:
        """Start the child and wait until it is ready.

        Without ``ready``, the child signals readiness itself (``announce_ready``).
        With it, ``ready()`` is polled every ``poll`` seconds until true. Raises
        ``EmulatorStartError`` with the log's tail if the child exits or the timeout
        passes first.
        """
        env = dict(self.env)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE if ready is None else log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        _running.add(self)
        try:
            if ready is None:
                self._wait_for_line(timeout)
            else:
                self._poll_ready(ready, timeout, poll)
        except BaseException:
            self.stop()
            raise

    def _wait_for_line(self, timeout: float) -> None:
        assert self._popen is not None and self._popen.stdout is not None
        stdout = self._popen.stdout
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline().decode(errors="replace").strip() if ready else ""
        stdout.close()
        if line != READY_LINE:
            self._fail("did not report ready" if not ready else "exited before it was ready")

    def _poll_ready(self, ready: Callable[[], bool], timeout: float, poll: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_running():
                self._fail("exited before it was ready")
            if ready():
                return
            time.sleep(poll)
        self._fail(f"was not ready within {timeout:.0f}s")

    def _fail(self, what: str) -> None:
        tail = self.log_tail()
        raise EmulatorStartError(f"{self.name} {what}; log {self.log_path}:\n{tail}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """Kill the child's process group: SIGTERM, then SIGKILL. Idempotent."""
        popen, self._popen = self._popen, None
        _running.discard(self)
        if popen is None:
            return
        _signal_group(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait()
        finally:
            # The leader is gone; a member that ignored SIGTERM must not linger.
            _signal_group(popen.pid, signal.SIGKILL)
            if popen.stdin:
                popen.stdin.close()

    def kill(self) -> None:
        """SIGKILL the child's process group at once, as a crash would. Idempotent."""
        popen, self._popen = self._popen, None
        _running.discard(self)
        if popen is None:
            return
        _signal_group(popen.pid, signal.SIGKILL)
        popen.wait()
        if popen.stdin:
            popen.stdin.close()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def lifeline_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` run under a keeper that holds the lifeline on its behalf."""
    return [sys.executable, "-m", "app.process", "--", *argv]


def keep(argv: Sequence[str]) -> int:
    """In the keeper: run ``argv``; stop it (SIGTERM) when the lifeline breaks or on a signal."""
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    def stop(*_: object) -> None:
        child.terminate()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    _on_lifeline_break(stop)
    return child.wait()


@atexit.register
def _stop_all() -> None:
    for proc in list(_running):
        proc.stop(timeout=2.0)


if __name__ == "__main__":
    sys.exit(keep(sys.argv[2:] if sys.argv[1:2] == ["--"] else sys.argv[1:]))
