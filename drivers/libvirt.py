"""libvirt domains, reached with libvirt-python: ``virDomainInjectNMI``.

Errors are mapped as Nova's libvirt driver maps them:
VIR_ERR_OPERATION_INVALID -> InstanceNotRunning, VIR_ERR_NO_SUPPORT ->
NMINotSupported. Connections are shared per URI and reopened when libvirtd
has gone away, so a restarted libvirtd needs no restart of crashlab.
"""

from __future__ import annotations

import threading
import uuid
from typing import ClassVar

import libvirt

from drivers.base import (
    BackendRejected,
    BackendUnreachable,
    Driver,
    DriverSettings,
    InstanceNotRunning,
    NMINotSupported,
    PowerState,
    ServerNotFound,
)

# nova/virt/libvirt/driver.py LIBVIRT_POWER_STATE
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


class LibvirtSettings(DriverSettings):
    uri: str = "qemu:///system"
    domain: str


class _Connections:
    """One open connection per URI, reopened when it has died.

    Each URI has its own lock: a URI whose ``libvirt.open`` hangs holds up
    only the callers of that URI, never those of another.
    """

    def __init__(self) -> None:
        self._connections: dict[str, libvirt.virConnect] = {}
        self._uri_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def _uri_lock(self, uri: str) -> threading.Lock:
        with self._lock:
            return self._uri_locks.setdefault(uri, threading.Lock())

    def get(self, uri: str) -> libvirt.virConnect:
        with self._uri_lock(uri):
            conn = self._connections.get(uri)
            if conn is not None and _alive(conn):
                return conn
            try:
                conn = libvirt.open(uri)
            except libvirt.libvirtError as exc:
                raise BackendUnreachable(
                    f"cannot connect to libvirt at {uri}: {exc.get_error_message()}"
                ) from None
            self._connections[uri] = conn
            return conn

    def discard(self, uri: str) -> None:
        with self._uri_lock(uri):
            self._connections.pop(uri, None)


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
        self.uri = settings.uri
        self.domain_name = settings.domain

    @property
    def backend_id(self) -> str:
        return f"libvirt:{self.uri}"

    def get_power_state(self) -> PowerState:
        state, _reason = self._call(lambda dom: dom.state())
        return _POWER.get(state, PowerState.NOSTATE)

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
            conn = CONNECTIONS.get(self.uri)
            try:
                domain = self._lookup(conn)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in _CONNECTION_ERRORS and attempt == 1:
                    CONNECTIONS.discard(self.uri)
                    continue
                raise BackendUnreachable(
                    f"libvirt at {self.uri} failed: {exc.get_error_message()}"
                ) from None
            try:
                return operation(domain)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in _CONNECTION_ERRORS:
                    raise
                CONNECTIONS.discard(self.uri)
                if not retry or attempt == 2:
                    raise BackendUnreachable(
                        f"lost the connection to libvirt at {self.uri}: {exc.get_error_message()}"
                    ) from None
        raise AssertionError("unreachable")

    def _lookup(self, conn: libvirt.virConnect) -> libvirt.virDomain:
        try:
            if _is_uuid(self.domain_name):
                return conn.lookupByUUIDString(self.domain_name)
            return conn.lookupByName(self.domain_name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise ServerNotFound(
                    f"domain {self.domain_name} does not exist at {self.uri}"
                ) from None
            raise


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
