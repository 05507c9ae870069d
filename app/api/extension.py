"""/v2.1/crashlab: crashlab's own extension, beyond Nova.

- the inventory: register, list, show and remove servers (admin only);
- trigger_crash_dump with options, for the server's project members or an
  admin (``crashlab:servers:trigger_crash_dump``); each option has a rule of
  its own: ``ignore_nmi_guard: true`` passes the NMI storm guard, admin only
  (``crashlab:nmi_guard:bypass``); ``require_armed: true`` sends only to a
  server whose crash readiness is armed (app/readiness.py), for members
  (``os_compute_api:crashlab:trigger_crash_dump:require_armed``);
- capture_memory_dump on the same action: the hypervisor dumps the server's
  memory (app/capture.py), admin only by default
  (``os_compute_api:crashlab:capture_memory_dump``);
- an instance action with each event's ``details``, which Nova shows only
  from microversion 2.84 and only to admins: here whoever may show the action
  reads them, whole where ``os-instance-actions:events:details`` passes (admins)
  and otherwise with BMC addresses, user names, URIs and host paths redacted
  (``app.redaction``);
- the drivers and what each declares it supports.

BMC passwords are stored encrypted and always shown as a mask.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

from app import policy as rules
from app.api import validation
from app.api.crash_dumps import crash_dump_view
from app.api.deps import context, json_body, service
from app.api.servers import accept_crash_dump
from app.api.views import action_event, instance_action
from app.backends import masked_settings
from app.redaction import backend_settings, redact
from app.service import ComputeService, Context, PendingCrashDump
from app.store import Server
from drivers import all_driver_classes

router = APIRouter(prefix="/v2.1/crashlab")


def registration(server: Server) -> dict[str, Any]:
    return {
        "uuid": server.uuid,
        "name": server.name,
        "project_id": server.project_id,
        "user_id": server.user_id,
        "driver": server.driver,
        "driver_info": masked_settings(server.driver, server.driver_info),
        "source": server.source,
        "locked_by": server.locked_by,
        "dump_target": server.dump_target or {"type": "none"},
        "dump_timeouts": server.dump_timeouts,
        "expected_kernel_release": server.expected_kernel_release,
    }


@router.get("/servers", summary="List registered servers (admin)")
def list_registered(
    ctx: Context = Depends(context), compute: ComputeService = Depends(service)
) -> dict[str, Any]:
    return {"servers": [registration(s) for s in compute.list_registered(ctx)]}


@router.post("/servers", status_code=201, summary="Register a server (admin)")
def register_server(
    body: Any = Depends(json_body),
    ctx: Context = Depends(context),
    compute: ComputeService = Depends(service),
) -> JSONResponse:
    validation.validate(validation.REGISTER_SERVER, body)
    server = compute.register_server(ctx, body["server"])
    return JSONResponse({"server": registration(server)}, status_code=201)


@router.get("/servers/{server_id}", summary="Show a registered server (admin)")
def show_registered(
    server_id: str, ctx: Context = Depends(context), compute: ComputeService = Depends(service)
) -> dict[str, Any]:
    return {"server": registration(compute.get_registered(ctx, server_id))}


@router.delete("/servers/{server_id}", status_code=204, summary="Remove a server (admin)")
def unregister_server(
    server_id: str, ctx: Context = Depends(context), compute: ComputeService = Depends(service)
) -> Response:
    compute.unregister_server(ctx, server_id)
    return Response(status_code=204)


@router.post(
    "/servers/{server_id}/action",
    status_code=202,
    response_class=Response,
    summary="trigger_crash_dump with options, or capture_memory_dump",
)
def extension_action(
    request: Request,
    server_id: str,
    body: Any = Depends(json_body),
    ctx: Context = Depends(context),
    compute: ComputeService = Depends(service),
) -> Response:
    if isinstance(body, dict) and "capture_memory_dump" in body:
        return _capture_memory_dump(request, server_id, body, ctx, compute)
    validation.validate(validation.FORCED_TRIGGER, body)
    options = body["trigger_crash_dump"] or {}
    pending = compute.trigger_crash_dump(
        ctx,
        server_id,
        rule=rules.EXTENSION_TRIGGER_CRASH_DUMP,
        ignore_nmi_guard=options.get("ignore_nmi_guard", False),
        require_armed=options.get("require_armed", False),
        allow_unknown=options.get("allow_unknown", False),
    )
    return accept_crash_dump(request, pending)


def _capture_memory_dump(
    request: Request, server_id: str, body: Any, ctx: Context, compute: ComputeService
) -> Response:
    """202 with the new crash dump; the capture runs after the answer (app/capture.py)."""
    validation.validate(validation.CAPTURE_MEMORY_DUMP, body)
    then = (body["capture_memory_dump"] or {}).get("then", "resume")
    # The NMI of then=nmi is an ordinary trigger by the same caller, as its own action.
    nmi_ctx = replace(ctx, request_id=f"req-{uuid.uuid4()}")

    def accept_nmi() -> PendingCrashDump:
        return compute.trigger_crash_dump(
            nmi_ctx, server_id, rule=rules.EXTENSION_TRIGGER_CRASH_DUMP
        )

    pending = compute.capture_memory_dump(ctx, server_id, then=then, accept_nmi=accept_nmi)
    server = pending.server
    view = crash_dump_view(pending.dump, server, whole=True)
    return JSONResponse(
        {"crash_dump": view},
        status_code=202,
        background=BackgroundTask(request.app.state.capture.run, pending),
    )


@router.get(
    "/servers/{server_id}/os-instance-actions/{request_id}",
    summary="Show an instance action with each event's details",
)
def show_action_details(
    server_id: str,
    request_id: str,
    ctx: Context = Depends(context),
    compute: ComputeService = Depends(service),
) -> dict[str, Any]:
    action, show_traceback = compute.get_action(ctx, server_id, request_id)
    server = compute.get_instance(ctx, server_id)
    whole = compute.policy.allowed(
        rules.ACTIONS_EVENTS_DETAILS, {"project_id": server.project_id}, ctx.credentials
    )
    events = []
    for event in action.events:
        shown = action_event(event)
        shown["details"] = (
            event.details
            if whole or event.details is None
            else redact(event.details, backend_settings(server))
        )
        if not show_traceback:
            del shown["traceback"]
        events.append(shown)
    return {"instanceAction": {**instance_action(action), "events": events}}


@router.get("/drivers", summary="List drivers and their declared capabilities")
def list_drivers(ctx: Context = Depends(context)) -> dict[str, Any]:
    return {
        "drivers": [
            {
                "name": cls.name,
                "description": cls.description,
                "capabilities": sorted(cls.capabilities),
            }
            for cls in all_driver_classes()
        ]
    }
