"""The three paths an NMI can take to a guest, and what crashlab needs to use each.

``attach(via, guest, workdir)`` starts whatever stands between crashlab and
the guest (nothing for libvirt, virtualbmc for IPMI, sushy-tools for Redfish)
and yields the driver name, ``driver_info`` and ``dump_target`` to register
the server with. The dump target is the guest's dump disk whatever the path:
where the dump lands does not depend on how the NMI is sent. A libvirt server
names its domain already; behind a BMC the target names it.
The emulator is stopped when the block ends, whatever happens inside it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.guest import DUMP_DEVICE, Guest
from emulators.sushy import SushyEmulator
from emulators.vbmc import VirtualBMCs


class Via(enum.StrEnum):
    LIBVIRT = "libvirt"
    IPMI = "ipmi"
    REDFISH = "redfish"


@dataclass(frozen=True)
class Attachment:
    """How the API reaches the guest: a driver and its settings, and where its dump lands."""

    driver: str
    driver_info: dict[str, Any] = field(repr=False)
    dump_target: dict[str, Any] = field(default_factory=dict)
    emulator_log: Path | None = None


@contextmanager
def attach(via: Via, guest: Guest, workdir: Path) -> Iterator[Attachment]:
    """Put ``via``'s path in front of a running ``guest`` for the duration of the block."""
    if via is Via.LIBVIRT:
        target = {"type": "disk", "device": DUMP_DEVICE}
        yield Attachment("libvirt", {"uri": guest.uri, "domain": guest.name}, target)
    elif via is Via.IPMI:
        with VirtualBMCs(workdir, libvirt_uri=guest.uri) as bmcs:
            endpoint = bmcs.add(guest.name)
            log = bmcs.root / "logs" / f"{guest.name}.log"
            yield Attachment("ipmi", endpoint.driver_info(), _disk_of(guest), log)
    elif via is Via.REDFISH:
        with SushyEmulator(workdir, libvirt_uri=guest.uri, domains=[guest.name]) as bmc:
            info = bmc.driver_info() | {"system_id": bmc.system_id(guest.name), "verify_tls": False}
            yield Attachment("redfish", info, _disk_of(guest), bmc.root / "emulator.log")
    else:
        raise ValueError(f"unknown path {via!r}")


def _disk_of(guest: Guest) -> dict[str, Any]:
    """The guest's dump disk as the target of a server that is not a libvirt one.

    No ``uri``: the target's default, the libvirt driver's, is where the guests run.
    """
    assert guest.uri == DEFAULT_LIBVIRT_URI, "a disk target is read on crashlab's host"
    return {"type": "disk", "domain": guest.name, "device": DUMP_DEVICE}
