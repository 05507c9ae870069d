"""The OpenAPI document served at /openapi.json, completed where FastAPI cannot see.

Routes read their bodies through ``deps.json_body`` so that every error is
worded as Nova words it; FastAPI therefore knows neither their request bodies
nor the faults they answer, and documents a 422 that never happens. This
module post-processes FastAPI's document:

- request bodies, from the same jsonschema documents ``app.api.validation``
  enforces (a server registration is narrowed to this deployment's drivers,
  each driver's ``driver_info`` from its settings model);
- every status an operation can answer, with Nova's fault body
  (``{"itemNotFound": {"code": 404, "message": ...}}``), or Keystone's error
  body under /identity;
- the ``X-Auth-Token`` security scheme, and the response headers clients read.

An operation missing from ``OPERATIONS`` still gets the generic faults, so a
new route never breaks the document; tests/reliability checks that none is missing.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from oslo_utils import strutils

from app.api import validation
from app.api.faults import IDENTITY_PREFIX
from app.api.middleware import is_compute_path
from app.config import Config
from app.dump_targets import DUMP_TARGET, DumpTimeouts
from app.exceptions import fault_name
from drivers import DRIVER_CLASSES, driver_class
from drivers.uris import HOST_PATTERN, LIBVIRT_URI_PATTERN

LOG = logging.getLogger(__name__)

Schema = dict[str, Any]
SECURITY_SCHEME = "keystoneToken"

_STRING: Schema = {"type": "string"}
_NULLABLE_STRING: Schema = {"type": ["string", "null"]}
_LINK: Schema = {
    "type": "object",
    "required": ["rel", "href"],
    "properties": {"rel": _STRING, "href": _STRING, "type": _STRING},
}
_LINKS: Schema = {"type": "array", "items": _LINK}


def _object(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    """An object with these properties; others may appear (views grow by microversion)."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }


_VERSION = _object(
    {
        "id": _STRING,
        "status": _STRING,
        "version": _STRING,
        "min_version": _STRING,
        "updated": _STRING,
        "links": _LINKS,
    },
    {"media-types": {"type": "array", "items": {"type": "object"}}},
)
_SERVER_SUMMARY = _object({"id": _STRING, "name": _STRING, "links": _LINKS})
_SERVER = _object(
    {
        "id": _STRING,
        "name": _STRING,
        "links": _LINKS,
        "status": _STRING,
        "tenant_id": _STRING,
        "user_id": _STRING,
        "hostId": _STRING,
        "created": _STRING,
        "updated": _STRING,
        "OS-EXT-STS:vm_state": _STRING,
        "OS-EXT-STS:task_state": _NULLABLE_STRING,
        "OS-EXT-STS:power_state": {"type": "integer"},
    },
    {"locked": {"type": "boolean"}, "host_status": _STRING, "progress": {"type": "integer"}},
)
_INSTANCE_ACTION_FIELDS: dict[str, Schema] = {
    "action": _STRING,
    "instance_uuid": _STRING,
    "request_id": _STRING,
    "user_id": _STRING,
    "project_id": _STRING,
    "start_time": _STRING,
    "message": _NULLABLE_STRING,
}
_EVENT = _object(
    {
        "event": _STRING,
        "start_time": _STRING,
        "finish_time": _NULLABLE_STRING,
        "result": _NULLABLE_STRING,
    },
    {"traceback": _NULLABLE_STRING, "details": _NULLABLE_STRING},
)
_INSTANCE_ACTION = _object(_INSTANCE_ACTION_FIELDS, {"events": {"type": "array", "items": _EVENT}})
_REGISTRATION = _object(
    {
        "uuid": _STRING,
        "name": _STRING,
        "project_id": _STRING,
        "user_id": _STRING,
        "driver": _STRING,
        "driver_info": {"type": "object"},
        "source": {"type": "string", "enum": ["config", "api"]},
        "locked_by": {"type": ["string", "null"], "enum": ["admin", "owner", None]},
        "dump_target": {"type": "object"},
        "dump_timeouts": {"type": ["object", "null"]},
        "expected_kernel_release": _NULLABLE_STRING,
    }
)
_NULLABLE_OBJECT: Schema = {"type": ["object", "null"]}
_CRASH_DUMP = _object(
    {
        "id": _STRING,
        "server_id": _STRING,
        "request_id": _NULLABLE_STRING,
        "state": {
            "type": "string",
            "enum": [
                "waiting",
                "panicked",
                "collecting",
                "capturing",
                "verifying",
                "collected",
                "verified",
                "failed",
            ],
        },
        "target": _STRING,
        "created_at": _STRING,
        "updated_at": _STRING,
        "error": _NULLABLE_STRING,
        "vmcore": _NULLABLE_OBJECT,
        "panic": _NULLABLE_OBJECT,
        "removed": {"type": "boolean"},
    }
)
_DUMP_TARGET_KEY = _object(
    {
        "type": {"type": "string", "enum": ["ssh"]},
        "user": _STRING,
        "host": _STRING,
        "port": {"type": "integer"},
        "host_key": _STRING,
        "public_key": _STRING,
        "private_key": _STRING,
    }
)
_FACT = _object({"value": {}, "source": _STRING})
_CRASH_READINESS = _object(
    {
        "verdict": {"type": "string", "enum": ["armed", "not-armed", "unknown"]},
        "checked_at": _STRING,
        "facts": {"type": "object", "additionalProperties": _FACT},
        "reasons": {"type": "array", "items": _STRING},
    }
)
_DRIVER = _object(
    {
        "name": _STRING,
        "description": _STRING,
        "capabilities": {"type": "array", "items": _STRING},
    }
)
_IDENTITY_VERSION = _object({"id": _STRING, "status": _STRING, "links": _LINKS})
_TOKEN = _object(
    {
        "methods": {"type": "array", "items": _STRING},
        "user": _object({"id": _STRING, "name": _STRING}),
        "roles": {"type": "array", "items": _object({"id": _STRING, "name": _STRING})},
        "expires_at": _STRING,
        "issued_at": _STRING,
        "audit_ids": {"type": "array", "items": _STRING},
        "catalog": {"type": "array", "items": {"type": "object"}},
    },
    {"project": _object({"id": _STRING, "name": _STRING})},
)
# Keystone v3 password authentication, as app.api.identity reads it: a user
# by id, or by name within a domain; a project likewise. Other methods and
# scopes are refused.
_AUTH_DOMAIN: Schema = {
    "type": "object",
    "properties": {"id": _STRING, "name": _STRING},
    "anyOf": [
        {"required": ["name"], "properties": {"name": {"minLength": 1}}},
        {"required": ["id"], "properties": {"id": {"minLength": 1}}},
    ],
}
_BY_NAME_OR_ID: Schema = {
    "anyOf": [
        {"required": ["name", "domain"], "properties": {"name": {"minLength": 1}}},
        {
            "required": ["id"],
            "properties": {"id": {"minLength": 1}, "name": {"maxLength": 0}},
        },
    ],
}
_AUTH_USER: Schema = {
    "type": "object",
    "required": ["password"],
    "properties": {"name": _STRING, "id": _STRING, "password": _STRING, "domain": _AUTH_DOMAIN},
    **_BY_NAME_OR_ID,
}
AUTH_TOKENS_BODY: Schema = {
    "type": "object",
    "required": ["auth"],
    "properties": {
        "auth": {
            "type": "object",
            "required": ["identity"],
            "properties": {
                "identity": {
                    "type": "object",
                    "required": ["methods", "password"],
                    "properties": {
                        "methods": {
                            "type": "array",
                            "items": {"enum": ["password"]},
                            "minItems": 1,
                        },
                        "password": {
                            "type": "object",
                            "required": ["user"],
                            "properties": {"user": _AUTH_USER},
                        },
                    },
                },
                "scope": {
                    "type": "object",
                    "required": ["project"],
                    "properties": {
                        "project": {
                            "type": "object",
                            "properties": {"name": _STRING, "id": _STRING, "domain": _AUTH_DOMAIN},
                            **_BY_NAME_OR_ID,
                        }
                    },
                },
            },
        }
    },
}
SERVER_ACTION_BODY: Schema = {
    "oneOf": [
        validation.TRIGGER_CRASH_DUMP,
        validation.LOCK,
        validation.UNLOCK,
        validation.RESET_STATE,
    ],
}

_REQUEST_ID_HEADER: Schema = {
    "description": "Names the instance action a request recorded",
    "required": True,
    "schema": {"type": "string", "pattern": "^req-[0-9a-f-]{36}$"},
}
_VERSION_HEADER: Schema = {
    "description": "The microversion that served the request",
    "required": True,
    "schema": {"type": "string", "pattern": "^compute [0-9]+\\.[0-9]+$"},
}
_SUBJECT_TOKEN_HEADER: Schema = {
    "description": "The token, to send back as X-Auth-Token",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}


@dataclass(frozen=True)
class Operation:
    """What one route accepts and answers, beyond what FastAPI sees."""

    success: int
    body: Schema | None = None  # the success response body; None for no content
    errors: tuple[int, ...] = ()
    request: Schema | str | None = None  # a schema, or "register" (built per deployment)
    authenticated: bool = True
    query: dict[str, Schema] = field(default_factory=dict)
    headers: dict[str, Schema] = field(default_factory=dict)
    response_headers: dict[str, Schema] = field(default_factory=dict)
    media_type: str = "application/json"  # of the success body


# What app/api/servers.py _all_tenants takes, as Nova's is_all_tenants: empty, or a
# word of oslo's bool_from_string in any case, with space around it.
_BOOL_WORDS = "|".join(
    "".join(f"[{c.upper()}{c}]" if c.isalpha() else c for c in word)
    for word in strutils.TRUE_STRINGS + strutils.FALSE_STRINGS
)
_ALL_TENANTS: Schema = {"type": "string", "pattern": rf"^$|^\s*({_BOOL_WORDS})\s*$"}
_LIST_QUERY = {"name": _STRING, "all_tenants": _ALL_TENANTS}
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("get", "/"): Operation(
        200, _object({"versions": {"type": "array", "items": _VERSION}}), authenticated=False
    ),
    ("get", "/v2"): Operation(200, _object({"version": _VERSION}), authenticated=False),
    ("get", "/v2.1"): Operation(200, _object({"version": _VERSION}), authenticated=False),
    ("get", "/identity"): Operation(
        300,
        _object({"versions": _object({"values": {"type": "array", "items": _IDENTITY_VERSION}})}),
        authenticated=False,
    ),
    ("get", "/identity/v3"): Operation(
        200, _object({"version": _IDENTITY_VERSION}), authenticated=False
    ),
    ("post", "/identity/v3/auth/tokens"): Operation(
        201,
        _object({"token": _TOKEN}),
        errors=(401,),
        request=AUTH_TOKENS_BODY,
        authenticated=False,
        response_headers={"X-Subject-Token": _SUBJECT_TOKEN_HEADER},
    ),
    ("get", "/identity/v3/auth/tokens"): Operation(
        200,
        _object({"token": _TOKEN}),
        errors=(404,),
        headers={"X-Subject-Token": _STRING},
    ),
    ("delete", "/identity/v3/auth/tokens"): Operation(
        204, errors=(404,), headers={"X-Subject-Token": _STRING}
    ),
    ("get", "/v2.1/servers"): Operation(
        200,
        _object({"servers": {"type": "array", "items": _SERVER_SUMMARY}}),
        errors=(403,),
        query=_LIST_QUERY,
    ),
    ("get", "/v2.1/servers/detail"): Operation(
        200,
        _object({"servers": {"type": "array", "items": _SERVER}}),
        errors=(403,),
        query=_LIST_QUERY,
    ),
    ("get", "/v2.1/servers/{server_id}"): Operation(
        200, _object({"server": _SERVER}), errors=(403, 404)
    ),
    ("post", "/v2.1/servers/{server_id}/action"): Operation(
        202, errors=(403, 404, 409), request=SERVER_ACTION_BODY
    ),
    ("get", "/v2.1/servers/{server_id}/os-instance-actions"): Operation(
        200,
        _object({"instanceActions": {"type": "array", "items": _object(_INSTANCE_ACTION_FIELDS)}}),
        errors=(403, 404),
    ),
    ("get", "/v2.1/servers/{server_id}/os-instance-actions/{request_id}"): Operation(
        200, _object({"instanceAction": _INSTANCE_ACTION}), errors=(403, 404)
    ),
    ("get", "/v2.1/crashlab/servers"): Operation(
        200, _object({"servers": {"type": "array", "items": _REGISTRATION}}), errors=(403,)
    ),
    ("post", "/v2.1/crashlab/servers"): Operation(
        201, _object({"server": _REGISTRATION}), errors=(403, 409), request="register"
    ),
    ("get", "/v2.1/crashlab/servers/{server_id}"): Operation(
        200, _object({"server": _REGISTRATION}), errors=(403, 404)
    ),
    ("delete", "/v2.1/crashlab/servers/{server_id}"): Operation(204, errors=(403, 404)),
    ("post", "/v2.1/crashlab/servers/{server_id}/action"): Operation(
        202,
        errors=(403, 404, 409),
        request={"oneOf": [validation.FORCED_TRIGGER, validation.CAPTURE_MEMORY_DUMP]},
    ),
    ("get", "/v2.1/crashlab/servers/{server_id}/crash-readiness"): Operation(
        200,
        _object({"crash_readiness": _CRASH_READINESS}),
        errors=(403, 404),
        query={"refresh": {"type": "boolean"}},
    ),
    ("get", "/v2.1/crashlab/servers/{server_id}/dump-target/key"): Operation(
        200, _object({"dump_target_key": _DUMP_TARGET_KEY}), errors=(403, 404)
    ),
    ("get", "/v2.1/crashlab/servers/{server_id}/os-instance-actions/{request_id}"): Operation(
        200, _object({"instanceAction": _INSTANCE_ACTION}), errors=(403, 404)
    ),
    ("get", "/v2.1/crashlab/servers/{server_id}/crash-dumps"): Operation(
        200, _object({"crash_dumps": {"type": "array", "items": _CRASH_DUMP}}), errors=(403, 404)
    ),
    ("get", "/v2.1/crashlab/servers/{server_id}/crash-dumps/{dump_id}"): Operation(
        200, _object({"crash_dump": _CRASH_DUMP}), errors=(403, 404)
    ),
    ("get", "/v2.1/crashlab/servers/{server_id}/crash-dumps/{dump_id}/vmcore"): Operation(
        200,
        {"type": "string", "format": "binary"},
        errors=(403, 404, 410),
        media_type="application/octet-stream",
    ),
    ("get", "/v2.1/crashlab/servers/{server_id}/crash-dumps/{dump_id}/dmesg"): Operation(
        200, {"type": "string"}, errors=(403, 404, 410), media_type="text/plain"
    ),
    ("get", "/v2.1/crashlab/drivers"): Operation(
        200, _object({"drivers": {"type": "array", "items": _DRIVER}})
    ),
}
_GENERIC = Operation(200, {"type": "object"}, errors=(403, 404, 409))
# What settings validators check that pydantic cannot put in a JSON schema.
_SETTINGS_PATTERNS: dict[tuple[str, str], str] = {
    (
        "redfish",
        "address",
    ): f"^https?://{HOST_PATTERN[1:-1]}(:([1-9][0-9]{{0,3}}|[1-5][0-9]{{4}}))?(/redfish/v1)?$",
    ("ipmi", "address"): HOST_PATTERN,
    ("libvirt", "uri"): LIBVIRT_URI_PATTERN,
}


def _given(field_name: str) -> Schema:
    return {"required": [field_name], "properties": {field_name: {"type": "string"}}}


def _uri_of(transport: str) -> Schema:
    return {"required": ["uri"], "properties": {"uri": {"pattern": f"^qemu\\+{transport}://"}}}


_TLS = ("tls_ca_cert", "tls_client_cert", "tls_client_key")
# Rules between fields (the settings models' after-validators), as JSON Schema:
# an ssh key needs a qemu+ssh URI; the TLS material goes together, with qemu+tls.
_SETTINGS_RULES: dict[str, list[Schema]] = {
    "libvirt": [
        {"if": _given("ssh_private_key"), "then": _uri_of("ssh")},
        *(
            {"if": _given(name), "then": {"allOf": [_uri_of("tls"), *map(_given, _TLS)]}}
            for name in _TLS
        ),
    ],
}


def install_openapi(app: FastAPI, config: Config) -> None:
    """Serve the completed document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = complete(document, config)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(document: dict[str, Any], config: Config) -> dict[str, Any]:
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    components["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "apiKey",
            "in": "header",
            "name": "X-Auth-Token",
            "description": "A token from POST /identity/v3/auth/tokens (X-Subject-Token)",
        }
    }
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            spec = OPERATIONS.get((method, path), _GENERIC)
            request = (
                _register_body(schemas, config.test_drivers, config.collector.enabled)
                if spec.request == "register"
                else spec.request
            )
            _describe(operation, path, spec, request)
    if not schemas:
        del components["schemas"]
    return document


def _describe(
    operation: dict[str, Any], path: str, spec: Operation, request: Schema | str | None
) -> None:
    compute = is_compute_path(path)
    statuses = set(spec.errors)
    if compute:
        statuses |= {400, 406}  # a malformed or unsupported microversion
    if spec.authenticated:
        statuses.add(401)
        operation["security"] = [{SECURITY_SCHEME: []}]
    if request is not None:
        statuses |= {400, 413, 415}
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": copy.deepcopy(request)}},
        }
    parameters = operation.setdefault("parameters", [])
    for name, schema in spec.query.items():
        if not any(p["name"] == name and p["in"] == "query" for p in parameters):
            parameters.append({"name": name, "in": "query", "required": False, "schema": schema})
    for name, schema in spec.headers.items():
        parameters.append({"name": name, "in": "header", "required": False, "schema": schema})
    if not parameters:
        del operation["parameters"]
    headers = dict(spec.response_headers)
    if compute:
        headers["X-OpenStack-Request-Id"] = _REQUEST_ID_HEADER
        headers["OpenStack-API-Version"] = _VERSION_HEADER
    operation["responses"] = {
        str(spec.success): _success(spec, headers),
        **{str(status): _fault(status, path) for status in sorted(statuses)},
    }


def _success(spec: Operation, headers: dict[str, Schema]) -> dict[str, Any]:
    response: dict[str, Any] = {"description": HTTPStatus(spec.success).phrase}
    if spec.body is not None:
        response["content"] = {spec.media_type: {"schema": spec.body}}
    if headers:
        response["headers"] = headers
    return response


def _fault(status: int, path: str) -> dict[str, Any]:
    detail = _object({"code": {"type": "integer", "const": status}, "message": _STRING})
    if path.startswith(IDENTITY_PREFIX):
        name = "error"
        detail["required"].append("title")
        detail["properties"]["title"] = _STRING
    else:
        name = fault_name(status)
    body = {
        "type": "object",
        "required": [name],
        "properties": {name: detail},
        "additionalProperties": False,
    }
    return {
        "description": HTTPStatus(status).phrase,
        "content": {"application/json": {"schema": body}},
    }


def _register_body(schemas: dict[str, Any], test_drivers: bool, collector: bool) -> Schema:
    """validation.REGISTER_SERVER, narrowed to what this service takes through the API:
    its drivers (test backends only with ``test_drivers``), without the fields
    only the config file may set, and the ssh dump target only with a ``collector``.

    Never to its projects and users: the document is served to anyone, and
    names no account.
    """
    body: Schema = copy.deepcopy(validation.REGISTER_SERVER)
    server = body["properties"]["server"]
    branches = []
    for name in DRIVER_CLASSES:
        try:
            settings_model = driver_class(name).settings_model
        except ImportError as error:  # an optional backend library is missing
            LOG.warning("driver %s left out of the API document: %s", name, error)
            continue
        if settings_model.test_backend and not test_drivers:
            continue
        settings = settings_model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(settings.pop("$defs", {}))
        for field_name in settings_model.config_only_fields:
            settings["properties"].pop(field_name, None)
            if field_name in settings.get("required", []):
                settings["required"].remove(field_name)
        for (driver, field_name), pattern in _SETTINGS_PATTERNS.items():
            if driver == name:
                settings["properties"][field_name]["pattern"] = pattern
        if name in _SETTINGS_RULES:
            settings["allOf"] = _SETTINGS_RULES[name]
        branch: Schema = {
            "properties": {"driver": {"const": name}, "driver_info": settings},
        }
        if name != "libvirt":
            # Only a libvirt server's disk target may leave its domain to the server's.
            branch["properties"]["dump_target"] = {
                "if": {"properties": {"type": {"const": "disk"}}},
                "then": {"required": ["domain"], "properties": {"domain": {"type": "string"}}},
            }
        if settings.get("required"):
            branch["required"] = ["driver_info"]
        branches.append(branch)
    server["properties"]["driver"] = {
        "type": "string",
        "enum": [b["properties"]["driver"]["const"] for b in branches],
    }
    server["oneOf"] = branches
    for field_name, schema in _dump_settings_schemas().items():
        schemas.update(schema.pop("$defs", {}))
        server["properties"][field_name] = schema
    if not collector:
        ssh: Schema = {"properties": {"type": {"const": "ssh"}}, "required": ["type"]}
        server["properties"]["dump_target"] = {
            "allOf": [server["properties"]["dump_target"], {"not": ssh}]
        }
    return body


def _dump_settings_schemas() -> dict[str, Schema]:
    template = "#/components/schemas/{model}"
    return {
        "dump_target": DUMP_TARGET.json_schema(ref_template=template),
        "dump_timeouts": DumpTimeouts.model_json_schema(ref_template=template),
    }
