"""virtualbmc in front of libvirt domains: an IPMI BMC per domain on loopback.

Each BMC is virtualbmc's own ``VirtualBMC`` class (the code ``vbmcd`` runs in
its per-domain children) in a child process crashlab starts and owns::

    with VirtualBMCs(workdir) as bmcs:
        endpoint = bmcs.add("guest-1")        # BMCEndpoint(address, port, username, password)
        bmcs.stop("guest-1")                  # the BMC goes dark; the domain keeps running
        bmcs.start("guest-1")                 # back, same port and credentials

Why not ``vbmcd`` plus ``vbmc add/start``: vbmcd restarts BMC children that die
(so "BMC down" cannot be simulated by killing one), keeps a pidfile and a ZMQ
control port, and every ``vbmc`` call costs a Python start-up. One process per
BMC gives crashlab the port, the credentials, readiness and the kill switch.

Everything lives under ``workdir/vbmc``, nothing in ``~/.vbmc``: a generated
``virtualbmc.conf`` (``VIRTUALBMC_CONFIG``; its ``config_dir``, ``pid_file`` and
ZMQ ``server_port`` point inside the workdir) and one config per domain in
virtualbmc's own format, so ``VIRTUALBMC_CONFIG=... vbmc list`` can read them.
"""

from __future__ import annotations

import configparser
import os
import secrets
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.process import (
    EmulatorProcess,
    EmulatorStartError,
    announce_ready,
    free_port,
    hold_lifeline,
)
from drivers.uris import DEFAULT_LIBVIRT_URI
from emulators.pyghmi_server import repair_server_sessions

_SECTION = "VirtualBMC"  # virtualbmc.manager.DEFAULT_SECTION
_START_ATTEMPTS = 5


@dataclass(frozen=True)
class BMCEndpoint:
    """Where and how to reach one BMC over IPMI (lanplus)."""

    address: str
    port: int
    username: str
    password: str = field(repr=False)

    def driver_info(self) -> dict[str, Any]:
        """crashlab's ``ipmi`` driver settings for this BMC."""
        return {
            "address": self.address,
            "port": self.port,
            "username": self.username,
            "password": self.password,
        }


class VirtualBMCs:
    """A set of virtualbmc BMCs, one per libvirt domain; all stopped on exit."""

    def __init__(
        self,
        workdir: Path | str,
        *,
        libvirt_uri: str = DEFAULT_LIBVIRT_URI,
        address: str = "127.0.0.1",
        username: str = "crashlab",
    ) -> None:
        self.root = Path(workdir) / "vbmc"
        self.config_dir = self.root / "domains"
        self.config_file = self.root / "virtualbmc.conf"
        self.libvirt_uri = libvirt_uri
        self.address = address
        self.username = username
        self._endpoints: dict[str, BMCEndpoint] = {}
        self._processes: dict[str, EmulatorProcess] = {}

    def __enter__(self) -> VirtualBMCs:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self._write_daemon_config()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add(
        self,
        domain_name: str,
        *,
        libvirt_uri: str | None = None,
        password: str | None = None,
    ) -> BMCEndpoint:
        """Put a BMC in front of ``domain_name`` (which must exist) and start it."""
        if domain_name in self._endpoints:
            raise ValueError(f"domain {domain_name!r} already has a BMC")
        uri = libvirt_uri or self.libvirt_uri
        # IPMI 2.0 passwords are at most 20 bytes; this gives 16.
        password = password or secrets.token_urlsafe(12)
        for attempt in range(_START_ATTEMPTS):
            endpoint = BMCEndpoint(
                self.address, free_port(socket.SOCK_DGRAM), self.username, password
            )
            self._write_domain_config(domain_name, endpoint, uri)
            self._endpoints[domain_name] = endpoint
            try:
                self.start(domain_name)
                return endpoint
            except EmulatorStartError:
                # Most likely the port was taken between choosing and binding.
                del self._endpoints[domain_name]
                if attempt == _START_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def endpoint(self, domain_name: str) -> BMCEndpoint:
        return self._endpoints[domain_name]

    def start(self, domain_name: str) -> BMCEndpoint:
        """Start (or restart) the BMC of a domain added before, on its port."""
        endpoint = self._endpoints[domain_name]
        if self.is_running(domain_name):
            return endpoint
        proc = EmulatorProcess(
            f"virtualbmc for {domain_name}",
            [sys.executable, "-m", "emulators.vbmc", str(self._domain_config(domain_name))],
            env={**os.environ, "VIRTUALBMC_CONFIG": str(self.config_file)},
            log_path=self.root / "logs" / f"{domain_name}.log",
        )
        proc.start()
        self._processes[domain_name] = proc
        return endpoint

    def stop(self, domain_name: str) -> None:
        """Kill the BMC of a domain: it stops answering, as a dead BMC would."""
        proc = self._processes.pop(domain_name, None)
        if proc is not None:
            proc.stop()

    def is_running(self, domain_name: str) -> bool:
        proc = self._processes.get(domain_name)
        return proc is not None and proc.is_running()

    def pids(self) -> list[int]:
        return [p.pid for p in self._processes.values() if p.pid is not None]

    def log(self, domain_name: str) -> str:
        """The BMC's log: virtualbmc logs each IPMI action at debug level."""
        path = self.root / "logs" / f"{domain_name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for domain_name in list(self._processes):
            self.stop(domain_name)

    def _write_daemon_config(self) -> None:
        config = configparser.ConfigParser()
        config["default"] = {
            "config_dir": str(self.config_dir),
            "pid_file": str(self.root / "master.pid"),
            "server_port": str(free_port()),
        }
        config["log"] = {"debug": "true"}
        with open(self.config_file, "w") as f:
            config.write(f)

    def _domain_config(self, domain_name: str) -> Path:
        return self.config_dir / domain_name / "config"

    def _write_domain_config(self, domain_name: str, endpoint: BMCEndpoint, uri: str) -> None:
        path = self._domain_config(domain_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = configparser.ConfigParser()
        config[_SECTION] = {
            "domain_name": domain_name,
            "username": endpoint.username,
            "password": endpoint.password,
            "address": endpoint.address,
            "port": str(endpoint.port),
            "libvirt_uri": uri,
            "active": "True",
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            config.write(f)


def _serve(config_path: str) -> None:
    """Child process: run one VirtualBMC from a per-domain config until killed."""
    hold_lifeline()
    repair_server_sessions()  # virtualbmc serves IPMI with pyghmi's BMC server
    from virtualbmc.vbmc import VirtualBMC

    config = configparser.ConfigParser()
    config.read(config_path)
    options = config[_SECTION]
    bmc = VirtualBMC(
        username=options["username"],
        password=options["password"],
        port=int(options["port"]),
        address=options["address"],
        domain_name=options["domain_name"],
        libvirt_uri=options["libvirt_uri"],
    )
    announce_ready()
    bmc.listen(timeout=1)


if __name__ == "__main__":
    _serve(sys.argv[1])
