"""OpenAPI 3.1 generated from the routes and the same pydantic models that validate them.

Describe a view with `@api_doc(...)` (stack it under the route decorator):

    @bp.post("")
    @api_doc(summary="Submit a task", request=TaskRequest, responses={202: TaskAccepted}, tags=["tasks"])
    @jwt_required()
    def submit(): ...

`request` is the JSON body model, `query` a model whose fields are query parameters,
`form` a dict of multipart fields (`{"file": "binary"}`), `headers` extra request headers.
`auth` defaults to True; pass `auth=False` for anonymous routes. Every route in the
url map is listed, decorated or not; problem+json error responses are added to each.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, send_from_directory
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from werkzeug.exceptions import NotFound

_ATTR = "_openapi"
_PATH_PARAM = re.compile(r"<(?:(?P<conv>[^:<>]+):)?(?P<name>[^<>]+)>")

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {"type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}}},
        },
    },
    "additionalProperties": True,
}


def api_doc(
    *,
    summary: str,
    request: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    form: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    responses: dict[int, type[BaseModel] | dict[str, Any] | None] | None = None,
    auth: bool = True,
    tags: list[str] | None = None,
    description: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Record how a view is called and what it answers, for /openapi.json."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, _ATTR, {
            "summary": summary, "request": request, "query": query, "form": form, "headers": headers or {},
            "responses": responses or {200: None}, "auth": auth, "tags": tags or [], "description": description,
        })
        return fn

    return wrap


def _error_responses(auth: bool, has_body: bool) -> dict[str, Any]:
    ref = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    out: dict[str, Any] = {
        "404": {"description": "Not found (another user's resource is 404 too)", "content": ref},
        "405": {"description": "Method not allowed", "content": ref},
        "422": {"description": "Validation failed; `errors` names each field", "content": ref},
        "429": {"description": "Rate limit or quota exceeded", "content": ref,
                "headers": {"Retry-After": {"schema": {"type": "string"}}}},
        "503": {"description": "A backing service is unavailable", "content": ref,
                "headers": {"Retry-After": {"schema": {"type": "string"}}}},
        "default": {"description": "Any other error, as problem+json", "content": ref},
    }
    if has_body:
        out["400"] = {"description": "Malformed body", "content": ref}
        out["413"] = {"description": "Body too large", "content": ref}
    if auth:
        out["401"] = {"description": "Missing, invalid, expired or revoked token", "content": ref,
                      "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}}
    return out


def _collect_models(app: Flask) -> list[tuple[type[BaseModel], str]]:
    wanted: list[tuple[type[BaseModel], str]] = []
    for fn in app.view_functions.values():
        meta = getattr(fn, _ATTR, None)
        if not meta:
            continue
        if meta["request"] is not None:
            wanted.append((meta["request"], "validation"))
        for model in meta["responses"].values():
            if isinstance(model, type) and issubclass(model, BaseModel):
                wanted.append((model, "serialization"))
    return list(dict.fromkeys(wanted))


def build_spec(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document for every route registered on `app`."""
    models = _collect_models(app)
    refs, defs = models_json_schema(models, ref_template="#/components/schemas/{model}") if models else ({}, {})
    components: dict[str, Any] = dict(defs.get("$defs", {}))
    components["Problem"] = PROBLEM_SCHEMA

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return refs[(model, mode)]  # type: ignore[index]

    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        fn = app.view_functions[rule.endpoint]
        meta = getattr(fn, _ATTR, None)
        params = []
        for m in _PATH_PARAM.finditer(rule.rule):
            schema = {"type": "integer"} if m.group("conv") == "int" else {"type": "string"}
            params.append({"name": m.group("name"), "in": "path", "required": True, "schema": schema})
        path = _PATH_PARAM.sub(lambda m: "{" + m.group("name") + "}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            op: dict[str, Any] = {"operationId": f"{rule.endpoint}.{method.lower()}"}
            if meta is None:
                op["summary"] = rule.endpoint
                op["responses"] = {"default": {"description": "undocumented response"}}
                paths.setdefault(path, {})[method.lower()] = op
                if params:
                    op["parameters"] = list(params)
                continue
            op["summary"] = meta["summary"]
            if meta["description"]:
                op["description"] = meta["description"]
            if meta["tags"]:
                op["tags"] = meta["tags"]
            op_params = list(params)
            if meta["query"] is not None:
                qschema = meta["query"].model_json_schema()
                required = set(qschema.get("required", []))
                for name, prop in qschema.get("properties", {}).items():
                    prop = {k: v for k, v in prop.items() if k != "title"}
                    op_params.append({"name": name, "in": "query", "required": name in required, "schema": prop})
            for name, desc in meta["headers"].items():
                op_params.append({"name": name, "in": "header", "required": False, "description": desc,
                                  "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                                             "pattern": "^[\\x21-\\x7e]+$"}})
            if op_params:
                op["parameters"] = op_params
            has_body = meta["request"] is not None or meta["form"] is not None
            if meta["request"] is not None:
                op["requestBody"] = {"required": True,
                                     "content": {"application/json": {"schema": ref(meta["request"], "validation")}}}
            elif meta["form"] is not None:
                props = {k: ({"type": "string", "format": "binary"} if v == "binary" else {"type": "string"})
                         for k, v in meta["form"].items()}
                op["requestBody"] = {"required": True, "content": {"multipart/form-data": {
                    "schema": {"type": "object", "required": list(props), "properties": props}}}}
            responses: dict[str, Any] = _error_responses(meta["auth"], has_body)
            for status, model in meta["responses"].items():
                entry: dict[str, Any] = {"description": str(status)}
                if isinstance(model, type) and issubclass(model, BaseModel):
                    entry["content"] = {"application/json": {"schema": ref(model, "serialization")}}
                elif isinstance(model, dict):  # a raw schema; `x-media-type` names a non-JSON body
                    schema = {k: v for k, v in model.items() if k != "x-media-type"}
                    entry["content"] = {model.get("x-media-type", "application/json"): {"schema": schema}}
                responses[str(status)] = entry
            op["responses"] = responses
            if meta["auth"]:
                op["security"] = [{"bearerAuth": []}]
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Marketplace API", "version": "1", "description": "Distributed AI task marketplace."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


bp = Blueprint("openapi", __name__)

_DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Marketplace API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="swagger-ui"><p>Loading the API description from <a href="/openapi.json">/openapi.json</a>&hellip;</p></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});</script>
</body></html>
"""


@bp.get("/openapi.json")
@api_doc(summary="This OpenAPI document", auth=False, responses={200: {"type": "object"}}, tags=["meta"])
def openapi_json():  # type: ignore[no-untyped-def]
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    spec = app.extensions.get("marketplace.openapi")
    if spec is None:  # built once per process: routes do not change after startup
        spec = app.extensions["marketplace.openapi"] = build_spec(app)
    return jsonify(spec)


@bp.get("/docs")
@api_doc(summary="Swagger UI", auth=False, responses={200: None}, tags=["meta"])
def docs():  # type: ignore[no-untyped-def]
    return Response(_DOCS_HTML, mimetype="text/html")


@bp.get("/docs/assets/<path:name>")
@api_doc(summary="Swagger UI assets", auth=False, responses={200: None}, tags=["meta"])
def docs_assets(name: str):  # type: ignore[no-untyped-def]
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # the page still links /openapi.json without the bundle
        raise NotFound("swagger-ui assets are not installed (pip install swagger-ui-bundle-v2)") from None
    return send_from_directory(str(swagger_ui_path), name)
