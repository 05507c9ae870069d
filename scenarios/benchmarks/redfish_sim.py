"""Simulated Redfish BMCs on loopback that count the NMIs they receive.

Each BMC is an HTTP/1.1 Redfish service on its own TCP port with one
ComputerSystem, ``/redfish/v1/Systems/1``, powered on, whose
``#ComputerSystem.Reset`` publishes ``Nmi`` among its allowable values. It
serves what crashlab's ``redfish`` driver (sushy) and a curl one-liner read
and send: the service root, the system, and the reset action. A reset with
``ResetType`` ``Nmi`` appends the BMC's port to a shared log, one line per NMI,
so the count is exact. HTTP basic auth is checked on every request but
the service root's, which the Redfish specification makes public.

All BMCs share one asyncio loop in one child process: serving a few hundred
small requests costs far less than the clients that send them, so the
simulator does not set the pace::

    with RedfishFleet(workdir, count=200) as fleet:
        fleet.ports                  # one TCP port per BMC, all on 127.0.0.1
        fleet.nmis.read()            # Counter of NMIs per port since the last read

Child: ``python -m scenarios.benchmarks.redfish_sim <count> <nmi-log> <ports-file>``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path
from typing import Any

from app.process import announce_ready, hold_lifeline
from scenarios.benchmarks.simulator import SimulatedFleet

USERNAME = "admin"
PASSWORD = "password"
ADDRESS = "127.0.0.1"
SYSTEM_ID = "1"
SYSTEM_PATH = f"/redfish/v1/Systems/{SYSTEM_ID}"
RESET_PATH = f"{SYSTEM_PATH}/Actions/ComputerSystem.Reset"
RESET_TYPES = ["On", "ForceOff", "GracefulShutdown", "GracefulRestart", "ForceRestart", "Nmi"]


class RedfishFleet(SimulatedFleet):
    """``count`` counting Redfish BMCs in one child process; stopped on exit."""

    kind = "redfish"
    module = "scenarios.benchmarks.redfish_sim"
    start_timeout = 60

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


class _BMC:
    """One simulated BMC: answers the Redfish requests on one port."""

    def __init__(self, port: int, nmi_log: Any) -> None:
        self.port = port
        self.nmi_log = nmi_log
        token = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
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
        status, payload = self._answer(method, target.split("?")[0], headers, body)
        data = json.dumps(payload).encode() if payload is not None else b""
        keep_alive = headers.get("connection", "").lower() != "close"
        reason = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized"}
        writer.write(
            f"HTTP/1.1 {status} {reason.get(status, 'Not Found')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        return keep_alive

    def _answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any] | None]:
        path = path.rstrip("/") or "/"
        if method == "GET" and path == "/redfish/v1":
            return 200, _service_root()  # public, as the Redfish specification requires
        if headers.get("authorization") != self.authorization:
            return 401, _error("Base.1.0.NoValidSession", "authentication required")
        if method == "GET" and path == SYSTEM_PATH:
            return 200, _system()
        if method == "POST" and path == RESET_PATH:
            reset_type = json.loads(body or b"{}").get("ResetType")
            if reset_type not in RESET_TYPES:
                return 400, _error("Base.1.0.ActionParameterValueError", f"{reset_type!r}")
            if reset_type == "Nmi":
                self.nmi_log.write(f"{self.port}\n")
                self.nmi_log.flush()
            return 204, None
        return 404, _error("Base.1.0.ResourceMissingAtURI", path)


def _service_root() -> dict[str, Any]:
    return {
        "@odata.id": "/redfish/v1/",
        "@odata.type": "#ServiceRoot.v1_5_0.ServiceRoot",
        "Id": "RootService",
        "Name": "crashlab Redfish simulator",
        "RedfishVersion": "1.5.0",
        "Systems": {"@odata.id": "/redfish/v1/Systems"},
    }


def _system() -> dict[str, Any]:
    return {
        "@odata.id": SYSTEM_PATH,
        "@odata.type": "#ComputerSystem.v1_10_0.ComputerSystem",
        "Id": SYSTEM_ID,
        "Name": "simulated server",
        "PowerState": "On",
        "Actions": {
            "#ComputerSystem.Reset": {
                "target": RESET_PATH,
                "ResetType@Redfish.AllowableValues": RESET_TYPES,
            }
        },
    }


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


async def _serve(count: int, nmi_log: Path, ports_file: Path) -> None:
    # One line per write, O_APPEND: the log survives the process and never splits a line.
    log = nmi_log.open("a", buffering=1)
    servers = []
    for _ in range(count):
        bmc = _BMC(0, log)
        server = await asyncio.start_server(bmc.serve, ADDRESS, 0, backlog=1024)
        bmc.port = server.sockets[0].getsockname()[1]
        servers.append(server)
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    ports_file.write_text(json.dumps(ports))
    announce_ready()
    await asyncio.Event().wait()


if __name__ == "__main__":
    hold_lifeline()
    asyncio.run(_serve(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
