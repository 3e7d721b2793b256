"""Helpers for the operator-surface tests: an API client on a real ledger, a fixed clock and token, a month of data."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp.test_utils import TestClient, TestServer

from pbxguard.api import ApiContext, Metrics, build_app
from pbxguard.config import Config, HttpConfig, Mode, Secret
from pbxguard.guard import Guard
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import Campaign
from pbxguard.policy.settings import PolicySettings

PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2026, 12, 1, 10, 30, tzinfo=PARIS)  # a Tuesday, inside the legal hours
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NUMBER = "+33612345678"
CALLER_ID = "0162123456"


async def legal_setup(ledger: Ledger, number: str = NUMBER) -> None:
    await ledger.add_campaign(Campaign("c1", "ACME", automated=True))
    await ledger.authorize_caller_id("+33162123456", "ACME", date(2026, 1, 1), None, None)
    await ledger.add_consent(number, "ACME", datetime(2026, 11, 1, tzinfo=UTC))


@dataclass
class Api:
    client: TestClient[Any, Any]
    ledger: Ledger
    guard: Guard
    metrics: Metrics
    context: ApiContext
    links: dict[str, bool]


async def make_api(ledger: Ledger | None, token: str = TOKEN, links: dict[str, bool] | None = None) -> Api:
    state = links if links is not None else {"ledger": True}
    config = Config(http=HttpConfig(token=Secret(token)))
    guard = Guard(ledger, PolicySettings(), Mode.ENFORCE, timeout=1.5)
    metrics = Metrics()
    guard.observers.append(metrics.observe_decision)
    guard.ledger_observers.append(metrics.observe_ledger)
    context = ApiContext(
        config=config, guard=guard, ledger=lambda: ledger, metrics=metrics, ready_state=lambda: dict(state),
        clock=lambda: NOW,
    )  # fmt: skip
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(context)))
    await client.start_server()
    return Api(client, ledger, guard, metrics, context, state)  # type: ignore[arg-type]


CAMPAIGNS = (
    Campaign("spring-offer", "ACME Energie", order_giver_siren="552100554"),
    Campaign("fibre-winback", "Telco Nord"),
    Campaign("press-renewal", "Le Journal", automated=False),
)
GIVER_CALLER_IDS = {
    "ACME Energie": "+33162123456",
    "Telco Nord": "+33270123456",
    "Le Journal": "+33948123456",
}


async def seed_month(guard: Guard, ledger: Ledger, per_day: int = 14, seed: int = 7) -> int:
    """A realistic month of journaled decisions up to NOW: three campaigns, consents for most numbers,
    a few refusals and an opposition; calls at every hour, weekends and 11 November included."""
    import random
    from datetime import time, timedelta

    from pbxguard.policy.model import CallAttempt

    rng = random.Random(seed)
    for campaign in CAMPAIGNS:
        await ledger.add_campaign(campaign)
        await ledger.authorize_caller_id(GIVER_CALLER_IDS[campaign.order_giver], campaign.order_giver,
                                         date(2026, 1, 1), None, None)  # fmt: skip
    numbers = [f"+3361{i:07d}" for i in range(60)]
    for index, number in enumerate(numbers):
        for giver in GIVER_CALLER_IDS:
            if (index + len(giver)) % 5:
                await ledger.add_consent(number, giver, datetime(2026, 9, 1, tzinfo=UTC))
    for number in numbers[:4]:
        await ledger.add_refusal(number, "ACME Energie", datetime(2026, 11, 20, 15, tzinfo=UTC), "agent")
    await ledger.add_opposition(numbers[5], None, datetime(2026, 10, 1, tzinfo=UTC), "mail")
    today = NOW.date()
    count = 0
    for back in range(29, -1, -1):
        day = today - timedelta(days=back)
        for _ in range(per_day if day.weekday() < 5 else per_day // 4):
            campaign = rng.choices(CAMPAIGNS, weights=(5, 3, 2))[0]
            at = datetime.combine(day, time(rng.choice((9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20)),
                                            rng.randrange(60)), tzinfo=PARIS)  # fmt: skip
            if day == today and at > NOW:
                at = NOW - timedelta(minutes=rng.randrange(1, 90))
            caller = GIVER_CALLER_IDS[campaign.order_giver] if rng.random() > 0.03 else "0612345678"
            attempt = CallAttempt(
                number=rng.choice(numbers), campaign_id=campaign.id, caller_id=caller, gate="ami"
            )
            await guard.decide(attempt, at, reserve=True)
            count += 1
    await guard.flush()
    return count
