"""/identity/v3: the Keystone v3 subset OpenStack clients need.

Password authentication scoped to a project, token validation and
revocation, and the discovery documents. The catalog points at this same
process: ``compute`` at /v2.1 and ``identity`` at /identity/v3.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from app.api.deps import json_body
from app.config import DEFAULT_DOMAIN_ID, DEFAULT_DOMAIN_NAME, IdentityConfig, derived_id
from app.exceptions import BadRequest, NotFound, Unauthorized
from app.identity import AuthenticationFailed, Token, TokenStore

router = APIRouter(prefix="/identity")

_DOMAIN = {"id": DEFAULT_DOMAIN_ID, "name": DEFAULT_DOMAIN_NAME}
_UPDATED = "2019-01-22T00:00:00Z"


def _keystone_time(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _version(request: Request) -> dict[str, Any]:
    root = str(request.base_url).rstrip("/")
    return {
        "id": "v3.14",
        "status": "stable",
        "updated": _UPDATED,
        "links": [{"rel": "self", "href": f"{root}/identity/v3/"}],
        "media-types": [
            {"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}
        ],
    }


@router.get("", summary="List identity API versions", status_code=300)
@router.get("/", include_in_schema=False, status_code=300)
def identity_versions(request: Request) -> JSONResponse:
    return JSONResponse({"versions": {"values": [_version(request)]}}, status_code=300)


@router.get("/v3", summary="Show the identity v3 version document")
@router.get("/v3/", include_in_schema=False)
def identity_v3(request: Request) -> dict[str, Any]:
    return {"version": _version(request)}


def _tokens(request: Request) -> TokenStore:
    tokens: TokenStore = request.app.state.tokens
    return tokens


def _password_request(body: Any) -> tuple[str, str, str | None]:
    """User name, password and project name from a v3 password auth body."""
    try:
        auth = body["auth"]
        identity = auth["identity"]
        if "password" not in identity.get("methods", []):
            raise Unauthorized("Only password authentication is supported.")
        user = identity["password"]["user"]
        password = user["password"]
        user_key = user.get("name") or user["id"]
        scope = auth.get("scope") or {}
        project = scope.get("project") if isinstance(scope, dict) else None
        project_key = (project.get("name") or project.get("id")) if project else None
    except (KeyError, TypeError, AttributeError):
        raise BadRequest("Expecting to find auth.identity.password.user in the request.") from None
    if not all(isinstance(v, str) for v in (user_key, password)) or not (
        project_key is None or isinstance(project_key, str)
    ):
        raise BadRequest("Invalid input for auth: names and passwords must be strings.")
    return user_key, password, project_key


def _resolve(
    identity: IdentityConfig, user_key: str, project_key: str | None
) -> tuple[str, str | None]:
    user = identity.user_by_name_or_id(user_key)
    project = identity.project_by_name_or_id(project_key) if project_key else None
    return (user.name if user else user_key), (project.name if project else project_key)


@router.post("/v3/auth/tokens", status_code=201, summary="Authenticate and issue a token")
def issue_token(request: Request, body: Any = Depends(json_body)) -> JSONResponse:
    tokens = _tokens(request)
    user_key, password, project_key = _password_request(body)
    user_name, project_name = _resolve(tokens.identity, user_key, project_key)
    try:
        user = tokens.authenticate(user_name, password, project_name)
    except AuthenticationFailed:
        raise Unauthorized() from None
    value, token = tokens.issue(user)
    return JSONResponse(
        {"token": _token_body(request, tokens.identity, token)},
        status_code=201,
        headers={"X-Subject-Token": value},
    )


def _subject(request: Request) -> tuple[TokenStore, str]:
    tokens = _tokens(request)
    if tokens.validate(request.headers.get("x-auth-token")) is None:
        raise Unauthorized()
    return tokens, request.headers.get("x-subject-token", "")


@router.get("/v3/auth/tokens", summary="Validate a token")
def validate_token(request: Request) -> JSONResponse:
    tokens, subject = _subject(request)
    token = tokens.validate(subject)
    if token is None:
        raise NotFound("Could not find token.")
    return JSONResponse(
        {"token": _token_body(request, tokens.identity, token)},
        headers={"X-Subject-Token": subject},
    )


@router.delete("/v3/auth/tokens", status_code=204, summary="Revoke a token")
def revoke_token(request: Request) -> Response:
    tokens, subject = _subject(request)
    if not tokens.revoke(subject):
        raise NotFound("Could not find token.")
    return Response(status_code=204)


def _token_body(request: Request, identity: IdentityConfig, token: Token) -> dict[str, Any]:
    creds = token.credentials
    root = str(request.base_url).rstrip("/")
    return {
        "methods": ["password"],
        "user": {
            "id": creds.user_id,
            "name": creds.user_name,
            "domain": dict(_DOMAIN),
            "password_expires_at": None,
        },
        "project": {"id": creds.project_id, "name": creds.project_name, "domain": dict(_DOMAIN)},
        "roles": [{"id": derived_id("role", role), "name": role} for role in creds.roles],
        "is_domain": False,
        "audit_ids": [token.audit_id],
        "issued_at": _keystone_time(token.issued_at),
        "expires_at": _keystone_time(token.expires_at),
        "catalog": [
            _service(identity.region, "compute", "nova", f"{root}/v2.1"),
            _service(identity.region, "identity", "keystone", f"{root}/identity/v3"),
        ],
    }


def _service(region: str, kind: str, name: str, url: str) -> dict[str, Any]:
    return {
        "id": derived_id("service", kind),
        "type": kind,
        "name": name,
        "endpoints": [
            {
                "id": derived_id("endpoint", f"{kind}:{interface}"),
                "interface": interface,
                "region": region,
                "region_id": region,
                "url": url,
            }
            for interface in ("public", "internal", "admin")
        ],
    }
