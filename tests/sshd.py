"""A private OpenSSH sshd on 127.0.0.1, and the client options that reach it.

Everything lives in one directory: the host key, ``sshd_config``,
``authorized_keys`` (sshd reads it at every connection, so keys may be added
while it runs), the client's ``ssh_config`` (host ``collector``) and the keys.
The login user is the current user; as root, ``PermitRootLogin
forced-commands-only`` lets in only keys with a ``command=``.
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
from pathlib import Path

from app.process import REPO_ROOT, EmulatorProcess, free_port

SSHD = Path("/usr/sbin/sshd")
HOST = "collector"
# sshd as root insists on its privilege-separation directory (made at boot on Debian).
PRIVSEP_DIR = Path("/run/sshd")

_SSHD_CONFIG = """\
ListenAddress 127.0.0.1
Port {port}
HostKey {dir}/host_ed25519
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin forced-commands-only
StrictModes no
LoginGraceTime 0
MaxStartups 100
Subsystem sftp {subsystem}
SetEnv PYTHONPATH={repo}
"""

_SSH_CONFIG = """\
Host {host}
  HostName 127.0.0.1
  Port {port}
  User {user}
  UserKnownHostsFile {dir}/known_hosts
  StrictHostKeyChecking accept-new
  BatchMode yes
  IdentitiesOnly yes
  ConnectTimeout 10
"""


class PrivateSSHD:
    """One sshd (``-D -e``, logging to ``sshd.log``) serving ``directory``'s keys."""

    def __init__(self, directory: Path, subsystem: str = "crashlab-sftp"):
        self.directory = directory
        self.subsystem = subsystem
        self.port = 0
        self.process: EmulatorProcess | None = None

    @property
    def ssh_config(self) -> Path:
        return self.directory / "ssh_config"

    def start(self) -> None:
        """Write the configs and host key, start sshd, wait until it accepts connections."""
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        _keygen(self.directory / "host_ed25519", "crashlab-test-host")
        (self.directory / "authorized_keys").touch()
        self.port = free_port()
        fields = {"port": self.port, "dir": self.directory, "user": getpass.getuser()}
        config = _SSHD_CONFIG.format(**fields, subsystem=self.subsystem, repo=REPO_ROOT)
        (self.directory / "sshd_config").write_text(config)
        self.ssh_config.write_text(_SSH_CONFIG.format(**fields, host=HOST))
        argv = [str(SSHD), "-D", "-e", "-f", str(self.directory / "sshd_config")]
        self.process = EmulatorProcess("sshd", argv, dict(os.environ), self.directory / "sshd.log")
        self.process.start(ready=self._accepts)

    def stop(self) -> None:
        """Stop sshd by its PID (its process group). Idempotent."""
        if self.process is not None:
            self.process.stop()

    def add_key(self, name: str, command: str) -> Path:
        """A new ed25519 key whose every session runs ``command``; its private key's path."""
        key = self.directory / f"key-{name}"
        _keygen(key, f"crashlab-server-{name}")
        quoted = command.replace('"', '\\"')
        line = f'restrict,command="{quoted}" {key.with_suffix(".pub").read_text().strip()}\n'
        with open(self.directory / "authorized_keys", "a") as keys:
            keys.write(line)
        return key

    def ssh(self, key: Path, *args: str) -> list[str]:
        """The argv of ``ssh -i KEY collector ARGS...``."""
        return ["ssh", "-F", str(self.ssh_config), "-i", str(key), HOST, *args]

    def scp(self, key: Path, source: Path, target: str, *options: str) -> list[str]:
        """The argv of ``scp -i KEY SOURCE collector:TARGET``."""
        return ["scp", "-F", str(self.ssh_config), *options, "-i", str(key), str(source)] + [
            f"{HOST}:{target}"
        ]

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False


def _keygen(path: Path, comment: str) -> None:
    if not path.exists():
        argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
        subprocess.run(argv, check=True)
