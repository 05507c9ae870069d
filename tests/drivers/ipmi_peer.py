"""IPMI BMCs served by pyghmi's own BMC server, for tests: real RMCP+ over UDP.

Run as ``python -m tests.drivers.ipmi_peer PORTS_FILE NMI_LOG LATENCY KIND...``:
one ``pyghmi.ipmi.bmc.Bmc`` per KIND on 127.0.0.1 (ports picked by the
kernel, written to PORTS_FILE as JSON), all in this one process, until killed.
``IPMIPeers`` (tests/drivers/conftest.py) runs one KIND per process and all
of them append to one NMI_LOG (one short ``O_APPEND`` write per NMI).

Kinds:

- ``on``: powered on; each chassis control "pulse diagnostic interrupt" appends
  the BMC's port to NMI_LOG, so tests can count NMIs per BMC.
- ``off``: powered off; a diagnostic interrupt is logged the same way (and
  must never arrive).
- ``nodiag``: powered on, ``pulse_diag`` not implemented: pyghmi answers 0xCC.
- ``mute-status``: as ``on``, but never answers Get Chassis Status (the read
  before the pulse), so no NMI can be sent.
- ``mute-first-diag``: as ``on``, but the answer to its first pulse is lost:
  the NMI is logged, nothing is sent back; later pulses are answered.

Every request other than the login answers after LATENCY seconds, without
blocking the others, as BMCs on a real network do; this is what makes "N at
once" measurably faster than "N in a row".
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

from pyghmi.ipmi import bmc

from app.process import announce_ready, hold_lifeline
from emulators.pyghmi_server import repair_server_sessions

USERNAME = "admin"
PASSWORD = "peer-password"


class PeerBmc(bmc.Bmc):  # type: ignore[misc]
    def __init__(self, power: str, nmi_log: Path, latency: float) -> None:
        super().__init__({USERNAME: PASSWORD}, port=0, address="127.0.0.1")
        self.port = self.serversocket.getsockname()[1]
        self.power = power
        self.nmi_log = nmi_log
        self.latency = latency
        self._log_lock = threading.Lock()

    def get_power_state(self) -> str:
        return self.power

    def handle_raw_request(self, request: dict[str, Any], session: Any) -> None:
        if self.latency:
            threading.Timer(self.latency, super().handle_raw_request, (request, session)).start()
        else:
            super().handle_raw_request(request, session)


class CountingBmc(PeerBmc):
    def pulse_diag(self) -> int:
        with self._log_lock, self.nmi_log.open("a") as log:
            log.write(f"{self.port}\n")
        return 0


class MutedBmc(CountingBmc):
    """Drops the answer to ``mute_status`` reads and to the first ``mute_diags`` pulses."""

    def __init__(self, nmi_log: Path, latency: float, *, status: bool, diags: int) -> None:
        super().__init__("on", nmi_log, latency)
        self.mute_status = status
        self.mute_diags = diags

    def handle_raw_request(self, request: dict[str, Any], session: Any) -> None:
        if request["netfn"] == 0 and request["command"] == 1 and self.mute_status:
            return
        if request["netfn"] == 0 and request["command"] == 2 and self.mute_diags:
            self.mute_diags -= 1
            self.pulse_diag()
            return
        super().handle_raw_request(request, session)


class NoDiagBmc(PeerBmc):
    """pyghmi's default ``pulse_diag`` raises NotImplementedError: completion code 0xCC."""


def _make(kind: str, nmi_log: Path, latency: float) -> PeerBmc:
    if kind == "on":
        return CountingBmc("on", nmi_log, latency)
    if kind == "off":
        return CountingBmc("off", nmi_log, latency)
    if kind == "mute-status":
        return MutedBmc(nmi_log, latency, status=True, diags=0)
    if kind == "mute-first-diag":
        return MutedBmc(nmi_log, latency, status=False, diags=1)
    if kind == "nodiag":
        return NoDiagBmc("on", nmi_log, latency)
    raise SystemExit(f"unknown BMC kind {kind!r}")


def main(argv: list[str]) -> None:
    hold_lifeline()
    repair_server_sessions()
    ports_file, nmi_log, latency, *kinds = argv
    bmcs = [_make(kind, Path(nmi_log), float(latency)) for kind in kinds]
    Path(ports_file).write_text(json.dumps([b.port for b in bmcs]))
    announce_ready()
    bmc.Bmc.listen(timeout=1)


if __name__ == "__main__":
    main(sys.argv[1:])
