"""The dashboard's numbers, from the decision journal: the same for the page, `/v1/stats` and `pbxguard stats`.

Days are calendar days in Paris time (where operators work); counts are journaled decisions, i.e.
every call a gate reserved (pre-checks without reservation are not journaled).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from pbxguard.ledger.store import DecisionFilter, Ledger
from pbxguard.policy.model import REASON_ORDER, Reason

PARIS = ZoneInfo("Europe/Paris")
ZONE_NAME = "Europe/Paris"
DEFAULT_DAYS = 30


@dataclass
class Counts:
    allowed: int = 0
    blocked: int = 0
    shadow: int = 0  # blocked, but let through by shadow mode

    @property
    def total(self) -> int:
        return self.allowed + self.blocked

    @property
    def block_rate(self) -> float:
        return self.blocked / self.total if self.total else 0.0

    def add(self, verdict: str, shadow: bool, n: int) -> None:
        if verdict == "allow":
            self.allowed += n
        else:
            self.blocked += n
            if shadow:
                self.shadow += n

    def to_json(self) -> dict[str, int]:
        return {"allowed": self.allowed, "blocked": self.blocked, "shadow": self.shadow}


@dataclass
class Stats:
    since: date
    until: date
    campaign: str | None
    order_giver: str | None
    today: date
    today_counts: Counts = field(default_factory=Counts)
    totals: Counts = field(default_factory=Counts)
    by_day: dict[date, Counts] = field(default_factory=dict)
    reasons_by_day: dict[date, dict[str, int]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    by_campaign: dict[str, Counts] = field(default_factory=dict)
    campaign_order_giver: dict[str, str | None] = field(default_factory=dict)
    by_order_giver: dict[str, Counts] = field(default_factory=dict)

    @property
    def days(self) -> list[date]:
        return [self.since + timedelta(days=i) for i in range((self.until - self.since).days + 1)]

    def to_json(self) -> dict[str, object]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "zone": ZONE_NAME,
            "filters": {"campaign": self.campaign, "order_giver": self.order_giver},
            "today": {"date": self.today.isoformat(), **self.today_counts.to_json()},
            "totals": self.totals.to_json(),
            "by_day": [
                {
                    "date": day.isoformat(),
                    **self.by_day.get(day, Counts()).to_json(),
                    "reasons": dict(self.reasons_by_day.get(day, {})),
                }
                for day in self.days
            ],
            "reasons": self.reasons,
            "by_campaign": [
                {"campaign": name, "order_giver": self.campaign_order_giver.get(name), **counts.to_json()}
                for name, counts in self.by_campaign.items()
            ],
            "by_order_giver": [
                {"order_giver": name, **counts.to_json()} for name, counts in self.by_order_giver.items()
            ],
        }


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=PARIS)


def default_range(now: datetime, days: int = DEFAULT_DAYS) -> tuple[date, date]:
    today = now.astimezone(PARIS).date()
    return today - timedelta(days=days - 1), today


def _reason_key(code: str) -> tuple[int, str]:
    try:
        return (REASON_ORDER[Reason(code)], code)
    except ValueError:
        return (len(REASON_ORDER), code)


# Every day of the period is a row of the answer (and a bar of the chart): a period of a century would
# hold the event loop, which serves the gates too, for seconds. Three years cover any inspection.
MAX_DAYS = 3 * 366


class PeriodTooLong(ValueError):
    pass


async def collect(
    ledger: Ledger,
    now: datetime,
    since: date | None = None,
    until: date | None = None,
    campaign: str | None = None,
    order_giver: str | None = None,
) -> Stats:
    default_since, today = default_range(now)
    until = until or today
    since = since or min(default_since, until)
    if since > until:
        since, until = until, since
    if (until - since).days >= MAX_DAYS:
        raise PeriodTooLong(f"the period is longer than {MAX_DAYS} days: choose a shorter one")
    stats = Stats(since=since, until=until, campaign=campaign, order_giver=order_giver, today=today)
    where = DecisionFilter(
        start=day_start(since),
        end=day_start(until + timedelta(days=1)),
        campaign=campaign,
        order_giver=order_giver,
    )
    for row in await ledger.decision_counts(where, ZONE_NAME):
        day, verdict, shadow, n = row["day"], row["verdict"], bool(row["shadow"]), int(row["n"])
        stats.totals.add(verdict, shadow, n)
        stats.by_day.setdefault(day, Counts()).add(verdict, shadow, n)
        name = row["campaign"]
        stats.by_campaign.setdefault(name, Counts()).add(verdict, shadow, n)
        stats.campaign_order_giver.setdefault(name, row["order_giver"])
        giver = row["order_giver"] or "(unknown campaign)"
        stats.by_order_giver.setdefault(giver, Counts()).add(verdict, shadow, n)
    reasons: dict[str, int] = defaultdict(int)
    for row in await ledger.reason_counts(where, ZONE_NAME):
        stats.reasons_by_day.setdefault(row["day"], {})[row["reason"]] = int(row["n"])
        reasons[row["reason"]] += int(row["n"])
    stats.reasons = {code: reasons[code] for code in sorted(reasons, key=_reason_key)}
    stats.by_campaign = dict(sorted(stats.by_campaign.items(), key=lambda kv: (-kv[1].total, kv[0])))
    stats.by_order_giver = dict(sorted(stats.by_order_giver.items(), key=lambda kv: (-kv[1].total, kv[0])))
    if since <= today <= until:
        stats.today_counts = stats.by_day.get(today, Counts())
    else:
        today_where = DecisionFilter(
            start=day_start(today), end=day_start(today + timedelta(days=1)), campaign=campaign,
            order_giver=order_giver,
        )  # fmt: skip
        for row in await ledger.decision_counts(today_where, ZONE_NAME):
            stats.today_counts.add(row["verdict"], bool(row["shadow"]), int(row["n"]))
    return stats


def reason_sort_key(code: str) -> tuple[int, str]:
    return _reason_key(code)


def _rate(counts: Counts) -> str:
    return f"{100 * counts.block_rate:5.1f} %" if counts.total else "    —  "


def render_text(stats: Stats, width: int = 40) -> str:
    """`pbxguard stats`: the dashboard's numbers for a terminal."""
    days = (stats.until - stats.since).days + 1
    scope = ", ".join(
        f"{label} {value}"
        for label, value in (("campaign", stats.campaign), ("order giver", stats.order_giver))
        if value
    )
    lines = [
        f"pbxguard stats  {stats.since} → {stats.until}  ({days} days, Paris time){'  ' + scope if scope else ''}",
        "",
        f"{'':<24}{'allowed':>10}{'blocked':>10}{'block rate':>12}",
        f"{'today ' + stats.today.isoformat():<24}{stats.today_counts.allowed:>10,}{stats.today_counts.blocked:>10,}"
        f"{_rate(stats.today_counts):>12}",
        f"{f'{days} days':<24}{stats.totals.allowed:>10,}{stats.totals.blocked:>10,}{_rate(stats.totals):>12}",
    ]
    if stats.totals.shadow:
        lines.append(f"  of which let through by shadow mode: {stats.totals.shadow:,}")
    lines += ["", "blocks by reason (a call blocked for two reasons counts under both)"]
    if stats.reasons:
        lines += [f"  {code:<26}{n:>10,}" for code, n in stats.reasons.items()]
    else:
        lines.append("  (none)")
    peak = max((stats.by_day.get(day, Counts()).blocked for day in stats.days), default=0)
    lines += ["", "blocked per day"]
    for day in stats.days:
        counts = stats.by_day.get(day, Counts())
        bar = "#" * (round(width * counts.blocked / peak) if peak else 0)
        lines.append(f"  {day:%a %Y-%m-%d}  {counts.allowed:>7,} allowed {counts.blocked:>7,} blocked  {bar}")
    lines += ["", f"{'per campaign':<24}{'order giver':<24}{'allowed':>10}{'blocked':>10}{'block rate':>12}"]
    for name, counts in stats.by_campaign.items():
        giver = stats.campaign_order_giver.get(name) or "(unknown)"
        lines.append(f"  {name:<22}{giver:<24}{counts.allowed:>10,}{counts.blocked:>10,}{_rate(counts):>12}")
    if not stats.by_campaign:
        lines.append("  (no decision)")
    lines += ["", f"{'per order giver':<48}{'allowed':>10}{'blocked':>10}{'block rate':>12}"]
    for name, counts in stats.by_order_giver.items():
        lines.append(f"  {name:<46}{counts.allowed:>10,}{counts.blocked:>10,}{_rate(counts):>12}")
    if not stats.by_order_giver:
        lines.append("  (no decision)")
    return "\n".join(lines)
