"""/openapi.json is generated from the routes and pydantic models; /docs serves Swagger UI locally."""
from __future__ import annotations


def test_openapi_documents_every_route_with_models(app, client):  # type: ignore[no-untyped-def]
    resp = client.get("/openapi.json")
    assert resp.status_code == 200
    spec = resp.get_json()
    assert spec["openapi"].startswith("3.1")
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}").replace("{path:", "{")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in documented, (path, method)
    submit = spec["paths"]["/v1/tasks"]["post"]
    body_ref = submit["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    task_request = spec["components"]["schemas"][body_ref.rsplit("/", 1)[1]]
    # the same pydantic model that validates the body
    assert task_request["properties"]["priority"]["maximum"] == 9
    assert set(task_request["properties"]["device"]["enum"]) == {"any", "cpu", "gpu"}
    assert "202" in submit["responses"] and "422" in submit["responses"]
    assert submit["security"] == [{"bearerAuth": []}]
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in submit["parameters"])
    assert "security" not in spec["paths"]["/v1/auth/login"]["post"]
    listing = {p["name"] for p in spec["paths"]["/v1/tasks"]["get"]["parameters"]}
    assert {"status", "limit", "cursor"} <= listing
    assert "multipart/form-data" in spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]
    assert "/v1/tasks/{task_id}/cancel" in spec["paths"]


def test_docs_serves_swagger_ui_from_the_local_package(client):  # type: ignore[no-untyped-def]
    page = client.get("/docs")
    assert page.status_code == 200 and b"/openapi.json" in page.data and b"swagger-ui-bundle.js" in page.data
    js = client.get("/docs/assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.data) > 100_000
    assert client.get("/docs/assets/../../secret").status_code == 404
