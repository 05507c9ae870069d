"""libvirt domains, reached with libvirt-python: ``virDomainInjectNMI``.

Errors are mapped as Nova's libvirt driver maps them:
VIR_ERR_OPERATION_INVALID -> InstanceNotRunning, VIR_ERR_NO_SUPPORT ->
NMINotSupported. Connections are shared per URI and reopened when libvirtd
has gone away, so a restarted libvirtd needs no restart of crashlab.

The URI is one of the few drivers/uris.py accepts, with no query string. What
a remote transport needs comes as settings, and crashlab adds the parameters
itself when it opens the connection:

- ``qemu+ssh``: ``ssh_private_key`` (optional, else ssh's default keys) becomes
  ``keyfile=``; ``no_tty=1`` is always added, so ssh runs in batch mode, never
  prompts and refuses a host whose key is not in the known_hosts of the account
  crashlab runs as. libvirt's ssh transport has no ``known_hosts`` parameter
  (only libssh and libssh2 do), so host keys are the account's, as for Nova's
  own qemu+ssh connections.
- ``qemu+tls``: ``tls_ca_cert``, ``tls_client_cert`` and ``tls_client_key``
  (all three, or none for libvirt's defaults under /etc/pki) become ``pkipath=``.

The material is written to 0600 files in a private directory that lives only
while libvirt opens the connection: ssh and GnuTLS have read it by then.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import ClassVar

import libvirt
from pydantic import Field, ValidationInfo, field_validator, model_validator

from drivers.base import (
    BackendRejected,
    BackendUnreachable,
    Driver,
    DriverSettings,
    InstanceNotRunning,
    NMINotSupported,
    PowerState,
    ServerNotFound,
    is_uuid,
    settings_source,
)
from drivers.uris import DEFAULT_LIBVIRT_URI, LibvirtURI, parse_libvirt_uri

# Nova's libvirt driver (LIBVIRT_POWER_STATE)
_POWER = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.SUSPENDED,
}
# Errors that mean the connection itself is gone, not the domain.
_CONNECTION_ERRORS = {
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
}

# libvirt logs every error to stderr by default; crashlab reports them itself.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


# Large enough for any PEM key or certificate (an RSA-16384 key is about 12 kB).
_PEM = Field(None, min_length=1, max_length=32768, pattern=r"^-----BEGIN [A-Z0-9 ]+-----\n")
_TLS_FIELDS = ("tls_ca_cert", "tls_client_cert", "tls_client_key")
# File names libvirt reads under pkipath (libvirt.org/uri.html, tls transport).
_PKI_FILES = {
    "tls_ca_cert": "cacert.pem",
    "tls_client_cert": "clientcert.pem",
    "tls_client_key": "clientkey.pem",
}


class LibvirtSettings(DriverSettings):
    """A libvirt domain: its daemon's URI, and the credentials a remote transport uses."""

    uri: str = Field(DEFAULT_LIBVIRT_URI, max_length=1024)
    domain: str = Field(min_length=1, max_length=255, description="domain name or UUID")
    ssh_private_key: str | None = _PEM
    tls_ca_cert: str | None = _PEM
    tls_client_cert: str | None = _PEM
    tls_client_key: str | None = _PEM

    secret_fields: ClassVar[frozenset[str]] = frozenset({"ssh_private_key", "tls_client_key"})

    @field_validator("uri")
    @classmethod
    def _allowed_uri(cls, value: str, info: ValidationInfo) -> str:
        allow_test = settings_source(info).allows_test_backends
        return str(parse_libvirt_uri(value, allow_test=allow_test))

    @model_validator(mode="after")
    def _credentials_fit_transport(self) -> LibvirtSettings:
        transport = self.parsed_uri.transport
        if self.ssh_private_key is not None and transport != "ssh":
            raise ValueError("ssh_private_key is for qemu+ssh:// URIs only")
        given = [name for name in _TLS_FIELDS if getattr(self, name) is not None]
        if given and transport != "tls":
            raise ValueError(f"{given[0]} is for qemu+tls:// URIs only")
        if given and len(given) != len(_TLS_FIELDS):
            raise ValueError(f"{', '.join(_TLS_FIELDS)} go together: give all three or none")
        return self

    @property
    def parsed_uri(self) -> LibvirtURI:
        # Already checked on validation, so a test URI here was allowed then.
        return parse_libvirt_uri(self.uri, allow_test=True)

    @property
    def connection_key(self) -> tuple[str | None, ...]:
        """What identifies one connection: the URI and the credentials used to open it."""
        return (self.uri, self.ssh_private_key, *(getattr(self, name) for name in _TLS_FIELDS))

    def connection_uri(self, private_dir: Path) -> str:
        """The URI to open, with the parameters its transport needs.

        Credentials are written to 0600 files in ``private_dir``, which must be
        a directory only crashlab can read.
        """
        uri = self.parsed_uri
        if uri.transport == "ssh":
            parameters = {"no_tty": "1"}
            if self.ssh_private_key is not None:
                keyfile = _write_private(private_dir / "id", self.ssh_private_key)
                parameters["keyfile"] = str(keyfile)
            return uri.with_parameters(parameters)
        if uri.transport == "tls" and self.tls_client_key is not None:
            for name, file_name in _PKI_FILES.items():
                _write_private(private_dir / file_name, getattr(self, name))
            return uri.with_parameters({"pkipath": str(private_dir)})
        return str(uri)


def _write_private(path: Path, pem: str) -> Path:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(pem if pem.endswith("\n") else pem + "\n")
    return path


def _open(settings: LibvirtSettings) -> libvirt.virConnect:
    with tempfile.TemporaryDirectory(prefix="crashlab-libvirt-") as private_dir:  # mode 0700
        try:
            return libvirt.open(settings.connection_uri(Path(private_dir)))
        except libvirt.libvirtError as exc:
            raise BackendUnreachable(
                f"cannot connect to libvirt at {settings.uri}: {exc.get_error_message()}"
            ) from None


class _Connections:
    """One open connection per URI and credentials, reopened when it has died.

    Each connection has its own lock: a URI whose ``libvirt.open`` hangs holds
    up only the callers of that URI, never those of another.
    """

    def __init__(self) -> None:
        self._connections: dict[tuple[str | None, ...], libvirt.virConnect] = {}
        self._key_locks: dict[tuple[str | None, ...], threading.Lock] = {}
        self._lock = threading.Lock()

    def _key_lock(self, key: tuple[str | None, ...]) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def get(self, settings: LibvirtSettings) -> libvirt.virConnect:
        with self._key_lock(settings.connection_key):
            conn = self._connections.get(settings.connection_key)
            if conn is not None and _alive(conn):
                return conn
            conn = _open(settings)
            self._connections[settings.connection_key] = conn
            return conn

    def discard(self, settings: LibvirtSettings) -> None:
        with self._key_lock(settings.connection_key):
            self._connections.pop(settings.connection_key, None)


def _alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


CONNECTIONS = _Connections()


class LibvirtDriver(Driver):
    name = "libvirt"
    description = "libvirt domain (QEMU/KVM) through libvirt-python's injectNMI"
    capabilities: ClassVar[frozenset[str]] = frozenset({"power_state", "nmi"})
    settings_model = LibvirtSettings

    def __init__(self, server_id: str, settings: DriverSettings) -> None:
        super().__init__(server_id, settings)
        assert isinstance(settings, LibvirtSettings)
        self.libvirt_settings = settings
        self.uri = settings.uri
        self.domain_name = settings.domain

    @property
    def backend_id(self) -> str:
        return f"libvirt:{self.uri}"

    def get_power_state(self) -> PowerState:
        state, _reason = self._call(lambda dom: dom.state())
        return _POWER.get(state, PowerState.NOSTATE)

    def domain_xml(self) -> str:
        """The domain's live XML: where its console and disks are (app/dump_targets.py)."""
        try:
            return str(self._call(lambda dom: dom.XMLDesc(0)))
        except libvirt.libvirtError as exc:
            raise BackendRejected(f"libvirt: {exc.get_error_message()}") from None

    def is_active(self) -> bool:
        try:
            return bool(self._call(lambda dom: dom.isActive()))
        except libvirt.libvirtError as exc:
            raise BackendRejected(f"libvirt: {exc.get_error_message()}") from None

    def trigger_crash_dump(self) -> None:
        try:
            self._call(lambda dom: dom.injectNMI(0), retry=False)
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            if code == libvirt.VIR_ERR_OPERATION_INVALID:
                raise InstanceNotRunning(self.server_id) from None
            if code == libvirt.VIR_ERR_NO_SUPPORT:
                raise NMINotSupported() from None
            raise BackendRejected(f"libvirt refused the NMI: {exc.get_error_message()}") from None

    def _call(self, operation, retry: bool = True):  # type: ignore[no-untyped-def]
        """Run ``operation(domain)``; reconnect once if the connection died first.

        The NMI is sent with ``retry=False``: only a failure to reach libvirt
        before the call is retried, never the call itself.
        """
        for attempt in (1, 2):
            conn = CONNECTIONS.get(self.libvirt_settings)
            try:
                domain = self._lookup(conn)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in _CONNECTION_ERRORS and attempt == 1:
                    CONNECTIONS.discard(self.libvirt_settings)
                    continue
                raise BackendUnreachable(
                    f"libvirt at {self.uri} failed: {exc.get_error_message()}"
                ) from None
            try:
                return operation(domain)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in _CONNECTION_ERRORS:
                    raise
                CONNECTIONS.discard(self.libvirt_settings)
                if not retry or attempt == 2:
                    raise BackendUnreachable(
                        f"lost the connection to libvirt at {self.uri}: {exc.get_error_message()}"
                    ) from None
        raise AssertionError("unreachable")

    def _lookup(self, conn: libvirt.virConnect) -> libvirt.virDomain:
        try:
            if is_uuid(self.domain_name):
                return conn.lookupByUUIDString(self.domain_name)
            return conn.lookupByName(self.domain_name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise ServerNotFound(
                    f"domain {self.domain_name} does not exist at {self.uri}"
                ) from None
            raise
