"""/v2.1/crashlab/servers/{server_id}/dump-target/key: an ssh target's key, for kdump.

The one response that carries a secret: the private key crashlab made for
the server when it was registered (app/collector.py), which its admin
installs in the server's kdump configuration (``SSH_KEY`` of kdump-tools,
with ``SSH="<user>@<host>"`` and the host key in its known_hosts). Admins
only (``os_compute_api:crashlab:dump_target_key:show``); never cached.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from app.api.deps import context, service
from app.service import ComputeService, Context

router = APIRouter(prefix="/v2.1/crashlab/servers/{server_id}/dump-target")


@router.get("/key", summary="The private key of the server's ssh dump target (admins)")
def show_dump_target_key(
    server_id: str,
    response: Response,
    ctx: Context = Depends(context),
    compute: ComputeService = Depends(service),
) -> dict[str, Any]:
    key, collector = compute.dump_target_key(ctx, server_id)
    response.headers["Cache-Control"] = "no-store"
    return {
        "dump_target_key": {
            "type": "ssh",
            "user": collector.user,
            "host": collector.config.address,
            "port": collector.config.port,
            "host_key": collector.host_public_key(),
            "public_key": key.public_key,
            "private_key": key.private_key,
        }
    }
