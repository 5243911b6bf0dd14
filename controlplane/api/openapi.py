"""`GET /openapi.json`: every route, its parameters, bodies and answers.

Built from the pydantic models in `schemas.py`, so the documented request shapes are
the ones the handlers validate with. A test compares this document with the routes the
application really has, and schemathesis checks live answers against it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter

from controlplane import __version__
from controlplane.api import schemas as s
from controlplane.api import ui
from controlplane.lbreports import NAME_PATTERN

JSON = "application/json"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _answer(description: str, model: type[BaseModel] | None = None, media: str = JSON) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if model is not None:
        out["content"] = {media: {"schema": _ref(model)}}
    elif media != JSON:
        out["content"] = {media: {"schema": {"type": "string"}}}
    return out


ERRORS = {
    "400": _answer("Malformed request; nothing changed", s.ErrorOut),
    "401": _answer("Missing or bad bearer token", s.ErrorOut),
    "403": _answer("Token may not do this", s.ErrorOut),
    "503": _answer("No decision yet, no quorum, or too many watchers", s.ErrorOut),
}
READ_ERRORS = {k: v for k, v in ERRORS.items() if k in ("400", "401", "503")}
BLOCKING = [
    {
        "name": "index",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 0},
        "description": "Return once the revision is past this one (blocking query)",
    },
    {
        "name": "wait",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(ms|s|m)?$"},
        "description": "How long to block, e.g. 30s, 500ms, 2m (capped)",
    },
]


def _get(
    summary: str,
    model: type[BaseModel] | None,
    params: list[dict[str, Any]] | None = None,
    errors: dict[str, Any] | None = None,
    media: str = JSON,
) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "parameters": params or [],
            "responses": {
                "200": _answer(summary, model, media),
                **(errors if errors is not None else READ_ERRORS),
            },
        }
    }


def build() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        s.ErrorOut,
        s.DecisionOut,
        s.PlanOut,
        s.FeaturesOut,
        s.IntentsOut,
        s.IntentOut,
        s.IntentAccepted,
        s.ClusterOut,
        s.MemberOut,
        s.ObservationsOut,
        s.ObservationOut,
        s.RegionsOut,
        s.RegionOut,
        s.RegionServiceOut,
        s.HistoryOut,
        s.HistoryEntryOut,
        s.HealthOut,
        s.ReadyOut,
        s.WeightsOut,
        s.PlacementOut,
        s.PlanBody,
        s.DeleteIntentBody,
        s.LbReportBody,
        s.LbOut,
        s.LbsOut,
        s.IntentRemoved,
        s.WhoamiOut,
        s.DrillRecordBody,
        s.DrillRecordOut,
        s.DrillRecordsOut,
        s.OfrepRequest,
        s.OfrepEvaluation,
        s.OfrepBulk,
        s.OfrepFailure,
        s.OfrepBulkFailure,
        s.OfrepGeneralError,
    ]
    components: dict[str, Any] = {}
    for model in models:
        schema = s.schema_of(model)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    intent_schema = TypeAdapter(s.IntentBody).json_schema(
        ref_template="#/components/schemas/{model}", by_alias=True
    )
    components.update(intent_schema.pop("$defs", {}))
    components["IntentBody"] = intent_schema

    paths: dict[str, Any] = {
        "/v1/decision": _get("The committed decision", s.DecisionOut, BLOCKING),
        "/v1/features": _get("Which features are on", s.FeaturesOut, BLOCKING),
        "/v1/watch": _get(
            "Server-sent events, one per revision", None, [BLOCKING[0]], media="text/event-stream"
        ),
        "/v1/weights/{service}": {
            "get": {
                "summary": "One service's weights, rendered for a load balancer",
                "parameters": [
                    {"name": "service", "in": "path", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "format",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["json", "haproxy", "nginx", "envoy"]},
                    },
                    *BLOCKING,
                ],
                "responses": {
                    "200": {
                        "description": "Weights (JSON for json and envoy, text for haproxy and nginx)",
                        "content": {
                            JSON: {"schema": {"type": "object"}},
                            "text/plain": {"schema": {"type": "string"}},
                        },
                    },
                    "404": _answer("Unknown service", s.ErrorOut),
                    **READ_ERRORS,
                },
            }
        },
        "/v1/regions": _get("Regions, their capacity, targets and current weights", s.RegionsOut),
        "/v1/observations": _get("Every observer's latest observation", s.ObservationsOut),
        "/v1/history": _get(
            "Decisions and intents, newest first",
            s.HistoryOut,
            [
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1},
                },
                {"name": "before", "in": "query", "required": False, "schema": {"type": "number"}},
            ],
        ),
        "/v1/cluster": _get("Members, leader, term, commit index", s.ClusterOut),
        "/v1/whoami": _get("Who the bearer token acts as: its name and scope", s.WhoamiOut),
        "/v1/intents": {
            **_get("Standing operator intents", s.IntentsOut),
            "post": {
                "summary": "Commit an operator intent",
                "security": [{"bearer": []}],
                "requestBody": {"required": True, "content": {JSON: {"schema": _ref_name("IntentBody")}}},
                "responses": {
                    "201": _answer("Committed; revision is the decision that carries it", s.IntentAccepted),
                    "202": _answer("Committed; its decision is not served here yet", s.IntentAccepted),
                    "404": _answer("Unknown region, service or feature", s.ErrorOut),
                    "409": _answer("Refused by a safety rule", s.ErrorOut),
                    "413": {"description": "Body too large"},
                    **ERRORS,
                },
            },
        },
        "/v1/intents/{intent_id}": {
            "delete": {
                "summary": "Remove one standing intent",
                "security": [{"bearer": []}],
                "parameters": [
                    {"name": "intent_id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "reason", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": _answer("Removed; revision is the decision without it", s.IntentRemoved),
                    "404": _answer("No such standing intent", s.ErrorOut),
                    **ERRORS,
                },
            }
        },
        "/v1/plan": {
            "post": {
                "summary": "What-if: the decision if regions failed, intents were committed "
                "or standing ones removed",
                "requestBody": {"required": True, "content": {JSON: {"schema": _ref(s.PlanBody)}}},
                "responses": {
                    "200": _answer("The planned decision; nothing committed", s.PlanOut),
                    "404": _answer("Unknown name", s.ErrorOut),
                    "413": {"description": "Body too large"},
                    **READ_ERRORS,
                },
            }
        },
        "/v1/lbs": _get("Every load balancer's latest report and state, by name", s.LbsOut),
        "/v1/lbs/{name}": {
            "post": {
                "summary": "A load balancer adapter reports what it applied (scope lb)",
                "security": [{"bearer": []}],
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": NAME_PATTERN},
                    }
                ],
                "requestBody": {"required": True, "content": {JSON: {"schema": _ref(s.LbReportBody)}}},
                "responses": {
                    "200": _answer("Kept; the load balancer as this agent now shows it", s.LbOut),
                    "413": {"description": "Body too large"},
                    "429": _answer("A new name, and this agent keeps reports of 1024 already", s.ErrorOut),
                    **{k: v for k, v in ERRORS.items() if k != "503"},
                },
            }
        },
        **_drill_paths(),
        **_ofrep_paths(),
        "/healthz": _get("The process is alive", s.HealthOut, errors={}),
        "/readyz": {
            "get": {
                "summary": "Has quorum and a committed decision",
                "responses": {
                    "200": _answer("Ready", s.ReadyOut),
                    "503": _answer("Not ready", s.ReadyOut),
                },
            }
        },
        "/metrics": _get("Prometheus metrics", None, errors={}, media="text/plain"),
        "/openapi.json": _get("This document", None, errors={}, media=JSON),
        **ui.openapi_paths(),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "controlplane agent API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _ref_name(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _drill_paths() -> dict[str, Any]:
    """Drill results: recorded by `cpctl drill` when a drill ends, listed by `cpctl drill history`."""
    limit = {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 100},
        "description": "At most this many, newest first (default and most: 100, all that are kept)",
    }
    return {
        "/v1/drills": {
            **_get("Past drills and their RTO, newest first", s.DrillRecordsOut, [limit]),
            "post": {
                "summary": "Record a drill's result (scope operate; who is the token's name)",
                "security": [{"bearer": []}],
                "requestBody": {"required": True, "content": {JSON: {"schema": _ref(s.DrillRecordBody)}}},
                "responses": {
                    "201": _answer("Recorded", s.DrillRecordOut),
                    "200": _answer("Recorded before under this id: the stored record", s.DrillRecordOut),
                    "404": _answer("Unknown region or service", s.ErrorOut),
                    "413": {"description": "Body too large"},
                    **ERRORS,
                },
            },
        }
    }


def _ofrep_paths() -> dict[str, Any]:
    """OFREP's core endpoints, as github.com/open-feature/protocol describes them."""
    body = {"required": False, "content": {JSON: {"schema": _ref(s.OfrepRequest)}}}
    auth = {
        "401": _answer("Missing or bad token (Bearer or X-API-Key)", s.ErrorOut),
        "403": _answer("Token may not read", s.ErrorOut),
        "413": {"description": "Body too large"},
        "503": {
            "description": "No decision committed yet",
            "headers": {"Retry-After": {"schema": {"type": "string"}}},
            "content": {JSON: {"schema": _ref(s.OfrepGeneralError)}},
        },
    }
    etag = {"ETag": {"schema": {"type": "string"}, "description": "Changes with the revision"}}
    return {
        "/ofrep/v1/evaluate/flags/{key}": {
            "post": {
                "summary": "OFREP: evaluate one flag (a feature switch, or shed_fraction)",
                "parameters": [{"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}],
                "requestBody": body,
                "responses": {
                    "200": _answer("The flag's value", s.OfrepEvaluation),
                    "400": _answer("The body or its context is not an object", s.OfrepFailure),
                    "404": _answer("No such flag (FLAG_NOT_FOUND)", s.OfrepFailure),
                    **auth,
                },
            }
        },
        "/ofrep/v1/evaluate/flags": {
            "post": {
                "summary": "OFREP: evaluate every flag; 304 when If-None-Match has the current ETag",
                "parameters": [
                    {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"}}
                ],
                "requestBody": body,
                "responses": {
                    "200": {**_answer("Every flag", s.OfrepBulk), "headers": etag},
                    "304": {"description": "Nothing changed since that ETag", "headers": etag},
                    "400": _answer("The body or its context is not an object", s.OfrepBulkFailure),
                    **auth,
                },
            }
        },
    }
