"""/v2.1/crashlab/servers/{server_id}/crash-readiness: would an NMI leave a dump?

Readable by the server's project and admins
(``os_compute_api:crashlab:crash_readiness:show``). The answer is the last
check, which the background sync refreshes; ``?refresh=true`` runs a bounded
check of this server alone (app/readiness.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from app.api.deps import context, service
from app.service import ComputeService, Context

router = APIRouter(prefix="/v2.1/crashlab/servers/{server_id}/crash-readiness")


@router.get("", summary="The server's crash readiness: armed, not-armed or unknown")
def show_crash_readiness(
    server_id: str,
    refresh: bool = Query(False, description="check afresh, bounded, instead of the last check"),
    ctx: Context = Depends(context),
    compute: ComputeService = Depends(service),
) -> dict[str, Any]:
    readiness = compute.get_readiness(ctx, server_id, refresh=refresh)
    return {"crash_readiness": readiness.as_dict()}
