"""The dashboard in a real headless browser (Debian's chromium driven by Playwright).

Skipped with a message when Playwright or /usr/bin/chromium is missing (`pip install playwright`,
`apt-get install chromium`; never `playwright install`, which downloads a browser).  Set
PBXGUARD_DASHBOARD_SCREENSHOT=docs/dashboard.png to refresh the README's screenshot.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from api_support import TOKEN, Api, seed_month

pytestmark = pytest.mark.timeout(180)

CHROMIUM = os.environ.get("PBXGUARD_CHROMIUM", "/usr/bin/chromium")
HAVE_CHROMIUM = Path(CHROMIUM).exists()
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture
async def browser() -> Any:
    playwright_api = pytest.importorskip(
        "playwright.async_api", reason="Playwright is not installed (pip install playwright)"
    )
    if not HAVE_CHROMIUM:
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)")
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            yield launched
        finally:
            await launched.close()


async def test_dashboard_in_a_browser(api: Api, browser: Any, tmp_path: Path) -> None:
    await seed_month(api.guard, api.ledger)
    base = str(api.client.make_url("/"))
    context = await browser.new_context(viewport={"width": 1366, "height": 768})
    page = await context.new_page()
    page.set_default_timeout(20_000)
    blocked_requests: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(base) else blocked_requests.append(r.url))
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    # Without the token: the sign-in page.  With ?token=: cookie, redirect, the dashboard.
    response = await page.goto(base)
    assert response.status == 401
    await page.fill("input[name=token]", TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_selector("#chart svg.chart")
    assert "token=" not in page.url  # the redirect dropped it from the address bar
    cookies = await context.cookies()
    (session,) = [c for c in cookies if c["name"] == "pbxguard_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    errors.clear()  # the sign-in page's 401 is logged as a failed load

    # The chart rendered: bars with a size, laid out inside the viewport's width.
    bars = page.locator("#chart rect.bar")
    assert await bars.count() > 20
    box = await bars.first.bounding_box()
    assert box is not None and box["width"] > 2 and box["height"] > 0
    chart = await page.locator("#chart svg.chart").bounding_box()
    assert chart is not None and 500 < chart["width"] <= 1366
    assert await page.locator(".legend li").count() >= 4
    assert await page.locator("#recent-blocked tbody tr").count() == 50
    assert "WEEKEND" in await page.locator("#reasons").inner_text()
    page_width = await page.evaluate("document.documentElement.scrollWidth")
    assert page_width <= 1366  # nothing overflows sideways on a laptop screen

    screenshot = os.environ.get("PBXGUARD_DASHBOARD_SCREENSHOT")
    await page.screenshot(path=screenshot or str(tmp_path / "dashboard.png"), full_page=True)

    # A filter changes what is shown.
    before_campaigns = await page.locator("#per-campaign tbody tr").count()
    before_bars = await bars.count()
    before_blocked = await page.locator('[data-kpi$="days — blocked"] .value').inner_text()
    await page.select_option("select[name=campaign]", "press-renewal")
    await page.fill("input[name=from]", "2026-11-16")
    await page.click("button[type=submit]")
    await page.wait_for_url("**campaign=press-renewal**")
    assert await page.locator("#per-campaign tbody tr").count() == 1 < before_campaigns
    assert "press-renewal" in await page.locator("#per-campaign").inner_text()
    assert await bars.count() < before_bars
    assert await page.locator('[data-kpi$="days — blocked"] .value').inner_text() != before_blocked
    assert await page.locator("select[name=campaign]").input_value() == "press-renewal"
    recent = await page.locator("#recent-blocked tbody").inner_text()
    assert "spring-offer" not in recent and "fibre-winback" not in recent

    assert blocked_requests == []  # no CDN, no external asset: works offline
    assert errors == []  # no CSP violation, no script error
    await context.close()
