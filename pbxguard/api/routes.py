"""Every HTTP route, in one table: `build_app` registers it and `openapi.document` describes it.

A route declares its path, query and JSON body fields (pbxguard.api.fields); the generic endpoint
authenticates, validates them and hands the parsed values to the handler.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
from aiohttp import web

from pbxguard.api import stats as stats_module
from pbxguard.api.context import ApiContext, read_upload
from pbxguard.api.errors import ApiError, invalid
from pbxguard.api.fields import Field, Kind
from pbxguard.api.metrics import CONTENT_TYPE
from pbxguard.bulk import ImportLineError, parse_number_lines
from pbxguard.ledger.store import DecisionFilter
from pbxguard.policy.model import (
    RULE_REFERENCES,
    CallAttempt,
    CallerIdKind,
    Campaign,
    Purpose,
    Reason,
    Sector,
)
from pbxguard.policy.numbers import classify_caller_id


class Access(enum.StrEnum):
    PUBLIC = "public"
    TOKEN = "token"  # noqa: S105 - Authorization: Bearer <http.token>
    DASHBOARD = "dashboard"  # bearer token, or the session cookie that ?token= sets


@dataclass(frozen=True, slots=True)
class Args:
    path: dict[str, Any]
    query: dict[str, Any]
    body: dict[str, Any]


RouteHandler = Callable[[ApiContext, web.Request, Args], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Reply:
    """One documented response: status -> (description, schema, content type)."""

    status: int
    description: str
    schema: dict[str, Any] | None = None
    content_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: RouteHandler
    operation_id: str
    summary: str
    tag: str
    access: Access = Access.TOKEN
    path_params: tuple[Field, ...] = ()
    query: tuple[Field, ...] = ()
    body: tuple[Field, ...] | None = None  # a JSON object with these fields
    upload: bool = False  # a text file: text/plain or multipart part "file"
    replies: tuple[Reply, ...] = ()
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_reply(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(payload, ensure_ascii=False, default=str),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


_REASON_CODES = frozenset(reason.value for reason in Reason)


def decision_row_json(row: asyncpg.Record) -> dict[str, Any]:
    """A journal row as JSON: every column (later migrations add theirs), plus the rule references."""
    out = {key: _jsonable(value) for key, value in row.items()}
    out["rules"] = [RULE_REFERENCES[Reason(code)] if code in _REASON_CODES else "" for code in row["reasons"]]
    return out


def campaign_json(campaign: Campaign) -> dict[str, Any]:
    return {
        "id": campaign.id,
        "order_giver": campaign.order_giver,
        "siren": campaign.order_giver_siren,
        "purpose": campaign.purpose.value,
        "sector": campaign.sector.value,
        "automated": campaign.automated,
        "prerecorded": campaign.prerecorded,
        "script_id": campaign.script_id,
    }


def encode_cursor(decided_at: datetime, ident: uuid.UUID) -> str:
    raw = f"{decided_at.astimezone(UTC).isoformat()}|{ident}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(value: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        at, _, ident = raw.partition("|")
        parsed = datetime.fromisoformat(at)
        if parsed.tzinfo is None:
            raise ValueError("naive")
        return parsed, uuid.UUID(ident)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid("cursor", "cursor: not a cursor this API returned") from None


async def _require_campaign(ctx: ApiContext, campaign_id: str) -> Campaign:
    campaign = await ctx.require_ledger().campaign(campaign_id)
    if campaign is None:
        raise ApiError(422, "unknown_campaign", f"campaign: unknown campaign {campaign_id!r}", "campaign")
    return campaign


# -- handlers: health, metrics, documentation --------------------------------------------------------


async def healthz(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    return json_reply({"status": "alive"})


async def readyz(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    state = ctx.ready_state()
    ok = all(state.values())
    return json_reply({"ready": ok, "checks": state}, status=200 if ok else 503)


async def metrics(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    ctx.metrics.set_links(ctx.ready_state())
    ledger = ctx.ledger()
    if ledger is not None:
        try:
            unsealed = await asyncio.wait_for(ledger.journal_unsealed(), 5)
        except Exception:  # the scrape must answer even when PostgreSQL does not
            unsealed = None
        if unsealed is not None:
            ctx.metrics.journal_unsealed.set(unsealed)
    response = web.Response(body=ctx.metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def openapi_json(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    from pbxguard.api.openapi import document

    return json_reply(document(ROUTES))


async def dashboard(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    from pbxguard.api.dashboard import page

    return await page(ctx, request, args.query)


# -- handlers: decisions ----------------------------------------------------------------------------


async def check(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    a = args.body
    await _require_campaign(ctx, a["campaign"])
    attempt = CallAttempt(
        number=a["number"],
        campaign_id=a["campaign"],
        caller_id=a["caller_id"],
        gate="http",
        call_key=a["call_key"],
    )
    decision = await ctx.guard.decide(attempt, a["at"] or ctx.now(), reserve=a["reserve"])
    return json_reply(decision.to_json())


async def check_batch(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    a = args.body
    await _require_campaign(ctx, a["campaign"])
    numbers: list[str] = a["numbers"]
    decisions = await ctx.guard.decide_many(
        numbers, a["campaign"], a["caller_id"], a["at"] or ctx.now(), gate="http-batch"
    )
    return json_reply(
        [
            {
                "number": number,
                "consumer": d.consumer,
                "verdict": d.verdict.value,
                "reasons": [r.value for r in d.reasons],
                "next_allowed_at": d.next_allowed_at.isoformat() if d.next_allowed_at else None,
            }
            for number, d in zip(numbers, decisions, strict=True)
        ]
    )


async def list_decisions(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    q = args.query
    if q["from"] is not None and q["to"] is not None and q["from"] >= q["to"]:
        raise invalid("to", "to: must be after from")
    where = DecisionFilter(
        start=q["from"], end=q["to"], campaign=q["campaign"], order_giver=q["order_giver"], consumer=q["number"],
        verdict=q["verdict"], reason=q["reason"],
    )  # fmt: skip
    after = decode_cursor(q["cursor"]) if q["cursor"] else None
    limit: int = q["limit"]
    rows = await ctx.require_ledger().list_decisions(where, limit + 1, after)
    page = rows[:limit]
    cursor = encode_cursor(page[-1]["decided_at"], page[-1]["id"]) if len(rows) > limit else None
    return json_reply({"decisions": [decision_row_json(r) for r in page], "next_cursor": cursor})


async def get_decision(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    row = await ctx.require_ledger().decision(args.path["id"])
    if row is None:
        raise ApiError(404, "not_found", f"no decision {args.path['id']}")
    return json_reply(decision_row_json(row))


async def get_stats(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    q = args.query
    try:
        result = await stats_module.collect(
            ctx.require_ledger(), ctx.now(), q["since"], q["until"], q["campaign"], q["order_giver"]
        )
    except stats_module.PeriodTooLong as exc:
        raise invalid("since", f"since: {exc}") from None
    return json_reply(result.to_json())


# -- handlers: bookkeeping ----------------------------------------------------------------------------


def _campaign_from(campaign_id: str, a: dict[str, Any]) -> Campaign:
    return Campaign(
        id=campaign_id, order_giver=a["order_giver"], purpose=Purpose(a["purpose"]), sector=Sector(a["sector"]),
        automated=a["automated"], prerecorded=a["prerecorded"], order_giver_siren=a["siren"],
        script_id=a["script_id"],
    )  # fmt: skip


async def list_campaigns(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    return json_reply([campaign_json(c) for c in await ctx.require_ledger().campaigns()])


async def create_campaign(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    campaign = _campaign_from(args.body["id"], args.body)
    await ctx.require_ledger().add_campaign(campaign)
    return json_reply(campaign_json(campaign), 201, {"Location": f"/v1/campaigns/{campaign.id}"})


async def put_campaign(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    campaign = _campaign_from(args.path["id"], args.body)
    await ctx.require_ledger().add_campaign(campaign)
    return json_reply(campaign_json(campaign))


async def get_campaign(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    campaign = await ctx.require_ledger().campaign(args.path["id"])
    if campaign is None:
        raise ApiError(404, "not_found", f"no campaign {args.path['id']!r}")
    return json_reply(campaign_json(campaign))


async def authorize_caller_id(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    a = args.body
    caller = classify_caller_id(a["caller_id"])
    if caller.kind in (CallerIdKind.MISSING, CallerIdKind.FORBIDDEN, CallerIdKind.MOBILE) or not caller.e164:
        raise invalid("caller_id", f"caller_id: cannot be authorised as a caller ID ({caller.kind.value})")
    valid_from = a["valid_from"] or ctx.now().astimezone(stats_module.PARIS).date()
    if a["valid_until"] is not None and a["valid_until"] < valid_from:
        raise invalid("valid_until", "valid_until: before valid_from")
    ident = await ctx.require_ledger().authorize_caller_id(
        caller.e164, a["order_giver"], valid_from, a["valid_until"], a["proof"]
    )
    return json_reply(
        {"authorization": ident, "caller_id": caller.e164, "kind": caller.kind.value, "order_giver": a["order_giver"],
         "valid_from": valid_from.isoformat(), "valid_until": a["valid_until"].isoformat() if a["valid_until"] else None},
        201,
    )  # fmt: skip


async def add_consent(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    a = args.body
    ident = await ctx.require_ledger().add_consent(
        a["number"], a["order_giver"], a["given_at"] or ctx.now(), source=a["source"], proof=a["proof"],
        wording=a["wording"], off_hours=a["off_hours"],
    )  # fmt: skip
    return json_reply({"consent": ident, "consumer": a["number"]}, 201)


async def revoke_consent(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    a = args.body
    count = await ctx.require_ledger().revoke_consent(a["number"], a["order_giver"], a["at"] or ctx.now())
    return json_reply({"revoked": count, "consumer": a["number"]})


async def add_contract(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    a = args.body
    ident = await ctx.require_ledger().add_contract(a["number"], a["order_giver"], a["until"], a["reference"])
    return json_reply({"contract": ident, "consumer": a["number"]}, 201)


async def add_refusal(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    a = args.body
    ident = await ctx.require_ledger().add_refusal(
        a["number"], a["order_giver"], a["at"] or ctx.now(), a["source"]
    )
    return json_reply({"refusal": ident, "consumer": a["number"]}, 201)


async def add_opposition(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    a = args.body
    ident = await ctx.require_ledger().add_opposition(
        a["number"], a["order_giver"], a["at"] or ctx.now(), a["source"]
    )
    return json_reply({"opposition": ident, "consumer": a["number"], "order_giver": a["order_giver"]}, 201)


async def put_consumer(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    number = args.path["number"]
    await ctx.require_ledger().set_residence(number, args.body["territory"], args.body["departement"])
    return json_reply(
        {"consumer": number, "territory": args.body["territory"], "departement": args.body["departement"]}
    )


async def bloctel_import(ctx: ApiContext, request: web.Request, args: Args) -> web.StreamResponse:
    q = args.query
    text, filename = await read_upload(request, ctx.upload_limit, ctx.body_timeout)
    try:
        # Validating millions of numbers is CPU work: off the event loop that serves the gates.
        numbers = await asyncio.to_thread(parse_number_lines, text.splitlines())
    except ImportLineError as exc:
        raise invalid("file", f"file: {exc}; nothing imported") from None
    if not numbers:
        raise invalid("file", "file: no number in it; nothing imported")
    status = "registered" if q["registered"] else "cleared"
    ident = await ctx.require_ledger().import_bloctel(
        numbers, q["order_giver"], q["cleaned_at"], status, q["filename"] or filename
    )
    return json_reply({"cleaning": ident, "numbers": len(numbers), "status": status}, 201)


# -- the table -------------------------------------------------------------------------------------------

NUMBER = Field("number", Kind.CONSUMER, True, "consumer number, national (0612345678) or E.164")
ORDER_GIVER = Field("order_giver", Kind.NAME, True, "order giver (donneur d'ordre); must have a campaign")
AT = Field("at", Kind.INSTANT, description="effective time (default: now); without offset: Paris time")
SOURCE = Field("source", Kind.NAME, description="where it was collected or reported")

CAMPAIGN_FIELDS: tuple[Field, ...] = (
    ORDER_GIVER,
    Field("siren", Kind.SIREN, description="the order giver's SIREN"),
    Field(
        "purpose", Kind.ENUM, choices=tuple(p.value for p in Purpose), default=Purpose.B2C_PROSPECTING.value
    ),
    Field("sector", Kind.ENUM, choices=tuple(s.value for s in Sector), default=Sector.GENERAL.value),
    Field(
        "automated", Kind.BOOLEAN, default=True, description="dialer-driven (predictive, progressive, power)"
    ),
    Field(
        "prerecorded", Kind.BOOLEAN, default=False, description="pre-recorded or robot voice (needs consent)"
    ),
    Field("script_id", Kind.NAME),
)
CAMPAIGN_ID = Field("id", Kind.NAME, True, "campaign identifier")

DECISION_FILTERS: tuple[Field, ...] = (
    Field(
        "from", Kind.INSTANT, description="decided at or after (ISO 8601; a date means its midnight, Paris)"
    ),
    Field("to", Kind.INSTANT, description="decided before"),
    Field("campaign", Kind.NAME),
    Field("order_giver", Kind.NAME),
    Field("number", Kind.CONSUMER, description="consumer number"),
    Field("verdict", Kind.ENUM, choices=("allow", "block")),
    Field("reason", Kind.ENUM, choices=tuple(r.value for r in Reason)),
    Field("limit", Kind.INTEGER, default=100, minimum=1, maximum=1000),
    Field("cursor", Kind.CURSOR, description="next_cursor of the previous page"),
)
STATS_FILTERS: tuple[Field, ...] = (
    Field("since", Kind.DATE, description="first day, Paris time (default: 29 days before today)"),
    Field("until", Kind.DATE, description="last day, included (default: today)"),
    Field("campaign", Kind.NAME),
    Field("order_giver", Kind.NAME),
)

ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", healthz, "healthz", "The process is alive", "operations", Access.PUBLIC,
          replies=(Reply(200, "alive", ref("Health")),)),
    Route("GET", "/readyz", readyz, "readyz", "Ledger reachable, gates listening, upstream links up", "operations",
          Access.PUBLIC, replies=(Reply(200, "ready", ref("Ready")), Reply(503, "not ready", ref("Ready")))),
    Route("GET", "/metrics", metrics, "metrics", "Prometheus metrics", "operations", Access.PUBLIC,
          replies=(Reply(200, "Prometheus text exposition format", {"type": "string"}, "text/plain"),)),
    Route("GET", "/v1/openapi.json", openapi_json, "openapi", "This document", "operations", Access.PUBLIC,
          replies=(Reply(200, "OpenAPI 3.1 document", {"type": "object"}),)),
    Route("GET", "/", dashboard, "dashboard", "Compliance dashboard (HTML)", "dashboard", Access.DASHBOARD,
          query=(
              Field("campaign", Kind.NAME), Field("order_giver", Kind.NAME),
              Field("from", Kind.DATE, description="first day (Paris time)"),
              Field("to", Kind.DATE, description="last day, included"),
              Field("token", Kind.NAME, description="the API token: sets a session cookie and redirects without it"),
          ),
          replies=(Reply(200, "the dashboard", {"type": "string"}, "text/html"),
                   Reply(303, "session cookie set; redirect to the same page without the token"),
                   Reply(401, "no or wrong token", {"type": "string"}, "text/html"))),
    Route("POST", "/v1/check", check, "check", "Decide one call (as `pbxguard check`)", "decisions",
          body=(
              NUMBER,
              Field("campaign", Kind.NAME, True),
              Field("caller_id", Kind.RAW_NUMBER, True, "the caller ID the call would present"),
              Field("at", Kind.INSTANT, description="time of the call (default: now)"),
              Field("reserve", Kind.BOOLEAN, default=False, description="record the attempt if allowed, and journal it"),
              Field("call_key", Kind.NAME, description="idempotency key: a replay returns the first decision"),
          ),
          replies=(Reply(200, "the decision (allowed or blocked)", ref("Decision")),)),
    Route("POST", "/v1/check/batch", check_batch, "checkBatch", "Pre-check up to 10,000 numbers (no reservation)",
          "decisions",
          body=(
              Field("campaign", Kind.NAME, True),
              Field("caller_id", Kind.RAW_NUMBER, True),
              Field("numbers", Kind.NUMBER_LIST, True, "numbers to check; invalid ones get INVALID_DESTINATION",
                    max_items=10000),
              Field("at", Kind.INSTANT, description="time of the calls (default: now)"),
          ),
          replies=(Reply(200, "one verdict per number, in order", {"type": "array", "items": ref("BatchItem")}),)),
    Route("GET", "/v1/decisions", list_decisions, "listDecisions", "The decision journal, newest first", "decisions",
          query=DECISION_FILTERS,
          replies=(Reply(200, "a page of journal rows", ref("DecisionPage")),)),
    Route("GET", "/v1/decisions/{id}", get_decision, "getDecision", "One journal row", "decisions",
          path_params=(Field("id", Kind.UUID, True, "decision id"),),
          replies=(Reply(200, "the journal row", ref("DecisionRow")), Reply(404, "no such decision", ref("Error")))),
    Route("GET", "/v1/stats", get_stats, "stats", "The dashboard's numbers", "decisions", query=STATS_FILTERS,
          replies=(Reply(200, "counts by day, reason, campaign and order giver", ref("Stats")),)),
    Route("GET", "/v1/campaigns", list_campaigns, "listCampaigns", "List campaigns", "campaigns",
          replies=(Reply(200, "campaigns", {"type": "array", "items": ref("Campaign")}),)),
    Route("POST", "/v1/campaigns", create_campaign, "createCampaign", "Add (or update) a campaign", "campaigns",
          body=(CAMPAIGN_ID, *CAMPAIGN_FIELDS), replies=(Reply(201, "saved", ref("Campaign")),)),
    Route("GET", "/v1/campaigns/{id}", get_campaign, "getCampaign", "One campaign", "campaigns",
          path_params=(CAMPAIGN_ID,),
          replies=(Reply(200, "the campaign", ref("Campaign")), Reply(404, "no such campaign", ref("Error")))),
    Route("PUT", "/v1/campaigns/{id}", put_campaign, "putCampaign", "Add or replace a campaign", "campaigns",
          path_params=(CAMPAIGN_ID,), body=CAMPAIGN_FIELDS, replies=(Reply(200, "saved", ref("Campaign")),)),
    Route("POST", "/v1/caller-ids/authorizations", authorize_caller_id, "authorizeCallerId",
          "Record that an order giver may present a caller ID", "caller IDs",
          body=(
              Field("caller_id", Kind.RAW_NUMBER, True, "NPV, 08, 30/31 or territorial number"),
              ORDER_GIVER,
              Field("valid_from", Kind.DATE, description="default: today"),
              Field("valid_until", Kind.DATE),
              Field("proof", Kind.NAME, description="contract or assignment reference"),
          ),
          replies=(Reply(201, "recorded", ref("Created")),)),
    Route("POST", "/v1/consents", add_consent, "addConsent", "Record a consent", "consumers",
          body=(NUMBER, ORDER_GIVER, Field("given_at", Kind.INSTANT, description="default: now"), SOURCE,
                Field("proof", Kind.NAME), Field("wording", Kind.TEXT),
                Field("off_hours", Kind.BOOLEAN, default=False,
                      description="also covers calls outside the legal days and hours (D223-9 al. 2)")),
          replies=(Reply(201, "recorded", ref("Created")),)),
    Route("POST", "/v1/consents/revoke", revoke_consent, "revokeConsent", "Revoke consents, effective at once",
          "consumers", body=(NUMBER, ORDER_GIVER, AT),
          replies=(Reply(200, "number of consents revoked", ref("Revoked")),)),
    Route("POST", "/v1/contracts", add_contract, "addContract", "Record a contract in progress", "consumers",
          body=(NUMBER, ORDER_GIVER, Field("until", Kind.DATE, True), Field("reference", Kind.NAME)),
          replies=(Reply(201, "recorded", ref("Created")),)),
    Route("POST", "/v1/refusals", add_refusal, "addRefusal", "A refusal during a conversation (60-day quiet period)",
          "consumers", body=(NUMBER, ORDER_GIVER, AT, SOURCE), replies=(Reply(201, "recorded", ref("Created")),)),
    Route("POST", "/v1/oppositions", add_opposition, "addOpposition", "A permanent opposition", "consumers",
          body=(NUMBER, Field("order_giver", Kind.NAME, description="default: every order giver"), AT, SOURCE),
          replies=(Reply(201, "recorded", ref("Created")),)),
    Route("PUT", "/v1/consumers/{number}", put_consumer, "putConsumer",
          "Known residence of a consumer (adds to what the number shows; neither field clears it)", "consumers",
          path_params=(Field("number", Kind.CONSUMER, True, "consumer number (E.164, + URL-encoded as %2B)"),),
          body=(Field("territory", Kind.TERRITORY), Field("departement", Kind.DEPARTEMENT)),
          replies=(Reply(200, "saved", ref("Residence")),)),
    Route("POST", "/v1/bloctel/imports", bloctel_import, "importBloctel",
          "Import a file Bloctel returned (one number per line), whole or not at all", "bloctel",
          query=(ORDER_GIVER, Field("cleaned_at", Kind.DATE, True, "date of the cleaning"),
                 Field("registered", Kind.BOOLEAN, default=False,
                       description="the file lists numbers reported as registered (default: cleared numbers)"),
                 Field("filename", Kind.NAME, description="recorded with the cleaning")),
          upload=True, replies=(Reply(201, "imported", ref("BloctelImport")),)),
)  # fmt: skip
