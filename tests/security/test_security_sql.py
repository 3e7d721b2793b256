"""Every SQL statement is parameterised.

1. Statically: every `execute`/`fetch*`/`cursor`/`copy_*` call in pbxguard/ passes SQL that is a
   constant, or is built only from constants, in the few places listed (and justified) in
   `BUILT_FROM_CONSTANTS`; values always travel as `$n` parameters.
2. Dynamically: SQL metacharacters (quotes, `;`, `--`, backslashes, `$1`, `%`, `_`, NUL, unicode, a
   DROP TABLE) are fed through every text field of every write of the HTTP API and the CLI, and come
   back verbatim from the database, or are refused cleanly (422, exit 2); the schema is intact after.
"""

from __future__ import annotations

import ast
import asyncio
import csv
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from api_support import Api, make_api

import pbxguard
from pbxguard import cli
from pbxguard.ledger import journal
from pbxguard.ledger.store import DecisionFilter, Ledger

pytestmark = pytest.mark.timeout(120)

PACKAGE = Path(pbxguard.__file__).parent
SQL_METHODS = frozenset({
    "execute", "executemany", "fetch", "fetchrow", "fetchval", "cursor", "prepare",
    "copy_from_query", "copy_records_to_table", "copy_to_table", "copy_from_table",
})  # fmt: skip

# The places whose SQL text is not one literal, and why each is safe. Keyed by (file, function).
BUILT_FROM_CONSTANTS = {
    ("ledger/store.py", "Ledger.list_decisions"):
        "WHERE clauses from DecisionFilter.clauses (constant column names and operators, `$n` "
        "placeholders; values appended to the argument list) and `LIMIT $n`",
    ("ledger/store.py", "Ledger.decision_counts"): "DecisionFilter.clauses, as above",
    ("ledger/store.py", "Ledger.reason_counts"): "DecisionFilter.clauses, as above",
    ("ledger/journal.py", "seal"): "f-string of the module constant _COLUMNS (the chained column names)",
    ("ledger/journal.py", "verify"): "f-string of the module constant _COLUMNS",
    ("ledger/migrate.py", "migrate"):
        "`migration.sql`: the SQL files shipped in pbxguard/ledger/migrations, checksummed, no input",
}  # fmt: skip


def _module_constants(tree: ast.Module) -> dict[str, ast.expr]:
    found: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            found[node.target.id] = node.value
    return found


def _is_literal(node: ast.expr, constants: dict[str, ast.expr]) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.Name) and node.id in constants:
        return isinstance(constants[node.id], ast.Constant) and isinstance(constants[node.id].value, str)  # type: ignore[attr-defined]
    return False


def sql_calls() -> Iterator[tuple[str, str, int, str, bool]]:
    """(file, function, line, source of the SQL argument, is a literal) for every SQL call."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = _module_constants(tree)
        relative = path.relative_to(PACKAGE).as_posix()

        def visit(
            node: ast.AST,
            scope: list[str],
            relative: str = relative,
            constants: dict[str, ast.expr] = constants,
        ) -> Iterator[tuple[str, str, int, str, bool]]:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    yield from visit(child, [*scope, child.name])
                    continue
                if (
                    isinstance(child, ast.Call)
                    and isinstance(child.func, ast.Attribute)
                    and child.func.attr in SQL_METHODS
                    and (child.args or any(k.arg == "query" for k in child.keywords))
                ):
                    sql = (
                        child.args[0]
                        if child.args
                        else next(k.value for k in child.keywords if k.arg == "query")
                    )
                    yield (
                        relative,
                        ".".join(scope),
                        child.lineno,
                        ast.unparse(sql),
                        _is_literal(sql, constants),
                    )
                yield from visit(child, scope)

        yield from visit(tree, [])


def test_sql_is_constant_or_built_from_constants_only() -> None:
    calls = list(sql_calls())
    assert len(calls) > 30, "the scan found too few SQL calls: has the ledger moved?"
    dynamic = [(f, fn, line, src) for f, fn, line, src, literal in calls if not literal]
    unexplained = [d for d in dynamic if (d[0], d[1]) not in BUILT_FROM_CONSTANTS]
    assert not unexplained, "SQL built at run time outside the reviewed places:\n" + "\n".join(
        f"  {f}:{line} in {fn}: {src}" for f, fn, line, src in unexplained
    )
    print(f"\n{len(calls)} SQL calls in pbxguard/: {len(calls) - len(dynamic)} literal, "
          f"{len(dynamic)} built from constants in {len({(d[0], d[1]) for d in dynamic})} reviewed functions")  # fmt: skip


def test_no_sql_is_formatted_with_percent_or_format() -> None:
    """No `%` or `.format()` anywhere near SQL: a string containing SELECT/INSERT/UPDATE/DELETE is never
    the left operand of `%` nor the object of `.format`."""
    keywords = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|WHERE|VALUES)\b")
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
                left = node.left
                assert not (isinstance(left, ast.Constant) and keywords.search(str(left.value))), (
                    f"{path}:{node.lineno}: SQL formatted with %"
                )
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "format"
            ):
                target = node.func.value
                assert not (isinstance(target, ast.Constant) and keywords.search(str(target.value))), (
                    f"{path}:{node.lineno}: SQL formatted with .format()"
                )


def test_the_constant_column_list_is_identifiers_only() -> None:
    assert re.fullmatch(r"[a-z_]+(, [a-z_]+)*", journal._COLUMNS)


PAYLOADS = [
    "O'Brien", 'say "hi"', "a;b", "x -- y", "back\\slash \\'", "$1", "$$ $1 $2 $$", "100%", "_under_score_",
    "%s %(x)s {0}", "'); DROP TABLE pbxguard.attempts; --", '"; DROP SCHEMA pbxguard CASCADE; --',
    "' OR '1'='1", "E'\\x41' || chr(39)", "/* c */ OR 1=1", "Ünïcødé 电话 ☎ 🚀", "\u202eRTL\u200b zero-width",
    "`tick` \\\\0 \\n",
]  # fmt: skip
NUL = "nul\x00byte"


def test_decision_filters_never_put_values_into_sql() -> None:
    evil = "'); DROP TABLE pbxguard.attempts; --"
    when = datetime(2026, 12, 1, tzinfo=UTC)
    where = DecisionFilter(when, when, evil, evil, evil, evil, evil)
    args: list[Any] = []
    clauses = where.clauses(args)
    assert args == [when, when, evil, evil, evil, evil, evil]
    for clause in clauses:
        assert re.fullmatch(r"true|[a-z_]+ (=|>=|<) \$[0-9]+|\$[0-9]+ = ANY \(reasons\)", clause), clause


# -- the database side ------------------------------------------------------------------------------


async def schema(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        """
        SELECT 'column', table_name, column_name, data_type FROM information_schema.columns
         WHERE table_schema = 'pbxguard'
        UNION ALL
        SELECT 'function', p.proname, pg_get_function_identity_arguments(p.oid), ''
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pbxguard'
        UNION ALL
        SELECT 'index', tablename, indexname, '' FROM pg_indexes WHERE schemaname = 'pbxguard'
        ORDER BY 1, 2, 3, 4
        """
    )
    return [tuple(r) for r in rows]


@pytest.fixture
async def api(ledger: Ledger) -> AsyncIterator[Api]:
    made = await make_api(ledger)
    try:
        yield made
    finally:
        await made.client.close()


async def test_metacharacters_through_every_http_write(api: Api, ledger: Ledger) -> None:
    from api_support import AUTH

    pool = ledger.pool
    async with pool.acquire() as conn:
        before = await schema(conn)
    client = api.client
    requests = 0

    async def send(method: str, path: str, expect: int | tuple[int, ...], **kw: Any) -> Any:
        nonlocal requests
        requests += 1
        kw["headers"] = {**AUTH, **kw.get("headers", {})}
        response = await client.request(method, path, **kw)
        body = await response.json()
        expected = (expect,) if isinstance(expect, int) else expect
        assert response.status in expected, (method, path, kw, response.status, body)
        return body

    for n, p in enumerate(PAYLOADS):
        number = f"+336{n:08d}"
        quoted = urllib.parse.quote(p, safe="")
        body = await send("POST", "/v1/campaigns", 201, json={"id": p, "order_giver": p, "script_id": p})
        assert (body["id"], body["order_giver"], body["script_id"]) == (p, p, p)
        row = await pool.fetchrow(
            "SELECT id, order_giver, script_id FROM pbxguard.campaigns WHERE id = $1", p
        )
        assert tuple(row) == (p, p, p)
        # aiohttp's {id} matches [^{}/]+: such ids can be created but not addressed by path (404).
        if not set(p) & set("/{}"):
            assert (await send("GET", f"/v1/campaigns/{quoted}", 200))["order_giver"] == p
            await send("PUT", f"/v1/campaigns/{quoted}", 200, json={"order_giver": p, "script_id": p + "2"})
            assert await pool.fetchval("SELECT script_id FROM pbxguard.campaigns WHERE id = $1", p) == p + "2"
        await send("POST", "/v1/caller-ids/authorizations", 201,
                   json={"caller_id": "0162123456", "order_giver": p, "proof": p, "valid_from": "2026-01-01"})  # fmt: skip
        assert (
            await pool.fetchval(
                "SELECT proof FROM pbxguard.caller_id_authorizations WHERE order_giver = $1", p
            )
            == p
        )
        await send("POST", "/v1/caller-ids/authorizations", 422, json={"caller_id": p, "order_giver": p})
        consent = await send("POST", "/v1/consents", 201, json={
            "number": number, "order_giver": p, "source": p, "proof": p, "wording": p,
            "given_at": "2026-11-01T10:00:00"})  # fmt: skip
        row = await pool.fetchrow(
            "SELECT consumer, order_giver, source, proof, wording FROM pbxguard.consents WHERE id = $1",
            consent["consent"],
        )
        assert tuple(row) == (number, p, p, p, p)
        await send("POST", "/v1/consents", 422, json={"number": p, "order_giver": p})
        contract = await send("POST", "/v1/contracts", 201,
                              json={"number": number, "order_giver": p, "until": "2027-01-01", "reference": p})  # fmt: skip
        assert (
            await pool.fetchval(
                "SELECT reference FROM pbxguard.contracts WHERE id = $1", contract["contract"]
            )
            == p
        )
        refusal = await send(
            "POST", "/v1/refusals", 201, json={"number": number, "order_giver": p, "source": p}
        )
        assert (
            await pool.fetchval("SELECT source FROM pbxguard.refusals WHERE id = $1", refusal["refusal"]) == p
        )
        opposition = await send(
            "POST", "/v1/oppositions", 201, json={"number": number, "order_giver": p, "source": p}
        )
        assert tuple(await pool.fetchrow(
            "SELECT order_giver, source FROM pbxguard.oppositions WHERE id = $1", opposition["opposition"]
        )) == (p, p)  # fmt: skip
        assert (await send("POST", "/v1/consents/revoke", 200, json={"number": number, "order_giver": p}))[
            "revoked"
        ] == 1
        await send("PUT", f"/v1/consumers/{quoted}", (404, 422), json={"territory": "RE"})
        await send("PUT", f"/v1/consumers/{urllib.parse.quote(number)}", 422, json={"territory": p})
        query = urllib.parse.urlencode({"order_giver": p, "cleaned_at": "2026-11-01", "filename": p})
        cleaning = await send("POST", f"/v1/bloctel/imports?{query}", 201, data=f"{number}\n".encode(),
                              headers={**AUTH, "Content-Type": "text/plain"})  # fmt: skip
        assert tuple(await pool.fetchrow(
            "SELECT order_giver, filename FROM pbxguard.bloctel_cleanings WHERE id = $1", cleaning["cleaning"]
        )) == (p, p)  # fmt: skip
        await send("POST", f"/v1/bloctel/imports?{query}", 422, data=f"{number}\n{p}\n".encode(),
                   headers={**AUTH, "Content-Type": "text/plain"})  # fmt: skip
        decision = await send("POST", "/v1/check", 200, json={
            "number": number, "campaign": p, "caller_id": p, "reserve": True, "call_key": p})  # fmt: skip
        row = await pool.fetchrow(
            "SELECT campaign, order_giver, caller_id, call_key FROM pbxguard.decisions WHERE id = $1",
            uuid.UUID(decision["decision"]),
        )
        assert tuple(row) == (p, p, p, p)
        batch = await send(
            "POST", "/v1/check/batch", 200, json={"campaign": p, "caller_id": p, "numbers": [p, number]}
        )
        assert batch[0]["reasons"][0] in ("INVALID_DESTINATION", "CALLER_ID_MISSING", "CALLER_ID_FORBIDDEN")
        listing = await send(
            "GET", "/v1/decisions?" + urllib.parse.urlencode({"campaign": p, "order_giver": p}), 200
        )
        assert [d["call_key"] for d in listing["decisions"]] == [p]
        await send("GET", "/v1/decisions?" + urllib.parse.urlencode({"number": p}), 422)
        stats = await send(
            "GET", "/v1/stats?" + urllib.parse.urlencode({"campaign": p, "order_giver": p}), 200
        )
        assert isinstance(stats, dict)
    # NUL: PostgreSQL text cannot hold it; every field refuses it with a 422, never a 500.
    for field, body in (
        ("id", {"id": NUL, "order_giver": "x"}), ("order_giver", {"id": "x", "order_giver": NUL}),
        ("script_id", {"id": "x", "order_giver": "x", "script_id": NUL}),
    ):  # fmt: skip
        assert (await send("POST", "/v1/campaigns", 422, json=body))["error"]["field"] == field
    p = PAYLOADS[0]
    for path, body in (
        ("/v1/consents", {"number": "+33600000000", "order_giver": p, "source": NUL}),
        ("/v1/consents", {"number": "+33600000000", "order_giver": p, "wording": NUL}),
        (
            "/v1/contracts",
            {"number": "+33600000000", "order_giver": p, "until": "2027-01-01", "reference": NUL},
        ),
        ("/v1/check", {"number": "+33600000000", "campaign": p, "caller_id": NUL, "reserve": True}),
        ("/v1/check", {"number": "+33600000000", "campaign": p, "caller_id": "x", "call_key": NUL}),
        ("/v1/check/batch", {"campaign": p, "caller_id": NUL, "numbers": ["+33600000000"]}),
    ):
        await send("POST", path, 422, json=body)
    async with pool.acquire() as conn:
        assert await schema(conn) == before
        assert await conn.fetchval("SELECT count(*) FROM pbxguard.attempts") >= 0
    print(f"\n{len(PAYLOADS)} payloads (+ NUL) through every HTTP write: {requests} requests, stored verbatim "
          "or refused with 422; schema unchanged")  # fmt: skip


# -- the command line -----------------------------------------------------------------------------------


def run_cli(config: Path, *args: str) -> int:
    try:
        return cli.main(["--config", str(config), *args])
    except SystemExit as exc:  # argparse refusing an argument
        return int(exc.code or 0)


async def test_metacharacters_through_every_cli_write(
    ledger: Ledger, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "pbxguard.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n', encoding="utf-8")
    pool = ledger.pool
    async with pool.acquire() as conn:
        before = await schema(conn)
    commands = 0

    async def run(expect: int | tuple[int, ...], *args: str) -> None:
        nonlocal commands
        commands += 1
        code = await asyncio.to_thread(run_cli, config, *args)
        expected = (expect,) if isinstance(expect, int) else expect
        assert code in expected, (args, code, capsys.readouterr())

    for n, p in enumerate(PAYLOADS):
        number = f"+3364{n:07d}"
        giver = f"--order-giver={p}"
        await run(0, "campaign", "add", f"--script-id={p}", giver, "--siren=552100554", "--", p)
        assert tuple(await pool.fetchrow(
            "SELECT c.id, c.order_giver, c.script_id, o.siren FROM pbxguard.campaigns c"
            " JOIN pbxguard.order_givers o ON o.name = c.order_giver WHERE c.id = $1", p,
        )) == (p, p, p, "552100554")  # fmt: skip
        await run(0, "caller-id", "authorize", "0162123456", giver, f"--proof={p}", "--from=2026-01-01")
        assert (
            await pool.fetchval(
                "SELECT proof FROM pbxguard.caller_id_authorizations WHERE order_giver = $1", p
            )
            == p
        )
        await run(0, "consent", "add", number, giver, f"--source={p}", f"--proof={p}", f"--wording={p}",
                  "--at=2026-11-01T10:00:00")  # fmt: skip
        assert tuple(await pool.fetchrow(
            "SELECT source, proof, wording FROM pbxguard.consents WHERE consumer = $1 AND order_giver = $2", number, p,
        )) == (p, p, p)  # fmt: skip
        csv_file = tmp_path / f"consents-{n}.csv"
        with csv_file.open("w", encoding="utf-8", newline="") as handle:
            csv.writer(handle).writerow([f"+3365{n:07d}", "2026-11-01T10:00:00", p, p, "false"])
        await run(0, "consent", "import", str(csv_file), giver, "--no-progress")
        assert tuple(await pool.fetchrow(
            "SELECT source, proof FROM pbxguard.consents WHERE consumer = $1", f"+3365{n:07d}"
        )) == (p, p)  # fmt: skip
        await run(0, "contract", "add", number, giver, "--until=2027-01-01", f"--reference={p}")
        assert (
            await pool.fetchval("SELECT reference FROM pbxguard.contracts WHERE consumer = $1", number) == p
        )
        await run(0, "refusal", "add", number, giver, f"--source={p}")
        assert await pool.fetchval("SELECT source FROM pbxguard.refusals WHERE consumer = $1", number) == p
        await run(0, "opposition", "add", number, giver, f"--source={p}")
        assert await pool.fetchval("SELECT source FROM pbxguard.oppositions WHERE consumer = $1", number) == p
        bloctel = tmp_path / f"bloctel {p.replace('/', '÷')}.txt"
        bloctel.write_text(f"{number}\n", encoding="utf-8")
        await run(0, "bloctel", "import", str(bloctel), giver, "--cleaned-at=2026-11-01", "--no-progress")
        assert (
            await pool.fetchval("SELECT filename FROM pbxguard.bloctel_cleanings WHERE order_giver = $1", p)
            == bloctel.name
        )
        await run(
            (0, 1), "check", number, f"--campaign={p}", f"--caller-id={p}", "--reserve", f"--call-key={p}"
        )
        assert tuple(await pool.fetchrow(
            "SELECT campaign, caller_id FROM pbxguard.decisions WHERE call_key = $1", p
        )) == (p, p)  # fmt: skip
        await run(0, "stats", f"--campaign={p}", giver)
        await run(
            0,
            "audit",
            "export",
            "--from=2020-01-01",
            "--to=2100-01-01",
            giver,
            f"--output={tmp_path / 'x.csv'}",
        )
        await run(2, "consent", "add", f"--order-giver={p}", "--", p)  # not a number: refused
        await run(2, "consumer", "set", number, f"--territory={p}")
    async with pool.acquire() as conn:
        assert await schema(conn) == before
    with capsys.disabled():
        print(f"\n{len(PAYLOADS)} payloads through every CLI write: {commands} commands, stored verbatim or "
              "refused with exit 2; schema unchanged")  # fmt: skip
