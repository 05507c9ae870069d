"""Simulated Redfish BMCs on loopback, each one ComputerSystem, that count the resets they get.

Each BMC is an HTTP/1.1 Redfish service on its own TCP port, serving what
crashlab's ``redfish`` driver (sushy) and a curl one-liner read and send: the
service root, the systems collection, the system, its reset action and, if
published, its ``@Redfish.ActionInfo``. HTTP basic auth is checked on every
request but the service root's, which the Redfish specification makes public.

``PeerBehaviour`` sets what a BMC publishes and how it answers: the cases a
real BMC may present and sushy-tools cannot (it always lists ``Nmi``): no
allowable values, a list without ``Nmi``, an ActionInfo resource, a refused
reset, a malformed service root, a powered-off system, answers that come late.

Two ways to run them, one implementation:

- ``RedfishPeer(behaviour)``: one BMC served by a thread of this process;
  ``peer.url``, ``peer.resets`` (every reset type received, in order);
- ``RedfishFleet(workdir, count)``: ``count`` BMCs on one asyncio loop in a
  child process, each NMI appended to ``fleet.nmis`` (``emulators/nmi_log.py``).
  Serving a few hundred small requests costs far less than the clients that
  send them, so the simulator does not set the pace.

Child: ``python -m emulators.redfish_sim <bmcs-file> <nmi-log> <count>``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.process import announce_ready, hold_lifeline
from emulators.nmi_log import NMILog
from emulators.simulator import SimulatedFleet, write_bmcs

USERNAME = "admin"
PASSWORD = "password"
ADDRESS = "127.0.0.1"
SYSTEM_ID = "1"
SYSTEMS_PATH = "/redfish/v1/Systems"
SYSTEM_PATH = f"{SYSTEMS_PATH}/{SYSTEM_ID}"
RESET_PATH = f"{SYSTEM_PATH}/Actions/ComputerSystem.Reset"
ACTION_INFO_PATH = f"{SYSTEM_PATH}/ResetActionInfo"
RESET_TYPES = ["On", "ForceOff", "GracefulShutdown", "GracefulRestart", "ForceRestart", "Nmi"]
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized"}

Body = dict[str, Any] | list[Any] | None


@dataclass
class PeerBehaviour:
    """What a simulated BMC publishes and how it answers."""

    power_state: str = "On"
    allowable_values: list[str] | None = field(default_factory=lambda: list(RESET_TYPES))
    action_info_values: list[str] | None = None  # published through @Redfish.ActionInfo
    reset_status: int = 204  # anything else refuses every reset with that status
    latency: float = 0.0  # seconds before each answer
    username: str = USERNAME
    password: str = PASSWORD
    malformed_root: bool = False  # the service root is a JSON list, not a resource


class RedfishBMC:
    """One simulated BMC: answers the Redfish requests of one port."""

    def __init__(self, behaviour: PeerBehaviour, nmi_log: NMILog | None = None) -> None:
        self.behaviour = behaviour
        self.nmi_log = nmi_log
        self.port = 0
        self.resets: list[str] = []
        token = base64.b64encode(f"{behaviour.username}:{behaviour.password}".encode()).decode()
        self.authorization = f"Basic {token}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection is to close."""
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        if self.behaviour.latency:
            await asyncio.sleep(self.behaviour.latency)
        status, payload = self.answer(method, target.split("?")[0], headers, body)
        data = json.dumps(payload).encode() if payload is not None else b""
        keep_alive = headers.get("connection", "").lower() != "close"
        writer.write(
            f"HTTP/1.1 {status} {REASONS.get(status, 'Not Found')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        return keep_alive

    def answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, Body]:
        path = path.rstrip("/") or "/"
        if method == "GET" and path == "/redfish/v1":
            # Public, as the Redfish specification requires.
            return 200, [] if self.behaviour.malformed_root else _service_root()
        if headers.get("authorization") != self.authorization:
            return 401, _error("Base.1.0.InsufficientPrivilege", "Unauthorized")
        if method == "GET":
            resource = self._resource(path)
            if resource is not None:
                return 200, resource
        if method == "POST" and path == RESET_PATH:
            return self._reset(json.loads(body or b"{}").get("ResetType", ""))
        return 404, _error("Base.1.0.ResourceMissingAtURI", path)

    def _resource(self, path: str) -> Body:
        b = self.behaviour
        if path == SYSTEMS_PATH:
            return {
                "@odata.id": SYSTEMS_PATH,
                "Members": [{"@odata.id": SYSTEM_PATH}],
                "Members@odata.count": 1,
            }
        if path == SYSTEM_PATH:
            return _system(b)
        if path == ACTION_INFO_PATH and b.action_info_values is not None:
            return {
                "@odata.id": ACTION_INFO_PATH,
                "Id": "ResetActionInfo",
                "Parameters": [
                    {"Name": "ResetType", "Required": True, "AllowableValues": b.action_info_values}
                ],
            }
        return None

    def _reset(self, reset_type: str) -> tuple[int, Body]:
        status = self.behaviour.reset_status
        if status != 204:
            message = f"ResetType {reset_type} is not supported"
            return status, _error("Base.1.0.ActionNotSupported", message)
        if reset_type not in RESET_TYPES:
            return 400, _error("Base.1.0.ActionParameterValueError", f"{reset_type!r}")
        self.resets.append(reset_type)
        if reset_type == "Nmi" and self.nmi_log is not None:
            self.nmi_log.append(self.port)
        return 204, None


def _service_root() -> dict[str, Any]:
    return {
        "@odata.id": "/redfish/v1/",
        "@odata.type": "#ServiceRoot.v1_5_0.ServiceRoot",
        "Id": "RootService",
        "Name": "crashlab Redfish simulator",
        "RedfishVersion": "1.5.0",
        "Systems": {"@odata.id": SYSTEMS_PATH},
    }


def _system(b: PeerBehaviour) -> dict[str, Any]:
    action: dict[str, Any] = {"target": RESET_PATH}
    if b.allowable_values is not None:
        action["ResetType@Redfish.AllowableValues"] = b.allowable_values
    if b.action_info_values is not None:
        action["@Redfish.ActionInfo"] = ACTION_INFO_PATH
    return {
        "@odata.id": SYSTEM_PATH,
        "@odata.type": "#ComputerSystem.v1_10_0.ComputerSystem",
        "Id": SYSTEM_ID,
        "Name": "simulated server",
        "PowerState": b.power_state,
        "Actions": {"#ComputerSystem.Reset": action},
    }


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ADDRESS, 0))
    sock.listen(1024)
    return sock


class RedfishPeer:
    """``with RedfishPeer(behaviour) as peer:`` one BMC served by a thread of this process.

    Its port is bound at once, so ``url`` is known before the BMC serves.
    """

    def __init__(self, behaviour: PeerBehaviour | None = None) -> None:
        self.behaviour = behaviour or PeerBehaviour()
        self._bmc = RedfishBMC(self.behaviour)
        self._socket = _listening_socket()
        self._bmc.port = self._socket.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{ADDRESS}:{self._bmc.port}"

    @property
    def resets(self) -> list[str]:
        return self._bmc.resets

    def __enter__(self) -> RedfishPeer:
        self._thread.start()
        start = asyncio.start_server(self._bmc.serve, sock=self._socket)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._loop.close()
        self._socket.close()

    async def _shutdown(self) -> None:
        """Stop listening and end the connections still open."""
        if self._server is not None:
            self._server.close()
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


class RedfishFleet(SimulatedFleet):
    """``count`` counting Redfish BMCs in one child process; stopped on exit."""

    kind = "redfish"
    module = "emulators.redfish_sim"
    start_timeout = 60

    def __init__(self, workdir: Path, count: int) -> None:
        super().__init__(workdir, [str(count)])

    def driver_info(self, port: int) -> dict[str, Any]:
        """crashlab's ``redfish`` driver settings for the BMC on ``port``."""
        return {
            "address": f"http://{ADDRESS}:{port}",
            "system_id": SYSTEM_ID,
            "username": USERNAME,
            "password": PASSWORD,
        }

    def curl(self, port: int) -> list[str]:
        """The command line an operator would type to send this BMC an NMI."""
        return [
            "curl", "--silent", "--show-error", "--fail", "--output", "/dev/null",
            "--user", f"{USERNAME}:{PASSWORD}",
            "--header", "Content-Type: application/json",
            "--data", '{"ResetType": "Nmi"}',
            f"http://{ADDRESS}:{port}{RESET_PATH}",
        ]  # fmt: skip


async def _serve(bmcs_file: Path, nmi_log: Path, count: int) -> None:
    servers = []
    for _ in range(count):
        bmc = RedfishBMC(PeerBehaviour(), NMILog(nmi_log))
        sock = _listening_socket()
        bmc.port = sock.getsockname()[1]
        servers.append(await asyncio.start_server(bmc.serve, sock=sock))
    write_bmcs(bmcs_file, [(s.sockets[0].getsockname()[1], os.getpid()) for s in servers])
    announce_ready()
    await asyncio.Event().wait()


if __name__ == "__main__":
    hold_lifeline()
    bmcs_file, nmi_log, count = sys.argv[1:]
    asyncio.run(_serve(Path(bmcs_file), Path(nmi_log), int(count)))
