"""Version discovery: GET / and the v2.0 / v2.1 version documents."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.api.endpoint import public_url
from app.api.microversion import MAX_VERSION, MIN_VERSION

router = APIRouter()

# Nova's version documents (VERSIONS)
_VERSIONS: dict[str, dict[str, str]] = {
    "v2.0": {
        "status": "DEPRECATED",
        "version": "",
        "min_version": "",
        "updated": "2025-07-04T12:00:00Z",
        "path": "v2",
    },
    "v2.1": {
        "status": "CURRENT",
        "version": str(MAX_VERSION),
        "min_version": str(MIN_VERSION),
        "updated": "2013-07-23T11:33:21Z",
        "path": "v2.1",
    },
}


def _entry(request: Request, version_id: str) -> dict[str, Any]:
    info = _VERSIONS[version_id]
    root = public_url(request)
    return {
        "id": version_id,
        "status": info["status"],
        "version": info["version"],
        "min_version": info["min_version"],
        "updated": info["updated"],
        "links": [{"rel": "self", "href": f"{root}/{info['path']}/"}],
    }


def _document(request: Request, version_id: str) -> dict[str, Any]:
    entry = _entry(request, version_id)
    entry["links"].append(
        {"rel": "describedby", "type": "text/html", "href": "http://docs.openstack.org/"}
    )
    media_version = version_id[1:].removesuffix(".0")
    entry["media-types"] = [
        {
            "base": "application/json",
            "type": f"application/vnd.openstack.compute+json;version={media_version}",
        }
    ]
    return {"version": entry}


@router.get("/", summary="List API versions")
def list_versions(request: Request) -> dict[str, Any]:
    return {"versions": [_entry(request, v) for v in _VERSIONS]}


@router.get("/v2.1", summary="Show the v2.1 version document")
@router.get("/v2.1/", include_in_schema=False)
def show_v21(request: Request) -> dict[str, Any]:
    return _document(request, "v2.1")


@router.get("/v2", summary="Show the v2.0 version document")
@router.get("/v2/", include_in_schema=False)
def show_v20(request: Request) -> dict[str, Any]:
    return _document(request, "v2.0")
