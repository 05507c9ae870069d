"""The addresses crashlab accepts for a backend: data that names a host, never a command.

A libvirt URI can do far more than name a hypervisor: ``qemu+ext`` and
``?command=`` run a program, ``test:///<path>`` and ``?keyfile=`` open a file,
``qemu+unix`` and ``?socket=`` connect to any socket (libvirt.org/uri.html).
So crashlab takes an allow-list, checked here for every field that holds a URI:

- ``qemu:///system`` and ``qemu:///session``, the local daemons;
- ``qemu+ssh://[user@]host[:port]/system`` and ``qemu+tls://host[:port]/system``;
- ``test:///default``, libvirt's built-in test hypervisor, where test backends are allowed.

Nothing else: no query string (crashlab adds the parameters a transport needs
itself, see drivers/libvirt.py), no fragment, no other path or transport. A
host is a DNS name or an IP literal, nothing that could be read as a path or an
option. BMC addresses follow the same rule: a host, or an http(s) URL of one.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import SplitResult, urlencode, urlsplit

LOCAL_PATHS = ("/system", "/session")
# The local system daemon: the libvirt driver's default, and where crashlab's guests run.
DEFAULT_LIBVIRT_URI = "qemu:///system"
TEST_URI = "test:///default"
REDFISH_ROOT_PATHS = ("", "/", "/redfish/v1", "/redfish/v1/")

# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# A login name for ssh: no leading hyphen, nothing a shell or ssh would interpret.
_SSH_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,31}")
# Anything beyond these cannot be part of an accepted URI; refusing them first
# means urlsplit's own clean-ups (it drops tabs and newlines) never matter.
_URI_CHARACTERS = re.compile(r"[A-Za-z0-9+.:/@\[\]_%?#=&-]+")

_HOST = rf"{_LABEL.pattern}(\.{_LABEL.pattern})*"
_PORT = r"(:([1-9][0-9]{0,3}|[1-5][0-9]{4}))?"
# For the API's document: a host as check_host takes it (a subset: no IPv6
# literals), and the libvirt allow-list as one regular expression. The
# functions here stay the rule.
HOST_PATTERN = rf"^{_HOST}$"
LIBVIRT_URI_PATTERN = (
    r"^(qemu:///(system|session)|test:///default"
    rf"|qemu\+ssh://({_SSH_USER.pattern}@)?{_HOST}{_PORT}/system"
    rf"|qemu\+tls://{_HOST}{_PORT}/system)$"
)

Transport = Literal["local", "ssh", "tls", "test"]


def check_host(host: str) -> str:
    """``host`` if it is a DNS name or an IP literal; ValueError otherwise."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return host
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError("must be a DNS name or an IP address")
    return host


@dataclass(frozen=True)
class LibvirtURI:
    """An accepted libvirt URI; ``str()`` is its canonical form."""

    transport: Transport
    path: str
    host: str | None = None
    port: int | None = None
    user: str | None = None

    def __str__(self) -> str:
        if self.transport == "test":
            return TEST_URI
        if self.transport == "local":
            return f"qemu://{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"qemu+{self.transport}://{user}{host}{port}{self.path}"

    def with_parameters(self, parameters: dict[str, str]) -> str:
        """The URI with crashlab's own query parameters, values URI-escaped as libvirt asks."""
        return f"{self}?{urlencode(parameters)}" if parameters else str(self)


def parse_libvirt_uri(uri: str, *, allow_test: bool) -> LibvirtURI:
    """The URI if it is on the allow-list above; ValueError saying why not."""
    if not _URI_CHARACTERS.fullmatch(uri):
        raise ValueError("must be a libvirt URI such as qemu:///system")
    if "?" in uri or "#" in uri:
        raise ValueError("must carry no query string or fragment; crashlab adds what is needed")
    parts = urlsplit(uri)
    if uri == TEST_URI:
        if not allow_test:
            raise ValueError("test:///default is a test backend, not enabled here (test_drivers)")
        return LibvirtURI("test", "/default")
    if parts.scheme == "qemu":
        if parts.netloc or parts.path not in LOCAL_PATHS:
            raise ValueError(
                "must be qemu:///system or qemu:///session; "
                "a remote host is reached with qemu+ssh:// or qemu+tls://"
            )
        return LibvirtURI("local", parts.path)
    if parts.scheme in ("qemu+ssh", "qemu+tls"):
        return _remote(parts, "ssh" if parts.scheme == "qemu+ssh" else "tls")
    raise ValueError(
        "must be qemu:///system, qemu:///session, qemu+ssh://[user@]host[:port]/system "
        "or qemu+tls://host[:port]/system"
    )


def _remote(parts: SplitResult, transport: Transport) -> LibvirtURI:
    scheme = f"qemu+{transport}"
    if not parts.hostname:
        raise ValueError(f"{scheme} needs a host: {scheme}://host/system")
    if parts.path != "/system":
        raise ValueError(f"{scheme} reaches the system daemon only: {scheme}://host/system")
    if parts.password is not None:
        raise ValueError("must not carry a password")
    if parts.username is not None and (
        transport == "tls" or not _SSH_USER.fullmatch(parts.username)
    ):
        raise ValueError(f"{scheme} takes no such user name")
    port = _port(parts)
    return LibvirtURI(transport, "/system", check_host(parts.hostname), port, parts.username)


def _port(parts: SplitResult) -> int | None:
    """The URL's port, if it names one; ValueError unless it is from 1 to 65535."""
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if port == 0:
        raise ValueError("has an invalid port")
    return port


def check_http_url(url: str, *, paths: tuple[str, ...] = ("", "/")) -> str:
    """``scheme://host[:port]`` of an http(s) URL whose path is one of ``paths``.

    ValueError for any other scheme, a missing or malformed host, credentials,
    a query string or a fragment.
    """
    if not _URI_CHARACTERS.fullmatch(url):
        raise ValueError("must be an http:// or https:// URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials; use username and password")
    if "?" in url or "#" in url or parts.path not in paths:
        raise ValueError("must be the service's root URL, with no query string or fragment")
    check_host(parts.hostname)
    _port(parts)
    return f"{parts.scheme}://{parts.netloc}"
