"""Nova's JSON shapes for servers and instance actions, by microversion."""

from __future__ import annotations

import datetime as dt
from typing import Any

from app.api.microversion import (
    EXTENDED_ATTRIBUTES_VERSION,
    HOST_STATUS_VERSION,
    LOCKED_FIELD_VERSION,
    APIVersion,
)
from app.service import ServerView
from app.store import ActionEvent, InstanceAction

# Nova's API state map (_STATE_MAP), for the states crashlab derives.
STATUS_FOR_VM_STATE = {
    "active": "ACTIVE",
    "paused": "PAUSED",
    "stopped": "SHUTOFF",
    "error": "ERROR",
    "suspended": "SUSPENDED",
    "rescued": "RESCUE",
    "resized": "VERIFY_RESIZE",
}
# Nova's server view (_progress_statuses)
PROGRESS_STATUSES = ("ACTIVE", "BUILD", "REBUILD", "RESIZE", "VERIFY_RESIZE", "MIGRATING")
FLAVOR_ID = "1"


def created_time(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def event_time(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="microseconds") if value else None


def _links(base: str, collection: str, item_id: str) -> list[dict[str, str]]:
    bookmark_base = base.rsplit("/v2.1", 1)[0]
    return [
        {"rel": "self", "href": f"{base}/{collection}/{item_id}"},
        {"rel": "bookmark", "href": f"{bookmark_base}/{collection}/{item_id}"},
    ]


def server_summary(view: ServerView, base: str) -> dict[str, Any]:
    server = view.server
    return {"id": server.uuid, "name": server.name, "links": _links(base, "servers", server.uuid)}


def server_detail(
    view: ServerView,
    base: str,
    version: APIVersion,
    *,
    show_extended: bool,
    show_host_status: bool,
) -> dict[str, Any]:
    server = view.server
    status = STATUS_FOR_VM_STATE.get(view.vm_state, "UNKNOWN")
    body: dict[str, Any] = {
        **server_summary(view, base),
        "status": status,
        "tenant_id": server.project_id,
        "user_id": server.user_id,
        "metadata": {},
        "hostId": view.host_id,
        "image": "",
        "flavor": {
            "id": FLAVOR_ID,
            "links": [{"rel": "bookmark", "href": f"{base.rsplit('/v2.1', 1)[0]}/flavors/1"}],
        },
        "created": created_time(server.created_at),
        "updated": created_time(server.updated_at),
        "addresses": {},
        "accessIPv4": "",
        "accessIPv6": "",
        "OS-DCF:diskConfig": "MANUAL",
        "OS-EXT-AZ:availability_zone": "nova",
        "config_drive": "",
        "key_name": None,
        "OS-SRV-USG:launched_at": event_time(server.created_at),
        "OS-SRV-USG:terminated_at": None,
        "security_groups": [{"name": "default"}],
        "OS-EXT-STS:task_state": None,
        "OS-EXT-STS:vm_state": view.vm_state,
        "OS-EXT-STS:power_state": int(view.power_state),
        "os-extended-volumes:volumes_attached": [],
    }
    if status in PROGRESS_STATUSES:
        body["progress"] = 0
    if show_extended:
        body["OS-EXT-SRV-ATTR:host"] = "crashlab"
        body["OS-EXT-SRV-ATTR:hypervisor_hostname"] = server.driver
        body["OS-EXT-SRV-ATTR:instance_name"] = server.name
        if version >= EXTENDED_ATTRIBUTES_VERSION:
            body.update(
                {
                    "OS-EXT-SRV-ATTR:reservation_id": "",
                    "OS-EXT-SRV-ATTR:launch_index": 0,
                    "OS-EXT-SRV-ATTR:hostname": server.name,
                    "OS-EXT-SRV-ATTR:kernel_id": "",
                    "OS-EXT-SRV-ATTR:ramdisk_id": "",
                    "OS-EXT-SRV-ATTR:root_device_name": None,
                    "OS-EXT-SRV-ATTR:user_data": None,
                }
            )
    if version >= LOCKED_FIELD_VERSION:
        body["locked"] = server.locked
    if version >= HOST_STATUS_VERSION and show_host_status:
        body["host_status"] = "UP"
    return body


def instance_action(action: InstanceAction) -> dict[str, Any]:
    return {
        "action": action.action,
        "instance_uuid": action.instance_uuid,
        "request_id": action.request_id,
        "user_id": action.user_id,
        "project_id": action.project_id,
        "start_time": event_time(action.start_time),
        "message": action.message,
    }


def action_event(event: ActionEvent) -> dict[str, Any]:
    # Below 2.51 only admins see events, and with traceback (Nova's
    # InstanceActionsController._format_event).
    return {
        "event": event.event,
        "start_time": event_time(event.start_time),
        "finish_time": event_time(event.finish_time),
        "result": event.result,
        "traceback": event.traceback,
    }
