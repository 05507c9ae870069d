"""The three paths an NMI can take to a guest, and what crashlab needs to use each.

``attach(via, guest, workdir)`` starts whatever stands between crashlab and
the guest (nothing for libvirt, virtualbmc for IPMI, sushy-tools for Redfish)
and yields the driver name and ``driver_info`` to register the server with.
The emulator is stopped when the block ends, whatever happens inside it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulators.guest import Guest
from emulators.sushy import SushyEmulator
from emulators.vbmc import VirtualBMCs


class Via(enum.StrEnum):
    LIBVIRT = "libvirt"
    IPMI = "ipmi"
    REDFISH = "redfish"


@dataclass(frozen=True)
class Attachment:
    """How the API reaches the guest: a driver and its settings."""

    driver: str
    driver_info: dict[str, Any] = field(repr=False)
    emulator_log: Path | None = None


@contextmanager
def attach(via: Via, guest: Guest, workdir: Path) -> Iterator[Attachment]:
    """Put ``via``'s path in front of a running ``guest`` for the duration of the block."""
    if via is Via.LIBVIRT:
        yield Attachment("libvirt", {"uri": guest.uri, "domain": guest.name})
    elif via is Via.IPMI:
        with VirtualBMCs(workdir, libvirt_uri=guest.uri) as bmcs:
            endpoint = bmcs.add(guest.name)
            info = endpoint.driver_info()
            yield Attachment("ipmi", info, bmcs.root / "logs" / f"{guest.name}.log")
    elif via is Via.REDFISH:
        with SushyEmulator(workdir, libvirt_uri=guest.uri, domains=[guest.name]) as bmc:
            info = bmc.driver_info() | {"system_id": bmc.system_id(guest.name), "verify_tls": False}
            yield Attachment("redfish", info, bmc.root / "emulator.log")
    else:
        raise ValueError(f"unknown path {via!r}")
