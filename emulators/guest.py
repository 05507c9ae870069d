"""A crashlab guest as a libvirt domain: boot, watch its console, clean up.

``Guest`` defines and starts a domain that boots a ``GuestImage`` straight from
its kernel and initramfs, with the serial console written to a file and a
sparse raw dump disk as ``/dev/vda``. Progress is read from the console, never
guessed from a fixed sleep. Leaving the ``with`` block (normally, by exception
or by Ctrl-C) destroys and undefines the domain and deletes its files.

With a ``SshDumpNetwork`` the domain also gets the network the kdump-ssh
variant's crash kernel sends its vmcore over (emulators/guest_image.py): a QEMU
user-mode netdev with ``restrict=on``, so the guest reaches nothing but the
collector, whose ``COLLECTOR_GUEST_ADDRESS:22`` a ``guestfwd`` forwards to
``127.0.0.1:<port>`` on the host. libvirt 9.0's ``<interface type='user'>``
offers neither option, so both go in ``<qemu:commandline>``. QEMU runs with
``-sandbox spawn=deny``, which rules out a ``guestfwd`` to a command; the
forward is a chardev, one TCP connection QEMU opens to the collector when it
starts (and again 1 s after the collector closes it). It carries one guest
connection, and a close on the host side never reaches the guest's socket,
so the crash kernel sends everything over one multiplexed ssh connection.
The server's key, the collector's host key and the target reach the guest as
fw_cfg blobs (``<sysinfo type='fwcfg'>``), written to the guest's work dir;
libvirt's DAC driver gives those files to QEMU's user while the domain runs
(and back to their owner after), so the private key stays 0600.

Failures, all subclasses of ``GuestError``::

    GuestError
     ├── GuestStartFailed   libvirt refused to define or start the domain
     │    └── LibvirtTooSlow  libvirt took longer than LIBVIRT_CALL_SECONDS to do it
     └── GuestTimeout       a console pattern did not appear in time
          └── GuestStopped  the domain stopped before the pattern appeared
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import libvirt

from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.accel import Accel, decided_accel, record_verdict

# The dump network's addresses are re-exported for the collector's side.
from emulators.guest_image import COLLECTOR_GUEST_ADDRESS as COLLECTOR_GUEST_ADDRESS
from emulators.guest_image import (
    FW_CFG_COREDIR,
    FW_CFG_KNOWN_HOSTS,
    FW_CFG_SSH_KEY,
    FW_CFG_SSH_TARGET,
    GUEST_AGENT_PORT,
    READY_MARKER,
    GuestImage,
    cache_root,
)
from emulators.guest_image import GUEST_ADDRESS as GUEST_ADDRESS

MEMORY_MIB = 768
DUMP_DISK_MIB = 64
# The dump disk's target dev in the domain XML: a dump target names it (app/dump_targets.py).
DUMP_DEVICE = "vda"
POLL_SECONDS = 0.1
# A define or start takes tens of milliseconds on a ready host; past this, say why.
LIBVIRT_CALL_SECONDS = 10.0
# A KVM guest reaches /init in about a second; TCG takes about six.
PROBE_TIMEOUT = 20.0

T = TypeVar("T")

QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NAMESPACE)
# The port the crash kernel connects to, as kdump-tools' ssh does by default.
COLLECTOR_GUEST_PORT = 22
# QEMU places a -device before libvirt's own, whose addresses libvirt counts up
# from slot 2: the last slot of the bus stays clear of them.
NETWORK_PCI_SLOT = 0x1F

# libvirt prints every error to stderr by default; crashlab raises or ignores them itself.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class GuestError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class GuestStartFailed(GuestError):
    pass


class LibvirtTooSlow(GuestStartFailed):
    """A libvirt call finished, but far too late: the host is not ready (``crashlab doctor``)."""

    def __init__(self, call: str, subject: str, seconds: float) -> None:
        super().__init__(
            f"libvirt {call} of {subject} took {seconds:.1f}s (bound {LIBVIRT_CALL_SECONDS:.0f}s); "
            "libvirt is slow on this host: run crashlab doctor"
        )
        self.call = call
        self.seconds = seconds


class GuestTimeout(GuestError):
    def __init__(self, pattern: str, timeout: float, tail: str, reason: str = "") -> None:
        reason = reason or f"no {pattern!r} on the console within {timeout:.0f}s"
        super().__init__(f"{reason}; console ends with:\n{tail}")
        self.pattern = pattern
        self.timeout = timeout
        self.tail = tail


class GuestStopped(GuestTimeout):
    def __init__(self, pattern: str, timeout: float, tail: str) -> None:
        super().__init__(pattern, timeout, tail, f"the guest stopped before {pattern!r}")


@dataclass(frozen=True)
class SshDumpNetwork:
    """Where a kdump-ssh guest's crash kernel sends its vmcore, and with what key.

    ``port`` is the collector's sshd on 127.0.0.1; ``private_key`` the server's
    key file (OpenSSH format); ``known_hosts`` the collector's host key line
    (``10.0.2.100 ssh-ed25519 AAAA...``), or a file holding it; ``target``
    kdump-tools' ``SSH=``, ``user@10.0.2.100``; ``coredir`` its
    ``KDUMP_COREDIR`` on the collector, ``/var/crash`` when None.

    What the collector's sshd must allow: QEMU's connection arrives when the
    domain starts and waits, unauthenticated, until the crash (so
    ``LoginGraceTime 0`` and ``MaxStartups`` above the number of guests), and
    OpenSSH 9's scp, which sends the dmesg, speaks SFTP (``Subsystem sftp``).
    """

    port: int
    private_key: Path
    known_hosts: Path | str
    target: str
    coredir: str | None = None

    def netdev_args(self) -> list[str]:
        """QEMU's arguments for the restricted user-mode network (``,,`` escapes a comma)."""
        forward = (
            f"tcp:{COLLECTOR_GUEST_ADDRESS}:{COLLECTOR_GUEST_PORT}"
            f"-tcp:127.0.0.1:{self.port},,reconnect=1"
        )
        return [
            "-netdev",
            f"user,id=crashnet,restrict=on,guestfwd={forward}",
            "-device",
            f"virtio-net-pci,netdev=crashnet,bus=pci.0,addr={NETWORK_PCI_SLOT:#x}",
        ]

    def blobs(self) -> dict[str, bytes]:
        """The fw_cfg blobs the crash kernel reads, by fw_cfg name."""
        known_hosts = (
            self.known_hosts.read_text() if isinstance(self.known_hosts, Path) else self.known_hosts
        )
        blobs = {
            FW_CFG_SSH_KEY: self.private_key.read_bytes(),
            FW_CFG_SSH_TARGET: self.target.encode(),
            FW_CFG_KNOWN_HOSTS: known_hosts.rstrip("\n").encode() + b"\n",
        }
        if self.coredir is not None:
            blobs[FW_CFG_COREDIR] = self.coredir.encode()
        return blobs


class Console:
    """Follows a console log file, remembering when each line first appeared."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self.seen_at: list[float] = []
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[str]:
        """Read what the guest wrote since the last poll; return the new complete lines."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        now = time.monotonic()
        new = [chunk.decode(errors="replace").rstrip("\r") for chunk in chunks]
        self.lines += new
        self.seen_at += [now] * len(new)
        return new

    def find(
        self, pattern: str | re.Pattern[str], start: int = 0
    ) -> tuple[re.Match[str], float] | None:
        """The first line from index ``start`` matching ``pattern``, and when it was read."""
        regex = re.compile(pattern)
        for index in range(start, len(self.lines)):
            if found := regex.search(self.lines[index]):
                return found, self.seen_at[index]
        return None

    def mark(self) -> int:
        """The index the next new line will have; pass it to ``find`` as ``start``."""
        self.poll()
        return len(self.lines)

    def follow(self, until: Callable[[], bool]) -> Iterator[str]:
        """Yield lines as they appear, until ``until()`` is true."""
        while True:
            yield from self.poll()
            if until():
                yield from self.poll()
                return
            time.sleep(POLL_SECONDS)

    def tail(self, count: int = 20) -> str:
        self.poll()
        return "\n".join(self.lines[-count:] + ([self._partial.decode(errors="replace")]))

    def text(self) -> str:
        self.poll()
        return "\n".join(self.lines)


class Guest:
    """One libvirt domain booting ``image``; a context manager that always cleans up.

    ``accel`` defaults to what ``detect_accel`` finds (KVM only if it works).
    The console log and dump disk live in ``workdir_root/<name>/`` (default
    ``$CRASHLAB_CACHE/guests``), deleted with the domain.
    The domain is defined (persistent) and then started, so it looks the same
    whether or not virtualbmc or sushy-tools later redefine it.
    """

    def __init__(
        self,
        image: GuestImage,
        *,
        uri: str = DEFAULT_LIBVIRT_URI,
        accel: Accel | None = None,
        name_prefix: str = "crashlab",
        workdir_root: Path | None = None,
        memory_mib: int = MEMORY_MIB,
        dump_disk_mib: int = DUMP_DISK_MIB,
        guest_agent: bool = True,
        dump_network: SshDumpNetwork | None = None,
    ) -> None:
        self.image = image
        self.guest_agent = guest_agent
        self.dump_network = dump_network
        self.uri = uri
        self.accel = accel
        self.name = f"{name_prefix}-{image.variant.value}-{secrets.token_hex(4)}"
        self.memory_mib = memory_mib
        self.dump_disk_mib = dump_disk_mib
        self._workdir_root = workdir_root or cache_root() / "guests"
        self.workdir = self._workdir_root / self.name
        self.console_path = self.workdir / "console.log"
        self.dump_disk = self.workdir / "dump.img"
        self.fw_cfg_dir = self.workdir / "fw_cfg"
        self.console = Console(self.console_path)
        self.uuid = ""
        self.started_at = 0.0
        self._conn: libvirt.virConnect | None = None

    def __repr__(self) -> str:
        return f"Guest({self.name!r}, accel={self.accel})"

    def __enter__(self) -> Guest:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None:
            self._conn = libvirt.open(self.uri)
        return self._conn

    def domain(self) -> libvirt.virDomain:
        return self.conn.lookupByName(self.name)

    def start(self) -> None:
        """Define the domain, then boot it."""
        self.define()
        self.boot()

    def define(self) -> None:
        """Create the work dir and dump disk, and define the domain, not yet running."""
        if self.accel is None:
            self.accel = detect_accel(self.image, self.uri)
        self._workdir_root.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(mode=0o755)
        with self.dump_disk.open("wb") as disk:
            disk.truncate(self.dump_disk_mib * 1024 * 1024)
        self._define()

    def boot(self) -> None:
        """Start the defined domain.

        A ``dump_network`` may be set between ``define`` and ``boot``: behind a
        BMC, the domain must exist before its server is registered, and the
        server's key exists only once it is. The domain is then defined again
        with the network, and its fw_cfg blobs written, before it starts.
        """
        if self.dump_network is not None:
            self._write_fw_cfg_blobs(self.dump_network.blobs())
        domain = self._define() if self.dump_network is not None else self.domain()
        try:
            self.started_at = time.monotonic()
            self._bounded("create", domain.create)
        except libvirt.libvirtError as exc:
            raise GuestStartFailed(f"cannot start {self.name}: {exc}") from exc

    def _define(self) -> libvirt.virDomain:
        try:
            domain = self._bounded("defineXML", lambda: self.conn.defineXML(self.domain_xml()))
        except libvirt.libvirtError as exc:
            raise GuestStartFailed(f"cannot define {self.name}: {exc}") from exc
        self.uuid = domain.UUIDString()
        return domain

    def fw_cfg_file(self, name: str) -> Path:
        """The file in the work dir that holds the fw_cfg blob ``name``."""
        return self.fw_cfg_dir / name.rsplit("/", 1)[-1]

    def _write_fw_cfg_blobs(self, blobs: dict[str, bytes]) -> None:
        self.fw_cfg_dir.mkdir(mode=0o755)
        for name, data in blobs.items():
            # Only the key is secret; libvirt hands each file to QEMU's user.
            mode = 0o600 if name == FW_CFG_SSH_KEY else 0o644
            fd = os.open(self.fw_cfg_file(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)

    def _bounded(self, call: str, run: Callable[[], T]) -> T:
        """Run a libvirt call; one that took longer than its bound fails, naming itself."""
        started = time.monotonic()
        result = run()
        seconds = time.monotonic() - started
        if seconds > LIBVIRT_CALL_SECONDS:
            raise LibvirtTooSlow(call, self.name, seconds)
        return result

    def domain_xml(self) -> str:
        """The domain definition. No ``<graphics>``: libvirt 9.0 rejects type='none'."""
        assert self.accel is not None
        domain = ET.Element("domain", type=self.accel.domain_type)
        ET.SubElement(domain, "name").text = self.name
        if self.uuid:
            # Defined again before boot: the same domain, with what was added since.
            ET.SubElement(domain, "uuid").text = self.uuid
        ET.SubElement(domain, "memory", unit="MiB").text = str(self.memory_mib)
        ET.SubElement(domain, "vcpu").text = "1"
        os_ = ET.SubElement(domain, "os")
        ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
        ET.SubElement(os_, "kernel").text = str(self.image.kernel)
        ET.SubElement(os_, "initrd").text = str(self.image.initrd)
        ET.SubElement(os_, "cmdline").text = self.image.cmdline
        if self.dump_network is not None:
            sysinfo = ET.SubElement(domain, "sysinfo", type="fwcfg")
            for name in self.dump_network.blobs():
                ET.SubElement(sysinfo, "entry", name=name, file=str(self.fw_cfg_file(name)))
        features = ET.SubElement(domain, "features")
        ET.SubElement(features, "acpi")
        ET.SubElement(features, "apic")
        # The guest's qemu_fw_cfg publishes its VMCOREINFO here, so a host-side
        # memory dump (app/capture.py) names its kernel.
        ET.SubElement(features, "vmcoreinfo", state="on")
        if self.accel is Accel.KVM:
            ET.SubElement(domain, "cpu", mode="host-passthrough")
        # A reboot would hide the console of a panic; stop instead.
        ET.SubElement(domain, "on_reboot").text = "destroy"
        ET.SubElement(domain, "on_crash").text = "preserve"
        devices = ET.SubElement(domain, "devices")
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw")
        ET.SubElement(disk, "source", file=str(self.dump_disk))
        ET.SubElement(disk, "target", dev=DUMP_DEVICE, bus="virtio")
        serial = ET.SubElement(devices, "serial", type="file")
        # Appended to, not truncated, when the domain starts again (a BMC's power on):
        # the console's readers keep their offsets.
        ET.SubElement(serial, "source", path=str(self.console_path), append="on")
        ET.SubElement(serial, "target", port="0")
        if self.guest_agent:
            # The QEMU guest agent's port, as OpenStack's hw_qemu_guest_agent adds it;
            # libvirt chooses the host side's socket.
            channel = ET.SubElement(devices, "channel", type="unix")
            ET.SubElement(channel, "target", type="virtio", name=GUEST_AGENT_PORT)
        ET.SubElement(devices, "memballoon", model="none")
        if self.dump_network is not None:
            commandline = ET.SubElement(domain, f"{{{QEMU_NAMESPACE}}}commandline")
            for arg in self.dump_network.netdev_args():
                ET.SubElement(commandline, f"{{{QEMU_NAMESPACE}}}arg", value=arg)
        return ET.tostring(domain, encoding="unicode")

    def is_active(self) -> bool:
        try:
            return bool(self.domain().isActive())
        except libvirt.libvirtError:
            return False

    def inject_nmi(self) -> None:
        """Send an NMI straight through libvirt, bypassing crashlab's API."""
        self.domain().injectNMI(0)

    def wait_for(
        self,
        pattern: str | re.Pattern[str],
        timeout: float,
        on_line: Callable[[str], None] | None = None,
        start_line: int = 0,
    ) -> float:
        """Wait until a console line matches ``pattern``; return seconds since this call.

        Lines before index ``start_line`` (see ``Console.mark``) are ignored; a
        matching line already read counts, with 0 seconds. ``on_line`` sees each
        new line as it arrives. Raises ``GuestStopped`` as soon as the domain
        has stopped without printing it, ``GuestTimeout`` after ``timeout``.
        """
        start = time.monotonic()
        deadline = start + timeout
        while True:
            for line in self.console.poll():
                if on_line:
                    on_line(line)
            if found := self.console.find(pattern, start_line):
                return max(0.0, found[1] - start)
            if not self.is_active():
                for line in self.console.poll():
                    if on_line:
                        on_line(line)
                if found := self.console.find(pattern, start_line):
                    return max(0.0, found[1] - start)
                raise GuestStopped(str(pattern), timeout, self.console.tail())
            if time.monotonic() > deadline:
                raise GuestTimeout(str(pattern), timeout, self.console.tail())
            time.sleep(POLL_SECONDS)

    def wait_ready(
        self, timeout: float = 120.0, on_line: Callable[[str], None] | None = None
    ) -> dict[str, str]:
        """Wait for the READY marker; return its ``key=value`` fields."""
        self.wait_for(READY_MARKER, timeout, on_line)
        found = self.console.find(READY_MARKER + r"(.*)")
        assert found is not None
        return dict(re.findall(r"(\w+)=(\S+)", found[0].group(1)))

    def wait_stopped(self, timeout: float) -> float:
        """Wait until the domain is no longer running; return the seconds waited."""
        start = time.monotonic()
        while self.is_active():
            if time.monotonic() - start > timeout:
                raise GuestTimeout("<domain shut off>", timeout, self.console.tail())
            time.sleep(POLL_SECONDS)
        return time.monotonic() - start

    def cleanup(self) -> None:
        """Destroy and undefine the domain, then delete its files. Safe to repeat."""
        if self._conn is not None:
            # A new connection: a libvirtd restarted since start() (tests/reliability
            # restarts it) has dropped the old one, and the domain must still go.
            _ignore_libvirt_error(self._conn.close)
            self._conn = None
        try:
            domain = self.conn.lookupByName(self.name)
        except libvirt.libvirtError:
            domain = None
        if domain is not None:
            # A transient domain vanishes when destroyed; a defined one must be undefined.
            _ignore_libvirt_error(domain.destroy)
            _ignore_libvirt_error(domain.undefine)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def detect_accel(image: GuestImage, uri: str) -> Accel:
    """The accelerator to boot ``image`` with on ``uri``; probes KVM at most once per host."""
    decided = decided_accel(uri)
    if decided is not None:
        return decided
    return record_verdict(uri, Accel.KVM if probe_kvm(image, uri) else Accel.TCG)


def probe_kvm(image: GuestImage, uri: str) -> bool:
    """Boot ``image`` under KVM; True if it reaches READY within ``PROBE_TIMEOUT``."""
    try:
        with Guest(image, uri=uri, accel=Accel.KVM, name_prefix="crashlab-kvmprobe") as guest:
            guest.wait_for(READY_MARKER, PROBE_TIMEOUT)
    except GuestError:
        return False
    return True


def _ignore_libvirt_error(call: Callable[[], object]) -> None:
    """Racing with the guest powering itself off is fine; the domain is gone either way."""
    with contextlib.suppress(libvirt.libvirtError):
        call()
