"""The ledger: PostgreSQL through asyncpg.

`Ledger.decide` is the one round trip of a decision (the `pbxguard.decide` function).  Decisions
that arrive while the database is busy with others are sent together, in one statement and one
transaction: one commit (one WAL flush) and one round trip for the lot, which is what lets a 2-core
machine keep up with many dialer channels at once; alone, a decision goes straight out.  Everything
else here is the bookkeeping that operators, CRMs and dialers feed: campaigns, caller-ID
authorisations, consents, contracts, refusals, oppositions, Bloctel cleanings, outcomes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Final

import asyncpg

from pbxguard.ledger.migrate import migrate
from pbxguard.ledger.pgcluster import LocalCluster
from pbxguard.policy.model import Campaign, Purpose, Sector


class StoreError(Exception):
    """The ledger could not be reached or refused the request; calls are blocked."""


class NotFoundError(StoreError):
    pass


def default_home() -> Path:
    env = os.environ.get("PBXGUARD_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        # /root is not traversable by the unprivileged account PostgreSQL runs as.
        return Path("/var/lib/pbxguard")
    return Path.home() / ".local" / "share" / "pbxguard"


def embedded_cluster(home: str | Path | None = None) -> LocalCluster:
    root = Path(home) if home else default_home()
    return LocalCluster(root / "postgresql", port=5432, durable=True)


DECIDE_SQL = """
SELECT * FROM pbxguard.decide($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                              $16, $17, $18, $19, $20, $21, $22, $23, $24, $25)
"""

# Several decisions in one statement (pbxguard.decide_batch, migration 0004), in the order given:
# one array per argument of decide, one element per decision.  The lists of a decision travel as
# comma-joined text (reason codes, territories and zones hold no comma): PostgreSQL's arrays cannot
# nest lists of different lengths.
DECIDE_BATCH_SQL = """
SELECT * FROM pbxguard.decide_batch($1::uuid[], $2::text[], $3::timestamptz[], $4::text[],
    $5::boolean[], $6::text[], $7::text[], $8::text[], $9::boolean[], $10::text[], $11::boolean[],
    $12::boolean[], $13::text[], $14::text[], $15::text[], $16::timestamptz[], $17::timestamptz[],
    $18::date[], $19::date[], $20::timestamptz[], $21::boolean[], $22::integer[], $23::text[],
    $24::text[], $25::uuid[])
"""
# Calls' outcomes, on the attempts and in the journal: one statement, so one round trip and one
# transaction where BEGIN, two UPDATEs and COMMIT took four.  It answers "UPDATE n" for the journal.
RECORD_OUTCOMES_SQL = """
WITH attempt AS (
    UPDATE pbxguard.attempts a SET outcome = u.outcome, outcome_at = u.at, duration_s = u.duration
      FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::integer[]) AS u(id, outcome, at, duration)
     WHERE a.decision_id = u.id AND a.decision_id = ANY($1) AND a.outcome IS NULL
)
UPDATE pbxguard.decisions d SET outcome = u.outcome, outcome_at = u.at, duration_s = u.duration
  FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::integer[]) AS u(id, outcome, at, duration)
 WHERE d.id = u.id AND d.id = ANY($1) AND d.outcome IS NULL
"""
# Decisions sent at once (batches or single ones); more queue behind them and go together.  On 2
# cores, 2 keeps one batch in the database while the next forms; more add contention, and smaller
# batches (measured with bench/ledger.py: 1 to 3 gave 4,247, 3,811 and 3,470 reservations/s at
# concurrency 32).  The daemon takes database.decide_concurrency.
DECIDE_CONCURRENCY = 2
DECIDE_BATCH_MAX = 64
# The decisions keep their connections between round trips rather than take one from the pool each
# time: asyncpg's acquire and release cost about 80 µs of the daemon's CPU, more than a SELECT 1
# (measured on this 2-core machine: 143 µs against 64 µs a round trip).  One unused for this long goes
# back to the pool, whose own idle timeout and reconnection then apply, as they would to any other.
HELD_IDLE_SECONDS = 60.0

# What says the database cannot be reached (as opposed to a statement it refused).
_UNREACHABLE: Final = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.ConnectionDoesNotExistError,
    # 57P01-57P03: PostgreSQL shutting down, crashed, or still recovering.
    asyncpg.exceptions.OperatorInterventionError,
)


@dataclass(frozen=True, slots=True)
class DecideRequest:
    decision_id: uuid.UUID
    call_key: str | None
    now: datetime
    consumer: str
    consumer_valid: bool
    campaign: str
    caller_id: str
    caller_kind: str
    auth_required: bool
    gate: str
    reserve: bool
    shadow: bool
    residence: str
    static_reasons: Sequence[str]
    hours_reasons: Sequence[str]
    window_start: datetime
    refusal_since: datetime
    bloctel_since: date
    today: date
    consent_since: datetime | None
    consent_regime: bool
    cap: int
    territories: Sequence[str]
    zones: Sequence[str]
    token: uuid.UUID | None

    def args(self) -> tuple[Any, ...]:
        return (
            self.decision_id, self.call_key, self.now, self.consumer, self.consumer_valid,
            self.campaign, self.caller_id, self.caller_kind, self.auth_required, self.gate,
            self.reserve, self.shadow, self.residence, list(self.static_reasons),
            list(self.hours_reasons), self.window_start, self.refusal_since, self.bloctel_since,
            self.today, self.consent_since, self.consent_regime, self.cap, list(self.territories),
            list(self.zones), self.token,
        )  # fmt: skip


_LIST_ARGS: Final = frozenset({"static_reasons", "hours_reasons", "territories", "zones"})


def batch_args(requests: Sequence[DecideRequest]) -> list[list[Any]]:
    """DECIDE_BATCH_SQL's 25 arrays, one element per request, in decide's argument order."""
    return [
        [",".join(getattr(r, name)) for r in requests]
        if name in _LIST_ARGS
        else [getattr(r, name) for r in requests]
        for name in DecideRequest.__dataclass_fields__
    ]


# A queued decision: its request, its caller's future, and the loop time its caller gives up at.
_Pending = tuple[DecideRequest, "asyncio.Future[asyncpg.Record]", float]


class Ledger:
    def __init__(self, pool: asyncpg.Pool, cluster: LocalCluster | None = None) -> None:
        self.pool = pool
        self.cluster = cluster
        self._releasing: set[asyncio.Task[None]] = set()  # connections handed back after a cancel
        # Decisions waiting for a free slot, and the batches under way.
        self._queue: collections.deque[_Pending] = collections.deque()
        self._batches: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        # Connections the decisions keep between round trips, with the loop time each was last used.
        self._held: list[tuple[asyncpg.Connection, float]] = []
        self._held_sweep: asyncio.TimerHandle | None = None
        self._closing = False
        self.decide_concurrency = DECIDE_CONCURRENCY
        self.decide_batch_max = DECIDE_BATCH_MAX
        # A batch that the database has not answered by then fails its decisions (they block).
        self.decide_timeout = 1.5

    # -- connection ---------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str = "",
        *,
        home: str | Path | None = None,
        min_size: int = 2,
        max_size: int = 20,
        run_migrations: bool = True,
    ) -> Ledger:
        cluster = None
        if not url:
            cluster = embedded_cluster(home)
            await asyncio.to_thread(cluster.start)
            url = cluster.dsn()
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                command_timeout=30,
                server_settings={"application_name": "pbxguard", "timezone": "UTC"},
                reset=_keep_session,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from None
        assert pool is not None
        ledger = cls(pool, cluster)
        if run_migrations:
            async with pool.acquire() as conn:
                await migrate(conn)
        return ledger

    async def close(self) -> None:
        self._closing = True  # a decision that ends from now on gives its connection back
        if self._held_sweep is not None:
            self._held_sweep.cancel()
            self._held_sweep = None
        for task in list(self._batches):
            task.cancel()
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        held, self._held = self._held, []
        for conn, _ in held:
            await self._release_quietly(conn)
        await self.pool.close()

    async def ping(self) -> bool:
        try:
            async with self.pool.acquire(timeout=1) as conn:
                return bool(await conn.fetchval("SELECT true", timeout=1))
        except Exception:
            # Whatever failed, the ledger is not usable now. An exception would end the readiness
            # watcher and freeze /readyz: asyncpg raises InternalClientError (neither an OSError nor an
            # InterfaceError) on a connection a crash caught mid-error (tests/faults/test_fault_pg_kill.py).
            return False

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            conn = await self.pool.acquire()
            try:
                yield conn
            except asyncio.CancelledError:
                # A statement cancelled half-way (a decision out of time). asyncpg sends the server a
                # cancel request and takes the connection back only once the server has answered it:
                # up to command_timeout (30 s) across a network partition. That wait must not be the
                # decision's, which is already late: the connection is handed back in the background
                # (tests/faults/test_fault_pg_proxy.py).
                self._release_later(conn)
                raise
            except BaseException:
                await self.pool.release(conn)
                raise
            await self.pool.release(conn)
        except _UNREACHABLE as exc:
            raise StoreError(f"ledger unavailable: {exc}") from None

    async def _decision_query(self, args: Sequence[Any], *, many: bool) -> Any:
        """DECIDE_BATCH_SQL's rows (many) or DECIDE_SQL's row, on a connection the decisions keep.

        Failures are handled as `_conn` handles them: the connection goes back to the pool, which
        resets or discards it, and the next decision takes a fresh one.
        """
        loop = asyncio.get_running_loop()
        conn: asyncpg.Connection | None = None
        while self._held:  # the idle ones are given back by _sweep_held
            held, _ = self._held.pop()
            if _usable(held):
                conn = held
                break
            self._release_later(held)
        try:
            if conn is None:
                conn = await self.pool.acquire()
            try:
                if many:
                    result = await conn.fetch(DECIDE_BATCH_SQL, *args)
                else:
                    result = await conn.fetchrow(DECIDE_SQL, *args)
            except asyncio.CancelledError:
                self._release_later(conn)  # see _conn
                raise
            except BaseException:
                await self.pool.release(conn)
                raise
            # Never the whole pool: the sealer, the API and the CRM writes need connections too.
            if not self._closing and len(self._held) < min(
                self.decide_concurrency, self.pool.get_max_size() - 1
            ):
                self._held.append((conn, loop.time()))
                if self._held_sweep is None:
                    self._held_sweep = loop.call_later(HELD_IDLE_SECONDS, self._sweep_held)
            else:
                await self.pool.release(conn)
        except _UNREACHABLE as exc:
            raise StoreError(f"ledger unavailable: {exc}") from None
        return result

    def _sweep_held(self) -> None:
        """Gives back the kept connections unused for HELD_IDLE_SECONDS, whether or not calls come.

        Kept, a connection escapes the pool's own idle timeout; overnight, with no call to decide,
        it would otherwise wait for the morning's first decision on a link nobody has tried since.
        The list is in the order the connections were last used, the oldest first.
        """
        self._held_sweep = None
        loop = asyncio.get_running_loop()
        stale_before = loop.time() - HELD_IDLE_SECONDS
        while self._held and self._held[0][1] <= stale_before:
            self._release_later(self._held.pop(0)[0])
        if self._held:
            self._held_sweep = loop.call_at(self._held[0][1] + HELD_IDLE_SECONDS, self._sweep_held)

    def _release_later(self, conn: asyncpg.Connection) -> None:
        task = asyncio.get_running_loop().create_task(self._release_quietly(conn))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release_quietly(self, conn: asyncpg.Connection) -> None:
        with contextlib.suppress(Exception):  # asyncpg closes a connection it cannot reset
            await self.pool.release(conn)

    # -- the decision ---------------------------------------------------------------------------

    async def decide(self, request: DecideRequest, patience: float | None = None) -> asyncpg.Record:
        """Decides one call; joins a batch when DECIDE_CONCURRENCY decisions are already under way.

        `patience`: seconds the caller waits (default `decide_timeout`).  A batch is cancelled in the
        database when its most impatient caller gives up, so that no decision commits after its
        caller was told the call is blocked (short of the cancel arriving just after the commit,
        which a retry with the same call key then finds).
        """
        if not self._queue and self._in_flight < self.decide_concurrency:
            # Nothing waits: straight out, on the caller's own task.
            self._in_flight += 1
            try:
                return await self._decide_one(request)
            finally:
                self._in_flight -= 1
                self._dispatch()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[asyncpg.Record] = loop.create_future()
        deadline = loop.time() + (self.decide_timeout if patience is None else patience)
        self._queue.append((request, future, deadline))
        self._dispatch()
        return await future

    async def _decide_one(self, request: DecideRequest) -> asyncpg.Record:
        row = await self._decision_query(request.args(), many=False)
        assert row is not None
        return row

    def _dispatch(self) -> None:
        """Starts batches from the queue while slots are free: each takes one decision per consumer."""
        while self._queue and self._in_flight < self.decide_concurrency:
            batch: list[_Pending] = []
            consumers: set[str] = set()
            later: list[_Pending] = []
            while self._queue and len(batch) < self.decide_batch_max:
                item = self._queue.popleft()
                if item[1].done():  # its caller gave up
                    continue
                if item[0].consumer in consumers:
                    later.append(item)
                else:
                    consumers.add(item[0].consumer)
                    batch.append(item)
            self._queue.extendleft(reversed(later))
            if not batch:
                return
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            async with asyncio.timeout_at(min(item[2] for item in batch)):
                if len(batch) == 1:
                    results: list[asyncpg.Record | BaseException] = [await self._decide_one(batch[0][0])]
                else:
                    results = await self.decide_batch([item[0] for item in batch])
        except asyncio.CancelledError:
            for _, future, _ in batch:
                future.cancel()
            raise
        except Exception as exc:
            results = [exc] * len(batch)
        finally:
            self._in_flight -= 1
            self._dispatch()
        for (_, future, _), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def decide_batch(self, requests: Sequence[DecideRequest]) -> list[asyncpg.Record | BaseException]:
        """Decides calls of distinct consumers in one transaction: per request, its row or its error.

        The consumers go to the database in sorted order, so that two batches always take their
        locks in the same order and never wait on each other.
        """
        if len({request.consumer for request in requests}) != len(requests):
            raise ValueError("a batch holds at most one decision per consumer")
        order = sorted(range(len(requests)), key=lambda index: requests[index].consumer)
        results: list[asyncpg.Record | BaseException] = [StoreError("not decided")] * len(requests)
        for index, result in zip(order, await self._decide_sorted([requests[i] for i in order]), strict=True):
            results[index] = result
        return results

    async def _decide_sorted(self, requests: list[DecideRequest]) -> list[asyncpg.Record | BaseException]:
        try:
            rows = await self._decision_query(batch_args(requests), many=True)
        except asyncpg.PostgresError:
            # One decision's error (or a deadlock) must not fail the others: each goes alone, and
            # only those that fail again report it.
            results: list[asyncpg.Record | BaseException] = []
            for request in requests:
                try:
                    results.append(await self._decide_one(request))
                except Exception as exc:
                    results.append(exc)
            return results
        if len(rows) != len(requests):
            raise StoreError(f"a batch of {len(requests)} decisions returned {len(rows)} rows")
        results = list(rows)
        for index, row in enumerate(rows):
            if row["status"] == "single":
                # A rarer path (replay, token, unknown campaign, residence changed): decide() alone.
                try:
                    results[index] = await self._decide_one(requests[index])
                except Exception as exc:
                    results[index] = exc
        return results

    async def set_next_allowed(self, items: Sequence[tuple[str, uuid.UUID, datetime]]) -> None:
        """Completes journal rows with the next legal instant the daemon computed after the fact."""
        if not items:
            return
        async with self._conn() as conn:
            await conn.execute(
                """
                UPDATE pbxguard.decisions d SET next_allowed_at = u.at
                  FROM unnest($1::text[], $2::uuid[], $3::timestamptz[]) AS u(consumer, id, at)
                 WHERE d.consumer = u.consumer AND d.id = u.id AND d.next_allowed_at IS NULL
                """,
                [i[0] for i in items],
                [i[1] for i in items],
                [i[2] for i in items],
            )

    # -- bookkeeping ----------------------------------------------------------------------------

    async def add_campaign(self, campaign: Campaign) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                """
                INSERT INTO pbxguard.order_givers (name, siren) VALUES ($1, $2)
                ON CONFLICT (name) DO UPDATE SET siren = coalesce(EXCLUDED.siren, pbxguard.order_givers.siren)
                """,
                campaign.order_giver,
                campaign.order_giver_siren,
            )
            await conn.execute(
                """
                INSERT INTO pbxguard.campaigns (id, order_giver, purpose, sector, automated, prerecorded, script_id)
                VALUES ($1, $2, $3, $4, $5, $6, $7)
                ON CONFLICT (id) DO UPDATE SET order_giver = EXCLUDED.order_giver,
                    purpose = EXCLUDED.purpose, sector = EXCLUDED.sector,
                    automated = EXCLUDED.automated, prerecorded = EXCLUDED.prerecorded,
                    script_id = EXCLUDED.script_id, updated_at = now()
                """,
                campaign.id,
                campaign.order_giver,
                campaign.purpose.value,
                campaign.sector.value,
                campaign.automated,
                campaign.prerecorded,
                campaign.script_id,
            )

    async def campaigns(self) -> list[Campaign]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                """
                SELECT c.*, o.siren FROM pbxguard.campaigns c
                JOIN pbxguard.order_givers o ON o.name = c.order_giver ORDER BY c.id
                """
            )
        return [campaign_from_row(row) for row in rows]

    async def campaign(self, campaign_id: str) -> Campaign | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                """
                SELECT c.*, o.siren FROM pbxguard.campaigns c
                JOIN pbxguard.order_givers o ON o.name = c.order_giver WHERE c.id = $1
                """,
                campaign_id,
            )
        return campaign_from_row(row) if row else None

    async def _require_order_giver(self, conn: asyncpg.Connection, name: str) -> None:
        if not await conn.fetchval("SELECT true FROM pbxguard.order_givers WHERE name = $1", name):
            raise NotFoundError(f"unknown order giver {name!r}: add a campaign for it first")

    async def authorize_caller_id(
        self, caller_id: str, order_giver: str, valid_from: date, valid_until: date | None, proof: str | None
    ) -> int:
        async with self._conn() as conn:
            await self._require_order_giver(conn, order_giver)
            value = await conn.fetchval(
                """
                INSERT INTO pbxguard.caller_id_authorizations (caller_id, order_giver, valid_from, valid_until, proof)
                VALUES ($1, $2, $3, $4, $5) RETURNING id
                """,
                caller_id,
                order_giver,
                valid_from,
                valid_until,
                proof,
            )
        return int(value)

    async def add_consent(
        self,
        consumer: str,
        order_giver: str,
        given_at: datetime,
        *,
        source: str | None = None,
        proof: str | None = None,
        wording: str | None = None,
        off_hours: bool = False,
    ) -> int:
        async with self._conn() as conn:
            await self._require_order_giver(conn, order_giver)
            value = await conn.fetchval(
                """
                INSERT INTO pbxguard.consents (consumer, order_giver, given_at, source, proof, wording, off_hours)
                VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id
                """,
                consumer,
                order_giver,
                given_at,
                source,
                proof,
                wording,
                off_hours,
            )
        return int(value)

    async def revoke_consent(self, consumer: str, order_giver: str, at: datetime) -> int:
        async with self._conn() as conn:
            result = await conn.execute(
                """
                UPDATE pbxguard.consents SET revoked_at = $3
                 WHERE consumer = $1 AND order_giver = $2 AND (revoked_at IS NULL OR revoked_at > $3)
                """,
                consumer,
                order_giver,
                at,
            )
        return int(result.split()[-1])

    async def add_contract(self, consumer: str, order_giver: str, until: date, reference: str | None) -> int:
        async with self._conn() as conn:
            await self._require_order_giver(conn, order_giver)
            value = await conn.fetchval(
                """
                INSERT INTO pbxguard.contracts (consumer, order_giver, until, reference)
                VALUES ($1, $2, $3, $4) RETURNING id
                """,
                consumer,
                order_giver,
                until,
                reference,
            )
        return int(value)

    async def add_refusal(self, consumer: str, order_giver: str, at: datetime, source: str | None) -> int:
        async with self._conn() as conn:
            await self._require_order_giver(conn, order_giver)
            value = await conn.fetchval(
                """
                INSERT INTO pbxguard.refusals (consumer, order_giver, refused_at, source)
                VALUES ($1, $2, $3, $4) RETURNING id
                """,
                consumer,
                order_giver,
                at,
                source,
            )
        return int(value)

    async def add_opposition(
        self, consumer: str, order_giver: str | None, at: datetime, source: str | None
    ) -> int:
        async with self._conn() as conn:
            if order_giver is not None:
                await self._require_order_giver(conn, order_giver)
            value = await conn.fetchval(
                """
                INSERT INTO pbxguard.oppositions (consumer, order_giver, opposed_at, source)
                VALUES ($1, $2, $3, $4) RETURNING id
                """,
                consumer,
                order_giver,
                at,
                source,
            )
        return int(value)

    async def set_residence(self, consumer: str, territory: str | None, departement: str | None) -> None:
        async with self._conn() as conn:
            if territory is None and departement is None:
                await conn.execute("DELETE FROM pbxguard.consumers WHERE consumer = $1", consumer)
                return
            await conn.execute(
                """
                INSERT INTO pbxguard.consumers (consumer, territory, departement) VALUES ($1, $2, $3)
                ON CONFLICT (consumer) DO UPDATE SET territory = EXCLUDED.territory,
                    departement = EXCLUDED.departement, updated_at = now()
                """,
                consumer,
                territory,
                departement,
            )

    async def import_bloctel(
        self, numbers: Sequence[str], order_giver: str, cleaned_on: date, status: str, filename: str | None
    ) -> int:
        """One transaction: the file is imported whole or not at all.  COPY into a staging table."""
        async with self._conn() as conn, conn.transaction():
            await self._require_order_giver(conn, order_giver)
            cleaning_id = await conn.fetchval(
                """
                INSERT INTO pbxguard.bloctel_cleanings (order_giver, cleaned_on, status, filename, row_count)
                VALUES ($1, $2, $3, $4, $5) RETURNING id
                """,
                order_giver,
                cleaned_on,
                status,
                filename,
                len(numbers),
            )
            await conn.execute("CREATE TEMP TABLE bloctel_import (consumer text) ON COMMIT DROP")
            await conn.copy_records_to_table("bloctel_import", records=[(n,) for n in numbers])
            await conn.execute(
                """
                INSERT INTO pbxguard.bloctel_status (consumer, order_giver, status, cleaned_on, cleaning_id)
                SELECT DISTINCT consumer, $1::text, $2::text, $3::date, $4::bigint FROM bloctel_import
                ON CONFLICT (consumer, order_giver) DO UPDATE
                   SET status = EXCLUDED.status, cleaned_on = EXCLUDED.cleaned_on,
                       cleaning_id = EXCLUDED.cleaning_id
                 WHERE pbxguard.bloctel_status.cleaned_on <= EXCLUDED.cleaned_on
                """,
                order_giver,
                status,
                cleaned_on,
                cleaning_id,
            )
        return int(cleaning_id)

    async def record_outcome(
        self, decision_id: uuid.UUID, outcome: str, at: datetime, duration_s: int | None
    ) -> bool:
        return await self.record_outcomes([(decision_id, outcome, at, duration_s)]) == 1

    async def record_outcomes(
        self, items: Sequence[tuple[uuid.UUID, str, datetime, int | None]]
    ) -> int:
        """Calls' outcomes, in one transaction; a decision's first outcome stays.  Returns how many
        journal rows took theirs.  (`= ANY($1)` gives the planner the index condition: joined with
        unnest alone, a generic plan may scan the whole journal.)"""
        first: dict[uuid.UUID, tuple[uuid.UUID, str, datetime, int | None]] = {}
        for item in items:
            first.setdefault(item[0], item)
        if not first:
            return 0
        columns = (
            [i[0] for i in first.values()],
            [i[1] for i in first.values()],
            [i[2] for i in first.values()],
            [i[3] for i in first.values()],
        )
        async with self._conn() as conn:
            result = await conn.execute(RECORD_OUTCOMES_SQL, *columns)
        return int(str(result).rsplit(" ", 1)[-1])

    async def attempts_count(self, consumer: str, order_giver: str) -> int:
        async with self._conn() as conn:
            value = await conn.fetchval(
                "SELECT count(*) FROM pbxguard.attempts WHERE consumer = $1 AND order_giver = $2",
                consumer,
                order_giver,
            )
        return int(value)

    async def decision(self, decision_id: uuid.UUID) -> asyncpg.Record | None:
        async with self._conn() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(
                "SELECT * FROM pbxguard.decisions WHERE id = $1", decision_id
            )
        return row

    # -- bulk consents, the journal read side (API, dashboard, stats) ------------------------------

    async def import_consents(
        self,
        order_giver: str,
        batches: Iterable[Sequence[tuple[str, datetime, str | None, str | None, bool]]],
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """COPY consents (consumer, given_at, source, proof, off_hours) in one transaction.

        `batches` is read lazily: the file is validated while it streams, and an exception raised
        by it (a bad line) rolls everything back, so a file is imported whole or not at all.
        """
        total = 0
        async with self._conn() as conn, conn.transaction():
            await self._require_order_giver(conn, order_giver)
            for batch in batches:
                await conn.copy_records_to_table(
                    "consents",
                    schema_name="pbxguard",
                    columns=["consumer", "order_giver", "given_at", "source", "proof", "off_hours"],
                    records=[(r[0], order_giver, r[1], r[2], r[3], r[4]) for r in batch],
                )
                total += len(batch)
                if on_batch is not None:
                    on_batch(total)
        return total

    async def consents_count(self, order_giver: str | None = None) -> int:
        async with self._conn() as conn:
            value = await conn.fetchval(
                "SELECT count(*) FROM pbxguard.consents WHERE $1::text IS NULL OR order_giver = $1",
                order_giver,
            )
        return int(value)

    async def list_decisions(
        self,
        where: DecisionFilter,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[asyncpg.Record]:
        """Journal rows, newest first, keyset-paginated on (decided_at, id)."""
        args: list[Any] = []
        clauses = where.clauses(args)
        if after is not None:
            args.extend(after)
            clauses.append(f"(decided_at, id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        sql = (
            "SELECT * FROM pbxguard.decisions WHERE "
            + " AND ".join(clauses)
            + f" ORDER BY decided_at DESC, id DESC LIMIT ${len(args)}"
        )
        async with self._conn() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows

    async def decision_counts(self, where: DecisionFilter, zone: str) -> list[asyncpg.Record]:
        """(day, campaign, order_giver, verdict, shadow, n): days are calendar days in `zone`."""
        args: list[Any] = [zone]
        clauses = where.clauses(args)
        sql = (
            "SELECT (decided_at AT TIME ZONE $1)::date AS day, campaign, order_giver, verdict, shadow,"
            " count(*) AS n FROM pbxguard.decisions WHERE "
            + " AND ".join(clauses)
            + " GROUP BY 1, 2, 3, 4, 5"
        )
        async with self._conn() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows

    async def reason_counts(self, where: DecisionFilter, zone: str) -> list[asyncpg.Record]:
        """(day, reason, n) over blocked decisions: a decision with two reasons counts under both."""
        args: list[Any] = [zone]
        clauses = [*where.clauses(args), "verdict = 'block'"]
        sql = (
            "SELECT (decided_at AT TIME ZONE $1)::date AS day, r.reason, count(*) AS n"
            " FROM pbxguard.decisions CROSS JOIN LATERAL unnest(reasons) AS r(reason) WHERE "
            + " AND ".join(clauses)
            + " GROUP BY 1, 2"
        )
        async with self._conn() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows

    async def order_givers(self) -> list[str]:
        async with self._conn() as conn:
            rows = await conn.fetch("SELECT name FROM pbxguard.order_givers ORDER BY name")
        return [str(row["name"]) for row in rows]

    async def journal_unsealed(self) -> int | None:
        """Journal rows not yet sealed into the hash chain (`seq IS NULL`); None before that column exists."""
        async with self._conn() as conn:
            has_seq = await conn.fetchval(
                """
                SELECT true FROM information_schema.columns
                 WHERE table_schema = 'pbxguard' AND table_name = 'decisions' AND column_name = $1
                """,
                "seq",
            )
            if not has_seq:
                return None
            value = await conn.fetchval(
                "SELECT count(*) FROM pbxguard.decisions WHERE seq IS NULL", timeout=5
            )
        return int(value)


@dataclass(frozen=True, slots=True)
class DecisionFilter:
    """Filters on the journal; every value becomes a query parameter, never SQL text."""

    start: datetime | None = None  # decided_at >= start
    end: datetime | None = None  # decided_at < end
    campaign: str | None = None
    order_giver: str | None = None
    consumer: str | None = None
    verdict: str | None = None
    reason: str | None = None

    def clauses(self, args: list[Any]) -> list[str]:
        clauses = ["true"]
        for column, op, value in (
            ("decided_at", ">=", self.start),
            ("decided_at", "<", self.end),
            ("campaign", "=", self.campaign),
            ("order_giver", "=", self.order_giver),
            ("consumer", "=", self.consumer),
            ("verdict", "=", self.verdict),
        ):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} {op} ${len(args)}")
        if self.reason is not None:
            args.append(self.reason)
            clauses.append(f"${len(args)} = ANY (reasons)")
        return clauses


def _usable(conn: asyncpg.Connection) -> bool:
    """False once asyncpg has seen the connection closed (by the server, say): it then detaches it
    from the pool's proxy, whose methods raise InterfaceError from that moment."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skips asyncpg's reset query on release: one round trip less per decision.

    pbxguard's sessions never change state that outlives a transaction: no SET, no LISTEN, no
    cursor kept open, advisory locks only at transaction level (the migration lock is released in a
    finally).  An open transaction is still rolled back by the pool before this is called.
    """


def campaign_from_row(row: asyncpg.Record) -> Campaign:
    return Campaign(
        id=row["id"],
        order_giver=row["order_giver"],
        purpose=Purpose(row["purpose"]),
        sector=Sector(row["sector"]),
        automated=row["automated"],
        prerecorded=row["prerecorded"],
        order_giver_siren=row["siren"],
        script_id=row["script_id"],
    )
