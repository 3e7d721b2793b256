"""The OpenAPI 3.1 document, generated from the route table: it cannot drift from what is served."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from pbxguard.api.fields import Field
from pbxguard.api.routes import Access, Route, ref
from pbxguard.policy.model import Reason

_STRING_OR_NULL: dict[str, Any] = {"type": ["string", "null"]}
_TIME_OR_NULL: dict[str, Any] = {"type": ["string", "null"], "format": "date-time"}
_REASONS: dict[str, Any] = {"type": "array", "items": {"type": "string", "enum": [r.value for r in Reason]}}
_COUNTS: dict[str, Any] = {
    "allowed": {"type": "integer"},
    "blocked": {"type": "integer"},
    "shadow": {"type": "integer", "description": "blocked, but let through by shadow mode"},
}


def _object(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    schema.update(extra)
    return schema


SCHEMAS: dict[str, Any] = {
    "Error": _object(
        {
            "error": _object(
                {
                    "code": {"type": "string", "examples": ["invalid", "unauthorized", "not_found"]},
                    "message": {"type": "string"},
                    "field": {**_STRING_OR_NULL, "description": "the offending field, when there is one"},
                },
                ["code", "message", "field"],
            )
        },
        ["error"],
    ),
    "Health": _object({"status": {"type": "string", "const": "alive"}}, ["status"]),
    "Ready": _object(
        {
            "ready": {"type": "boolean"},
            "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
        },
        ["ready", "checks"],
    ),
    "Decision": _object(
        {
            "decision": {"type": "string", "format": "uuid"},
            "verdict": {"type": "string", "enum": ["allow", "block"]},
            "reasons": _REASONS,
            "rules": {
                "type": "array",
                "items": {"type": "string"},
                "description": "legal reference per reason",
            },
            "next_allowed_at": {
                **_TIME_OR_NULL,
                "description": "earliest legal instant when only time blocks",
            },
            "consumer": _STRING_OR_NULL,
            "territories": {"type": "array", "items": {"type": "string"}},
            "zones": {"type": "array", "items": {"type": "string"}},
            "campaign": {"type": "string"},
            "order_giver": _STRING_OR_NULL,
            "caller_id": {"type": "string"},
            "gate": {"type": "string"},
            "decided_at": {"type": "string", "format": "date-time"},
            "call_key": _STRING_OR_NULL,
            "shadow": {"type": "boolean"},
            "replayed": {"type": "boolean"},
            "counted": {"type": "boolean"},
        },
        ["decision", "verdict", "reasons", "rules", "next_allowed_at", "consumer", "campaign", "decided_at"],
    ),
    "BatchItem": _object(
        {
            "number": {"type": "string", "description": "as sent"},
            "consumer": {**_STRING_OR_NULL, "description": "E.164, null when the number is invalid"},
            "verdict": {"type": "string", "enum": ["allow", "block"]},
            "reasons": _REASONS,
            "next_allowed_at": _TIME_OR_NULL,
        },
        ["number", "verdict", "reasons", "next_allowed_at"],
    ),
    "DecisionRow": _object(
        {
            "id": {"type": "string", "format": "uuid"},
            "consumer": {"type": "string"},
            "call_key": _STRING_OR_NULL,
            "decided_at": {"type": "string", "format": "date-time"},
            "gate": {"type": "string"},
            "campaign": {"type": "string"},
            "order_giver": _STRING_OR_NULL,
            "caller_id": {"type": "string"},
            "verdict": {"type": "string", "enum": ["allow", "block"]},
            "reasons": _REASONS,
            "rules": {"type": "array", "items": {"type": "string"}},
            "shadow": {"type": "boolean"},
            "counted": {"type": "boolean"},
            "territories": {"type": "array", "items": {"type": "string"}},
            "zones": {"type": "array", "items": {"type": "string"}},
            "next_allowed_at": _TIME_OR_NULL,
            "outcome": _STRING_OR_NULL,
            "outcome_at": _TIME_OR_NULL,
            "duration_s": {"type": ["integer", "null"]},
            "recorded_at": {"type": "string", "format": "date-time"},
        },
        ["id", "consumer", "decided_at", "campaign", "verdict", "reasons"],
        description="a row of pbxguard.decisions; columns added by later migrations appear as well",
        additionalProperties=True,
    ),
    "DecisionPage": _object(
        {
            "decisions": {"type": "array", "items": ref("DecisionRow")},
            "next_cursor": {
                **_STRING_OR_NULL,
                "description": "pass as `cursor` for the next page; null at the end",
            },
        },
        ["decisions", "next_cursor"],
    ),
    "Stats": _object(
        {
            "since": {"type": "string", "format": "date"},
            "until": {"type": "string", "format": "date"},
            "zone": {"type": "string"},
            "filters": {"type": "object"},
            "today": _object({"date": {"type": "string", "format": "date"}, **_COUNTS}),
            "totals": _object(_COUNTS),
            "by_day": {
                "type": "array",
                "items": _object(
                    {
                        "date": {"type": "string", "format": "date"},
                        **_COUNTS,
                        "reasons": {"type": "object", "additionalProperties": {"type": "integer"}},
                    }
                ),
            },
            "reasons": {"type": "object", "additionalProperties": {"type": "integer"}},
            "by_campaign": {
                "type": "array",
                "items": _object({"campaign": {"type": "string"}, "order_giver": _STRING_OR_NULL, **_COUNTS}),
            },
            "by_order_giver": {
                "type": "array",
                "items": _object({"order_giver": {"type": "string"}, **_COUNTS}),
            },
        },
        ["since", "until", "today", "totals", "by_day", "reasons", "by_campaign", "by_order_giver"],
    ),
    "Campaign": _object(
        {
            "id": {"type": "string"},
            "order_giver": {"type": "string"},
            "siren": _STRING_OR_NULL,
            "purpose": {"type": "string"},
            "sector": {"type": "string"},
            "automated": {"type": "boolean"},
            "prerecorded": {"type": "boolean"},
            "script_id": _STRING_OR_NULL,
        },
        ["id", "order_giver", "purpose", "sector", "automated", "prerecorded"],
    ),
    "Created": _object(
        {},
        description="the new record's id under its kind (consent, contract, refusal, opposition, authorization)",
        additionalProperties=True,
    ),
    "Revoked": _object({"revoked": {"type": "integer"}, "consumer": {"type": "string"}}, ["revoked"]),
    "Residence": _object(
        {"consumer": {"type": "string"}, "territory": _STRING_OR_NULL, "departement": _STRING_OR_NULL},
        ["consumer"],
    ),
    "BloctelImport": _object(
        {
            "cleaning": {"type": "integer"},
            "numbers": {"type": "integer"},
            "status": {"type": "string", "enum": ["cleared", "registered"]},
        },
        ["cleaning", "numbers", "status"],
    ),
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref("Error")}}}


def _parameter(spec: Field, where: str) -> dict[str, Any]:
    param: dict[str, Any] = {"name": spec.name, "in": where, "required": spec.required or where == "path"}
    if spec.description:
        param["description"] = spec.description
    param["schema"] = spec.schema()
    if where == "query" and not spec.required:
        param["allowEmptyValue"] = True  # `?from=&campaign=` (an HTML form's empty fields): absent
    return param


def _body_schema(fields: tuple[Field, ...]) -> dict[str, Any]:
    required = [f.name for f in fields if f.required]
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {f.name: f.schema() for f in fields},
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema


def operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary, "tags": [route.tag]}
    if route.description:
        op["description"] = route.description
    params = [_parameter(f, "path") for f in route.path_params] + [
        _parameter(f, "query") for f in route.query
    ]
    if params:
        op["parameters"] = params
    responses: dict[str, Any] = {}
    for reply in route.replies:
        entry: dict[str, Any] = {"description": reply.description}
        if reply.schema is not None:
            entry["content"] = {reply.content_type: {"schema": reply.schema}}
        responses[str(reply.status)] = entry
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _body_schema(route.body)}},
        }
        responses.setdefault("400", _error("malformed JSON, or not a JSON object"))
        responses.setdefault("408", _error("the body was not received within http.body_timeout_ms"))
        responses.setdefault("413", _error("body larger than 2 MiB"))
        responses.setdefault("415", _error("not application/json"))
    if route.upload:
        op["requestBody"] = {
            "required": True,
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "multipart/form-data": {
                    "schema": _object(
                        {"file": {"type": "string", "contentMediaType": "text/plain"}}, ["file"]
                    )
                },
            },
        }
        responses.setdefault("400", _error("malformed multipart body"))
        responses.setdefault("408", _error("the file was not received within http.body_timeout_ms"))
        responses.setdefault("413", _error("file larger than 64 MiB"))
        responses.setdefault("415", _error("neither text/plain nor multipart/form-data"))
    if route.body is not None or route.upload or route.query or route.path_params:
        responses.setdefault("422", _error("a field is missing or invalid: `field` names it"))
    if route.access is Access.TOKEN:
        op["security"] = [{"bearer": []}]
        responses.setdefault("401", _error("missing or wrong bearer token"))
        responses.setdefault("403", _error("no http.token configured: writes and personal data are disabled"))
        responses.setdefault("503", _error("the ledger is unreachable"))
    elif route.access is Access.DASHBOARD:
        op["security"] = [{"bearer": []}, {"session": []}]
    else:
        op["security"] = []
    op["responses"] = responses
    return op


def _version() -> str:
    try:
        return metadata.version("pbxguard")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def document(routes: tuple[Route, ...]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pbxguard",
            "version": _version(),
            "description": (
                "French telemarketing compliance gate for Asterisk: decisions, the decision journal, and the "
                "facts they rest on (campaigns, caller-ID authorisations, consents, contracts, refusals, "
                "oppositions, Bloctel cleanings). Every route but health, metrics and this document needs "
                '`Authorization: Bearer <http.token>`. Errors are `{"error": {"code", "message", "field"}}`.'
            ),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "[http] token"},
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "pbxguard_session",
                    "description": "set by opening the dashboard once with ?token=",
                },
            },
        },
    }
