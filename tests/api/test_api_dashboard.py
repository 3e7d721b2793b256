"""The dashboard, server side: authentication (bearer, ?token= then cookie), content, escaping, filters,
and `pbxguard stats` printing the same numbers."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from api_support import AUTH, NOW, TOKEN, Api, seed_month

from pbxguard import cli
from pbxguard.api import stats as stats_module
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import Campaign

pytestmark = pytest.mark.timeout(120)


async def test_dashboard_needs_the_token(api: Api) -> None:
    response = await api.client.get("/")
    assert response.status == 401
    assert response.content_type == "text/html"
    assert 'name="token"' in await response.text()
    response = await api.client.get("/?token=wrong", allow_redirects=False)
    assert response.status == 401
    assert "pbxguard_session" not in response.cookies


async def test_token_query_sets_a_strict_cookie_and_redirects(api: Api) -> None:
    response = await api.client.get(f"/?campaign=c1&token={TOKEN}", allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"] == "/?campaign=c1"
    cookie = response.cookies["pbxguard_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert TOKEN not in cookie.value
    response = await api.client.get("/")  # the client's cookie jar sends it back
    assert response.status == 200
    # The cookie opens the dashboard only, never the API.
    assert (await api.client.get("/v1/decisions")).status == 401


async def test_dashboard_without_a_configured_token_is_closed(tokenless_api: Api) -> None:
    response = await tokenless_api.client.get("/?token=")
    assert response.status == 403
    response = await tokenless_api.client.get("/", headers={"Authorization": "Bearer "})
    assert response.status == 403


async def test_dashboard_content(api: Api) -> None:
    decided = await seed_month(api.guard, api.ledger)
    response = await api.client.get("/", headers=AUTH)
    assert response.status == 200
    html = await response.text()
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    bars = re.findall(r'<rect class="bar"[^>]*data-reason="(\w+)"', html)
    assert bars and {"WEEKEND", "OUTSIDE_HOURS", "NO_CONSENT", "PUBLIC_HOLIDAY"} <= set(bars)
    stats = await stats_module.collect(api.ledger, NOW)
    assert stats.totals.total == decided
    assert f">{stats.totals.blocked:,}<" in html and f">{stats.totals.allowed:,}<" in html
    for campaign in ("spring-offer", "fibre-winback", "press-renewal"):
        assert campaign in html
    recent = re.search(r'<table id="recent-blocked">.*?</table>', html, re.S)
    assert recent is not None
    assert recent.group(0).count("<tr>") == 51  # header + 50 rows
    assert not re.search(r"\+3361\d{7}", html)  # numbers masked
    assert re.search(r"\*{8}\d{4}", html)
    assert "postgresql" in html


async def test_dashboard_filters(api: Api) -> None:
    await seed_month(api.guard, api.ledger)
    whole = await (await api.client.get("/", headers=AUTH)).text()
    only = await (
        await api.client.get("/?campaign=press-renewal&from=2026-11-16&to=2026-11-30", headers=AUTH)
    ).text()
    assert whole != only
    table = re.search(r'<table id="per-campaign">.*?</table>', only, re.S)
    assert table is not None and "press-renewal" in table.group(0) and "spring-offer" not in table.group(0)
    assert '<option value="press-renewal" selected>' in only
    assert 'value="2026-11-16"' in only and "(15 days)" in only
    stats = await stats_module.collect(api.ledger, NOW, campaign="press-renewal",
                                       since=stats_module.date(2026, 11, 16), until=stats_module.date(2026, 11, 30))  # fmt: skip
    assert f">{stats.totals.blocked:,}<" in only
    response = await api.client.get("/?from=someday", headers=AUTH)
    assert response.status == 422


async def test_everything_is_escaped(api: Api) -> None:
    evil = '<script>alert("x")</script>'
    await api.ledger.add_campaign(Campaign(evil, "Evil & Co <b>"))
    html = await (await api.client.get("/", headers=AUTH)).text()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "Evil &amp; Co &lt;b&gt;" in html


async def test_dashboard_when_the_ledger_is_not_connected(api: Api) -> None:
    api.context.ledger = lambda: None
    response = await api.client.get("/", headers=AUTH)
    assert response.status == 200
    assert "ledger is not connected" in await response.text()


async def test_stats_cli_prints_the_dashboard_numbers(api: Api, database_url: str, monkeypatch: Any,
                                                      capsys: Any) -> None:  # fmt: skip
    await seed_month(api.guard, api.ledger)
    monkeypatch.setenv("PBXGUARD_DATABASE_URL", database_url)
    monkeypatch.delenv("PBXGUARD_CONFIG", raising=False)
    code = await asyncio.to_thread(
        cli.main, ["stats", "--since", "2026-11-02", "--until", "2026-12-01", "--json"]
    )
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    expected = await stats_module.collect(api.ledger, NOW)
    assert payload["totals"] == expected.totals.to_json()
    assert payload["reasons"] == expected.reasons
    code = await asyncio.to_thread(cli.main, ["stats", "--since", "2026-11-02", "--until", "2026-12-01",
                                              "--campaign", "spring-offer"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "pbxguard stats  2026-11-02 → 2026-12-01  (30 days, Paris time)  campaign spring-offer" in text
    assert "blocks by reason" in text and "WEEKEND" in text and "spring-offer" in text
    assert "fibre-winback" not in text


async def test_stats_of_an_empty_ledger(ledger: Ledger) -> None:
    stats = await stats_module.collect(ledger, NOW)
    text = stats_module.render_text(stats)
    assert "(no decision)" in text and "(none)" in text
    assert len(stats.days) == 30
