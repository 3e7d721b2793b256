"""The compliance dashboard at `/`: one server-rendered HTML page, no JavaScript, no external asset.

Authentication: `Authorization: Bearer <token>`, or open `/?token=<token>` once: that sets an HttpOnly,
SameSite=Strict session cookie (derived from the token, not the token) and redirects without it.
Everything interpolated into the page goes through `html.escape`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from datetime import datetime, timedelta
from functools import lru_cache
from html import escape
from importlib import resources
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import asyncpg
from aiohttp import web

from pbxguard.api import stats as stats_module
from pbxguard.api.chart import stacked_bars, swatch
from pbxguard.api.context import SESSION_COOKIE, ApiContext
from pbxguard.api.stats import PARIS, Stats, reason_sort_key
from pbxguard.ledger.store import DecisionFilter, StoreError
from pbxguard.logs import mask_number
from pbxguard.policy.model import Campaign

log = logging.getLogger("pbxguard.http")

RECENT_BLOCKED = 50
SESSION_SECONDS = 12 * 3600


@lru_cache(maxsize=1)
def stylesheet() -> str:
    return (resources.files("pbxguard") / "static" / "dashboard.css").read_text(encoding="utf-8")


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(stylesheet().encode()).digest()).decode()
    return (
        f"default-src 'none'; style-src 'sha256-{digest}'; img-src data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )


def _html(body: str, status: int = 200, title: str = "pbxguard — compliance") -> web.Response:
    document = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{stylesheet()}</style></head><body>{body}</body></html>"
    )
    response = web.Response(text=document, status=status, content_type="text/html", charset="utf-8")
    response.headers["Content-Security-Policy"] = _csp()
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cache-Control"] = "no-store"
    return response


def _login(message: str, status: int) -> web.Response:
    return _html(
        '<form class="login" method="get" action="/"><h1>pbxguard</h1>'
        f"<p>{escape(message)}</p>"
        '<label>API token<input type="password" name="token" autocomplete="current-password" autofocus></label>'
        '<button type="submit">Open the dashboard</button></form>',
        status,
        "pbxguard — sign in",
    )


async def page(ctx: ApiContext, request: web.Request, query: dict[str, Any]) -> web.StreamResponse:
    token = query.pop("token", None)
    if not ctx.token:
        return _html(
            '<div class="login"><h1>pbxguard</h1><p>No <code>[http] token</code> is configured: the dashboard shows '
            "personal data and stays closed until one is set.</p></div>",
            403,
        )
    if token is not None:
        if not ctx.token_matches(token):
            return _login("Wrong token.", 401)
        kept = [(k, v) for k, v in request.query.items() if k != "token"]
        location = request.path + ("?" + urlencode(kept) if kept else "")
        response = web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})
        response.set_cookie(
            SESSION_COOKIE, ctx.session_value(), max_age=SESSION_SECONDS, path="/", httponly=True,
            samesite="Strict", secure=request.secure,
        )  # fmt: skip
        return response
    if not (ctx.bearer_ok(request) or ctx.cookie_ok(request)):
        return _login("Enter the API token ([http] token) to open the compliance dashboard.", 401)
    return _html(await render(ctx, query))


async def render(ctx: ApiContext, query: dict[str, Any]) -> str:
    now = ctx.now()
    campaign, order_giver = query.get("campaign"), query.get("order_giver")
    since, until = query.get("from"), query.get("to")
    links = ctx.ready_state()
    error = ""
    stats: Stats | None = None
    recent: list[asyncpg.Record] = []
    campaigns: list[Campaign] = []
    givers: list[str] = []
    ledger = ctx.ledger()
    if ledger is None:
        error = "The ledger is not connected: no data to show, and every call is being blocked."
    else:
        try:
            stats = await stats_module.collect(ledger, now, since, until, campaign, order_giver)
            where = DecisionFilter(
                start=stats_module.day_start(stats.since),
                end=stats_module.day_start(stats.until + timedelta(days=1)),
                campaign=campaign, order_giver=order_giver, verdict="block",
            )  # fmt: skip
            recent, campaigns, givers = await asyncio.gather(
                ledger.list_decisions(where, RECENT_BLOCKED), ledger.campaigns(), ledger.order_givers()
            )
        except stats_module.PeriodTooLong as exc:
            error = f"No figures: {exc}."
        except (StoreError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("dashboard: ledger query failed: %s", exc)
            error = "The ledger did not answer: the figures below may be missing."
    mode = ctx.config.mode.value
    parts = [
        "<header><h1>pbxguard<span>compliance dashboard</span></h1>",
        f'<span class="mode {escape(mode)}">mode: {escape(mode)}</span>',
        '<ul class="links" aria-label="links">',
        *(
            f'<li class="{"up" if up else "down"}" title="{escape(name)} {"up" if up else "down"}">'
            f"{escape(_link_label(name))} {'✓' if up else '✗'}</li>"
            for name, up in links.items()
        ),
        "</ul></header><main>",
    ]
    if error:
        parts.append(f'<div class="error" role="alert">{escape(error)}</div>')
    parts.append(_filters(campaigns, givers, campaign, order_giver, stats))
    if stats is not None:
        parts.append(_kpis(stats))
        parts.append(_chart_and_reasons(stats))
        parts.append('<div class="row halves">' + _campaign_table(stats) + _giver_table(stats) + "</div>")
        parts.append(_recent(recent))
    parts.append("</main>")
    parts.append(
        f"<footer>Generated {escape(now.astimezone(PARIS).strftime('%Y-%m-%d %H:%M'))} Paris time · days are Paris "
        "calendar days · counts are journaled decisions (reserved calls) · numbers masked but the last 4 digits · "
        "the same figures as JSON: <code>GET /v1/stats</code>, API: <code>/v1/openapi.json</code></footer>"
    )
    return "".join(parts)


def _link_label(name: str) -> str:
    return {"ledger": "postgresql"}.get(name, name)


def _option(value: str, label: str, selected: str | None) -> str:
    chosen = " selected" if value == selected else ""
    return f'<option value="{escape(value)}"{chosen}>{escape(label)}</option>'


def _filters(
    campaigns: list[Campaign],
    givers: list[str],
    campaign: str | None,
    order_giver: str | None,
    stats: Stats | None,
) -> str:
    campaign_options = [_option("", "all campaigns", campaign or "")]
    known = {c.id for c in campaigns}
    campaign_options += [_option(c.id, f"{c.id} ({c.order_giver})", campaign) for c in campaigns]
    if campaign and campaign not in known:
        campaign_options.append(_option(campaign, campaign, campaign))
    giver_options = [_option("", "all order givers", order_giver or "")]
    giver_options += [_option(g, g, order_giver) for g in givers]
    if order_giver and order_giver not in givers:
        giver_options.append(_option(order_giver, order_giver, order_giver))
    since = stats.since.isoformat() if stats else ""
    until = stats.until.isoformat() if stats else ""
    period = (
        f'<span class="range">{escape(since)} → {escape(until)} ({(stats.until - stats.since).days + 1} days)</span>'
        if stats
        else ""
    )
    return (
        '<form class="filters" method="get" action="/" id="filters">'
        f'<label>Campaign<select name="campaign">{"".join(campaign_options)}</select></label>'
        f'<label>Order giver<select name="order_giver">{"".join(giver_options)}</select></label>'
        f'<label>From<input type="date" name="from" value="{escape(since)}"></label>'
        f'<label>To<input type="date" name="to" value="{escape(until)}"></label>'
        '<button type="submit">Apply</button><a href="/">Reset</a>'
        f"{period}</form>"
    )


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _kpis(stats: Stats) -> str:
    days = (stats.until - stats.since).days + 1
    cards = [
        ("Today — allowed", stats.today_counts.allowed, "allowed", stats.today.strftime("%a %d %b")),
        (
            "Today — blocked",
            stats.today_counts.blocked,
            "blocked",
            f"{_pct(stats.today_counts.block_rate)} of calls",
        ),
        (f"{days} days — allowed", stats.totals.allowed, "allowed", f"{stats.totals.total:,} calls decided"),
        (
            f"{days} days — blocked",
            stats.totals.blocked,
            "blocked",
            f"{_pct(stats.totals.block_rate)} of calls",
        ),
        (
            "Shadow passes",
            stats.totals.shadow,
            "",
            "blocked but let through (shadow mode)" if stats.totals.shadow else "none: enforced",
        ),
    ]
    return (
        '<section class="kpis">'
        + "".join(
            f'<div class="kpi" data-kpi="{escape(label)}"><div class="label">{escape(label)}</div>'
            f'<div class="value {css}">{value:,}</div><div class="sub">{escape(sub)}</div></div>'
            for label, value, css, sub in cards
        )
        + "</section>"
    )


def _chart_and_reasons(stats: Stats) -> str:
    order = sorted(stats.reasons, key=reason_sort_key)
    svg = stacked_bars(stats.days, stats.reasons_by_day, order)
    legend = "".join(f"<li>{swatch(code)}<span>{escape(code)}</span></li>" for code in order)
    rows = "".join(
        f'<tr><td>{swatch(code)} {escape(code)}</td><td class="n">{n:,}</td>'
        f'<td class="n">{_pct(n / stats.totals.blocked) if stats.totals.blocked else "—"}</td></tr>'
        for code, n in stats.reasons.items()
    )
    reasons_table = (
        f'<table id="reasons"><thead><tr><th>Reason</th><th class="n">Blocks</th><th class="n">Share</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
        if rows
        else '<p class="empty">No blocked call in this period.</p>'
    )
    return (
        '<div class="row">'
        f'<section class="card" id="chart"><h2>Blocked calls by reason <small>per day, Paris time; a call blocked '
        f"for two reasons counts under both</small></h2>{svg}"
        f'<ul class="legend">{legend}</ul></section>'
        f'<section class="card"><h2>Blocks by reason <small>whole period</small></h2>'
        f'<div class="scroll">{reasons_table}</div></section>'
        "</div>"
    )


def _counts_cells(allowed: int, blocked: int) -> str:
    total = allowed + blocked
    rate = _pct(blocked / total) if total else "—"
    return f'<td class="n">{allowed:,}</td><td class="n">{blocked:,}</td><td class="n">{rate}</td>'


def _campaign_table(stats: Stats) -> str:
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{escape(stats.campaign_order_giver.get(name) or '(unknown)')}</td>"
        f"{_counts_cells(c.allowed, c.blocked)}</tr>"
        for name, c in stats.by_campaign.items()
    )
    body = (
        '<table id="per-campaign"><thead><tr><th>Campaign</th><th>Order giver</th><th class="n">Allowed</th>'
        f'<th class="n">Blocked</th><th class="n">Block rate</th></tr></thead><tbody>{rows}</tbody></table>'
        if rows
        else '<p class="empty">No decision in this period.</p>'
    )
    return f'<section class="card"><h2>Per campaign</h2><div class="scroll">{body}</div></section>'


def _giver_table(stats: Stats) -> str:
    rows = "".join(
        f"<tr><td>{escape(name)}</td>{_counts_cells(c.allowed, c.blocked)}</tr>"
        for name, c in stats.by_order_giver.items()
    )
    body = (
        '<table id="per-order-giver"><thead><tr><th>Order giver</th><th class="n">Allowed</th>'
        f'<th class="n">Blocked</th><th class="n">Block rate</th></tr></thead><tbody>{rows}</tbody></table>'
        if rows
        else '<p class="empty">No decision in this period.</p>'
    )
    return f'<section class="card"><h2>Per order giver</h2><div class="scroll">{body}</div></section>'


def _local(at: datetime | None, zones: list[str] | None) -> str:
    if at is None:
        return ""
    zone = (zones or ["Europe/Paris"])[0]
    try:
        local = at.astimezone(ZoneInfo(zone))
    except (KeyError, ValueError):
        local = at.astimezone(PARIS)
    text = local.strftime("%a %d/%m %H:%M")
    return text if zone == "Europe/Paris" else f"{text} ({zone.split('/')[-1].replace('_', ' ')})"


def _recent(rows: list[asyncpg.Record]) -> str:
    if not rows:
        return (
            f'<section class="card"><h2>Most recent blocked calls <small>last {RECENT_BLOCKED}</small></h2>'
            '<p class="empty">No blocked call in this period.</p></section>'
        )
    lines = []
    for row in rows:
        reasons = "".join(f'<span class="chip">{escape(code)}</span>' for code in row["reasons"])
        if row["shadow"]:
            reasons += ' <span class="tag">shadow: let through</span>'
        next_at = row["next_allowed_at"]
        next_text = (
            escape(_local(next_at, list(row["zones"] or [])))
            if next_at
            else '<span class="empty">not by waiting</span>'
        )
        lines.append(
            f"<tr><td>{escape(row['decided_at'].astimezone(PARIS).strftime('%d/%m %H:%M:%S'))}</td>"
            f'<td class="mono">{escape(mask_number(row["consumer"]) or "")}</td>'
            f"<td>{escape(row['campaign'])}</td><td>{escape(row['order_giver'] or '')}</td>"
            f"<td>{escape(row['gate'])}</td><td>{reasons}</td><td>{next_text}</td></tr>"
        )
    return (
        f'<section class="card"><h2>Most recent blocked calls <small>last {RECENT_BLOCKED}; times in Paris, next '
        "legal time in the consumer's zone</small></h2>"
        '<table id="recent-blocked"><thead><tr><th>Decided</th><th>Number</th><th>Campaign</th><th>Order giver</th>'
        "<th>Gate</th><th>Reasons</th><th>Next legal time</th></tr></thead>"
        f"<tbody>{''.join(lines)}</tbody></table></section>"
    )
