"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

`code` is the HTTP status, as vLLM's own server reports it, so clients see one shape from
every route.
"""

from __future__ import annotations

import re
from http import HTTPStatus

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """Raised anywhere under a route; answered by `api_error_handler`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def invalid(e: ValidationError, root: str | None = None) -> APIError:
    """A pydantic error as a 400 naming the first offending field."""
    err = e.errors(include_url=False)[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
    msg = err["msg"].removeprefix("Value error, ")
    named = _NAMED.match(msg)
    if not loc and named:  # a model-level check that names its field: "arms: ..."
        loc, msg = named.group(1), msg[named.end() :]
    param = ".".join(x for x in (root, loc) if x) or None
    return APIError(400, f"{param}: {msg}" if param else msg, param)


_NAMED = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*): ")


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


async def api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.message, exc.param, exc.headers)
