"""Blank QEMU domains on qemu:///system, each call over a connection of its own.

A blank domain has no OS (SeaBIOS finds nothing to boot and waits), which is
enough for libvirt to report it running and accept an NMI, and for the BMC
emulators to act on it. Shared by tests/drivers and tests/reliability. These
helpers keep no connection: tests/reliability restarts libvirtd, which drops
every open connection.
"""

from __future__ import annotations

import time

import libvirt

from drivers.uris import DEFAULT_LIBVIRT_URI

URI = DEFAULT_LIBVIRT_URI
PREFIX = "crashlab-reltest-"
BLANK_DOMAIN_XML = """
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <devices><memballoon model='none'/></devices>
</domain>
"""


def connect(timeout: float = 20.0) -> libvirt.virConnect:
    """A new connection, waiting for libvirtd if it is (re)starting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return libvirt.open(URI)
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def domain_exists(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    return True


def start_blank(name: str) -> None:
    conn = connect()
    try:
        conn.defineXML(BLANK_DOMAIN_XML.format(name=name)).create()
    finally:
        conn.close()


def remove(name: str) -> None:
    """Destroy and undefine the domain if it exists."""
    conn = connect()
    try:
        domain = conn.lookupByName(name)
        if domain.isActive():
            domain.destroy()
        domain.undefine()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()
