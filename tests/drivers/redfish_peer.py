"""A small Redfish service for tests: one ComputerSystem, over real HTTP.

sushy-tools always publishes ``Nmi`` among the allowed reset types, so the
cases a real BMC may present (no list at all, a list without ``Nmi``, an
``@Redfish.ActionInfo`` resource, a BMC that refuses the reset) are served by
this peer instead. It speaks HTTP with basic auth on loopback, records every
reset it receives, and can answer slowly, or not at all.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

SYSTEMS = "/redfish/v1/Systems"
SYSTEM = f"{SYSTEMS}/peer-1"
RESET = f"{SYSTEM}/Actions/ComputerSystem.Reset"
ACTION_INFO = f"{SYSTEM}/ResetActionInfo"
ALL_RESET_TYPES = ["On", "ForceOff", "GracefulShutdown", "ForceRestart", "Nmi"]


@dataclass
class PeerBehaviour:
    """What the peer publishes and how it answers."""

    power_state: str = "On"
    allowable_values: list[str] | None = field(default_factory=lambda: list(ALL_RESET_TYPES))
    action_info_values: list[str] | None = None  # published through @Redfish.ActionInfo
    reset_status: int = 204
    latency: float = 0.0
    username: str = "root"
    password: str = "peer-secret"
    malformed_root: bool = False  # the service root is a JSON list, not a resource


class RedfishPeer:
    """``with RedfishPeer(behaviour) as peer:``; ``peer.url``, ``peer.resets``."""

    def __init__(self, behaviour: PeerBehaviour | None = None) -> None:
        self.behaviour = behaviour or PeerBehaviour()
        self.resets: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> RedfishPeer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def resource(self, path: str) -> dict[str, Any] | list[Any] | None:
        b = self.behaviour
        if path in ("/redfish/v1", "/redfish/v1/"):
            if b.malformed_root:
                return []
            return {
                "@odata.id": "/redfish/v1/",
                "Id": "RootService",
                "RedfishVersion": "1.6.0",
                "Systems": {"@odata.id": SYSTEMS},
            }
        if path == SYSTEMS:
            return {
                "@odata.id": SYSTEMS,
                "Members": [{"@odata.id": SYSTEM}],
                "Members@odata.count": 1,
            }
        if path == SYSTEM:
            action: dict[str, Any] = {"target": RESET}
            if b.allowable_values is not None:
                action["ResetType@Redfish.AllowableValues"] = b.allowable_values
            if b.action_info_values is not None:
                action["@Redfish.ActionInfo"] = ACTION_INFO
            return {
                "@odata.id": SYSTEM,
                "Id": "peer-1",
                "PowerState": b.power_state,
                "Actions": {"#ComputerSystem.Reset": action},
            }
        if path == ACTION_INFO and b.action_info_values is not None:
            return {
                "@odata.id": ACTION_INFO,
                "Id": "ResetActionInfo",
                "Parameters": [
                    {
                        "Name": "ResetType",
                        "Required": True,
                        "AllowableValues": b.action_info_values,
                    }
                ],
            }
        return None


def _handler_for(peer: RedfishPeer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if not self._authorized():
                return
            body = peer.resource(self.path.rstrip("/") or "/")
            if body is None:
                self._reply(
                    404, {"error": {"code": "Base.1.0.ResourceMissingAtURI", "message": self.path}}
                )
            else:
                self._reply(200, body)

        def do_POST(self) -> None:
            if not self._authorized():
                return
            length = int(self.headers.get("Content-Length", 0))
            payload = json.loads(self.rfile.read(length) or b"{}")
            if self.path != RESET:
                self._reply(
                    404, {"error": {"code": "Base.1.0.ResourceMissingAtURI", "message": self.path}}
                )
                return
            status = peer.behaviour.reset_status
            if status == 204:
                peer.resets.append(payload.get("ResetType", ""))
                self._reply(204, None)
            else:
                message = f"ResetType {payload.get('ResetType')} is not supported"
                self._reply(
                    status, {"error": {"code": "Base.1.0.ActionNotSupported", "message": message}}
                )

        def _authorized(self) -> bool:
            b = peer.behaviour
            if b.latency:
                threading.Event().wait(b.latency)
            if self.path.rstrip("/") == "/redfish/v1":
                return True
            expected = base64.b64encode(f"{b.username}:{b.password}".encode()).decode()
            if self.headers.get("Authorization") == f"Basic {expected}":
                return True
            self._reply(
                401,
                {"error": {"code": "Base.1.0.InsufficientPrivilege", "message": "Unauthorized"}},
            )
            return False

        def _reply(self, status: int, body: dict[str, Any] | list[Any] | None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
