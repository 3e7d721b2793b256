"""The monitor: what happened to the calls the AMI gate let through, and refusals reported over AMI.

It reads pbxguard's own upstream AMI connection (the AMI gate hands it every message) and

* follows each allowed Originate by the proxy ActionID it was forwarded with (``OriginateResponse``
  carries it) and by ``PBXGUARD_TOKEN`` (every channel that receives the variable, including the
  channels it is inherited by, announces it with ``VarSet``), then records the outcome (answered,
  busy, no_answer, failed) and the talk time on the attempt with ``Ledger.record_outcome``;
* turns ``UserEvent: PbxguardRefusal`` into ``Guard.record_feedback`` (a refusal starts the 60-day
  quiet period, an opposition stops calls for good).

How an agent desktop, an IVR or a dialer reports a refusal (through pbxguard's AMI gate or straight
to Asterisk, with any AMI account allowed to send ``UserEvent``)::

    Action: UserEvent
    UserEvent: PbxguardRefusal
    Number: 0612345678
    Campaign: c1               (or OrderGiver: ACME)
    Kind: refusal              (or opposition; refusal when absent)

and from the dialplan: ``UserEvent(PbxguardRefusal,Number: ${NUMBER},Campaign: c1,Kind: refusal)``.

:class:`CallTracker` is the pure part (messages and timestamps in, outcomes out);
:class:`Monitor` runs it and writes to the ledger from a queue, so that a slow or absent database
never stalls the AMI reader (Asterisk drops a manager session that does not read in time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from pbxguard.guard import Guard
from pbxguard.logs import mask_number
from pbxguard.protocols.ami import Message

__all__ = ["CallTracker", "Feedback", "Monitor", "Outcome", "outcome_for"]

log = logging.getLogger("pbxguard.monitor")

ANSWERED: Final = "answered"
BUSY: Final = "busy"
NO_ANSWER: Final = "no_answer"
FAILED: Final = "failed"

# Q.850 causes (Hangup "Cause") that tell why an unanswered call ended.
_BUSY_CAUSES: Final = frozenset({17})  # user busy
_NO_ANSWER_CAUSES: Final = frozenset({16, 18, 19})  # cleared before answer, no user responding, no answer
# Outcomes written in one transaction at most.
_OUTCOME_BATCH: Final = 500
# The only events the monitor reads; the rest of Asterisk's stream is skipped at once.
_FOLLOWED_EVENTS: Final = frozenset({"originateresponse", "varset", "newstate", "hangup", "userevent"})
# OriginateResponse "Reason" (the AST_CONTROL_* frame that ended the attempt).
_BUSY_REASONS: Final = frozenset({5})  # AST_CONTROL_BUSY
_NO_ANSWER_REASONS: Final = frozenset({1, 3})  # hung up while ringing, rang until the timeout


@dataclass(frozen=True, slots=True)
class Outcome:
    decision_id: str
    outcome: str
    at: datetime
    duration_s: int | None


@dataclass(frozen=True, slots=True)
class Feedback:
    number: str
    kind: str  # refusal | opposition
    campaign: str | None
    order_giver: str | None
    at: datetime
    source: str


def outcome_for(answered: bool, causes: list[tuple[bool, int]], reason: int | None) -> str:
    """The outcome of a call from what the events said. ``causes`` are (leg is a Local channel, cause);
    the cause of a real (non-Local) leg says more than that of the Local legs around it."""
    if answered:
        return ANSWERED
    ordered = [c for local, c in causes if not local and c] + [c for local, c in causes if local and c]
    if ordered:
        cause = ordered[0]
        if cause in _BUSY_CAUSES:
            return BUSY
        if cause in _NO_ANSWER_CAUSES:
            return NO_ANSWER
        return FAILED
    if reason in _BUSY_REASONS:
        return BUSY
    if reason in _NO_ANSWER_REASONS:
        return NO_ANSWER
    return FAILED


def _int(value: str | None) -> int | None:
    try:
        return int((value or "").strip())
    except ValueError:
        return None


def _var_name(name: str) -> str:
    return name.lstrip("_").upper()


@dataclass(slots=True)
class _Call:
    decision_id: str
    deadline: float  # monotonic; the call is forgotten after it
    action_id: str | None = None  # upstream ActionID while its OriginateResponse is awaited
    originate_done: bool = False  # OriginateResponse seen (or never coming)
    live: set[str] = field(default_factory=set)  # uniqueids carrying the token, not hung up yet
    answered_at: datetime | None = None
    causes: list[tuple[bool, int]] = field(default_factory=list)
    reason: int | None = None
    last_hangup: datetime | None = None


class CallTracker:
    """Follows allowed calls through the AMI event stream. Pure: no I/O, time is passed in."""

    def __init__(self, *, max_calls: int = 100_000, ttl: float = 6 * 3600.0) -> None:
        self._max_calls = max_calls
        self._ttl = ttl
        self._calls: OrderedDict[str, _Call] = OrderedDict()  # decision id -> call, oldest first
        self._by_action: dict[str, str] = {}  # upstream ActionID of the Originate -> decision id
        self._by_channel: dict[str, str] = {}  # uniqueid -> decision id

    def __len__(self) -> int:
        return len(self._calls)

    def expect(self, action_id: str, decision_id: str, mono: float) -> None:
        """An allowed Originate was forwarded upstream with this ActionID."""
        while len(self._calls) >= self._max_calls:
            _, oldest = self._calls.popitem(last=False)
            self._drop(oldest)
        self._calls[decision_id] = _Call(decision_id, mono + self._ttl, action_id)
        self._by_action[action_id] = decision_id

    def expects(self, action_id: str | None) -> bool:
        return action_id is not None and action_id in self._by_action

    def cancel(self, action_id: str) -> None:
        decision_id = self._by_action.pop(action_id, None)
        if decision_id is not None:
            call = self._calls.pop(decision_id, None)
            if call is not None:
                self._drop(call)

    def rejected(self, action_id: str, at: datetime) -> Outcome | None:
        """Asterisk answered the Originate with an error: nothing was dialled, the attempt stays."""
        decision_id = self._by_action.pop(action_id, None)
        call = self._calls.pop(decision_id, None) if decision_id else None
        if call is None:
            return None
        self._drop(call)
        return Outcome(call.decision_id, FAILED, at, None)

    def link_lost(self) -> None:
        """Events sent while the link was down are gone: no OriginateResponse will come for the
        Originates in flight. Calls with live channels are still followed (their Hangup may come
        on the next connection if Asterisk kept running); the others are forgotten (outcome
        unknown, left empty in the ledger)."""
        self._by_action.clear()
        for decision_id in list(self._calls):
            call = self._calls[decision_id]
            call.originate_done = True
            if not call.live:
                del self._calls[decision_id]

    def expire(self, mono: float) -> int:
        expired = [c for c in self._calls.values() if c.deadline <= mono]
        for call in expired:
            del self._calls[call.decision_id]
            self._drop(call)
        return len(expired)

    def _drop(self, call: _Call) -> None:
        for uniqueid in call.live:
            self._by_channel.pop(uniqueid, None)
        if call.action_id is not None and self._by_action.get(call.action_id) == call.decision_id:
            del self._by_action[call.action_id]

    def _finish(self, call: _Call, at: datetime) -> Outcome:
        self._calls.pop(call.decision_id, None)
        self._drop(call)
        answered = call.answered_at is not None
        duration: int | None = None
        if call.answered_at is not None:
            end = call.last_hangup or at
            duration = max(0, round((end - call.answered_at).total_seconds()))
        return Outcome(call.decision_id, outcome_for(answered, call.causes, call.reason), at, duration)

    def observe(self, message: Message, at: datetime) -> Outcome | Feedback | None:
        kind, name = message.server_kind
        if kind == "response":
            action_id = message.action_id
            if action_id in self._by_action and (message.get("Response") or "").strip().lower() == "error":
                return self.rejected(action_id, at)
            return None
        if kind != "event":
            return None
        event = name.lower()
        if event == "originateresponse":
            return self._originate_response(message, at)
        if event == "varset":
            self._varset(message)
            return None
        if event == "newstate":
            call = self._call_of(message)
            if (
                call is not None
                and call.answered_at is None
                and (message.get("ChannelState") or "").strip() == "6"
            ):
                call.answered_at = at
            return None
        if event == "hangup":
            return self._hangup(message, at)
        if event == "userevent":
            return feedback_from(message, at)
        return None

    def _call_of(self, message: Message) -> _Call | None:
        decision_id = self._by_channel.get((message.get("Uniqueid") or "").strip())
        return self._calls.get(decision_id) if decision_id else None

    def _originate_response(self, message: Message, at: datetime) -> Outcome | None:
        action_id = message.action_id
        decision_id = self._by_action.pop(action_id, None) if action_id else None
        call = self._calls.get(decision_id) if decision_id else None
        if call is None:
            return None
        call.originate_done = True
        call.action_id = None
        uniqueid = (message.get("Uniqueid") or "").strip()
        success = (message.get("Response") or "").strip().lower() == "success"
        if success:
            # Asterisk answers an Originate once the called leg is up: that is the answer time.
            if call.answered_at is None:
                call.answered_at = at
            if uniqueid and uniqueid != "<unknown>" and uniqueid not in self._by_channel:
                call.live.add(uniqueid)
                self._by_channel[uniqueid] = call.decision_id
        else:
            call.reason = _int(message.get("Reason"))
        if not call.live:
            return self._finish(call, at)
        return None

    def _varset(self, message: Message) -> None:
        if _var_name(message.get("Variable") or "") != "PBXGUARD_TOKEN":
            return
        call = self._calls.get((message.get("Value") or "").strip())
        uniqueid = (message.get("Uniqueid") or "").strip()
        if call is None or not uniqueid or uniqueid in self._by_channel:
            return
        call.live.add(uniqueid)
        self._by_channel[uniqueid] = call.decision_id

    def _hangup(self, message: Message, at: datetime) -> Outcome | None:
        uniqueid = (message.get("Uniqueid") or "").strip()
        decision_id = self._by_channel.pop(uniqueid, None)
        call = self._calls.get(decision_id) if decision_id else None
        if call is None:
            return None
        call.live.discard(uniqueid)
        channel = (message.get("Channel") or "").strip()
        cause = _int(message.get("Cause"))
        if cause is not None:
            call.causes.append((channel.lower().startswith("local/"), cause))
        call.last_hangup = at
        if not call.live and call.originate_done:
            return self._finish(call, at)
        return None


def feedback_from(message: Message, at: datetime) -> Feedback | None:
    """``UserEvent: PbxguardRefusal`` -> Feedback; anything else (or an unusable one) -> None."""
    if (message.get("UserEvent") or "").strip().lower() != "pbxguardrefusal":
        return None
    number = (message.get("Number") or "").strip()
    kind = (message.get("Kind") or "refusal").strip().lower() or "refusal"
    campaign = (message.get("Campaign") or "").strip() or None
    order_giver = (message.get("OrderGiver") or "").strip() or None
    if not number or kind not in ("refusal", "opposition"):
        log.warning(
            "ignoring PbxguardRefusal without a number or with an unknown Kind",
            extra={"fields": {"number": mask_number(number), "kind": kind[:20]}},
        )
        return None
    return Feedback(number, kind, campaign, order_giver, at, "ami:UserEvent")


# -- the running monitor ---------------------------------------------------------------------------


class Monitor:
    """Runs a :class:`CallTracker` on the upstream messages and writes what it learns to the ledger.

    Writes go through a bounded queue served by one task; a write that fails (database away) is
    retried with backoff, then logged at ERROR with what was lost.
    """

    def __init__(
        self,
        guard: Guard,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_queue: int = 10_000,
        retries: int = 5,
        retry_delay: float = 0.2,
    ) -> None:
        self.guard = guard
        self.tracker = CallTracker()
        self._clock = clock
        self._queue: asyncio.Queue[Outcome | Feedback] = asyncio.Queue(max_queue)
        self._retries = retries
        self._retry_delay = retry_delay
        self._task: asyncio.Task[None] | None = None
        self.recorded = 0  # outcomes and feedback written (for tests and metrics)
        self.lost = 0

    def _now(self) -> datetime:
        return self._clock()

    def _mono(self) -> float:
        return asyncio.get_running_loop().time()

    # -- fed by the AMI gate (synchronous: never blocks the reader) ----------------------------

    def expect(self, action_id: str, decision_id: str) -> None:
        self.tracker.expect(action_id, decision_id, self._mono())

    def cancel(self, action_id: str) -> None:
        self.tracker.cancel(action_id)

    def not_sent(self, decision_id: str) -> None:
        """An allowed Originate that could not be forwarded: the attempt was counted, no call made."""
        self._put(Outcome(decision_id, FAILED, self._now(), None))

    def link_lost(self) -> None:
        self.tracker.link_lost()

    def observe(self, message: Message) -> None:
        kind, name = message.server_kind
        if kind == "event":
            if name.lower() not in _FOLLOWED_EVENTS:
                return
        elif kind != "response" or not self.tracker.expects(message.action_id):
            return
        at = _event_time(message) or self._now()
        self._put(self.tracker.observe(message, at))

    def _put(self, item: Outcome | Feedback | None) -> None:
        if item is None:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.lost += 1
            log.error("monitor queue full, dropping %s", _describe(item))

    # -- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ami-monitor")

    async def stop(self, grace: float = 2.0) -> None:
        """Writes what is queued (within ``grace`` seconds), then stops."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), grace)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def idle(self) -> None:
        """Returns once everything observed so far has been written (or given up on)."""
        await self._queue.join()

    async def _run(self) -> None:
        next_expiry = self._mono() + 60
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_expiry - self._mono())):
                    item = await self._queue.get()
            except TimeoutError:
                item = None
            if item is not None:
                # Outcomes queued meanwhile go with it, in one transaction: a busy dialer ends
                # hundreds of calls a second.  Feedback (refusals) is written one by one.
                outcomes: list[Outcome] = []
                items = [item]
                while len(items) < _OUTCOME_BATCH and not self._queue.empty():
                    items.append(self._queue.get_nowait())
                try:
                    for queued in items:
                        if isinstance(queued, Outcome):
                            outcomes.append(queued)
                        else:
                            await self._write(queued)
                    if outcomes:
                        await self._write(outcomes)
                finally:
                    for _ in items:
                        self._queue.task_done()
            if self._mono() >= next_expiry:
                forgotten = self.tracker.expire(self._mono())
                if forgotten:
                    log.info("forgot %d calls whose end was never seen", forgotten)
                next_expiry = self._mono() + 60

    async def _write(self, item: list[Outcome] | Feedback) -> None:
        delay = self._retry_delay
        for attempt in range(self._retries + 1):
            try:
                if isinstance(item, list):
                    await self._record_outcomes(item)
                    self.recorded += len(item)
                else:
                    await self._record_feedback(item)
                    self.recorded += 1
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if attempt == self._retries:
                    lost = item if isinstance(item, list) else [item]
                    self.lost += len(lost)
                    for one in lost:
                        log.error("could not record %s: %s", _describe(one), exc)
                    return
                log.warning("ledger write failed (%s), retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _record_outcomes(self, items: list[Outcome]) -> None:
        ledger = self.guard.ledger
        if ledger is None:
            raise ConnectionError("no ledger")
        async with asyncio.timeout(max(self.guard.timeout, 1.0) * 2):
            await ledger.record_outcomes(
                [(uuid.UUID(i.decision_id), i.outcome, i.at, i.duration_s) for i in items]
            )
        for item in items:
            log.info(
                "call outcome",
                extra={
                    "fields": {
                        "decision": item.decision_id,
                        "outcome": item.outcome,
                        "duration_s": item.duration_s,
                    }
                },
            )

    async def _record_feedback(self, item: Feedback) -> None:
        if self.guard.ledger is None:
            raise ConnectionError("no ledger")
        recorded = await asyncio.wait_for(
            self.guard.record_feedback(
                item.number,
                kind=item.kind,
                now=item.at,
                campaign_id=item.campaign,
                order_giver=item.order_giver,
                source=item.source,
            ),
            max(self.guard.timeout, 1.0) * 2,
        )
        fields = {"number": mask_number(item.number), "kind": item.kind, "campaign": item.campaign}
        if recorded:
            log.info("feedback recorded", extra={"fields": fields})
        else:
            log.warning(
                "feedback not recorded: unknown number, campaign or order giver", extra={"fields": fields}
            )


def _event_time(message: Message) -> datetime | None:
    # Present when manager.conf has timestampevents = yes: the time Asterisk saw it, not we.
    value = message.get("Timestamp")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not 0 < seconds < 1e11:
        return None
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)


def _describe(item: Outcome | Feedback) -> str:
    if isinstance(item, Outcome):
        return f"outcome {item.outcome} of decision {item.decision_id}"
    return f"{item.kind} for {mask_number(item.number)} (campaign {item.campaign}, order giver {item.order_giver})"
