"""The ARI gate: channels that enter ``Stasis(pbxguard[,NUMBER[,CAMPAIGN]])`` are decided here.

pbxguard registers the Stasis application by holding Asterisk's event WebSocket
(``/ari/events?app=NAME&subscribeAll=false``) open; the link is supervised with capped exponential
backoff, and reconnecting registers the application again, which is all an Asterisk restart needs.
While pbxguard is not connected, ``Stasis()`` fails at once and the shipped dialplan blocks.

For each ``StasisStart`` of our application:

- number: the first Stasis argument, else the channel's dialplan extension; campaign: the second
  argument, else the ``PBXGUARD_CAMPAIGN`` channel variable; caller ID: ``channel.caller.number``
  (the current ``CALLERID(num)``); token: the ``PBXGUARD_TOKEN`` channel variable; call key: the
  channel id (its Asterisk uniqueid);
- the verdict variables are set (``PBXGUARD_REASONS``, ``PBXGUARD_NEXT``, ``PBXGUARD_DECISION``, then
  ``PBXGUARD_VERDICT``) and the channel is either continued in the dialplan (the call is permitted)
  or hung up with Q.850 cause 21, call rejected;
- a decision not made within ``asterisk.ari.timeout_ms`` (minus a reserve for the answer) is
  ``BLOCK`` / ``STORE_UNAVAILABLE``.

Which channels are ours. Only a channel that runs the dialplan before it is dialled can be gated: the
``;2`` leg of a Local channel (or a phone's channel) executing ``Stasis(pbxguard,...)``. The ``;1``
leg of a Local channel enters an application only once its ``;2`` leg has answered, that is after
the call was placed (an ARI ``POST /channels?endpoint=Local/...&app=pbxguard``, or an AMI Originate
with ``Application: Stasis``): deciding it then would hang up on a consumer who already picked up,
so such a channel is logged and left alone, for whoever put it there. Put the check in the dialplan
the call goes through (``[pbxguard-outbound-ari]``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
from yarl import URL

from pbxguard.config import Config
from pbxguard.gates.fastagi import unavailable_decision, verdict_variables
from pbxguard.guard import Guard
from pbxguard.logs import mask_number
from pbxguard.policy.model import CallAttempt, Decision

__all__ = ["AriGate", "StasisCall", "authorization_header", "base_url", "parse_stasis_start"]

log = logging.getLogger("pbxguard.gates.ari")

HANGUP_CAUSE_CALL_REJECTED: Final = 21
_MIN_REPLY_RESERVE: Final = 0.05
_MAX_REPLY_RESERVE: Final = 0.5


# -- pure part --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StasisCall:
    channel_id: str
    channel_name: str
    number: str
    campaign: str | None  # None: read PBXGUARD_CAMPAIGN from the channel
    caller_id: str


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def parse_stasis_start(event: Mapping[str, Any], app: str) -> StasisCall | None:
    """The call to decide, or None when the event is not a StasisStart we should decide."""
    if event.get("type") != "StasisStart" or event.get("application") != app:
        return None
    channel = event.get("channel")
    if not isinstance(channel, Mapping):
        return None
    channel_id = _text(channel.get("id"))
    name = _text(channel.get("name"))
    if not channel_id:
        return None
    if name.startswith("Local/") and name.endswith(";1"):
        # Entered after its ;2 leg answered: the call is already placed (see the module docstring).
        return None
    raw_args = event.get("args")
    args = [_text(a) for a in raw_args] if isinstance(raw_args, list) else []
    dialplan = channel.get("dialplan")
    exten = _text(dialplan.get("exten")) if isinstance(dialplan, Mapping) else ""
    caller = channel.get("caller")
    caller_id = _text(caller.get("number")) if isinstance(caller, Mapping) else ""
    return StasisCall(
        channel_id=channel_id,
        channel_name=name,
        number=(args[0] if args and args[0] else exten),
        campaign=(args[1] if len(args) > 1 and args[1] else None),
        caller_id=caller_id,
    )


def authorization_header(username: str, password: str) -> str:
    """HTTP basic credentials, by hand: ``aiohttp.BasicAuth`` is deprecated in aiohttp 3.14."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def base_url(url: str) -> URL:
    """``http://host:8088`` (with or without a trailing ``/`` or ``/ari``) -> ``http://host:8088/ari``."""
    parsed = URL(url.rstrip("/"))
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"asterisk.ari.url must be http(s)://HOST:PORT, got {url!r}")
    path = parsed.path.rstrip("/")
    if not path.endswith("/ari"):
        path += "/ari"
    return parsed.with_path(path).with_query(None).with_fragment(None)


def events_url(base: URL, app: str) -> URL:
    scheme = "wss" if base.scheme == "https" else "ws"
    return base.with_scheme(scheme).joinpath("events").with_query({"app": app, "subscribeAll": "false"})


# -- asyncio adapter --------------------------------------------------------------------------------


class _ChannelGone(Exception):
    """ARI answered 404 for the channel: it hung up meanwhile."""


class AriError(Exception):
    pass


class AriGate:
    """ARI client and Stasis gate. ``start()``, ``stop()``, ``ready()`` as the daemon expects."""

    def __init__(
        self,
        config: Config,
        guard: Guard,
        *,
        clock: Callable[[], datetime] | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
    ) -> None:
        ari = config.asterisk.ari
        self._base = base_url(ari.url)
        self._app = ari.app
        self._events_url = events_url(self._base, ari.app)
        self._auth = authorization_header(ari.username, str(ari.password))
        self._timeout = max(ari.timeout_ms, 1) / 1000
        self._reserve = min(_MAX_REPLY_RESERVE, max(_MIN_REPLY_RESERVE, self._timeout / 4))
        self._limiter = asyncio.Semaphore(max(1, ari.max_concurrent))
        self._guard = guard
        self._clock = clock or (lambda: datetime.now(UTC))
        self._full_numbers = config.log.numbers == "full"
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._session: aiohttp.ClientSession | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connected = False
        self.connections = 0  # successful WebSocket connections so far (tests, metrics)

    # -- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            headers={"Authorization": self._auth},
            timeout=aiohttp.ClientTimeout(total=self._timeout, connect=self._timeout),
            # Asterisk's HTTP server listens with a backlog of 10: keep the pool small and reused.
            connector=aiohttp.TCPConnector(limit=16),
        )
        self._runner = asyncio.create_task(self._run(), name="ari-events")

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        tasks = [t for t in (runner, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._connected = False
        if self._session is not None:
            await self._session.close()
            self._session = None

    def ready(self) -> bool:
        return self._connected

    @property
    def pending(self) -> int:
        return len(self._tasks)

    # -- the event link ---------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self._backoff_initial
        failures = 0
        while True:
            try:
                await self._listen()
                failures = 0
                delay = self._backoff_initial
                log.warning("ARI event stream closed by Asterisk: reconnecting")
            except asyncio.CancelledError:
                raise
            except aiohttp.WSServerHandshakeError as exc:
                failures += 1
                level = logging.ERROR if exc.status in (401, 403) else logging.WARNING
                if failures == 1 or exc.status in (401, 403):
                    log.log(level, "ARI refused the event stream: HTTP %s %s", exc.status, exc.message)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                failures += 1
                # First failure loud, the rest of an outage quiet: one line per outage, not per try.
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "ARI not reachable (%s): retrying with backoff",
                    type(exc).__name__ if not str(exc) else exc,
                )
            finally:
                self._connected = False
            # Full jitter, so that several daemons do not reconnect in step after an Asterisk restart.
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self._backoff_max)

    async def _listen(self) -> None:
        assert self._session is not None
        async with self._session.ws_connect(
            self._events_url,
            heartbeat=15.0,  # finds a dead link (Asterisk killed, network gone) within ~30 s
            timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
            max_msg_size=4 * 1024 * 1024,
        ) as ws:
            self._connected = True
            self.connections += 1
            log.info("ARI connected, Stasis application registered", extra={"fields": {"app": self._app}})
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self._on_text(msg.data)
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    raise aiohttp.ClientError(f"WebSocket error: {ws.exception()}")

    def _on_text(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            log.warning("ARI sent a message that is not JSON: ignored")
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "ApplicationReplaced":
            log.error(
                "another ARI client registered the application %r: pbxguard no longer sees its calls",
                self._app,
            )
            return
        if kind != "StasisStart":
            return
        call = parse_stasis_start(event, self._app)
        if call is None:
            channel = event.get("channel")
            name = channel.get("name") if isinstance(channel, dict) else None
            log.warning(
                "channel %s entered Stasis(%s) after the call was placed: not decided, left alone "
                "(check the call in the dialplan before dialling, see [pbxguard-outbound-ari])",
                name,
                self._app,
            )
            return
        task = asyncio.create_task(self._handle(call), name=f"ari-decide-{call.channel_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one channel ------------------------------------------------------------------------------

    async def _handle(self, call: StasisCall) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        answer_by = deadline - self._reserve
        attempt = CallAttempt(
            call.number, call.campaign or "", call.caller_id, gate="ari", call_key=call.channel_id
        )
        decision: Decision | None = None
        try:
            async with asyncio.timeout_at(answer_by), self._limiter:
                token = await self._get_variable(call.channel_id, "PBXGUARD_TOKEN")
                campaign = call.campaign
                if campaign is None:
                    campaign = (await self._get_variable(call.channel_id, "PBXGUARD_CAMPAIGN") or "").strip()
                attempt = CallAttempt(
                    call.number,
                    campaign,
                    call.caller_id,
                    gate="ari",
                    call_key=call.channel_id,
                    token=token or None,
                )
                decision = await self._guard.decide(attempt, self._clock())
        except _ChannelGone:
            log.info("channel %s hung up before it was decided", call.channel_name)
            return
        except TimeoutError:
            log.warning(
                "no decision within asterisk.ari.timeout_ms for %s: blocked (STORE_UNAVAILABLE)",
                self._mask(call.number),
            )
        except (aiohttp.ClientError, AriError, OSError) as exc:
            log.warning("ARI failed while reading channel %s (%s): blocking it", call.channel_name, exc)
        except Exception:
            log.exception("deciding channel %s failed: blocking it", call.channel_name)
        if decision is None:
            decision = unavailable_decision(attempt, self._clock(), shadow=self._guard.shadow)
        await self._answer(call, decision, deadline)

    async def _answer(self, call: StasisCall, decision: Decision, deadline: float) -> None:
        permitted = decision.permits_call
        try:
            async with asyncio.timeout_at(deadline):
                try:
                    for name, value in verdict_variables(decision):
                        await self._set_variable(call.channel_id, name, value)
                except (aiohttp.ClientError, AriError, OSError) as exc:
                    # Without its variables an allowed channel would be blocked by the dialplan
                    # anyway; hang it up here rather than leave it waiting in Stasis.
                    log.warning("could not set variables on %s (%s): hanging it up", call.channel_name, exc)
                    permitted = False
                if permitted:
                    await self._request("POST", f"channels/{call.channel_id}/continue")
                else:
                    await self._request(
                        "DELETE",
                        f"channels/{call.channel_id}",
                        {"reason_code": str(HANGUP_CAUSE_CALL_REJECTED)},
                    )
        except _ChannelGone:
            log.info("channel %s hung up before the answer", call.channel_name)
        except (TimeoutError, aiohttp.ClientError, AriError, OSError) as exc:
            log.warning(
                "could not %s channel %s: %s",
                "continue" if permitted else "hang up",
                call.channel_name,
                type(exc).__name__ if not str(exc) else exc,
            )
        else:
            log.debug(
                "ARI decision",
                extra={
                    "fields": {
                        "number": self._mask(call.number),
                        "verdict": decision.verdict.value,
                        "reasons": [r.value for r in decision.reasons],
                        "decision": decision.id,
                        "channel": call.channel_name,
                    }
                },
            )

    # -- REST -----------------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, params: Mapping[str, str] | None = None) -> Any:
        if self._session is None:
            raise AriError("gate stopped")
        url = self._base.joinpath(path, encoded=False)
        async with self._session.request(method, url, params=params) as response:
            if response.status == 404:
                body = await response.text()
                raise _ChannelGone(body[:200])
            if response.status >= 300:
                body = await response.text()
                raise AriError(f"{method} {path}: HTTP {response.status} {body[:200]}")
            if response.status == 204 or response.content_length == 0:
                return None
            return await response.json(content_type=None)

    async def _get_variable(self, channel_id: str, name: str) -> str | None:
        try:
            body = await self._request("GET", f"channels/{channel_id}/variable", {"variable": name})
        except _ChannelGone:
            # ARI answers 404 for "variable not found" as for "channel not found"; a gone channel
            # shows up at the next request.
            return None
        value = body.get("value") if isinstance(body, dict) else None
        return value if isinstance(value, str) else None

    async def _set_variable(self, channel_id: str, name: str, value: str) -> None:
        await self._request("POST", f"channels/{channel_id}/variable", {"variable": name, "value": value})

    def _mask(self, number: str | None) -> str | None:
        return mask_number(number, full=self._full_numbers)
