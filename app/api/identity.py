"""/identity/v3: the Keystone v3 subset OpenStack clients need.

Password authentication scoped to the user's project, token validation and
revocation, and the discovery documents. Requests are checked as Keystone
checks them; a scope crashlab cannot grant (domain, system, unscoped, trust)
is refused as Keystone refuses a user with no role there: 401. The catalog
points at this same service, from ``app.api.endpoint.public_url``:
``compute`` at /v2.1 and ``identity`` at /identity/v3.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

import jsonschema
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from app.api.deps import json_body
from app.api.endpoint import public_url
from app.config import DEFAULT_DOMAIN_ID, DEFAULT_DOMAIN_NAME, IdentityConfig, derived_id
from app.exceptions import BadRequest, NotFound, Unauthorized
from app.identity import (
    AccountLocked,
    AuthenticationFailed,
    Domain,
    PasswordAuth,
    Reference,
    Token,
    TokenStore,
)

router = APIRouter(prefix="/identity")

Schema = dict[str, Any]

_DOMAIN = {"id": DEFAULT_DOMAIN_ID, "name": DEFAULT_DOMAIN_NAME}
_STRING: Schema = {"type": "string"}
_UPDATED = "2019-01-22T00:00:00Z"


def _keystone_time(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _version(request: Request) -> dict[str, Any]:
    root = public_url(request)
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


_DOMAIN_REF: Schema = {"type": "object", "properties": {"id": _STRING, "name": _STRING}}
_NAMED_REF: Schema = {
    "type": "object",
    "properties": {"id": _STRING, "name": _STRING, "domain": _DOMAIN_REF},
}
# Keystone's auth request schema (token_issue), for the parts crashlab reads.
TOKEN_ISSUE: Schema = {
    "type": "object",
    "properties": {
        "identity": {
            "type": "object",
            "properties": {
                "methods": {"type": "array", "items": _STRING},
                "password": {
                    "type": "object",
                    "properties": {
                        "user": {
                            "type": "object",
                            "properties": {
                                "id": _STRING,
                                "name": _STRING,
                                "password": _STRING,
                                "domain": _DOMAIN_REF,
                            },
                        }
                    },
                },
            },
            "required": ["methods"],
        },
        "scope": {
            "type": ["object", "string"],
            "properties": {
                "project": _NAMED_REF,
                "domain": _DOMAIN_REF,
                "OS-TRUST:trust": {"type": "object", "properties": {"id": _STRING}},
                "system": {"type": "object"},
            },
        },
    },
    "required": ["identity"],
}
_VALIDATOR = jsonschema.Draft4Validator(TOKEN_ISSUE)
AUTH_METHODS = ("password",)
SCOPES = ("project", "domain", "unscoped", "system", "OS-TRUST:trust")


def _expecting(attribute: str, target: str) -> BadRequest:
    """keystone.exception.ValidationError's wording."""
    return BadRequest(
        f"Expecting to find {attribute} in {target}. The server could not comply with the "
        "request since it is either malformed or otherwise incorrect. The client is assumed "
        "to be in error."
    )


def _invalid(field: str, detail: str) -> BadRequest:
    """keystone.exception.SchemaValidationError's wording."""
    return BadRequest(f"Invalid input for field {field}: {detail}")


def _has_id_or_name(ref: dict[str, Any], field: str) -> None:
    if "id" not in ref and "name" not in ref:
        raise _invalid(field, "id or name must be present.")


def _domain(ref: dict[str, Any]) -> Domain | None:
    domain = ref.get("domain")
    return None if domain is None else Domain(id=domain.get("id"), name=domain.get("name"))


def password_auth(body: Any) -> PasswordAuth:
    """A v3 password authentication request, checked as Keystone checks it.

    The body's shape first (Keystone's auth request schema), then the methods: each
    needs its payload (400) and must be one crashlab supports (401), as
    Keystone's AuthInfo does; then the user and scope references.
    """
    auth = body.get("auth") if isinstance(body, dict) else None
    if not auth:
        raise _expecting("auth", "request body")
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(auth))
    if error is not None:
        path = "/".join(str(part) for part in error.absolute_path) or "auth"
        raise _invalid(f"'{path}'", error.message)
    identity = auth["identity"]
    methods = list(dict.fromkeys(identity["methods"]))
    for method in methods:
        if method not in identity:
            raise _expecting(method, "identity")
    if any(method not in AUTH_METHODS for method in methods):
        raise Unauthorized("Attempted to authenticate with an unsupported method.")
    if not methods:
        raise Unauthorized()  # no method ran, so no user was found
    user = identity["password"].get("user")
    if user is None:
        raise _expecting("user", "password")
    _has_id_or_name(user, "identity/password/user")
    if "domain" in user:
        _has_id_or_name(user["domain"], "identity/password/user/domain")
    if not user.get("id") and not user.get("name"):
        raise _expecting("id or name", "user")
    if user.get("name") and "domain" not in user:
        raise _expecting("domain", "user")
    if user.get("name") and not (user["domain"].get("id") or user["domain"].get("name")):
        raise _expecting("id or name", "domain")
    reference = Reference(id=user.get("id"), name=user.get("name"), domain=_domain(user))
    return _scoped(auth.get("scope"), PasswordAuth(reference, user.get("password")))


def _scoped(scope: Any, request: PasswordAuth) -> PasswordAuth:
    """The request with the scope it asks for; Keystone wants exactly one kind."""
    if scope is None:
        return request
    if isinstance(scope, str):
        scope = {scope: {}}  # Keystone takes "unscoped" as {"unscoped": {}}
    kinds = [kind for kind in SCOPES if kind in scope]
    if len(kinds) != 1:
        raise _expecting("system, project, domain, OS-TRUST:trust or unscoped", "scope")
    [kind] = kinds
    if kind == "domain":
        _has_id_or_name(scope["domain"], "scope/domain")
    if kind == "OS-TRUST:trust" and not scope[kind].get("id"):
        raise _expecting("trust_id", "trust")
    if kind != "project":
        return replace(request, scope=kind)
    project = scope["project"]
    _has_id_or_name(project, "scope/project")
    if "domain" in project:
        _has_id_or_name(project["domain"], "scope/project/domain")
    if project.get("name") and "domain" not in project:
        raise _expecting("domain", "project")
    reference = Reference(id=project.get("id"), name=project.get("name"), domain=_domain(project))
    return replace(request, scope="project", project=reference)


@router.post("/v3/auth/tokens", status_code=201, summary="Authenticate and issue a token")
async def issue_token(request: Request, body: Any = Depends(json_body)) -> JSONResponse:
    tokens = _tokens(request)
    try:
        value, token = await tokens.login(password_auth(body))
    except AccountLocked as locked:
        # keystone.exception.AccountLocked, shown even without insecure_debug.
        raise Unauthorized(f"The account is locked for user: {locked.user_id}.") from None
    except AuthenticationFailed:
        raise Unauthorized() from None
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
    root = public_url(request)
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
