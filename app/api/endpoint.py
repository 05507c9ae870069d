"""The root URL clients reach crashlab at: the one base of every link and catalog URL.

``public_endpoint`` from the config when it is set, as Keystone's [DEFAULT]
public_endpoint; else the address this connection was accepted on (ASGI
``scope["server"]``), which, unlike the Host header, a client cannot choose.
``crashlab serve`` speaks plain HTTP; behind a TLS proxy, set public_endpoint.
"""

from __future__ import annotations

from fastapi import Request


def public_url(request: Request) -> str:
    """The root URL, without a trailing slash."""
    configured: str | None = request.app.state.public_endpoint
    if configured:
        return configured
    host, port = request.scope.get("server") or ("localhost", None)
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}" if port in (None, 80) else f"http://{host}:{port}"
