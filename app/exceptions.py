"""Errors the crashlab API returns, each knowing its Nova fault name and status.

One handler in ``app.api.faults`` formats them all as Nova does:
``{"<fault name>": {"code": N, "message": "..."}}``.

    APIError
     ├── BadRequest                 400 badRequest
     │    ├── ValidationFailed          "Invalid input for field/attribute ..."
     │    ├── MalformedBody             "Malformed request body"
     │    ├── NoSuchAction              "There is no such action: X"
     │    └── InvalidVersion            "API Version String X is of invalid format ..."
     ├── Unauthorized               401 unauthorized
     ├── Forbidden                  403 forbidden
     │    └── PolicyNotAuthorized       "Policy doesn't allow R to be performed."
     ├── NotFound                   404 itemNotFound
     │    ├── InstanceNotFound          "Instance <uuid> could not be found."
     │    ├── InstanceActionNotFound
     │    ├── CrashDumpNotFound         "Crash dump <id> of instance <uuid> could not be found."
     │    ├── NoSshDumpTarget           the server's dump target is not ssh: it has no key
     │    └── NoVmcore                  the dump has no vmcore (yet, or ever)
     ├── NotAcceptable              406 computeFault (Nova has no name for 406)
     │    └── VersionNotSupported       "Version X is not supported by the API. ..."
     ├── Conflict                   409 conflictingRequest
     │    ├── InstanceIsLocked          "Instance <uuid> is locked"
     │    ├── InstanceInvalidState      "Cannot 'A' instance <uuid> while it is in vm_state S"
     │    ├── NMIGuardActive            crashlab's storm guard (beyond Nova)
     │    └── DuplicateServer
     ├── Gone                       410 computeFault (Nova has no name for 410)
     │    └── VmcoreRemoved             the vmcore was removed by retention
     ├── PayloadTooLarge            413 overLimit
     ├── UnsupportedMediaType       415 badMediaType
     ├── InternalError              500 computeFault
     └── ServiceUnavailable         503 serviceUnavailable
"""

from __future__ import annotations

from typing import ClassVar

# Nova's fault names (Fault._fault_names); anything else is computeFault.
FAULT_NAMES: dict[int, str] = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    409: "conflictingRequest",
    413: "overLimit",
    415: "badMediaType",
    429: "overLimit",
    501: "notImplemented",
    503: "serviceUnavailable",
}


def fault_name(status: int) -> str:
    return FAULT_NAMES.get(status, "computeFault")


class APIError(Exception):
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "An unknown exception occurred."

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    @property
    def fault_name(self) -> str:
        return fault_name(self.status)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, message={self.message!r})"


class BadRequest(APIError):
    status = 400
    default_message = (
        "The server could not comply with the request since it is either "
        "malformed or otherwise incorrect."
    )


class ValidationFailed(BadRequest):
    pass


class MalformedBody(BadRequest):
    default_message = "Malformed request body"


class NoSuchAction(BadRequest):
    def __init__(self, action: str) -> None:
        super().__init__(f"There is no such action: {action}")


class InvalidVersion(BadRequest):
    def __init__(self, version: str) -> None:
        super().__init__(
            f"API Version String {version} is of invalid format. "
            "Must be of format MajorNum.MinorNum."
        )


class Unauthorized(APIError):
    status = 401
    default_message = "The request you have made requires authentication."


class Forbidden(APIError):
    status = 403
    default_message = "Access was denied to this resource."


class PolicyNotAuthorized(Forbidden):
    def __init__(self, rule: str) -> None:
        super().__init__(f"Policy doesn't allow {rule} to be performed.")


class NotFound(APIError):
    status = 404
    default_message = "The resource could not be found."


class InstanceNotFound(NotFound):
    def __init__(self, instance_id: str) -> None:
        super().__init__(f"Instance {instance_id} could not be found.")


class InstanceActionNotFound(NotFound):
    def __init__(self, request_id: str, instance_id: str) -> None:
        # Nova's instance actions API (show)
        super().__init__(f"Action {request_id} not found")


class CrashDumpNotFound(NotFound):
    def __init__(self, dump_id: str, instance_uuid: str) -> None:
        super().__init__(f"Crash dump {dump_id} of instance {instance_uuid} could not be found.")


class NoSshDumpTarget(NotFound):
    def __init__(self, instance_uuid: str) -> None:
        super().__init__(f"Instance {instance_uuid} has no ssh dump target.")


class NoVmcore(NotFound):
    def __init__(self, dump_id: str, state: str) -> None:
        super().__init__(f"Crash dump {dump_id} has no vmcore (state {state}).")


class NotAcceptable(APIError):
    status = 406
    default_message = "The resource could not be found."


class VersionNotSupported(NotAcceptable):
    def __init__(self, version: str, min_version: str, max_version: str) -> None:
        super().__init__(
            f"Version {version} is not supported by the API. "
            f"Minimum is {min_version} and maximum is {max_version}."
        )


class Conflict(APIError):
    status = 409
    default_message = "There was a conflict when trying to complete your request."


class InstanceIsLocked(Conflict):
    def __init__(self, instance_id: str) -> None:
        super().__init__(f"Instance {instance_id} is locked")


class InstanceInvalidState(Conflict):
    # Nova's common.raise_http_conflict_for_instance_invalid_state wording.
    def __init__(self, action: str, instance_id: str, attr: str, state: str) -> None:
        super().__init__(f"Cannot '{action}' instance {instance_id} while it is in {attr} {state}")


class NMIGuardActive(Conflict):
    pass


class DuplicateServer(Conflict):
    pass


class Gone(APIError):
    status = 410
    default_message = "The resource is no longer available."


class VmcoreRemoved(Gone):
    def __init__(self, dump_id: str) -> None:
        super().__init__(
            f"The vmcore of crash dump {dump_id} was removed by the retention policy; "
            "its record remains."
        )


class PayloadTooLarge(APIError):
    status = 413
    default_message = "Request is too large."


class UnsupportedMediaType(APIError):
    status = 415
    default_message = "The request media type is not supported by this server."


class InternalError(APIError):
    status = 500
    default_message = (
        "Unexpected API Error. Please report this at http://bugs.launchpad.net/nova/ "
        "and attach the Nova API log if possible."
    )


class ServiceUnavailable(APIError):
    status = 503
    default_message = "The service is temporarily unavailable; try again shortly."
