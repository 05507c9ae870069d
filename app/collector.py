"""The dump collector: a private OpenSSH sshd that receives vmcores the way
Debian's kdump-tools sends them in SSH mode.

A server whose ``dump_target`` is ``{"type": "ssh"}`` gets its own key pair
when it is registered (``make_key_pair``); its admin installs the private key
in the server's kdump configuration (``GET .../dump-target/key``). The
collector is Debian's ``sshd``, run by ``crashlab serve`` as a managed child
(app/process.py) with a configuration of its own: its own address and port,
host key, ``authorized_keys`` and pid file, all under the collector's
directory. It touches no system sshd and needs no systemd.

Each key's line in ``authorized_keys`` forces the gate (app/collector_gate.py)
with that server's upload directory, ``<directory>/uploads/<server uuid>``:
the key may run only kdump-tools' own commands, inside that directory.
``authorized_keys`` is rewritten from the store whenever the set of ssh
servers changes; sshd reads it at every login.

What was tried and rejected: a chroot with ``internal-sftp`` (kdump-tools
runs ``mkdir``, ``dd`` and ``mv`` over ssh, which SFTP cannot express), and
paramiko as the server (crashlab would then carry its own SSH server; OpenSSH's
is the one operators run).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.collector_gate import SFTP_COMMAND, forced_command
from app.config import CollectorConfig
from app.crypto import SecretBox
from app.dump_targets import SshTarget, parse_target
from app.process import EmulatorProcess, EmulatorStartError, lifeline_argv
from app.store import Store

LOG = logging.getLogger(__name__)

START_SECONDS = 15.0


@dataclass(frozen=True)
class KeyPair:
    """A server's key: the private half in OpenSSH's format, the public half as a line."""

    private_key: str = field(repr=False)
    public_key: str


def make_key_pair(comment: str) -> KeyPair:
    """A new Ed25519 key pair (the cryptography package, OpenSSH's formats)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    return KeyPair(private, f"{public_key_of(private)} {comment}")


def public_key_of(private_key: str) -> str:
    """The ``ssh-ed25519 AAAA...`` line of an OpenSSH private key."""
    key = serialization.load_ssh_private_key(private_key.encode(), password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


@dataclass(frozen=True)
class UploadKey:
    """One server's entry in ``authorized_keys``."""

    server_uuid: str
    public_key: str


def upload_keys(store: Store, box: SecretBox) -> list[UploadKey]:
    """The public key of every server whose dump target is ssh."""
    return [
        UploadKey(server.uuid, public_key_of(box.decrypt(server.dump_key)))
        for server in store.list_servers()
        if server.dump_key is not None and isinstance(parse_target(server.dump_target), SshTarget)
    ]


class Collector:
    """The collector's files and its sshd."""

    def __init__(self, config: CollectorConfig, directory: Path) -> None:
        self.config = config
        self.directory = directory
        self.sshd_dir = directory / "sshd"
        self.uploads = directory / "uploads"
        self.host_key = self.sshd_dir / "ssh_host_ed25519_key"
        self.authorized_keys = self.sshd_dir / "authorized_keys"
        self.sshd_config = self.sshd_dir / "sshd_config"
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self._sshd: EmulatorProcess | None = None
        # Registrations run on several threads; each rewrite of the keys is whole.
        self._keys_lock = threading.Lock()

    # Files

    def prepare(self, store: Store, box: SecretBox) -> None:
        """The host key (kept across restarts), the configuration and the keys."""
        self.sshd_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.uploads.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.host_key.exists():
            pair = make_key_pair("crashlab-collector")
            _write_private(self.host_key, pair.private_key)
            self.host_key.with_suffix(".pub").write_text(pair.public_key + "\n")
        self.sshd_config.write_text(self.render_config())
        self.refresh_keys(store, box)

    def render_config(self) -> str:
        # Root may log in only to run the forced gate; anyone else logs in as itself.
        root_login = "forced-commands-only" if os.getuid() == 0 else "no"
        return _SSHD_CONFIG.format(
            address=self.config.address,
            port=self.config.port,
            host_key=self.host_key,
            pid_file=self.sshd_dir / "sshd.pid",
            authorized_keys=self.authorized_keys,
            user=self.user,
            root_login=root_login,
            sftp=SFTP_COMMAND,
        )

    def refresh_keys(self, store: Store, box: SecretBox) -> None:
        """Rewrite ``authorized_keys`` from the store, atomically: each key forced into its
        own directory. Read and written under one lock, so no stale read wins."""
        with self._keys_lock:
            keys = upload_keys(store, box)
            lines = [self.authorized_line(key) for key in sorted(keys, key=lambda k: k.server_uuid)]
            fd, staged = tempfile.mkstemp(dir=self.sshd_dir, prefix=".authorized_keys.")
            with os.fdopen(fd, "w") as handle:  # mkstemp makes it 0600
                handle.write("".join(line + "\n" for line in lines))
            os.replace(staged, self.authorized_keys)

    def authorized_line(self, key: UploadKey) -> str:
        directory = self.upload_dir(key.server_uuid)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        command = forced_command(directory, self.config.max_dump_bytes)
        # sshd reads the option up to the next '"': a path holding one cannot be quoted.
        if '"' in command or "\n" in command:
            raise ValueError(f"the collector cannot name this path in authorized_keys: {command}")
        return f'restrict,command="{command}" {key.public_key}'

    def upload_dir(self, server_uuid: str) -> Path:
        return self.uploads / server_uuid

    def host_public_key(self) -> str:
        """The collector's host key, ``ssh-ed25519 AAAA...``, for a known_hosts line."""
        return public_key_of(self.host_key.read_text())

    # The sshd

    def start(self) -> None:
        """Start sshd and wait until it answers with its banner."""
        if os.getuid() == 0:
            # sshd's privilege separation directory, made by systemd's tmpfiles on Debian.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        argv = [str(self.config.sshd), "-D", "-e", "-f", str(self.sshd_config)]
        self._sshd = EmulatorProcess(
            "collector sshd",
            lifeline_argv(argv),
            dict(os.environ),
            self.directory / "sshd.log",
        )
        self._sshd.start(ready=self.answers, timeout=START_SECONDS)

    def answers(self) -> bool:
        """True when sshd accepts a connection and sends its identification."""
        try:
            with socket.create_connection((self.config.address, self.config.port), 1.0) as sock:
                return sock.recv(8).startswith(b"SSH-2.0")
        except OSError:
            return False

    def is_running(self) -> bool:
        return self._sshd is not None and self._sshd.is_running()

    async def keep_running(self, interval: float) -> None:
        """Start sshd again whenever it has died, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if self.is_running():
                continue
            LOG.warning("the collector's sshd is not running; starting it again")
            try:
                await asyncio.to_thread(self.start)
            except EmulatorStartError as error:
                LOG.error("the collector's sshd did not start: %s", error)

    def stop(self) -> None:
        if self._sshd is not None:
            self._sshd.stop()
            self._sshd = None


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


# Only public keys, only the forced gate, no forwarding of any kind, no tty.
# LoginGraceTime 0: a QEMU guestfwd holds its connection open from boot until
# the crash kernel speaks, which may be days later.
_SSHD_CONFIG = """\
# The dump collector's sshd, written by crashlab (app/collector.py).
ListenAddress {address}:{port}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
AllowUsers {user}
PermitRootLogin {root_login}
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
DisableForwarding yes
PermitTTY no
PermitTunnel no
PermitUserRC no
PermitUserEnvironment no
PrintMotd no
PrintLastLog no
LoginGraceTime 0
MaxStartups 1000
MaxSessions 16
LogLevel VERBOSE
Subsystem sftp {sftp}
"""
