"""/v2.1/servers: list, show, and the server action (Nova's ServersController)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from oslo_utils import strutils
from starlette.background import BackgroundTask

from app import policy as rules
from app.api import validation
from app.api.deps import api_version, context, json_body, service
from app.api.endpoint import public_url
from app.api.microversion import TRIGGER_CRASH_DUMP_VERSION, APIVersion
from app.api.views import server_detail, server_summary
from app.exceptions import BadRequest, MalformedBody, NoSuchAction, NotFound
from app.service import ComputeService, Context, PendingCrashDump, ServerView

router = APIRouter(prefix="/v2.1")


def _base(request: Request) -> str:
    return public_url(request) + "/v2.1"


def _detail(
    request: Request, compute: ComputeService, ctx: Context, version: APIVersion, view: ServerView
) -> dict[str, Any]:
    target = {"project_id": view.server.project_id}
    return server_detail(
        view,
        _base(request),
        version,
        show_extended=compute.policy.allowed(rules.EXTENDED_ATTRIBUTES, target, ctx.credentials),
        show_host_status=compute.policy.allowed(
            rules.SERVERS_SHOW_HOST_STATUS, target, ctx.credentials
        ),
    )


def _all_tenants(request: Request) -> bool:
    """Nova's API (is_all_tenants): present and empty is true, else
    oslo's strict bool_from_string, whose ValueError Nova answers with 400."""
    value = request.query_params.get("all_tenants")
    if not value:
        return value is not None
    try:
        return bool(strutils.bool_from_string(value, strict=True))
    except ValueError as error:
        raise BadRequest(f"Invalid input received: {error}") from None


@router.get("/servers", summary="List servers")
def list_servers(
    request: Request,
    name: str | None = None,
    ctx: Context = Depends(context),
    compute: ComputeService = Depends(service),
) -> dict[str, Any]:
    views = compute.list_servers(ctx, detail=False, name=name, all_tenants=_all_tenants(request))
    return {"servers": [server_summary(v, _base(request)) for v in views]}


@router.get("/servers/detail", summary="List servers with details")
def list_servers_detail(
    request: Request,
    name: str | None = None,
    ctx: Context = Depends(context),
    version: APIVersion = Depends(api_version),
    compute: ComputeService = Depends(service),
) -> dict[str, Any]:
    views = compute.list_servers(ctx, detail=True, name=name, all_tenants=_all_tenants(request))
    return {"servers": [_detail(request, compute, ctx, version, v) for v in views]}


@router.get("/servers/{server_id}", summary="Show a server")
def show_server(
    request: Request,
    server_id: str,
    ctx: Context = Depends(context),
    version: APIVersion = Depends(api_version),
    compute: ComputeService = Depends(service),
) -> dict[str, Any]:
    view = compute.show(ctx, server_id)
    return {"server": _detail(request, compute, ctx, version, view)}


@router.post(
    "/servers/{server_id}/action",
    status_code=202,
    summary="Run a server action: trigger_crash_dump, lock, unlock or os-resetState",
    response_class=Response,
)
def server_action(
    request: Request,
    server_id: str,
    body: Any = Depends(json_body),
    ctx: Context = Depends(context),
    version: APIVersion = Depends(api_version),
    compute: ComputeService = Depends(service),
) -> Response:
    # Nova's WSGI layer (action_peek): exactly one top-level key.
    if not isinstance(body, dict) or len(body) != 1:
        raise MalformedBody()
    name = next(iter(body))
    handler = ACTIONS.get(name)
    if handler is None:
        raise NoSuchAction(name)
    return handler(ActionCall(request, compute, ctx, version, server_id, body))


@dataclass(frozen=True)
class ActionCall:
    """One server action as routed: who asks, at which version, with which body."""

    request: Request
    compute: ComputeService
    ctx: Context
    version: APIVersion
    server_id: str
    body: dict[str, Any]


def _trigger_crash_dump(call: ActionCall) -> Response:
    # Below 2.17 the action does not exist: Nova answers webob's plain 404.
    if call.version < TRIGGER_CRASH_DUMP_VERSION:
        raise NotFound()
    validation.validate(validation.TRIGGER_CRASH_DUMP, call.body)
    return accept_crash_dump(
        call.request, call.compute.trigger_crash_dump(call.ctx, call.server_id)
    )


def accept_crash_dump(request: Request, pending: PendingCrashDump) -> Response:
    """Nova's 202 for an accepted trigger; the driver call runs once it is sent."""
    dispatcher = request.app.state.dispatcher
    return Response(status_code=202, background=BackgroundTask(dispatcher.run, pending))


def _lock(call: ActionCall) -> Response:
    validation.validate(validation.LOCK, call.body)
    call.compute.lock(call.ctx, call.server_id)
    return Response(status_code=202)


def _unlock(call: ActionCall) -> Response:
    validation.validate(validation.UNLOCK, call.body)
    call.compute.unlock(call.ctx, call.server_id)
    return Response(status_code=202)


def _reset_state(call: ActionCall) -> Response:
    validation.validate(validation.RESET_STATE, call.body)
    call.compute.reset_state(call.ctx, call.server_id, call.body["os-resetState"]["state"])
    return Response(status_code=202)


ActionHandler = Callable[[ActionCall], Response]
ACTIONS: dict[str, ActionHandler] = {
    "trigger_crash_dump": _trigger_crash_dump,
    "lock": _lock,
    "unlock": _unlock,
    "os-resetState": _reset_state,
}
