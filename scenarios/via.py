"""The three paths an NMI can take to a guest, and what crashlab needs to use each.

``attach(via, guest, workdir)`` starts whatever stands between crashlab and
the guest (nothing for libvirt, virtualbmc for IPMI, sushy-tools for Redfish)
and yields the driver name, ``driver_info`` and ``dump_target`` to register
the server with. Where the dump lands does not depend on how the NMI is sent:

- libvirt: the guest's dump disk, which crashlab reads on its own host (a
  libvirt server names its domain already; behind a BMC the target names it);
- with ``over_ssh`` (the default behind a BMC, as a real bare-metal server
  would be set up; a choice over libvirt): the ``ssh`` target. The crash
  kernel sends its vmcore to crashlab's collector over the guest's restricted
  network (``ssh_dump_network``), and crashlab reads neither the guest's disk
  nor its console.

The emulator is stopped when the block ends, whatever happens inside it.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.guest import COLLECTOR_GUEST_ADDRESS, DUMP_DEVICE, Guest, SshDumpNetwork
from emulators.sushy import SushyEmulator
from emulators.vbmc import VirtualBMCs

SSH_TARGET: dict[str, Any] = {"type": "ssh"}


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
def attach(
    via: Via, guest: Guest, workdir: Path, *, over_ssh: bool = False
) -> Iterator[Attachment]:
    """Put ``via``'s path in front of a defined ``guest`` for the duration of the block."""
    if via is Via.LIBVIRT:
        target = SSH_TARGET if over_ssh else {"type": "disk", "device": DUMP_DEVICE}
        yield Attachment("libvirt", {"uri": guest.uri, "domain": guest.name}, target)
    elif via is Via.IPMI:
        with VirtualBMCs(workdir, libvirt_uri=guest.uri) as bmcs:
            endpoint = bmcs.add(guest.name)
            log = bmcs.root / "logs" / f"{guest.name}.log"
            target = SSH_TARGET if over_ssh else _disk_of(guest)
            yield Attachment("ipmi", endpoint.driver_info(), target, log)
    elif via is Via.REDFISH:
        with SushyEmulator(workdir, libvirt_uri=guest.uri, domains=[guest.name]) as bmc:
            info = bmc.driver_info() | {"system_id": bmc.system_id(guest.name), "verify_tls": False}
            target = SSH_TARGET if over_ssh else _disk_of(guest)
            yield Attachment("redfish", info, target, bmc.root / "emulator.log")
    else:
        raise ValueError(f"unknown path {via!r}")


def ssh_dump_network(key: dict[str, Any], workdir: Path) -> SshDumpNetwork:
    """The guest's network to the collector, with the key the API handed out for it.

    The guest knows the collector as ``COLLECTOR_GUEST_ADDRESS``, which its
    ``guestfwd`` turns into a connection to the collector's loopback port.
    """
    private_key = workdir / "kdump_id"
    fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key["private_key"])
    return SshDumpNetwork(
        port=key["port"],
        private_key=private_key,
        known_hosts=f"{COLLECTOR_GUEST_ADDRESS} {key['host_key']}",
        target=f"{key['user']}@{COLLECTOR_GUEST_ADDRESS}",
    )


def _disk_of(guest: Guest) -> dict[str, Any]:
    """The guest's dump disk as the target of a server that is not a libvirt one.

    No ``uri``: the target's default, the libvirt driver's, is where the guests run.
    """
    assert guest.uri == DEFAULT_LIBVIRT_URI, "a disk target is read on crashlab's host"
    return {"type": "disk", "domain": guest.name, "device": DUMP_DEVICE}
