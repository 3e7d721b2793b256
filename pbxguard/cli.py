"""The `pbxguard` command line.

Exit status: 0 success (or call allowed), 1 call blocked (or no legal window), 2 usage,
configuration or ledger error, with one line on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

from pbxguard import config as config_module
from pbxguard.bulk import ImportLineError, Progress, consent_batches, parse_number_lines
from pbxguard.config import Config, ConfigError
from pbxguard.guard import Guard
from pbxguard.ledger import journal
from pbxguard.ledger.migrate import MigrationError
from pbxguard.ledger.pgcluster import ClusterError
from pbxguard.ledger.store import Ledger, StoreError
from pbxguard.policy.model import (
    TERRITORY_ZONES,
    CallAttempt,
    CallerIdKind,
    Campaign,
    Decision,
    Purpose,
    Sector,
)
from pbxguard.policy.numbers import classify_caller_id, parse_destination
from pbxguard.policy.settings import AuthorizationScope

PARIS = ZoneInfo("Europe/Paris")
EXIT_OK, EXIT_BLOCKED, EXIT_ERROR = 0, 1, 2


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # --json is accepted before or after the subcommand.
        self.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")

    def error(self, message: str) -> NoReturn:
        # One line that always starts "pbxguard: error:", naming the subcommand when there is one.
        where = self.prog.removeprefix("pbxguard").strip()
        sys.stderr.write(f"pbxguard: error: {where + ': ' if where else ''}{message}\n")
        raise SystemExit(EXIT_ERROR)


# -- argument types ------------------------------------------------------------------------------


def number_arg(value: str) -> str:
    destination = parse_destination(value)
    if not destination.valid or destination.e164 is None:
        raise argparse.ArgumentTypeError(f"not a valid French consumer number: {value!r}")
    return destination.e164


def instant_arg(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {value!r} (e.g. 2026-12-01T10:30:00+01:00)"
        ) from None
    # A time without offset is read as French metropolitan time, where operators work.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=PARIS)


def date_arg(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {value!r} (expected YYYY-MM-DD)") from None


def siren_arg(value: str) -> str:
    digits = value.replace(" ", "")
    if len(digits) != 9 or not digits.isdigit():
        raise argparse.ArgumentTypeError(f"a SIREN has 9 digits: {value!r}")
    return digits


def name_arg(value: str) -> str:
    if not value.strip() or len(value) > 200 or any(ord(ch) < 32 for ch in value):
        raise argparse.ArgumentTypeError(f"not a usable name: {value!r}")
    return value.strip()


def territory_arg(value: str) -> str:
    code = value.upper()
    if code not in TERRITORY_ZONES:
        raise argparse.ArgumentTypeError(f"unknown territory {value!r} (one of {', '.join(TERRITORY_ZONES)})")
    return code


def departement_arg(value: str) -> str:
    code = value.upper()
    valid = (len(code) == 2 and (code.isdigit() or code in ("2A", "2B"))) or (
        len(code) == 3 and code.isdigit() and code.startswith("97")
    )
    if not valid:
        raise argparse.ArgumentTypeError(f"not a département code: {value!r} (e.g. 57, 2A, 974)")
    return code


# -- the parser ----------------------------------------------------------------------------------


def build_parser() -> Parser:
    parser = Parser(prog="pbxguard", description="French telemarketing compliance gate for Asterisk.")
    parser.add_argument(
        "--config", help="configuration file (default: $PBXGUARD_CONFIG, /etc/pbxguard/pbxguard.toml)"
    )
    parser.set_defaults(json=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--log-format", choices=("json", "text"), help="override log.format")

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="action", required=True, parser_class=Parser)
    db_sub.add_parser("migrate", help="apply pending migrations")
    db_sub.add_parser("stop", help="stop the embedded PostgreSQL cluster")
    db_sub.add_parser("url", help="print the connection URL of the embedded cluster")

    campaign = sub.add_parser("campaign", help="campaigns and their order givers")
    campaign_sub = campaign.add_subparsers(dest="action", required=True, parser_class=Parser)
    add = campaign_sub.add_parser("add", help="add or update a campaign")
    add.add_argument("id", type=name_arg)
    add.add_argument("--order-giver", required=True, type=name_arg)
    add.add_argument("--siren", type=siren_arg)
    add.add_argument("--purpose", choices=[p.value for p in Purpose], default=Purpose.B2C_PROSPECTING.value)
    add.add_argument("--sector", choices=[s.value for s in Sector], default=Sector.GENERAL.value)
    mode = add.add_mutually_exclusive_group()
    mode.add_argument(
        "--automated",
        dest="automated",
        action="store_true",
        default=True,
        help="predictive, progressive or power dialer (default)",
    )
    mode.add_argument("--manual", dest="automated", action="store_false", help="agents dial by hand")
    add.add_argument("--prerecorded", action="store_true", help="pre-recorded or robot voice (needs consent)")
    add.add_argument("--script-id", type=name_arg)
    campaign_sub.add_parser("list", help="list campaigns")

    cid = sub.add_parser("caller-id", help="caller-ID authorisations")
    cid_sub = cid.add_subparsers(dest="action", required=True, parser_class=Parser)
    auth = cid_sub.add_parser("authorize", help="record that an order giver may present a number")
    auth.add_argument("number")
    auth.add_argument("--order-giver", required=True, type=name_arg)
    auth.add_argument("--from", dest="valid_from", type=date_arg)
    auth.add_argument("--until", type=date_arg)
    auth.add_argument("--proof", type=name_arg)

    consent = sub.add_parser("consent", help="consumers' consents")
    consent_sub = consent.add_subparsers(dest="action", required=True, parser_class=Parser)
    cadd = consent_sub.add_parser("add", help="record a consent")
    cadd.add_argument("number", type=number_arg)
    cadd.add_argument("--order-giver", required=True, type=name_arg)
    cadd.add_argument("--at", type=instant_arg, help="when it was given (default: now)")
    cadd.add_argument("--source", type=name_arg)
    cadd.add_argument("--proof", type=name_arg)
    cadd.add_argument("--wording", type=name_arg)
    cadd.add_argument(
        "--off-hours", action="store_true", help="covers calls outside the legal days and hours"
    )
    crev = consent_sub.add_parser("revoke", help="revoke consents, effective at once")
    crev.add_argument("number", type=number_arg)
    crev.add_argument("--order-giver", required=True, type=name_arg)
    crev.add_argument("--at", type=instant_arg)
    cimp = consent_sub.add_parser(
        "import",
        help="import a CSV file of consents (number,given_at,source,proof,off_hours), whole or not at all",
    )
    cimp.add_argument("file", type=Path)
    cimp.add_argument("--order-giver", required=True, type=name_arg)
    cimp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress on stderr")

    contract = sub.add_parser("contract", help="contracts in progress")
    contract_sub = contract.add_subparsers(dest="action", required=True, parser_class=Parser)
    kadd = contract_sub.add_parser("add", help="record a contract in progress")
    kadd.add_argument("number", type=number_arg)
    kadd.add_argument("--order-giver", required=True, type=name_arg)
    kadd.add_argument("--until", required=True, type=date_arg)
    kadd.add_argument("--reference", type=name_arg)

    refusal = sub.add_parser("refusal", help="refusals during a conversation (60-day quiet period)")
    refusal_sub = refusal.add_subparsers(dest="action", required=True, parser_class=Parser)
    radd = refusal_sub.add_parser("add")
    radd.add_argument("number", type=number_arg)
    radd.add_argument("--order-giver", required=True, type=name_arg)
    radd.add_argument("--at", type=instant_arg)
    radd.add_argument("--source", type=name_arg)

    opposition = sub.add_parser("opposition", help="permanent oppositions")
    opposition_sub = opposition.add_subparsers(dest="action", required=True, parser_class=Parser)
    oadd = opposition_sub.add_parser("add")
    oadd.add_argument("number", type=number_arg)
    oadd.add_argument("--order-giver", type=name_arg, help="default: every order giver")
    oadd.add_argument("--at", type=instant_arg)
    oadd.add_argument("--source", type=name_arg)

    consumer = sub.add_parser("consumer", help="what is known of a consumer's residence")
    consumer_sub = consumer.add_subparsers(dest="action", required=True, parser_class=Parser)
    cset = consumer_sub.add_parser("set")
    cset.add_argument("number", type=number_arg)
    cset.add_argument("--territory", type=territory_arg)
    cset.add_argument("--departement", type=departement_arg)

    bloctel = sub.add_parser("bloctel", help="Bloctel cleanings (regime until 2026-08-10)")
    bloctel_sub = bloctel.add_subparsers(dest="action", required=True, parser_class=Parser)
    bimp = bloctel_sub.add_parser("import", help="import a file Bloctel returned")
    bimp.add_argument("file", type=Path)
    bimp.add_argument("--order-giver", required=True, type=name_arg)
    bimp.add_argument("--cleaned-at", required=True, type=date_arg)
    bimp.add_argument(
        "--registered", action="store_true", help="the file lists numbers Bloctel reported as registered"
    )
    bimp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress on stderr")

    stats = sub.add_parser(
        "stats", help="the dashboard's numbers: calls allowed and blocked, by reason, campaign"
    )
    stats.add_argument("--since", type=date_arg, help="first day, Paris time (default: 29 days before today)")
    stats.add_argument("--until", type=date_arg, help="last day, included (default: today)")
    stats.add_argument("--campaign", type=name_arg)
    stats.add_argument("--order-giver", type=name_arg)

    audit = sub.add_parser("audit", help="the decision journal: verify, export, seal")
    audit_sub = audit.add_subparsers(dest="action", required=True, parser_class=Parser)
    verify = audit_sub.add_parser("verify", help="recompute the hash chain and report the first broken entry")
    verify.add_argument("--from", dest="since", type=instant_arg)
    verify.add_argument("--to", dest="until", type=instant_arg)
    export = audit_sub.add_parser("export", help="write the decisions of a period for an inspection")
    export.add_argument("--from", dest="since", required=True, type=instant_arg)
    export.add_argument("--to", dest="until", required=True, type=instant_arg)
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    export.add_argument("--order-giver", type=name_arg)
    export.add_argument("--output", type=Path, help="file to write (default: standard output)")
    audit_sub.add_parser("seal", help="seal pending decisions now (the daemon does it continuously)")

    check = sub.add_parser("check", help="decide one call")
    check.add_argument("number", type=number_arg)
    check.add_argument("--campaign", required=True)
    check.add_argument("--caller-id", required=True)
    check.add_argument("--at", type=instant_arg, help="time of the call (default: now)")
    check.add_argument("--reserve", action="store_true", help="record the attempt if allowed")
    check.add_argument("--call-key", help="idempotency key (a replay returns the first decision)")

    window = sub.add_parser("next-window", help="the next instant a call to this consumer is legal")
    window.add_argument("number", type=number_arg)
    window.add_argument("--campaign", required=True)
    window.add_argument(
        "--caller-id", default="", help="caller ID to check as well (default: ignore caller ID)"
    )
    window.add_argument("--after", type=instant_arg)
    return parser


# -- commands ------------------------------------------------------------------------------------


def _print(args: argparse.Namespace, payload: Mapping[str, object], text: str) -> None:
    if args.json:
        print(json.dumps(payload, ensure_ascii=False, default=str))
    else:
        print(text)


def _now() -> datetime:
    return datetime.now(UTC)


def _render_decision(decision: Decision) -> str:
    lines = [
        f"{decision.verdict.value.upper()}  {decision.consumer or '(invalid number)'}"
        + (
            f"  territory {'/'.join(decision.territories)}  zone {', '.join(decision.zones)}"
            if decision.territories
            else ""
        ),
    ]
    for reason, rule in zip(decision.reasons, decision.rules, strict=True):
        lines.append(f"  {reason.value:<26} {rule}")
    if decision.next_allowed_at:
        local = ", ".join(
            f"{decision.next_allowed_at.astimezone(ZoneInfo(zone)).isoformat()} {zone}"
            for zone in decision.zones
        )
        lines.append(f"  next allowed: {decision.next_allowed_at.isoformat()} ({local})")
    elif decision.reasons:
        lines.append("  next allowed: never by waiting (a reason that time does not clear)")
    if decision.shadow:
        lines.append("  shadow mode: the call would go through")
    lines.append(
        f"  decision {decision.id}{' (replayed)' if decision.replayed else ''}"
        f"{' (attempt counted)' if decision.counted else ''}"
    )
    return "\n".join(lines)


async def _with_ledger(config: Config, body: Callable[[Ledger], Awaitable[int]]) -> int:
    ledger = await Ledger.connect(
        config.database.url, home=config.database.home or None, min_size=1, max_size=4
    )
    try:
        return await body(ledger)
    finally:
        await ledger.close()


async def _require_campaign(ledger: Ledger, campaign_id: str) -> Campaign:
    campaign = await ledger.campaign(campaign_id)
    if campaign is None:
        raise UsageError(f"unknown campaign {campaign_id!r} (see: pbxguard campaign list)")
    return campaign


async def cmd_check(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    # Bad input is a usage error here; a gate would block the same call with a reason instead.
    await _require_campaign(ledger, args.campaign)
    guard = Guard(ledger, config.policy, config.mode, timeout=config.database.timeout_ms / 1000)
    attempt = CallAttempt(
        number=args.number, campaign_id=args.campaign, caller_id=args.caller_id, gate="cli",
        call_key=args.call_key,
    )  # fmt: skip
    decision = await guard.decide(attempt, args.at or _now(), reserve=args.reserve)
    await guard.flush()
    _print(args, decision.to_json(), _render_decision(decision))
    return EXIT_OK if decision.allowed else EXIT_BLOCKED


async def cmd_next_window(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    await _require_campaign(ledger, args.campaign)
    policy = config.policy
    caller = args.caller_id
    if not caller:
        # Only the consumer side is asked: a free-phone caller ID that needs no authorisation passes
        # every caller-ID rule, so what remains are the consumer's reasons.
        caller = "0800000000"
        policy = dataclasses.replace(policy, caller_id_authorization=AuthorizationScope.NPV)
    guard = Guard(ledger, policy, config.mode, timeout=config.database.timeout_ms / 1000)
    after = args.after or _now()
    attempt = CallAttempt(number=args.number, campaign_id=args.campaign, caller_id=caller, gate="cli")
    decision = await guard.decide(attempt, after, reserve=False)
    at = after if decision.allowed else decision.next_allowed_at
    payload = {
        "consumer": decision.consumer,
        "next_window": at.isoformat() if at else None,
        "blocking_reasons": [r.value for r in decision.reasons] if at is None else [],
        "zones": list(decision.zones),
    }
    if at is None:
        text = "no legal window by waiting: " + ", ".join(r.value for r in decision.reasons)
    else:
        text = at.isoformat() + "".join(
            f"  ({at.astimezone(ZoneInfo(z)).strftime('%a %Y-%m-%d %H:%M')} {z})" for z in decision.zones
        )
    _print(args, payload, text)
    return EXIT_OK if at is not None else EXIT_BLOCKED


async def cmd_campaign(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    if args.action == "add":
        campaign = Campaign(
            id=args.id, order_giver=args.order_giver, purpose=Purpose(args.purpose), sector=Sector(args.sector),
            automated=args.automated, prerecorded=args.prerecorded, order_giver_siren=args.siren,
            script_id=args.script_id,
        )  # fmt: skip
        await ledger.add_campaign(campaign)
        _print(args, {"campaign": campaign.id, "status": "saved"}, f"campaign {campaign.id} saved")
        return EXIT_OK
    campaigns = await ledger.campaigns()
    rows = [
        {"id": c.id, "order_giver": c.order_giver, "siren": c.order_giver_siren, "purpose": c.purpose.value,
         "sector": c.sector.value, "automated": c.automated, "prerecorded": c.prerecorded}
        for c in campaigns
    ]  # fmt: skip
    text = (
        "\n".join(
            f"{r['id']:<20} {r['order_giver']:<24} {r['purpose']:<17} {r['sector']:<23} "
            f"{'automated' if r['automated'] else 'manual'}"
            for r in rows
        )
        or "(no campaigns)"
    )
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
    else:
        print(text)
    return EXIT_OK


async def cmd_caller_id(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    caller = classify_caller_id(args.number)
    if caller.kind in (CallerIdKind.MISSING, CallerIdKind.FORBIDDEN, CallerIdKind.MOBILE) or not caller.e164:
        raise UsageError(f"{args.number!r} cannot be authorised as a caller ID ({caller.kind.value})")
    valid_from = args.valid_from or _now().astimezone(PARIS).date()
    if args.until and args.until < valid_from:
        raise UsageError("--until is before --from")
    ident = await ledger.authorize_caller_id(
        caller.e164, args.order_giver, valid_from, args.until, args.proof
    )
    _print(args, {"authorization": ident, "caller_id": caller.e164, "kind": caller.kind.value},
           f"{caller.e164} ({caller.kind.value}) authorised for {args.order_giver} from {valid_from}"
           + (f" until {args.until}" if args.until else ""))  # fmt: skip
    return EXIT_OK


async def cmd_consent(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    if args.action == "import":
        return await cmd_consent_import(args, ledger)
    at = args.at or _now()
    if args.action == "add":
        ident = await ledger.add_consent(
            args.number, args.order_giver, at, source=args.source, proof=args.proof, wording=args.wording,
            off_hours=args.off_hours,
        )  # fmt: skip
        _print(args, {"consent": ident}, f"consent {ident} recorded for {args.number}")
        return EXIT_OK
    count = await ledger.revoke_consent(args.number, args.order_giver, at)
    _print(args, {"revoked": count}, f"{count} consent(s) revoked for {args.number}")
    return EXIT_OK


async def cmd_simple(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    at = getattr(args, "at", None) or _now()
    if args.command == "contract":
        ident = await ledger.add_contract(args.number, args.order_giver, args.until, args.reference)
        text = f"contract {ident} recorded for {args.number} until {args.until}"
    elif args.command == "refusal":
        ident = await ledger.add_refusal(args.number, args.order_giver, at, args.source)
        text = f"refusal {ident} recorded for {args.number}"
    elif args.command == "opposition":
        ident = await ledger.add_opposition(args.number, args.order_giver, at, args.source)
        text = f"opposition {ident} recorded for {args.number} ({args.order_giver or 'every order giver'})"
    else:
        await ledger.set_residence(args.number, args.territory, args.departement)
        ident = 0
        text = f"residence of {args.number} set"
    _print(args, {"id": ident, "status": "recorded"}, text)
    return EXIT_OK


def read_number_file(path: Path, progress: Progress | None = None) -> list[str]:
    """One number per line (national or E.164); blank lines and # comments skipped."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    with handle, io.TextIOWrapper(handle, encoding="utf-8-sig") as text:

        def lines() -> Iterator[str]:
            for count, line in enumerate(text, 1):
                if progress is not None and count % 50_000 == 0:
                    progress.update(count, handle.tell())
                yield line

        try:
            numbers = parse_number_lines(lines())
        except ImportLineError as exc:
            raise UsageError(f"{path}:{exc.line_no}: {exc.detail}; nothing imported") from None
        except UnicodeDecodeError:
            raise UsageError(f"{path}: not UTF-8 text; nothing imported") from None
    return numbers


def _progress(args: argparse.Namespace, label: str) -> Progress | None:
    if not args.progress:
        return None
    try:
        return Progress(label, args.file.stat().st_size)
    except OSError:
        return Progress(label, None)


async def cmd_consent_import(args: argparse.Namespace, ledger: Ledger) -> int:
    """Streams the CSV into COPY: validated while it is read, one transaction, progress on stderr."""
    progress = _progress(args, "consent import")
    try:
        handle = args.file.open("rb")
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    with handle, io.TextIOWrapper(handle, encoding="utf-8-sig", newline="") as text:
        on_batch = (lambda rows: progress.update(rows, handle.tell())) if progress is not None else None
        try:
            rows = await ledger.import_consents(args.order_giver, consent_batches(text), on_batch)
        except ImportLineError as exc:
            raise UsageError(f"{args.file}:{exc.line_no}: {exc.detail}; nothing imported") from None
        except UnicodeDecodeError:
            raise UsageError(f"{args.file}: not UTF-8 text; nothing imported") from None
    seconds = progress.done(rows) if progress is not None else None
    _print(args, {"consents": rows, "order_giver": args.order_giver, "seconds": seconds},
           f"{rows:,} consents imported for {args.order_giver}")  # fmt: skip
    return EXIT_OK


async def cmd_stats(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    from pbxguard.api import stats as stats_module

    try:
        result = await stats_module.collect(
            ledger, _now(), args.since, args.until, args.campaign, args.order_giver
        )
    except stats_module.PeriodTooLong as exc:
        raise UsageError(str(exc)) from None
    _print(args, result.to_json(), stats_module.render_text(result))
    return EXIT_OK


async def cmd_bloctel(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    progress = _progress(args, "bloctel file")
    numbers = read_number_file(args.file, progress)
    if progress is not None:
        progress.done(len(numbers))
    status = "registered" if args.registered else "cleared"
    ident = await ledger.import_bloctel(numbers, args.order_giver, args.cleaned_at, status, args.file.name)
    _print(args, {"cleaning": ident, "numbers": len(numbers), "status": status},
           f"{len(numbers)} numbers imported as {status} on {args.cleaned_at} (cleaning {ident})")  # fmt: skip
    return EXIT_OK


async def cmd_db(args: argparse.Namespace, config: Config) -> int:
    from pbxguard.ledger.store import embedded_cluster

    if args.action == "migrate":
        ledger = await Ledger.connect(config.database.url, home=config.database.home or None, min_size=1,
                                      max_size=1, run_migrations=False)  # fmt: skip
        try:
            from pbxguard.ledger.migrate import migrate

            async with ledger.pool.acquire() as conn:
                applied = await migrate(conn)
        finally:
            await ledger.close()
        _print(args, {"applied": applied}, "applied: " + (", ".join(applied) or "nothing (up to date)"))
        return EXIT_OK
    if config.database.url:
        raise UsageError("database.url is set: the embedded cluster is not in use")
    cluster = embedded_cluster(config.database.home or None)
    if args.action == "stop":
        await asyncio.to_thread(cluster.stop)
        _print(args, {"stopped": True}, f"embedded PostgreSQL in {cluster.root} stopped")
    else:
        _print(args, {"url": cluster.dsn()}, cluster.dsn())
    return EXIT_OK


async def cmd_audit(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    key = config.journal.key.encode() or None
    async with ledger.pool.acquire() as conn:
        if args.action == "seal":
            total = 0
            while (count := await journal.seal(conn, key)) > 0:
                total += count
            _print(args, {"sealed": total}, f"{total} decision(s) sealed")
            return EXIT_OK
        if args.action == "verify":
            result = await journal.verify(conn, key, args.since, args.until)
            payload = {
                "ok": result.ok,
                "checked": result.checked,
                "first_seq": result.first_seq,
                "last_seq": result.last_seq,
                "problems": result.problems,
                "unsealed": result.unsealed,
            }
            if result.ok:
                text = (
                    f"journal verified: {result.checked} entries"
                    + (f" (seq {result.first_seq}..{result.last_seq})" if result.checked else "")
                    + f", {result.unsealed} not yet sealed"
                )
            else:
                text = "journal NOT intact: " + "; ".join(result.problems)
            _print(args, payload, text)
            return EXIT_OK if result.ok else EXIT_BLOCKED
        if args.until <= args.since:
            raise UsageError("--to must be after --from")
        out = args.output.open("w", encoding="utf-8", newline="") if args.output else sys.stdout
        count = 0
        try:
            batch: list[dict[str, object]] = []
            async for row in journal.export_rows(conn, args.since, args.until, args.order_giver):
                batch.append(row)
                if len(batch) >= 1000:
                    journal.write_rows(batch, out, args.format, header=count == 0)
                    count += len(batch)
                    batch = []
            journal.write_rows(batch, out, args.format, header=count == 0)
            count += len(batch)
        finally:
            if args.output:
                out.close()
        if args.output:
            sys.stderr.write(f"{count} decision(s) written to {args.output}\n")
        return EXIT_OK


LEDGER_COMMANDS: dict[str, Callable[[argparse.Namespace, Config, Ledger], Awaitable[int]]] = {
    "check": cmd_check,
    "next-window": cmd_next_window,
    "campaign": cmd_campaign,
    "caller-id": cmd_caller_id,
    "consent": cmd_consent,
    "contract": cmd_simple,
    "refusal": cmd_simple,
    "opposition": cmd_simple,
    "consumer": cmd_simple,
    "bloctel": cmd_bloctel,
    "stats": cmd_stats,
    "audit": cmd_audit,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_module.load(args.config)
        if args.command == "run":
            from pbxguard.daemon import run_daemon

            return run_daemon(config, log_format=args.log_format)
        if args.command == "db":
            return asyncio.run(cmd_db(args, config))
        command = LEDGER_COMMANDS[args.command]
        return asyncio.run(_with_ledger(config, lambda ledger: command(args, config, ledger)))
    except (ConfigError, UsageError, StoreError, ClusterError, MigrationError) as exc:
        sys.stderr.write(f"pbxguard: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR
    except Exception as exc:  # a ledger constraint or anything unforeseen: one line, never a traceback
        sys.stderr.write(
            f"pbxguard: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
        )
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
