"""The one place where errors become HTTP responses, in Nova's fault format.

Compute paths answer ``{"<fault name>": {"code": N, "message": "..."}}``;
identity paths answer Keystone's ``{"error": {"code", "title", "message"}}``.
An unexpected error's 500 is sent by ``app.api.middleware``, which alone can
give it the request-id and version headers.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.exceptions import APIError, fault_name

IDENTITY_PREFIX = "/identity"
# The methods an Allow header may name.
HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def fault_body(status: int, message: str, path: str = "") -> dict[str, dict[str, object]]:
    if path.startswith(IDENTITY_PREFIX):
        title = HTTPStatus(status).phrase
        return {"error": {"code": status, "title": title, "message": message}}
    return {fault_name(status): {"code": status, "message": message}}


def fault_response(status: int, message: str, path: str = "") -> JSONResponse:
    return JSONResponse(fault_body(status, message, path), status_code=status)


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, APIError)
    return fault_response(error.status, error.message, request.url.path)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    message = (
        error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).phrase
    )
    if error.status_code == 404:
        message = "The resource could not be found."
    response = fault_response(error.status_code, message, request.url.path)
    if error.headers:
        response.headers.update(error.headers)
    if error.status_code == 405:
        response.headers["Allow"] = _allowed_methods(request)
    return response


def _allowed_methods(request: Request) -> str:
    """Every method the path takes, each asked of the router as a request would be.

    Starlette names only the methods of the first route that matched, FastAPI
    makes one route per method, and an included router is one route that has
    no ``methods`` of its own; a full match is what each of them answers alike.
    """
    routes = request.app.router.routes
    allowed = [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]
    return ", ".join(allowed)


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    field = ".".join(str(part) for part in first.get("loc", ())[1:])
    message = f"Invalid input for field/attribute {field}. {first.get('msg', '')}".strip()
    return fault_response(400, message, request.url.path)


def install_fault_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
