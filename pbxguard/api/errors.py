"""JSON errors: `{"error": {"code": ..., "message": ..., "field": ...}}`, for every failure of every route."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

log = logging.getLogger("pbxguard.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid",
    500: "internal",
    503: "store_unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})
        self.close = close  # close the connection after the answer (a body left half-read)

    def response(self) -> web.Response:
        response = error_response(self.status, self.code, self.message, self.field, self.headers)
        if self.close:
            response.force_close()
        return response


def invalid(field: str, message: str, code: str = "invalid") -> ApiError:
    return ApiError(422, code, message, field)


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = {"error": {"code": code, "message": message, "field": field}}
    response = web.json_response(body, status=status, headers=dict(headers or {}))
    response.headers["Cache-Control"] = "no-store"
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        if exc.status == 404:
            message = f"no route {request.path}"
        elif exc.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        elif exc.status == 413:
            message = "request body too large"
        else:
            message = exc.reason
        return error_response(exc.status, _CODES.get(exc.status, "error"), message, None, headers)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error (see the daemon's log)")
