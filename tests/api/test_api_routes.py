"""The HTTP API on a real ledger: every route's happy path, authentication, validation, pagination."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from api_support import AUTH, CALLER_ID, NOW, NUMBER, PARIS, TOKEN, Api, legal_setup

from pbxguard.api.routes import ROUTES, Access
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import CallAttempt, Campaign

pytestmark = pytest.mark.timeout(60)


async def post(api: Api, path: str, body: Any, **kw: Any) -> aiohttp.ClientResponse:
    headers = kw.pop("headers", AUTH)
    return await api.client.post(path, json=body, headers=headers, **kw)


async def error_of(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    payload = await response.json()
    assert set(payload["error"]) == {"code", "message", "field"}
    return dict(payload["error"])


# -- public routes ----------------------------------------------------------------------------------


async def test_health_and_readiness_are_public(api: Api) -> None:
    response = await api.client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "alive"}
    response = await api.client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"ready": True, "checks": {"ledger": True}}
    api.links["ami"] = False
    response = await api.client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["checks"] == {"ledger": True, "ami": False}


# -- authentication -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "route", [r for r in ROUTES if r.access is Access.TOKEN], ids=lambda r: r.operation_id
)
async def test_every_token_route_refuses_a_missing_or_wrong_token(api: Api, route: Any) -> None:
    path = route.path.replace("{id}", "c1").replace("{number}", "%2B33612345678")
    response = await api.client.request(route.method, path, json={})
    error = await error_of(response, 401)
    assert error["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for header in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN, "Bearer "):
        response = await api.client.request(route.method, path, json={}, headers={"Authorization": header})
        assert response.status == 401, header


async def test_without_a_configured_token_writes_and_personal_data_are_refused(tokenless_api: Api) -> None:
    client = tokenless_api.client
    for method, path in (("POST", "/v1/consents"), ("GET", "/v1/decisions"), ("POST", "/v1/check")):
        response = await client.request(method, path, json={}, headers={"Authorization": "Bearer "})
        error = await error_of(response, 403)
        assert error["code"] == "no_token_configured"
    for path in ("/healthz", "/readyz", "/metrics", "/v1/openapi.json"):
        assert (await client.get(path)).status == 200, path


# -- errors ---------------------------------------------------------------------------------------------


async def test_unknown_route_and_wrong_method_are_json(api: Api) -> None:
    error = await error_of(await api.client.get("/v1/nothing-here", headers=AUTH), 404)
    assert error["code"] == "not_found"
    response = await api.client.delete("/v1/campaigns", headers=AUTH)
    error = await error_of(response, 405)
    assert error["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


async def test_malformed_json_is_400(api: Api) -> None:
    for raw in (b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"at": NaN}'):
        response = await api.client.post(
            "/v1/consents", data=raw, headers={**AUTH, "Content-Type": "application/json"}
        )
        error = await error_of(response, 400)
        assert error["code"] == "malformed_json", raw


async def test_wrong_content_type_is_415(api: Api) -> None:
    response = await api.client.post(
        "/v1/consents", data="number=1", headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert (await error_of(response, 415))["code"] == "unsupported_media_type"


async def test_a_body_over_the_limit_is_413(api: Api) -> None:
    big = json.dumps({"numbers": ["0612345678"] * 200_000, "campaign": "c1", "caller_id": CALLER_ID})
    assert len(big) > 2 * 1024 * 1024
    response = await api.client.post(
        "/v1/check/batch", data=big, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert (await error_of(response, 413))["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"order_giver": "ACME"}, "number"),
        ({"number": "0612345678"}, "order_giver"),
        ({"number": "not a number", "order_giver": "ACME"}, "number"),
        ({"number": "0899123456", "order_giver": "ACME"}, "number"),
        ({"number": "0612345678", "order_giver": "ACME", "given_at": "yesterday"}, "given_at"),
        ({"number": "0612345678", "order_giver": "ACME", "off_hours": "yes"}, "off_hours"),
        ({"number": "0612345678", "order_giver": "", "given_at": None}, "order_giver"),
        ({"number": "0612345678", "order_giver": "ACME", "colour": "blue"}, "colour"),
        ({"number": 612345678, "order_giver": "ACME"}, "number"),
        ({"number": "0612345678", "order_giver": "x" * 201}, "order_giver"),
    ],
)
async def test_validation_errors_name_the_field(api: Api, body: dict[str, Any], field: str) -> None:
    await legal_setup(api.ledger)
    error = await error_of(await post(api, "/v1/consents", body), 422)
    assert error["field"] == field
    assert field in error["message"]


async def test_unknown_order_giver_is_422_and_writes_nothing(api: Api) -> None:
    error = await error_of(await post(api, "/v1/consents", {"number": NUMBER, "order_giver": "Nobody"}), 422)
    assert error["field"] == "order_giver"
    assert await api.ledger.consents_count() == 0


# -- campaigns ----------------------------------------------------------------------------------------------


async def test_campaign_routes(api: Api) -> None:
    response = await post(
        api, "/v1/campaigns", {"id": "spring", "order_giver": "ACME Energie", "siren": "552100554"}
    )
    assert response.status == 201
    assert response.headers["Location"] == "/v1/campaigns/spring"
    created = await response.json()
    assert created == {
        "id": "spring", "order_giver": "ACME Energie", "siren": "552100554", "purpose": "b2c_prospecting",
        "sector": "general", "automated": True, "prerecorded": False, "script_id": None,
    }  # fmt: skip
    response = await api.client.put(
        "/v1/campaigns/autumn",
        json={
            "order_giver": "ACME Energie",
            "automated": False,
            "sector": "press",
            "purpose": "contract_service",
        },
        headers=AUTH,
    )
    assert response.status == 200
    assert (await response.json())["automated"] is False
    listed = await (await api.client.get("/v1/campaigns", headers=AUTH)).json()
    assert [c["id"] for c in listed] == ["autumn", "spring"]
    one = await (await api.client.get("/v1/campaigns/autumn", headers=AUTH)).json()
    assert one["sector"] == "press"
    await error_of(await api.client.get("/v1/campaigns/winter", headers=AUTH), 404)
    error = await error_of(
        await post(api, "/v1/campaigns", {"id": "x", "order_giver": "A", "sector": "bogus"}), 422
    )
    assert error["field"] == "sector"
    error = await error_of(
        await post(api, "/v1/campaigns", {"id": "x", "order_giver": "A", "siren": "123"}), 422
    )
    assert error["field"] == "siren"


# -- bookkeeping ---------------------------------------------------------------------------------------------


async def test_caller_id_authorization(api: Api) -> None:
    await api.ledger.add_campaign(Campaign("c1", "ACME"))
    response = await post(api, "/v1/caller-ids/authorizations", {"caller_id": "01 62 12 34 56", "order_giver": "ACME",
                                                                "valid_from": "2026-01-01", "proof": "contract 42"})  # fmt: skip
    assert response.status == 201
    body = await response.json()
    assert (
        body["caller_id"] == "+33162123456" and body["kind"] == "npv" and body["valid_from"] == "2026-01-01"
    )
    error = await error_of(
        await post(api, "/v1/caller-ids/authorizations", {"caller_id": "0612345678", "order_giver": "ACME"}),
        422,
    )
    assert error["field"] == "caller_id"
    error = await error_of(
        await post(api, "/v1/caller-ids/authorizations",
                   {"caller_id": "0162123456", "order_giver": "ACME", "valid_from": "2026-02-01", "valid_until": "2026-01-01"}),
        422,
    )  # fmt: skip
    assert error["field"] == "valid_until"


async def test_consent_add_and_revoke_change_the_decision(api: Api) -> None:
    await legal_setup(api.ledger, number="+33698765432")
    check = {"number": "0612345678", "campaign": "c1", "caller_id": CALLER_ID}
    blocked = await (await post(api, "/v1/check", check)).json()
    assert blocked["reasons"] == ["NO_CONSENT"]
    response = await post(api, "/v1/consents", {"number": "06 12 34 56 78", "order_giver": "ACME",
                                                "given_at": "2026-11-20T09:00:00", "source": "web form",
                                                "proof": "form-1", "wording": "J'accepte", "off_hours": False})  # fmt: skip
    assert response.status == 201
    assert (await response.json())["consumer"] == NUMBER
    allowed = await (await post(api, "/v1/check", check)).json()
    assert allowed["verdict"] == "allow"
    response = await post(api, "/v1/consents/revoke", {"number": NUMBER, "order_giver": "ACME"})
    assert await response.json() == {"revoked": 1, "consumer": NUMBER}
    assert (await (await post(api, "/v1/check", check)).json())["reasons"] == ["NO_CONSENT"]


async def test_contract_refusal_opposition_and_residence(api: Api) -> None:
    await legal_setup(api.ledger)
    check = {"number": NUMBER, "campaign": "c1", "caller_id": CALLER_ID}
    response = await post(api, "/v1/contracts", {"number": NUMBER, "order_giver": "ACME", "until": "2027-06-30",
                                                "reference": "K-1"})  # fmt: skip
    assert response.status == 201 and "contract" in await response.json()
    response = await post(api, "/v1/refusals", {"number": NUMBER, "order_giver": "ACME",
                                               "at": "2026-11-30T11:00:00+01:00", "source": "agent 7"})  # fmt: skip
    assert response.status == 201
    decision = await (await post(api, "/v1/check", check)).json()
    assert decision["reasons"] == ["REFUSAL_QUIET_PERIOD"]
    assert decision["next_allowed_at"] is not None
    response = await post(api, "/v1/oppositions", {"number": NUMBER})
    assert response.status == 201
    assert (await response.json())["order_giver"] is None
    decision = await (await post(api, "/v1/check", check)).json()
    assert decision["reasons"] == ["OPPOSED", "REFUSAL_QUIET_PERIOD"]
    response = await api.client.put("/v1/consumers/%2B33612345678", json={"territory": "re"}, headers=AUTH)
    assert response.status == 200
    assert await response.json() == {"consumer": NUMBER, "territory": "RE", "departement": None}
    decision = await (await post(api, "/v1/check", check)).json()
    assert "RE" in decision["territories"]
    error = await error_of(await api.client.put("/v1/consumers/0899123456", json={}, headers=AUTH), 422)
    assert error["field"] == "number"
    error = await error_of(
        await api.client.put("/v1/consumers/0612345678", json={"departement": "999"}, headers=AUTH), 422
    )
    assert error["field"] == "departement"


async def bloctel_rows(ledger: Ledger) -> int:
    async with ledger.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM pbxguard.bloctel_status"))


async def test_bloctel_import_as_text_and_as_multipart(api: Api) -> None:
    await legal_setup(api.ledger)
    response = await api.client.post(
        "/v1/bloctel/imports?order_giver=ACME&cleaned_at=2026-07-20",
        data="# cleaned\n0612345678\n+33698765432;extra\n\n",
        headers={**AUTH, "Content-Type": "text/plain"},
    )
    assert response.status == 201, await response.text()
    assert await response.json() == {"cleaning": 1, "numbers": 2, "status": "cleared"}
    form = aiohttp.FormData()
    form.add_field("comment", "ignored")
    form.add_field(
        "file", b"0611111111\n0622222222\n", filename="bloctel-0721.txt", content_type="text/plain"
    )
    response = await api.client.post(
        "/v1/bloctel/imports?order_giver=ACME&cleaned_at=2026-07-21&registered=true", data=form, headers=AUTH
    )
    assert response.status == 201, await response.text()
    assert (await response.json())["status"] == "registered"
    assert await bloctel_rows(api.ledger) == 4
    async with api.ledger.pool.acquire() as conn:
        assert (
            await conn.fetchval("SELECT filename FROM pbxguard.bloctel_cleanings WHERE id = 2")
            == "bloctel-0721.txt"
        )


async def test_a_bad_bloctel_line_imports_nothing(api: Api) -> None:
    await legal_setup(api.ledger)
    response = await api.client.post(
        "/v1/bloctel/imports?order_giver=ACME&cleaned_at=2026-07-20",
        data="0612345678\n0698765432\nnot-a-number\n",
        headers={**AUTH, "Content-Type": "text/plain"},
    )
    error = await error_of(response, 422)
    assert error["field"] == "file" and "line 3" in error["message"]
    assert await bloctel_rows(api.ledger) == 0
    error = await error_of(
        await api.client.post("/v1/bloctel/imports?order_giver=ACME", data="0612345678\n",
                              headers={**AUTH, "Content-Type": "text/plain"}),
        422,
    )  # fmt: skip
    assert error["field"] == "cleaned_at"
    response = await api.client.post(
        "/v1/bloctel/imports?order_giver=ACME&cleaned_at=2026-07-20", json=["0612345678"], headers=AUTH
    )
    assert (await error_of(response, 415))["code"] == "unsupported_media_type"


async def test_bloctel_upload_limit(api: Api) -> None:
    await legal_setup(api.ledger)
    api.context.upload_limit = 1000
    response = await api.client.post(
        "/v1/bloctel/imports?order_giver=ACME&cleaned_at=2026-07-20",
        data="0612345678\n" * 200,
        headers={**AUTH, "Content-Type": "text/plain"},
    )
    await error_of(response, 413)
    assert await bloctel_rows(api.ledger) == 0


# -- decisions ------------------------------------------------------------------------------------------------


async def test_check_answers_like_the_cli(api: Api) -> None:
    await legal_setup(api.ledger)
    response = await post(
        api, "/v1/check", {"number": "0612345678", "campaign": "c1", "caller_id": CALLER_ID}
    )
    assert response.status == 200
    decision = await response.json()
    assert set(decision) == {
        "decision", "verdict", "reasons", "rules", "next_allowed_at", "consumer", "territories", "zones", "campaign",
        "order_giver", "caller_id", "gate", "decided_at", "call_key", "shadow", "replayed", "counted",
    }  # fmt: skip
    assert decision["verdict"] == "allow" and decision["gate"] == "http"
    assert decision["decided_at"] == NOW.isoformat()
    assert decision["counted"] is False  # reserve is false by default
    assert await api.ledger.attempts_count(NUMBER, "ACME") == 0
    saturday = {"number": NUMBER, "campaign": "c1", "caller_id": CALLER_ID, "at": "2026-12-05T11:00:00+01:00"}
    decision = await (await post(api, "/v1/check", saturday)).json()
    assert decision["reasons"] == ["WEEKEND"]
    assert decision["rules"] == ["C. conso D223-9 al. 1 (Monday to Friday)"]
    assert decision["next_allowed_at"] == "2026-12-07T09:00:00+00:00"
    error = await error_of(await post(api, "/v1/check", {**saturday, "campaign": "nope"}), 422)
    assert error["field"] == "campaign" and error["code"] == "unknown_campaign"


async def test_check_with_reserve_counts_once_per_call_key(api: Api) -> None:
    await legal_setup(api.ledger)
    body = {"number": NUMBER, "campaign": "c1", "caller_id": CALLER_ID, "reserve": True, "call_key": "crm-1"}
    first = await (await post(api, "/v1/check", body)).json()
    second = await (await post(api, "/v1/check", body)).json()
    assert first["counted"] is True and first["replayed"] is False
    assert second["replayed"] is True and second["decision"] == first["decision"]
    assert await api.ledger.attempts_count(NUMBER, "ACME") == 1
    row = await (await api.client.get(f"/v1/decisions/{first['decision']}", headers=AUTH)).json()
    assert row["id"] == first["decision"] and row["call_key"] == "crm-1" and row["gate"] == "http"


async def test_batch_precheck(api: Api) -> None:
    await legal_setup(api.ledger)
    numbers = ["0612345678", "0698765432", "garbage", "+33612345678"]
    response = await post(
        api, "/v1/check/batch", {"campaign": "c1", "caller_id": CALLER_ID, "numbers": numbers}
    )
    assert response.status == 200
    results = await response.json()
    assert [r["number"] for r in results] == numbers
    assert [r["verdict"] for r in results] == ["allow", "block", "block", "allow"]
    assert results[1]["reasons"] == ["NO_CONSENT"]
    assert results[2]["reasons"] == ["INVALID_DESTINATION"] and results[2]["consumer"] is None
    assert await api.ledger.attempts_count(NUMBER, "ACME") == 0
    evening = await (await post(api, "/v1/check/batch", {"campaign": "c1", "caller_id": CALLER_ID,
                                                        "numbers": ["0612345678"], "at": "2026-12-01T21:00:00+01:00"})).json()  # fmt: skip
    assert evening[0]["reasons"] == ["OUTSIDE_HOURS"]
    assert evening[0]["next_allowed_at"] == "2026-12-02T09:00:00+00:00"
    too_many = {"campaign": "c1", "caller_id": CALLER_ID, "numbers": ["0612345678"] * 10_001}
    assert (await error_of(await post(api, "/v1/check/batch", too_many), 422))["field"] == "numbers"
    bad_item = {"campaign": "c1", "caller_id": CALLER_ID, "numbers": ["0612345678", 42]}
    assert (await error_of(await post(api, "/v1/check/batch", bad_item), 422))["field"] == "numbers[1]"
    empty = {"campaign": "c1", "caller_id": CALLER_ID, "numbers": []}
    assert (await error_of(await post(api, "/v1/check/batch", empty), 422))["field"] == "numbers"


async def test_a_full_batch_of_ten_thousand(api: Api) -> None:
    await legal_setup(api.ledger)
    numbers = [f"06{i:08d}" for i in range(10_000)]
    response = await post(api, "/v1/check/batch", {"campaign": "c1", "caller_id": CALLER_ID, "numbers": numbers},
                          timeout=aiohttp.ClientTimeout(total=50))  # fmt: skip
    results = await response.json()
    assert len(results) == 10_000
    assert sum(r["verdict"] == "block" for r in results) == 10_000  # no consent for any of them


async def journal(api: Api, count: int, campaign: str = "c1") -> list[str]:
    """`count` reserved decisions, one minute apart, alternating two numbers (one without consent)."""
    ids = []
    for i in range(count):
        number = NUMBER if i % 2 == 0 else "+33698765432"
        attempt = CallAttempt(
            number=number, campaign_id=campaign, caller_id=CALLER_ID, gate="ami", call_key=f"{campaign}-{i}"
        )
        decision = await api.guard.decide(attempt, NOW - timedelta(minutes=i), reserve=True)
        ids.append(decision.id)
    return ids


async def test_decisions_listing_filters_and_pagination(api: Api) -> None:
    await legal_setup(api.ledger)
    await api.ledger.add_campaign(Campaign("c2", "Other"))
    ids = await journal(api, 25)
    other = await journal(api, 3, campaign="c2")
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = "limit=10&campaign=c1" + (f"&cursor={cursor}" if cursor else "")
        page = await (await api.client.get(f"/v1/decisions?{query}", headers=AUTH)).json()
        pages += 1
        seen += [row["id"] for row in page["decisions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == ids  # newest first: journal() went back in time
    assert set(other).isdisjoint(seen)

    async def listed(query: str) -> list[dict[str, Any]]:
        response = await api.client.get(f"/v1/decisions?{query}", headers=AUTH)
        assert response.status == 200, await response.text()
        return list((await response.json())["decisions"])

    blocked = await listed("verdict=block&limit=1000&campaign=c1")
    assert blocked and all(r["verdict"] == "block" for r in blocked)
    assert len(blocked) == 12 + 9  # no consent; the frequency cap after 4 allowed calls
    assert all(r["rules"] for r in blocked)
    assert len(await listed("reason=NO_CONSENT&campaign=c1")) == 12
    assert {r["consumer"] for r in await listed("reason=FREQUENCY_CAP")} == {NUMBER}
    assert len(await listed("verdict=allow&campaign=c1")) == 4
    assert len(await listed("number=0612345678&campaign=c1")) == 13
    assert len(await listed("order_giver=Other")) == 3
    frm = (NOW - timedelta(minutes=4)).isoformat()
    to = (NOW - timedelta(minutes=1)).isoformat()
    window = await listed(f"from={frm.replace('+', '%2B')}&to={to.replace('+', '%2B')}&campaign=c1")
    assert [r["id"] for r in window] == ids[2:5]
    assert await listed("from=2027-01-01") == []
    for query, field in (("limit=0", "limit"), ("limit=1001", "limit"), ("verdict=maybe", "verdict"),
                         ("reason=LATE", "reason"), ("cursor=%%%", "cursor"), ("number=12", "number"),
                         ("from=2026-12-02&to=2026-12-01", "to"), ("sort=asc", "sort")):  # fmt: skip
        response = await api.client.get(f"/v1/decisions?{query}", headers=AUTH)
        assert (await error_of(response, 422))["field"] == field, query


async def test_one_decision(api: Api) -> None:
    await legal_setup(api.ledger)
    (ident,) = await journal(api, 1)
    row = await (await api.client.get(f"/v1/decisions/{ident}", headers=AUTH)).json()
    assert (
        row["verdict"] == "allow"
        and row["consumer"] == NUMBER
        and row["decided_at"] == NOW.astimezone(UTC).isoformat()
    )
    assert "seq" in row  # columns of later migrations come along
    await error_of(
        await api.client.get("/v1/decisions/00000000-0000-4000-8000-000000000000", headers=AUTH), 404
    )
    assert (await error_of(await api.client.get("/v1/decisions/nope", headers=AUTH), 422))["field"] == "id"


async def test_stats_route(api: Api) -> None:
    await legal_setup(api.ledger)
    await journal(api, 6)
    stats = await (await api.client.get("/v1/stats?since=2026-11-28", headers=AUTH)).json()
    assert stats["since"] == "2026-11-28" and stats["until"] == NOW.astimezone(PARIS).date().isoformat()
    assert stats["today"] == {"date": "2026-12-01", "allowed": 3, "blocked": 3, "shadow": 0}
    assert stats["totals"] == {"allowed": 3, "blocked": 3, "shadow": 0}
    assert stats["reasons"] == {"NO_CONSENT": 3}
    assert [d["date"] for d in stats["by_day"]] == ["2026-11-28", "2026-11-29", "2026-11-30", "2026-12-01"]
    assert stats["by_campaign"] == [
        {"campaign": "c1", "order_giver": "ACME", "allowed": 3, "blocked": 3, "shadow": 0}
    ]
    empty = await (await api.client.get("/v1/stats?campaign=zzz", headers=AUTH)).json()
    assert empty["totals"] == {"allowed": 0, "blocked": 0, "shadow": 0}
    assert len(empty["by_day"]) == 30


async def test_ledger_down_is_503(api: Api) -> None:
    await api.ledger.close()
    error = await error_of(await post(api, "/v1/consents", {"number": NUMBER, "order_giver": "ACME"}), 503)
    assert error["code"] == "store_unavailable"


async def test_no_ledger_yet_is_503(api: Api) -> None:
    api.context.ledger = lambda: None
    error = await error_of(await api.client.get("/v1/campaigns", headers=AUTH), 503)
    assert error["code"] == "store_unavailable"
    assert (await api.client.get("/metrics")).status == 200


async def test_decided_at_default_is_the_clock(api: Api) -> None:
    await legal_setup(api.ledger)
    api.context.clock = lambda: datetime(2026, 12, 1, 22, 0, tzinfo=PARIS)
    decision = await (
        await post(api, "/v1/check", {"number": NUMBER, "campaign": "c1", "caller_id": CALLER_ID})
    ).json()
    assert decision["reasons"] == ["OUTSIDE_HOURS"]
