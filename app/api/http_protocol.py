"""The HTTP/1.1 protocol ``crashlab serve`` runs: uvicorn's h11 one, with Nova's 400.

A request uvicorn cannot parse (a malformed request line, a bad header) never
reaches the application: uvicorn answers it itself, in plain text and with no
request id. This protocol answers it as every other fault is answered, in
Nova's format with the request-id headers. The path is unknown, so there are
no version headers. It is uvicorn's h11 protocol, named rather than left to
uvicorn's ``auto`` choice, which would switch parsers if httptools were installed.
"""

from __future__ import annotations

import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.api.faults import fault_body
from app.api.middleware import new_request_id, request_id_headers

LOG = logging.getLogger(__name__)


class NovaH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        request_id = new_request_id()
        LOG.warning("%s answered 400: %s", request_id, msg)
        body = json.dumps(fault_body(400, msg)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *request_id_headers(request_id),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()
