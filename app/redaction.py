"""An event's details as a non-admin may read them: where the backend is, removed.

An event's ``details`` is a driver's error message written for the operator: it
can name BMC addresses, BMC user names, libvirt URIs and host paths. Admins read
it whole; everyone else reads ``redact(details, driver_info)``. Anything shaped
like an address or a path goes first, wherever it came from (URLs with a scheme,
IPv4 and IPv6 literals, host:port, absolute paths); then every string the
server's own driver settings hold (a bare host name, a user name, a domain),
as a whole word and in any case. A setting that is not secret at all is removed
too: the list is what the server has, not what a driver is known to have.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from app.store import Server

REDACTED = "[redacted]"

_PORT = r"(?::\d{1,5}\b)?"
# Where a match may not end: punctuation that closes a sentence or a clause.
_TAIL = r"[^\s'\"<>()\[\],;:.]"


def _redact_if_ipv6(match: re.Match[str]) -> str:
    try:
        ipaddress.IPv6Address(match.group().split("%")[0])
    except ValueError:
        return match.group()  # e.g. a clock time or a MAC address
    return REDACTED


# In this order, so that a port goes with its host.
_ADDRESSES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    # A URL: scheme://, then anything up to a space or a quote.
    (re.compile(rf"\b[A-Za-z][A-Za-z0-9+.-]*://(?:[^\s'\"<>]*{_TAIL})?"), REDACTED),
    # [IPv6], with a port or not.
    (re.compile(r"\[[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(?:%[\w.-]+)?\]" + _PORT), REDACTED),
    # What might be a bare IPv6 address, checked by ipaddress.
    (
        re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f.]*[0-9A-Fa-f](?:%[\w.-]+)?"),
        _redact_if_ipv6,
    ),
    # IPv4, with a port or not.
    (re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}\b" + _PORT), REDACTED),
    # host:port, the host with a letter in it (so that a clock time is kept), and
    # not an ISO 8601 date and time (2026-12-02T13:34, whose T is no host's).
    (
        re.compile(
            r"(?<![\w.-])(?!\d{4}-\d\d-\d\dT\d\d:)(?=[A-Za-z0-9.-]*[A-Za-z])"
            r"[A-Za-z0-9][A-Za-z0-9.-]*:\d{1,5}\b"
        ),
        REDACTED,
    ),
    # An absolute path, not the middle of a word or a fraction.
    (re.compile(rf"(?<![\w.:/~-])/(?:[^\s'\"<>(),;]*{_TAIL})?"), REDACTED),
]


def backend_settings(server: Server) -> dict[str, Any]:
    """What names a server's backends: its driver settings, and its dump target's
    domain and URI (not the target's type or device, which are words of the details)."""
    target = server.dump_target or {}
    named = {key: target[key] for key in ("domain", "uri") if target.get(key)}
    return {**server.driver_info, **{f"dump_target_{key}": value for key, value in named.items()}}


def redact(details: str, driver_info: Mapping[str, Any]) -> str:
    """``details`` without addresses, paths, or any value of ``driver_info``."""
    text = details
    for pattern, replacement in _ADDRESSES:
        text = pattern.sub(replacement, text)
    for value in sorted(set(_setting_values(driver_info)), key=len, reverse=True):
        word = re.compile(rf"(?<!\w){re.escape(value)}(?!\w)", re.IGNORECASE)
        text = word.sub(REDACTED, text)
    return text


def _setting_values(driver_info: Mapping[str, Any]) -> Iterator[str]:
    """Every string the settings hold, and the host, user and port inside a URL
    (ssh, for one, names the port on its own: "connect to host ... port N")."""
    for value in driver_info.values():
        if not isinstance(value, str) or not value.strip():
            continue
        yield value.strip()
        parts = urlsplit(value)
        if parts.scheme and parts.netloc:
            yield from (part for part in (parts.hostname, parts.username) if part)
            if parts.port is not None:
                yield str(parts.port)
