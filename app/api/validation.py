"""Request body schemas, checked with jsonschema and worded as Nova words them.

Nova's API validators: an error at a path reads "Invalid input for
field/attribute <last path element>. Value: <value>. <jsonschema message>".
Unlike Nova, the value and the message are taken from a copy of the body in
which every secret field of every driver (a BMC password, a private key) is
masked, so a refused registration never repeats a secret.
"""

from __future__ import annotations

import functools
from typing import Any

import jsonschema

from app.backends import SECRET_MASK
from app.exceptions import ValidationFailed
from drivers import all_driver_classes

# Nova's server action schemas
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
# Nova's admin actions schema (reset_state)
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
                "dump_target": {"type": "object"},
                "dump_timeouts": {"type": "object"},
                "expected_kernel_release": _STRING,
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
            "properties": {
                "ignore_nmi_guard": {"type": "boolean"},
                "require_armed": {"type": "boolean"},
                "allow_unknown": {"type": "boolean"},
            },
            "additionalProperties": False,
        }
    },
    "required": ["trigger_crash_dump"],
    "additionalProperties": False,
}
CAPTURE_MEMORY_DUMP = {
    "type": "object",
    "properties": {
        "capture_memory_dump": {
            "type": ["object", "null"],
            "properties": {"then": {"type": "string", "enum": ["resume", "nmi", "destroy"]}},
            "additionalProperties": False,
        }
    },
    "required": ["capture_memory_dump"],
    "additionalProperties": False,
}


@functools.cache
def secret_fields() -> frozenset[str]:
    """The names of every driver's secret fields (read once the drivers are needed)."""
    return frozenset().union(*(cls.settings_model.secret_fields for cls in all_driver_classes()))


def masked_secrets(value: Any) -> Any:
    """``value`` with the value of every secret field, at any depth, replaced by a mask.

    Keys match whatever their case: ``Password`` is refused later, but not repeated.
    """
    if isinstance(value, dict):
        return {
            k: SECRET_MASK if str(k).lower() in secret_fields() else masked_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [masked_secrets(item) for item in value]
    return value


def validate(schema: dict[str, Any], body: Any) -> None:
    validator = jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())
    if validator.is_valid(body):
        return
    # No schema here constrains a secret field (driver_info is the driver's to
    # check), so the masked body fails as the body does, and is what is reported.
    error = jsonschema.exceptions.best_match(validator.iter_errors(masked_secrets(body)))
    if error is None:
        raise ValidationFailed()
    if error.path:
        raise ValidationFailed(
            f"Invalid input for field/attribute {error.path[-1]}. "
            f"Value: {error.instance}. {error.message}"
        )
    raise ValidationFailed(error.message)
