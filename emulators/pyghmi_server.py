"""One workaround for pyghmi's BMC server, shared by every BMC crashlab simulates or emulates.

pyghmi 1.6's ``ServerSession`` has no ``sessionless_data``. A client that
logs in again from the same address makes the old server session drop its
routing entry on the first packet; a second packet already queued for that
session (a re-send under load) is then sessionless, and pyghmi calls
``sessionless_data`` on the session: the AttributeError ends the BMC's loop
(45 of 200 simulated BMCs died so in one run, and ipmitool could not reach
them either). virtualbmc serves IPMI with the same server code.

``repair_server_sessions()`` is called explicitly by each BMC child process
(``emulators/vbmc.py``, ``scenarios/benchmarks/ipmi_sim.py``,
``tests/drivers/ipmi_peer.py``), never on import, and only where pyghmi lacks
the method: a pyghmi that gains its own is left alone.
"""

from __future__ import annotations

from typing import Any


def repair_server_sessions() -> bool:
    """Let the BMC handle a packet its session no longer routes; True if pyghmi needed it."""
    from pyghmi.ipmi.private import serversession

    if hasattr(serversession.ServerSession, "sessionless_data"):
        return False

    def sessionless_data(session: Any, data: bytes, sockaddr: Any) -> None:
        session.bmc.sessionless_data(data, sockaddr)

    serversession.ServerSession.sessionless_data = sessionless_data
    return True
