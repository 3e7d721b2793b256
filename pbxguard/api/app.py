"""The aiohttp application: the route table registered behind authentication, validation and JSON errors."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from pbxguard.api.context import ApiContext, read_json_object
from pbxguard.api.errors import ApiError, Handler, json_errors
from pbxguard.api.fields import parse_fields
from pbxguard.api.routes import ROUTES, Access, Args, Route
from pbxguard.ledger.store import NotFoundError, StoreError

CONTEXT: web.AppKey[ApiContext] = web.AppKey("pbxguard_context", ApiContext)


def endpoint(ctx: ApiContext, route: Route) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        if route.access is Access.TOKEN:
            ctx.authorize(request)
        path = parse_fields(route.path_params, dict(request.match_info), from_text=True, where="path")
        query = parse_fields(route.query, dict(request.query), from_text=True, where="query")
        body = (
            parse_fields(
                route.body, await read_json_object(request, ctx.json_limit, ctx.body_timeout), from_text=False, where="body"
            )
            if route.body is not None
            else {}
        )
        try:
            return await route.handler(ctx, request, Args(path, query, body))
        except NotFoundError as exc:  # the only one: an order giver without a campaign
            raise ApiError(422, "unknown_order_giver", f"order_giver: {exc}", "order_giver") from None
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise ApiError(422, "rejected", f"the ledger refused it: {type(exc).__name__}") from None
        except (
            StoreError,
            OSError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
            asyncpg.PostgresConnectionError,
            asyncpg.exceptions.OperatorInterventionError,
            TimeoutError,
        ) as exc:
            raise ApiError(
                503, "store_unavailable", f"the ledger is unavailable: {type(exc).__name__}"
            ) from None

    handle.__name__ = route.operation_id
    return handle


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if request.path.startswith("/v1/"):
        response.headers.setdefault("Cache-Control", "no-store")


def build_app(ctx: ApiContext) -> web.Application:
    # Bodies are read through per-route limits (2 MiB JSON, 64 MiB uploads), not client_max_size.
    app = web.Application(middlewares=[json_errors], client_max_size=ctx.upload_limit + (1 << 20))
    app[CONTEXT] = ctx
    for route in ROUTES:
        app.router.add_route(route.method, route.path, endpoint(ctx, route))
    app.on_response_prepare.append(_security_headers)
    return app


__all__ = ["CONTEXT", "ApiContext", "build_app"]
