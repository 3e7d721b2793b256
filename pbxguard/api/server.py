"""Serving the HTTP application: optional TLS, a connection limit, and timeouts for slow clients.

- `http.idle_timeout_ms` (aiohttp's keep-alive timeout): a connection that has not sent a whole
  request head within it, after connecting or after its previous response, is closed. aiohttp arms
  this timer when the connection opens, so it also cuts a client that trickles its headers in
  (slowloris). A request body must arrive within `http.body_timeout_ms` (408, see api.context).
- `http.max_connections`: when that many are open, a new connection displaces the oldest one that is
  between requests (no handler running) for at least `DISPLACE_AFTER` seconds, so idle connections
  cannot lock operators and CRMs out; when every connection is busy, the new one is answered 503 and
  closed. A TLS handshake must finish within the idle timeout (at most 60 s).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from typing import Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from pbxguard.api.errors import Handler

__all__ = ["DISPLACE_AFTER", "ConnectionLimit", "LimitedSite"]

log = logging.getLogger("pbxguard.http")

DISPLACE_AFTER: Final = 1.0
_OVERFLOW_LOG_INTERVAL: Final = 5.0
_BUSY_BODY = json.dumps(
    {"error": {"code": "too_many_connections", "message": "too many connections (http.max_connections)",
               "field": None}}
).encode()  # fmt: skip
_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Cache-Control: no-store\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


class _Refused(asyncio.Protocol):
    """A connection over the limit: answered 503 and closed, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


class ConnectionLimit:
    """Counts the server's connections and knows which are idle (between requests) since when.

    Only connections aiohttp holds are tracked (pbxguard keeps no reference to a closed one): a
    connection is first seen at the next accept after it opened, or when a request on it ends, which
    can only make it look idle for less time than it was.
    """

    def __init__(self, limit: int, handshake_timeout: float) -> None:
        self.limit = limit
        self.handshake_timeout = handshake_timeout
        self.displaced = 0
        self.refused = 0
        self._since: dict[RequestHandler, float] = {}  # connection -> idle since (monotonic)
        self._busy: dict[RequestHandler, int] = {}  # connection -> requests being handled
        self._refused_logged = 0.0
        self._refused_unlogged = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        protocol = request.protocol
        self._busy[protocol] = self._busy.get(protocol, 0) + 1
        try:
            return await handler(request)
        finally:
            left = self._busy.pop(protocol, 1) - 1
            if left > 0:
                self._busy[protocol] = left
            self._since[protocol] = asyncio.get_running_loop().time()

    def factory(self, server: web.Server) -> asyncio.BaseProtocol:
        """Called by the event loop for each accepted connection."""
        now = asyncio.get_running_loop().time()
        live = server.connections
        self._since = {handler: self._since.get(handler, now) for handler in live}
        if len(live) >= self.limit and not self._displace(now):
            self._log_refused()
            return _Refused()
        return server()

    def _displace(self, now: float) -> bool:
        idle = [
            (since, handler)
            for handler, since in self._since.items()
            if handler not in self._busy and now - since >= DISPLACE_AFTER
        ]
        if not idle:
            return False
        since, victim = min(idle, key=lambda item: item[0])
        del self._since[victim]
        victim.force_close()
        self.displaced += 1
        log.debug("HTTP connection displaced: idle %.1f s and http.max_connections reached", now - since)
        return True

    def _log_refused(self) -> None:
        self.refused += 1
        self._refused_unlogged += 1
        now = time.monotonic()
        if now - self._refused_logged >= _OVERFLOW_LOG_INTERVAL:
            log.warning(
                "HTTP connection refused: %d connections busy (http.max_connections); %d refused since "
                "the last report",
                self.limit,
                self._refused_unlogged,
            )
            self._refused_unlogged = 0
            self._refused_logged = now


class LimitedSite(web.BaseSite):
    """A TCP site whose connections go through a ConnectionLimit, optionally over TLS."""

    __slots__ = ("_host", "_limit", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limit: ConnectionLimit,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 512,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._limit = limit

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        if self._server is not None and isinstance(self._server, asyncio.Server) and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        limit = self._limit
        tls = self._ssl_context
        self._server = await asyncio.get_running_loop().create_server(
            lambda: limit.factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
            ssl=tls,
            ssl_handshake_timeout=min(limit.handshake_timeout, 60.0) if tls is not None else None,
        )
