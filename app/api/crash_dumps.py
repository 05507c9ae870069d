"""/v2.1/crashlab/servers/{server_id}/crash-dumps: what followed each NMI, and its vmcore.

Readable by the server's project (readers included) and by admins, each
under a rule of its own (``os_compute_api:crashlab:crash_dumps:list``,
``:show`` and ``:download``). A member reads ``error`` redacted, as event
details are (app/redaction.py); an admin reads it whole. The vmcore download
honours ``Range`` and carries ``Digest: sha-256=`` of the whole file, the
same digest as the resource's ``vmcore.sha256``.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, PlainTextResponse

from app import exceptions as exc
from app import policy as rules
from app.api.deps import context, service
from app.api.views import event_time
from app.follower import CrashDumpFollower
from app.redaction import backend_settings, redact
from app.service import ComputeService, Context
from app.store import CrashDump, Server

router = APIRouter(prefix="/v2.1/crashlab/servers/{server_id}/crash-dumps")


def crash_dump_view(dump: CrashDump, server: Server, whole: bool) -> dict[str, Any]:
    error = dump.error
    if error is not None and not whole:
        error = redact(error, backend_settings(server))
    return {
        "id": dump.id,
        "server_id": dump.server_id,
        "request_id": dump.request_id,
        "state": dump.state,
        "target": dump.target,
        "created_at": event_time(dump.created_at),
        "updated_at": event_time(dump.updated_at),
        "error": error,
        "vmcore": dump.vmcore,
        "panic": dump.panic,
        "removed": dump.removed_at is not None,
    }


def _follower(request: Request) -> CrashDumpFollower:
    follower: CrashDumpFollower = request.app.state.follower
    return follower


def _shown(compute: ComputeService, ctx: Context, dump: CrashDump) -> dict[str, Any]:
    server = compute.get_instance(ctx, dump.server_id)
    whole = compute.policy.allowed(
        rules.ACTIONS_EVENTS_DETAILS, {"project_id": server.project_id}, ctx.credentials
    )
    return crash_dump_view(dump, server, whole)


@router.get("", summary="List the crash dumps of a server, newest first")
def list_crash_dumps(
    server_id: str, ctx: Context = Depends(context), compute: ComputeService = Depends(service)
) -> dict[str, Any]:
    dumps = compute.list_crash_dumps(ctx, server_id)
    return {"crash_dumps": [_shown(compute, ctx, dump) for dump in dumps]}


@router.get("/{dump_id}", summary="Show one crash dump")
def show_crash_dump(
    server_id: str,
    dump_id: str,
    ctx: Context = Depends(context),
    compute: ComputeService = Depends(service),
) -> dict[str, Any]:
    return {"crash_dump": _shown(compute, ctx, compute.get_crash_dump(ctx, server_id, dump_id))}


def downloadable_dump(
    server_id: str,
    dump_id: str,
    ctx: Context = Depends(context),
    compute: ComputeService = Depends(service),
) -> CrashDump:
    """The dump, if the caller may download it (``crash_dumps:download``)."""
    return compute.get_crash_dump(ctx, server_id, dump_id, rules.CRASH_DUMPS_DOWNLOAD)


@router.get("/{dump_id}/vmcore", summary="Download the vmcore (Range honoured)")
def download_vmcore(request: Request, dump: CrashDump = Depends(downloadable_dump)) -> FileResponse:
    path = _stored(request, dump, "vmcore")
    assert dump.vmcore is not None
    digest = base64.b64encode(bytes.fromhex(dump.vmcore["sha256"])).decode()
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"vmcore-{dump.id}",
        headers={"Digest": f"sha-256={digest}"},
    )


@router.get("/{dump_id}/dmesg", summary="The dumped kernel's log, as text")
def download_dmesg(
    request: Request, dump: CrashDump = Depends(downloadable_dump)
) -> PlainTextResponse:
    return PlainTextResponse(_stored(request, dump, "dmesg").read_text(errors="replace"))


def _stored(request: Request, dump: CrashDump, name: str) -> Path:
    if dump.removed_at is not None:
        raise exc.VmcoreRemoved(dump.id)
    path = _follower(request).dump_dir(dump.id) / name
    if dump.vmcore is None or not path.is_file():
        raise exc.NoVmcore(dump.id, dump.state)
    return path
