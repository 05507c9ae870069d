"""sushy-tools in front of libvirt domains: a Redfish BMC on loopback.

One ``sushy-emulator`` (libvirt backend) serves every domain it is allowed to
see as a ComputerSystem whose id is the domain's libvirt UUID::

    with SushyEmulator(workdir, domains=["guest-1"], tls=True) as bmc:
        bmc.url                       # https://127.0.0.1:<port>
        bmc.username, bmc.password    # HTTP basic auth, chosen by crashlab
        bmc.ca_file                   # the self-signed certificate, to verify TLS
        bmc.system_id("guest-1")      # libvirt UUID of the domain
        bmc.stop(); bmc.start()       # the BMC goes dark, then comes back on its port

``domains`` uses ``SUSHY_EMULATOR_ALLOWED_INSTANCES``. sushy-tools 2.2.0 answers
HTTP 500, not 404, for a system outside that list (its ``api_utils`` shadows its
``error`` module), and it matches UUIDs only, so domain names are refused too.

Before the BMC is handed out, every system it serves is *warmed*: sushy-tools
answers the first ``GET /redfish/v1/Systems/<id>`` through ``get_versions``
and ``get_bios``, which ``defineXML`` the domain to store default version and
BIOS metadata. That first GET is only as fast as libvirt's define (30 ms on a
ready host, 30-100 s on one that re-probes QEMU, see ``emulators/doctor.py``),
so crashlab pays it here, bounded, and not inside the first trigger.

Basic auth uses ``SUSHY_EMULATOR_AUTH_FILE``: an Apache htpasswd file in which
sushy-tools accepts only bcrypt digests (``$2b$``). Everything lives under
``workdir/sushy``, including sushy-tools' state database, which would otherwise
go to ``/tmp/sushy-emulator``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import libvirt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app.process import EmulatorProcess, EmulatorStartError, free_port, hold_lifeline
from drivers.uris import DEFAULT_LIBVIRT_URI

_START_ATTEMPTS = 5
# The Redfish driver's default timeout: a warm-up slower than this would have failed a trigger.
WARM_UP_SECONDS = 10.0


class SushyWarmUpError(EmulatorStartError):
    """The first GET of a system (a libvirt define inside sushy-tools) was too slow or failed."""


class SushyEmulator:
    """A sushy-tools Redfish emulator over libvirt; stopped on exit."""

    def __init__(
        self,
        workdir: Path | str,
        *,
        libvirt_uri: str = DEFAULT_LIBVIRT_URI,
        domains: Iterable[str] | None = None,
        tls: bool = False,
        address: str = "127.0.0.1",
        username: str = "crashlab",
        password: str | None = None,
    ) -> None:
        """``domains`` limits the systems served to those domains (all of the URI's if None)."""
        self.root = Path(workdir) / "sushy"
        self.libvirt_uri = libvirt_uri
        self.domains = list(domains) if domains is not None else None
        self.tls = tls
        self.address = address
        self.username = username
        self.password = password or secrets.token_urlsafe(16)
        self.port = 0
        self.ca_file: Path | None = self.root / "cert.pem" if tls else None
        self._process: EmulatorProcess | None = None

    def __enter__(self) -> SushyEmulator:
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_auth_file()
        if self.tls:
            _write_self_signed_cert(self.root / "cert.pem", self.root / "key.pem", self.address)
        for attempt in range(_START_ATTEMPTS):
            self.port = free_port()
            self._write_config()
            try:
                self.start()
            except EmulatorStartError:
                # Most likely the port was taken between choosing and binding.
                if attempt == _START_ATTEMPTS - 1:
                    raise
                continue
            try:
                self.warm_up()
            except BaseException:
                self.stop()
                raise
            return self
        raise AssertionError("unreachable")

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.address}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def driver_info(self) -> dict[str, Any]:
        """crashlab's ``redfish`` driver settings for this emulator, less the ``system_id``."""
        return {"address": self.url, "username": self.username, "password": self.password}

    def system_id(self, domain_name: str) -> str:
        """The Redfish ComputerSystem id of a domain: its libvirt UUID."""
        conn = libvirt.openReadOnly(self.libvirt_uri)
        try:
            uuid: str = conn.lookupByName(domain_name).UUIDString()
            return uuid
        finally:
            conn.close()

    def system_path(self, domain_name: str) -> str:
        return f"/redfish/v1/Systems/{self.system_id(domain_name)}"

    def start(self) -> None:
        """Start (or restart) the emulator on its port; returns once it answers."""
        if self._process is not None and self._process.is_running():
            return
        proc = EmulatorProcess(
            "sushy-emulator",
            [
                sys.executable,
                "-m",
                "emulators.sushy",
                str(self.root / "emulator.conf"),
                "--libvirt-uri",
                self.libvirt_uri,
            ],
            env={**os.environ, "TMPDIR": str(self._tmpdir())},
            log_path=self.root / "emulator.log",
        )
        proc.start(ready=self._answers)
        self._process = proc

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def is_running(self) -> bool:
        return self._process is not None and self._process.is_running()

    def log(self) -> str:
        path = self.root / "emulator.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def warm_up(self) -> dict[str, float]:
        """GET every system served once, so sushy-tools writes its metadata now; seconds each."""
        seconds = {}
        with httpx.Client(
            base_url=self.url, auth=(self.username, self.password), verify=False,
            timeout=WARM_UP_SECONDS,
        ) as client:  # fmt: skip
            for path in self._system_paths(client):
                started = time.monotonic()
                try:
                    client.get(path).raise_for_status()
                except httpx.TimeoutException:
                    raise SushyWarmUpError(
                        f"sushy-tools did not answer its first GET {path} within "
                        f"{WARM_UP_SECONDS:.0f}s: it defines the domain through libvirt, "
                        "and libvirt's define is slow here; run crashlab doctor"
                    ) from None
                except httpx.HTTPError as exc:
                    raise SushyWarmUpError(f"sushy-tools' first GET {path} failed: {exc}") from exc
                seconds[path] = time.monotonic() - started
        return seconds

    def _system_paths(self, client: httpx.Client) -> list[str]:
        if self.domains is not None:
            return [self.system_path(name) for name in self.domains]
        members = client.get("/redfish/v1/Systems").raise_for_status().json()["Members"]
        return [member["@odata.id"] for member in members]

    def _answers(self) -> bool:
        try:
            response = httpx.get(f"{self.url}/redfish/v1/", verify=False, timeout=1.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _tmpdir(self) -> Path:
        path = self.root / "tmp"
        path.mkdir(exist_ok=True)
        return path

    def _write_auth_file(self) -> None:
        # sushy-tools checks the digest on every request: the lowest cost keeps it ~1 ms.
        digest = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
        _write_private(self.root / "htpasswd", f"{self.username}:{digest}\n")

    def _write_config(self) -> None:
        settings: dict[str, object] = {
            "SUSHY_EMULATOR_LISTEN_IP": self.address,
            "SUSHY_EMULATOR_LISTEN_PORT": self.port,
            "SUSHY_EMULATOR_AUTH_FILE": str(self.root / "htpasswd"),
        }
        if self.tls:
            settings["SUSHY_EMULATOR_SSL_CERT"] = str(self.root / "cert.pem")
            settings["SUSHY_EMULATOR_SSL_KEY"] = str(self.root / "key.pem")
        if self.domains is not None:
            settings["SUSHY_EMULATOR_ALLOWED_INSTANCES"] = [
                self.system_id(name) for name in self.domains
            ]
        text = "".join(f"{key} = {value!r}\n" for key, value in settings.items())
        _write_private(self.root / "emulator.conf", text)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _write_self_signed_cert(cert_path: Path, key_path: Path, address: str) -> None:
    """A P-256 certificate for ``address`` and localhost, valid for a day, its own issuer."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crashlab sushy-emulator")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(address)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    )


def _serve(argv: list[str]) -> int:
    """Child process: sushy-tools' own ``sushy-emulator`` entry point, with a lifeline."""
    hold_lifeline()
    from sushy_tools.emulator import main as emulator

    config, *rest = argv
    sys.argv = ["sushy-emulator", "--config", config, *rest]
    result: int = emulator.main()
    return result


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
