"""/v2.1/servers/{id}/os-instance-actions, as Nova serves it at 2.1-2.17."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from app.api.deps import context, service
from app.api.views import action_event, instance_action
from app.service import ComputeService, Context

router = APIRouter(prefix="/v2.1")


@router.get("/servers/{server_id}/os-instance-actions", summary="List instance actions")
def list_instance_actions(
    server_id: str,
    ctx: Context = Depends(context),
    compute: ComputeService = Depends(service),
) -> dict[str, Any]:
    actions = compute.list_actions(ctx, server_id)
    return {"instanceActions": [instance_action(a) for a in actions]}


@router.get(
    "/servers/{server_id}/os-instance-actions/{request_id}", summary="Show an instance action"
)
def show_instance_action(
    server_id: str,
    request_id: str,
    ctx: Context = Depends(context),
    compute: ComputeService = Depends(service),
) -> dict[str, Any]:
    action, show_events = compute.get_action(ctx, server_id, request_id)
    body = instance_action(action)
    if show_events:
        body["events"] = [action_event(e) for e in action.events]
    return {"instanceAction": body}
