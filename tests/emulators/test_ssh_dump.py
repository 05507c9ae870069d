"""A real kdump-ssh guest sends its vmcore to a real sshd, as Debian's kdump-tools does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.process import free_port
from app.vmcore import extract_vmcore, scan_flattened
from emulators.accel import Accel
from emulators.guest import (
    COLLECTOR_GUEST_ADDRESS,
    GUEST_ADDRESS,
    QEMU_NAMESPACE,
    Guest,
    SshDumpNetwork,
)
from emulators.guest_image import (
    CRASH_KERNEL_MARKER,
    DUMP_FAILED_MARKER,
    DUMP_SAVED_MARKER,
    FW_CFG_KNOWN_HOSTS,
    FW_CFG_SSH_KEY,
    FW_CFG_SSH_TARGET,
    PANIC_LOG_MARKER,
    GuestImage,
    ImageVariant,
)

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

SSHD = Path("/usr/sbin/sshd")
# Where sshd's privilege separation runs; Debian's init script makes it.
PRIVSEP_DIR = Path("/run/sshd")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")
BOOT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Sshd:
    """A private sshd on 127.0.0.1, the collector's stand-in."""

    port: int
    client_key: Path
    known_hosts: str
    log: Path


def _sshd_config(root: Path, port: int) -> str:
    # OpenSSH 9's scp speaks SFTP, so the collector needs the subsystem.
    return f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {root}/host_ed25519
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LoginGraceTime 0
MaxStartups 100
LogLevel VERBOSE
Subsystem sftp {SFTP_SERVER}
"""


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    if not SSHD.exists():
        pytest.skip("openssh-server is not installed (scripts/apt-packages)")
    root = tmp_path / "sshd"
    root.mkdir()
    _keygen(root / "host_ed25519")
    _keygen(root / "client")
    (root / "authorized_keys").write_text((root / "client.pub").read_text())
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    (root / "sshd_config").write_text(_sshd_config(root, port))
    log = root / "sshd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(root / "sshd_config")],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 10
        while "Server listening" not in log.read_text():
            assert process.poll() is None, f"sshd exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"sshd did not listen: {log.read_text()}"
            time.sleep(0.05)
        key_type, key = (root / "host_ed25519.pub").read_text().split()[:2]
        yield Sshd(port, root / "client", f"{COLLECTOR_GUEST_ADDRESS} {key_type} {key}", log)
    finally:
        # Its own process group: the listener and any connection it still serves.
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)


def _dump_is_blank(disk: Path) -> bool:
    with disk.open("rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return False
    return True


def test_kdump_ssh_guest_sends_its_vmcore_as_kdump_tools_does(
    images: dict[ImageVariant, GuestImage], sshd: Sshd, tmp_path: Path
) -> None:
    image = images[ImageVariant.KDUMP_SSH]
    coredir = tmp_path / "crash"
    network = SshDumpNetwork(
        port=sshd.port,
        private_key=sshd.client_key,
        known_hosts=sshd.known_hosts,
        target=f"root@{COLLECTOR_GUEST_ADDRESS}",
        coredir=str(coredir),
    )
    with Guest(image, dump_network=network) as guest:
        ready = guest.wait_ready(BOOT_TIMEOUT)
        assert ready["kexec_crash_loaded"] == "1"
        nmi_at = time.time()
        guest.inject_nmi()
        guest.wait_for(CRASH_KERNEL_MARKER, 60)
        guest.wait_for(f"{PANIC_LOG_MARKER} .*Kernel panic - not syncing: NMI", 60)
        guest.wait_for(f"{DUMP_SAVED_MARKER}|{DUMP_FAILED_MARKER}", 120)
        guest.wait_stopped(30)
        console = guest.console.text()
        # Sent over the network only: the dump disk stays as it was made.
        assert _dump_is_blank(guest.dump_disk)

    saved = re.search(rf"{DUMP_SAVED_MARKER} bytes=(\d+)", console)
    assert saved, console[-3000:]
    stampdirs = list(coredir.glob(f"{GUEST_ADDRESS}-*"))
    assert len(stampdirs) == 1, stampdirs
    stamp = stampdirs[0].name.removeprefix(f"{GUEST_ADDRESS}-")
    assert re.fullmatch(r"\d{12}", stamp)
    assert sorted(p.name for p in stampdirs[0].iterdir()) == [f"dmesg.{stamp}", f"dump.{stamp}"]
    dump = stampdirs[0] / f"dump.{stamp}"
    assert "Kernel panic - not syncing: NMI" in (stampdirs[0] / f"dmesg.{stamp}").read_text()
    stream = scan_flattened(dump)
    assert stream.found and stream.complete
    assert stream.bytes == dump.stat().st_size == int(saved.group(1))
    vmcore = extract_vmcore(dump, tmp_path / "vmcore")
    assert vmcore.kernel_release == image.kernel_release
    assert vmcore.panic_message == "NMI: Not continuing"
    # Every ssh and scp went over the one connection QEMU forwards.
    assert sshd.log.read_text().count("Accepted publickey") == 1
    print(
        f"\nkdump-ssh: {dump.stat().st_size} bytes in dump.{stamp}, "
        f"{dump.stat().st_ctime - nmi_at:.1f}s after the NMI"
    )


def test_the_dump_network_is_in_the_domain_only_when_asked_for(
    images: dict[ImageVariant, GuestImage], tmp_path: Path
) -> None:
    image = images[ImageVariant.KDUMP_SSH]
    (tmp_path / "key").write_text("not a key\n")
    network = SshDumpNetwork(
        port=2222, private_key=tmp_path / "key", known_hosts="10.0.2.100 ssh-ed25519 AAAA",
        target="kdump@10.0.2.100",
    )  # fmt: skip
    plain = ET.fromstring(Guest(image, accel=Accel.TCG).domain_xml())
    assert plain.find("sysinfo") is None and plain.find(f"{{{QEMU_NAMESPACE}}}commandline") is None

    guest = Guest(image, accel=Accel.TCG, dump_network=network)
    domain = ET.fromstring(guest.domain_xml())
    args = [arg.get("value") for arg in domain.iter(f"{{{QEMU_NAMESPACE}}}arg")]
    assert args[0] == "-netdev" and args[2] == "-device"
    assert args[1] == (
        "user,id=crashnet,restrict=on,guestfwd=tcp:10.0.2.100:22-tcp:127.0.0.1:2222,,reconnect=1"
    )
    assert args[3].startswith("virtio-net-pci,netdev=crashnet,")
    entries = {e.get("name"): e.get("file") for e in domain.findall("sysinfo[@type='fwcfg']/entry")}
    assert set(entries) == {FW_CFG_SSH_KEY, FW_CFG_SSH_TARGET, FW_CFG_KNOWN_HOSTS}
    assert all(Path(str(path)).parent == guest.fw_cfg_dir for path in entries.values())
