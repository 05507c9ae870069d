"""Request body schemas, checked with jsonschema and worded as Nova words them.

nova/api/validation/validators.py: an error at a path reads "Invalid input for
field/attribute <last path element>. Value: <value>. <jsonschema message>".
"""

from __future__ import annotations

from typing import Any

import jsonschema

from app.exceptions import ValidationFailed

# nova/api/openstack/compute/schemas/servers.py
TRIGGER_CRASH_DUMP = {
    "type": "object",
    "properties": {"trigger_crash_dump": {"type": "null"}},
    "required": ["trigger_crash_dump"],
    "additionalProperties": False,
}
# Nova validates lock/unlock bodies only from 2.73; crashlab takes null or
# an object, which is what novaclient ({"lock": null}) and Tempest
# ({"lock": {}}) send.
LOCK = {
    "type": "object",
    "properties": {"lock": {"type": ["object", "null"]}},
    "required": ["lock"],
    "additionalProperties": False,
}
UNLOCK = {
    "type": "object",
    "properties": {"unlock": {"type": ["object", "null"]}},
    "required": ["unlock"],
    "additionalProperties": False,
}
# nova/api/openstack/compute/schemas/admin_actions.py reset_state
RESET_STATE = {
    "type": "object",
    "properties": {
        "os-resetState": {
            "type": "object",
            "properties": {"state": {"type": "string", "enum": ["active", "error"]}},
            "required": ["state"],
            "additionalProperties": False,
        }
    },
    "required": ["os-resetState"],
    "additionalProperties": False,
}
# crashlab extension: register a server.
_STRING = {"type": "string", "minLength": 1, "maxLength": 255}
REGISTER_SERVER = {
    "type": "object",
    "properties": {
        "server": {
            "type": "object",
            "properties": {
                "uuid": {"type": "string", "format": "uuid"},
                "name": _STRING,
                "project_id": _STRING,
                "user_id": _STRING,
                "driver": _STRING,
                "driver_info": {"type": "object"},
            },
            "required": ["name", "project_id", "user_id", "driver"],
            "additionalProperties": False,
        }
    },
    "required": ["server"],
    "additionalProperties": False,
}
# crashlab extension: trigger_crash_dump with options, each optional; null or
# {} is a plain trigger (null is Nova's body for the action).
FORCED_TRIGGER = {
    "type": "object",
    "properties": {
        "trigger_crash_dump": {
            "type": ["object", "null"],
            "properties": {"ignore_nmi_guard": {"type": "boolean"}},
            "additionalProperties": False,
        }
    },
    "required": ["trigger_crash_dump"],
    "additionalProperties": False,
}


def validate(schema: dict[str, Any], body: Any) -> None:
    validator = jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())
    error = jsonschema.exceptions.best_match(validator.iter_errors(body))
    if error is None:
        return
    if error.path:
        raise ValidationFailed(
            f"Invalid input for field/attribute {error.path[-1]}. "
            f"Value: {error.instance}. {error.message}"
        )
    raise ValidationFailed(error.message)
