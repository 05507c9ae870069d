"""The ``crashlab serve`` process the benchmarks measure, and the calls they time.

``BenchService`` starts ``crashlab serve`` as a child process on a free
loopback port with a generated config: one admin user, the NMI storm guard
off (the benchmarks trigger the same server again and again), state in the
work directory. Servers are registered through the admin extension, as an
operator would. Every trigger is timed on the client; the moment an event
finished is the service's own ``finish_time``, so polling for results adds
nothing to the figures.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx

from app.client import ClientError, Credentials, request_token, wait_for_action
from app.events import CRASH_DUMP_EVENT
from app.identity import hash_password
from app.process import EmulatorStartError
from scenarios.serve import ServeProcess, write_config

ADMIN = "admin"
# A second tenant, for the comparisons of one tenant's load against another's.
TENANT = "tenant"
MICROVERSION = "compute 2.17"
LATER_POLL = 0.001


class BenchError(Exception):
    """A benchmark could not run or saw a wrong result (lost NMI, failed event)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


@dataclass(frozen=True)
class Trigger:
    """One accepted trigger_crash_dump, timed on the client (``time.time()``)."""

    server_id: str
    request_id: str
    sent_at: float
    accepted_at: float


@dataclass(frozen=True)
class FinishedEvent:
    """The ``compute_trigger_crash_dump`` event of a trigger, once it has a result."""

    trigger: Trigger
    result: str
    details: str | None
    finished_at: float

    @property
    def seconds(self) -> float:
        """From sending the POST to the event finishing in the service."""
        return self.finished_at - self.trigger.sent_at


class BenchService(ServeProcess):
    """One ``crashlab serve`` child process (scenarios/serve.py), logged in as ADMIN."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.password = secrets.token_urlsafe(12)
        super().__init__(
            workdir / "crashlab.yaml",
            workdir / "state.db",
            workdir / "serve.log",
            env={"CRASHLAB_SECRET_KEY": ""},
        )
        self._http: httpx.Client | None = None
        self._token = ""

    def start(self, timeout: float = 60.0) -> Self:
        """Start the service (``startup_s``: to its first 200 on ``GET /``) and log in."""
        write_config(self.config_path, self._config())
        try:
            super().start(timeout)
        except EmulatorStartError as exc:
            raise BenchError(str(exc)) from exc
        self._http = httpx.Client(base_url=self.url + "/v2.1", timeout=60.0)
        self._token = self._authenticate()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        super().stop()

    def rss_mb(self) -> float:
        """Resident set size of the service process, in MiB."""
        assert self.pid is not None, "crashlab serve is not running"
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        raise BenchError("no VmRSS for crashlab serve")

    # The API, as the benchmarks use it

    def register(
        self, name: str, driver: str, driver_info: dict[str, Any], owner: str = ADMIN
    ) -> str:
        """Register a server owned by ``owner`` (its user and project); returns its uuid."""
        body = {
            "server": {
                "name": name,
                "project_id": owner,
                "user_id": owner,
                "driver": driver,
                "driver_info": driver_info,
            }
        }
        response = self.http.post("/crashlab/servers", json=body, headers=self._headers())
        _expect(response, 201)
        server_id: str = response.json()["server"]["uuid"]
        return server_id

    def trigger(self, server_id: str) -> Trigger:
        """One trigger_crash_dump on the keep-alive connection; returns at the 202."""
        sent_at = time.time()
        response = self.http.post(
            f"/servers/{server_id}/action",
            json={"trigger_crash_dump": None},
            headers=self._headers(),
        )
        accepted_at = time.time()
        _expect(response, 202)
        return Trigger(server_id, response.headers["x-openstack-request-id"], sent_at, accepted_at)

    def trigger_all(self, server_ids: list[str]) -> list[Trigger]:
        """One trigger_crash_dump per server, all sent at once."""
        return asyncio.run(self._trigger_all(server_ids))

    async def _trigger_all(self, server_ids: list[str]) -> list[Trigger]:
        limits = httpx.Limits(max_connections=len(server_ids), max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=self.url + "/v2.1", timeout=120.0, limits=limits
        ) as client:

            async def one(server_id: str) -> Trigger:
                sent_at = time.time()
                response = await client.post(
                    f"/servers/{server_id}/action",
                    json={"trigger_crash_dump": None},
                    headers=self._headers(),
                )
                _expect(response, 202)
                request_id = response.headers["x-openstack-request-id"]
                return Trigger(server_id, request_id, sent_at, time.time())

            return list(await asyncio.gather(*(one(s) for s in server_ids)))

    def wait_finished(
        self, triggers: list[Trigger], timeout: float = 120.0, poll: float = 0.005
    ) -> list[FinishedEvent]:
        """Wait until every trigger's event has a result; in the order given.

        The first look is after ``poll`` seconds, so the polling GETs do not
        compete with the dispatch they wait for; the figures come from the
        service's ``finish_time`` either way. The triggers run at once in the
        service, so waiting for each in turn takes as long as the slowest, and
        the later ones have most likely finished by their first look.
        """
        deadline = time.monotonic() + timeout
        finished: list[FinishedEvent] = []
        for trigger in triggers:
            try:
                action = wait_for_action(
                    self._get,
                    trigger.server_id,
                    trigger.request_id,
                    timeout=max(0.0, deadline - time.monotonic()),
                    poll=poll,
                    max_poll=0.1,
                )
            except TimeoutError:
                missing = len(triggers) - len(finished)
                raise BenchError(
                    f"{missing} crash dump event(s) unfinished after {timeout:g} s"
                ) from None
            except ClientError as exc:
                raise BenchError(f"reading {trigger.request_id}: {exc}") from exc
            finished.append(_finished_event(trigger, action))
            poll = LATER_POLL
        return finished

    def _get(self, path: str) -> httpx.Response:
        return self.http.get(path, headers=self._headers())

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            raise BenchError("crashlab serve is not running")
        return self._http

    def _headers(self) -> dict[str, str]:
        return {"X-Auth-Token": self._token, "OpenStack-API-Version": MICROVERSION}

    def client(self, user: str) -> httpx.Client:
        """A client of the compute API, authenticated as ``user`` (ADMIN or TENANT)."""
        return httpx.Client(
            base_url=self.url + "/v2.1",
            timeout=120.0,
            headers={
                "X-Auth-Token": self._authenticate(user),
                "OpenStack-API-Version": MICROVERSION,
            },
        )

    def _authenticate(self, user: str = ADMIN) -> str:
        credentials = Credentials(f"{self.url}/identity/v3", user, self.password, user)
        response = request_token(credentials)
        _expect(response, 201)
        return response.headers["X-Subject-Token"]

    def _config(self) -> dict[str, Any]:
        return {
            "host_name": "bench",
            "nmi_guard": {"enabled": False},
            "test_drivers": True,  # api_overhead registers test:///default
            "identity": {
                "users": [
                    {
                        "name": ADMIN,
                        "password_hash": hash_password(self.password, rounds=4),
                        "project": ADMIN,
                        "roles": ["admin"],
                    },
                    {
                        "name": TENANT,
                        "password_hash": hash_password(self.password, rounds=4),
                        "project": TENANT,
                        "roles": ["member"],
                    },
                ]
            },
        }


def _finished_event(trigger: Trigger, action: dict[str, Any]) -> FinishedEvent:
    [event] = [e for e in action["events"] if e["event"] == CRASH_DUMP_EVENT]
    finished = dt.datetime.fromisoformat(event["finish_time"]).replace(tzinfo=dt.UTC)
    return FinishedEvent(trigger, event["result"], event.get("details"), finished.timestamp())


def _expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise BenchError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}, not {status}: {response.text[:300]}"
        )
