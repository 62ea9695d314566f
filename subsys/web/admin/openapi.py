"""The OpenAPI 3.1 document of the admin API, generated from the route table and its models.

Nothing here is written by hand: paths come from ``routes.ROUTES``, schemas
from the pydantic models in :mod:`subsys.core.admin`. Tests validate real
responses against this document (openapi-core) and fuzz the live API with it
(schemathesis), so it stays true.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from subsys import __version__
from subsys.core import admin as api

__all__ = ["openapi_document"]

_ERRORS = {
    "400": "bad request (a parameter or body that does not validate)",
    "401": "no token, a wrong token, or no token configured on the node",
    "403": "a read token on a mutating route",
    "404": "no such node or topic",
    "409": "conflict: the state does not allow it (not owned, draining, changed meanwhile)",
    "502": "a node that had to act did not answer",
    "504": "it did not happen in time",
}


def openapi_document(routes: list) -> dict[str, Any]:
    """The document for ``routes`` (the route table: method, path, handler, operator, summary,
    request model, response model, query parameters)."""
    models: list[type[BaseModel]] = [api.ErrorResponse, api.Event]
    for _method, _path, _handler, _operator, _summary, request, response, _query in routes:
        models += [m for m in (request, response) if m is not None]
    _keys, schema = models_json_schema(
        [(model, "validation") for model in dict.fromkeys(models)], ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, Any] = {}
    for method, path, _handler, operator, summary, request, response, query in routes:
        operation: dict[str, Any] = {
            "summary": summary,
            "operationId": _operation_id(method, path),
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in re.findall(r"{(\w+)}", path)
            ] + [
                {"name": name, "in": "query", "required": False, "schema": {"type": kind}, "description": text}
                for name, kind, text in query
            ],
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": _ref(response)}}},
                **{
                    status: {"description": text, "content": {"application/json": {"schema": _ref(api.ErrorResponse)}}}
                    for status, text in _ERRORS.items()
                    if status != "403" or operator
                },
            },
            "security": [{"bearer": []}],
        }
        if operator:
            operation["description"] = "Operator role. Audited."
        if request is not None:
            operation["requestBody"] = {
                "required": False,
                "content": {"application/json": {"schema": _ref(request)}},
            }
        paths.setdefault(f"{api.API_PREFIX}{path}", {})[method.lower()] = operation
    paths[f"{api.API_PREFIX}/events"] = {"get": {
        "summary": "Live events: a snapshot, then ownership, presence, node and health changes",
        "operationId": "events",
        "parameters": [{"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "resume after this event id (also: the Last-Event-ID header)"}],
        "responses": {
            "200": {"description": "server-sent events; each data line is an Event",
                    "content": {"text/event-stream": {"schema": _ref(api.Event)}}},
            "401": {"description": _ERRORS["401"], "content": {"application/json": {"schema": _ref(api.ErrorResponse)}}},
        },
        "security": [{"bearer": []}],
    }}  # fmt: skip
    paths[f"{api.API_PREFIX}/openapi.json"] = {"get": {
        "summary": "This document", "operationId": "openapi",
        "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}},
                      "401": {"description": _ERRORS["401"], "content": {"application/json": {"schema": _ref(api.ErrorResponse)}}}},
        "security": [{"bearer": []}],
    }}  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "subsys admin API",
            "version": __version__,
            "description": "Any node answers for the whole cluster. Bearer tokens: read or operator role.",
        },
        "paths": paths,
        "components": {
            "schemas": schema.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation_id(method: str, path: str) -> str:
    words = [w.strip("{}") for w in path.strip("/").split("/")]
    return method.lower() + "_" + "_".join(words)
