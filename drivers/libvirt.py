"""libvirt domains, reached with libvirt-python: ``virDomainInjectNMI``.

Beyond the NMI: small files read inside the guest through the QEMU guest
agent (``guest-file-open``/``read``, over ``virDomainQemuAgentCommand``), for
crash readiness; and a memory dump by the hypervisor, ``coreDumpWithFormat``
in kdump-compressed (zlib) format, memory only, for host-side capture.

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

import base64
import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import libvirt
import libvirt_qemu
from pydantic import Field, ValidationInfo, field_validator, model_validator

from drivers.base import (
    BackendRejected,
    BackendUnreachable,
    Driver,
    DriverError,
    DriverSettings,
    GuestAgentUnavailable,
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

# libvirt's answers when a domain has no agent channel, or nothing answers on it.
_NO_AGENT = {libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, libvirt.VIR_ERR_AGENT_UNRESPONSIVE}
# Bounds one agent command; the caller bounds the whole check (app/readiness.py).
AGENT_TIMEOUT_SECONDS = 5
# Readiness reads small files (sysctls, a command line): more is not read.
GUEST_FILE_LIMIT = 64 * 1024


class _AgentRefused(Exception):
    """The agent answered with an error of its own (a file it cannot open)."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


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
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {"power_state", "nmi", "guest_agent", "memory_dump"}
    )
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

    def read_guest_files(self, paths: Sequence[str]) -> dict[str, bytes | None]:
        """Each file through the QEMU guest agent: guest-file-open, -read until EOF, -close."""
        return {path: self._read_guest_file(path) for path in paths}

    def _read_guest_file(self, path: str) -> bytes | None:
        try:
            opened = self._agent("guest-file-open", {"path": path, "mode": "r"})
        except _AgentRefused as refused:
            if "No such file" in refused.desc:
                return None
            raise BackendRejected(f"the guest agent cannot open {path}: {refused.desc}") from None
        handle = opened["return"]
        data = b""
        try:
            while len(data) < GUEST_FILE_LIMIT:
                read = self._agent("guest-file-read", {"handle": handle, "count": 4096})["return"]
                data += base64.b64decode(read.get("buf-b64", ""))
                if read.get("eof") or not read.get("count"):
                    break
        except _AgentRefused as refused:
            raise BackendRejected(f"the guest agent cannot read {path}: {refused.desc}") from None
        finally:
            with contextlib.suppress(DriverError, _AgentRefused):
                self._agent("guest-file-close", {"handle": handle})
        return data[:GUEST_FILE_LIMIT]

    def _agent(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """One guest agent command; its JSON answer, or _AgentRefused with the agent's error."""
        request = json.dumps({"execute": command, "arguments": arguments})
        try:
            answer = self._call(
                lambda dom: libvirt_qemu.qemuAgentCommand(dom, request, AGENT_TIMEOUT_SECONDS, 0)
            )
        except libvirt.libvirtError as exc:
            code, message = exc.get_error_code(), exc.get_error_message()
            if code in _NO_AGENT:
                raise GuestAgentUnavailable(f"no guest agent: {message}") from None
            if code == libvirt.VIR_ERR_OPERATION_INVALID:
                raise InstanceNotRunning(self.server_id) from None
            if code == libvirt.VIR_ERR_INTERNAL_ERROR and "unable to execute" in message:
                raise _AgentRefused(message) from None
            raise BackendRejected(f"libvirt: {message}") from None
        reply: dict[str, Any] = json.loads(answer)
        return reply

    def memory_bytes(self) -> int:
        try:
            _state, max_kib, _kib, _vcpus, _cpu = self._call(lambda dom: dom.info())
        except libvirt.libvirtError as exc:
            raise BackendRejected(f"libvirt: {exc.get_error_message()}") from None
        return int(max_kib) * 1024

    def capture_memory_dump(self, path: Path, *, destroy: bool) -> None:
        """libvirt's coreDumpWithFormat: kdump-compressed (zlib), memory only, never retried.

        libvirt pauses the guest while it is dumped and resumes it after,
        unless it was paused already; ``destroy`` (VIR_DUMP_CRASH) stops it instead.
        QEMU before 8.2 writes this format only flattened (makedumpfile's
        stream format, restored with ``makedumpfile -R``).
        """
        flags = libvirt.VIR_DUMP_MEMORY_ONLY | (libvirt.VIR_DUMP_CRASH if destroy else 0)
        try:
            self._call(
                lambda dom: dom.coreDumpWithFormat(
                    str(path), libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_KDUMP_ZLIB, flags
                ),
                retry=False,
            )
        except libvirt.libvirtError as exc:
            path.unlink(missing_ok=True)
            code = exc.get_error_code()
            if code == libvirt.VIR_ERR_OPERATION_INVALID:
                raise InstanceNotRunning(self.server_id) from None
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                raise ServerNotFound(
                    f"domain {self.domain_name} went away during the dump"
                ) from None
            raise BackendRejected(
                f"libvirt could not dump the memory: {exc.get_error_message()}"
            ) from None
        except DriverError:
            path.unlink(missing_ok=True)
            raise

    def abort_memory_dump(self) -> None:
        with contextlib.suppress(DriverError, libvirt.libvirtError):
            self._call(lambda dom: dom.abortJob(), retry=False)

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
