"""What every handler needs: the configuration, the guard, the ledger, the clock; authentication; bodies."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from pbxguard.api.errors import ApiError
from pbxguard.api.metrics import Metrics
from pbxguard.config import Config
from pbxguard.guard import Guard
from pbxguard.ledger.store import Ledger

JSON_LIMIT = 2 * 1024 * 1024  # JSON bodies (a 10,000-number batch is ~200 KB)
UPLOAD_LIMIT = 64 * 1024 * 1024  # Bloctel files
SESSION_COOKIE = "pbxguard_session"


def utc_now() -> datetime:
    return datetime.now(UTC)


def no_state() -> dict[str, bool]:
    return {}


@dataclass
class ApiContext:
    config: Config
    guard: Guard
    ledger: Callable[[], Ledger | None]
    metrics: Metrics
    ready_state: Callable[[], dict[str, bool]] = no_state
    clock: Callable[[], datetime] = utc_now
    json_limit: int = JSON_LIMIT
    upload_limit: int = UPLOAD_LIMIT
    body_timeout: float | None = None  # seconds to receive a body (http.body_timeout_ms); None: no limit

    @property
    def token(self) -> str:
        return str(self.config.http.token)

    def require_ledger(self) -> Ledger:
        ledger = self.ledger()
        if ledger is None:
            raise ApiError(503, "store_unavailable", "the ledger is not connected yet")
        return ledger

    def now(self) -> datetime:
        return self.clock()

    # -- authentication -------------------------------------------------------------------------

    def session_value(self) -> str:
        """The dashboard cookie: derived from the token, so the token itself is never stored by a browser."""
        return hmac.new(self.token.encode(), b"pbxguard dashboard session v1", hashlib.sha256).hexdigest()

    def token_matches(self, presented: str) -> bool:
        return bool(self.token) and hmac.compare_digest(presented.encode(), self.token.encode())

    def bearer_ok(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    def cookie_ok(self, request: web.Request) -> bool:
        value = request.cookies.get(SESSION_COOKIE, "")
        return (
            bool(self.token)
            and bool(value)
            and hmac.compare_digest(value.encode(), self.session_value().encode())
        )

    def authorize(self, request: web.Request) -> None:
        """Bearer token or 401; no token configured at all: 403 (writes and personal data are off)."""
        if not self.token:
            raise ApiError(
                403,
                "no_token_configured",
                "no http.token is configured: writes and personal data are disabled (set http.token)",
            )
        if not self.bearer_ok(request):
            missing = "Authorization" not in request.headers
            raise ApiError(
                401,
                "unauthorized",
                "missing bearer token" if missing else "wrong bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="pbxguard"'},
            )


# -- bodies ---------------------------------------------------------------------------------------


def _body_timeout(within: float | None) -> ApiError:
    # The rest of the body is not worth waiting for: the connection is closed after the answer.
    return ApiError(408, "request_timeout", f"request body not received within {within:g} s", close=True)


async def read_limited(request: web.Request, limit: int, within: float | None = None) -> bytes:
    """The body, at most `limit` bytes (else 413), received within `within` seconds (else 408)."""
    try:
        async with asyncio.timeout(within):
            return await _read_limited(request, limit)
    except TimeoutError:
        raise _body_timeout(within) from None


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "body_too_large", f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not valid JSON")


async def read_json_object(request: web.Request, limit: int, within: float | None = None) -> dict[str, Any]:
    content_type = request.content_type if request.headers.get("Content-Type") else "application/json"
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", "send application/json")
    raw = await read_limited(request, limit, within)
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "malformed_json", f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "malformed_json", "the body must be a JSON object")
    return data


async def read_upload(
    request: web.Request, limit: int, within: float | None = None
) -> tuple[str, str | None]:
    """A text file as `text/plain` (or `text/csv`, `application/octet-stream`) or as the multipart part `file`."""
    try:
        async with asyncio.timeout(within):
            return await _read_upload(request, limit)
    except TimeoutError:
        raise _body_timeout(within) from None


async def _read_upload(request: web.Request, limit: int) -> tuple[str, str | None]:
    content_type = request.content_type
    if content_type == "multipart/form-data":
        if request.content_length is not None and request.content_length > limit + 65536:
            raise ApiError(413, "body_too_large", f"upload larger than {limit} bytes")
        try:
            return await _read_multipart(request, limit)
        except (HttpProcessingError, ValueError) as exc:  # aiohttp's multipart parser: bad part headers
            message = getattr(exc, "message", None) or str(exc)
            raise ApiError(400, "malformed_multipart", f"malformed multipart body: {message:.200}") from None
    if content_type in ("text/plain", "text/csv", "application/octet-stream"):
        return _decode(await read_limited(request, limit)), None
    raise ApiError(
        415, "unsupported_media_type", "send the file as text/plain or as multipart/form-data part 'file'"
    )


async def _read_multipart(request: web.Request, limit: int) -> tuple[str, str | None]:
    reader = await request.multipart()
    while True:
        part = await reader.next()
        if part is None:
            raise ApiError(422, "invalid", "file: a multipart part named 'file' is required", "file")
        if not isinstance(part, BodyPartReader) or part.name != "file":
            await part.release()
            continue
        chunks: list[bytes] = []
        size = 0
        while chunk := await part.read_chunk(1 << 16):
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"upload larger than {limit} bytes")
            chunks.append(chunk)
        return _decode(b"".join(chunks)), part.filename


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ApiError(422, "invalid", f"file: not UTF-8 text (byte {exc.start})", "file") from None
