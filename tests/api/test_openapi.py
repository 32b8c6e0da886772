"""The OpenAPI document and a schemathesis fuzz of every operation.

SQLite only: the fuzzer exercises the HTTP edge (decoding, validation, routing, error mapping),
which is the same code for both stores; store behaviour is covered on both backends elsewhere.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from api.app import create_app
from tests.api.conftest import ADMIN_TOKEN, Api

README = Path(__file__).resolve().parents[2] / "README.md"
# More for a deeper local run: INTEGRATIONS_FUZZ_EXAMPLES=300 pytest tests/api/test_openapi.py
MAX_EXAMPLES = int(os.environ.get("INTEGRATIONS_FUZZ_EXAMPLES", "20"))
# One test per group of OpenAPI tags, so that pytest-xdist can spread the fuzzing over its workers.
FUZZ_GROUPS = {
    "integrations": {"integrations"},
    "sharing": {"sharing"},
    "users": {"users"},
    "teams-auth-operations": {"teams", "auth", "operations"},
    "connections": {"connections"},
}
# Not fuzzed here: the proxy forwards to the integration's upstream, and its 502/504 answers for an
# unreachable or slow upstream are by design. tests/proxy covers it, with a hypothesis property
# test over generated paths and a corpus of attacks against a recording local upstream.
NOT_FUZZED = {"proxy"}
# Deleting the seeded resources early would turn the rest of the run into 404s: deletes go last.
_METHOD_ORDER = {"GET": 0, "POST": 1, "PUT": 2, "PATCH": 3, "DELETE": 4}


@pytest.fixture
def backend() -> str:
    """Overrides the two-backend parametrisation of tests/conftest.py (see the module docstring)."""
    return "sqlite"


def _readme_routes() -> set[tuple[str, str]]:
    """(METHOD, path with every ``{param}`` as ``{}``) for each route in the README's API table."""
    text = README.read_text(encoding="utf-8")
    table = text.split("## API overview", 1)[1].split("\n## ", 1)[0]
    routes: set[tuple[str, str]] = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        method = None
        for code in re.findall(r"`([^`]+)`", first_cell):
            parts = code.split()
            if len(parts) == 2:
                method, path = parts
            else:  # "`/schema/swagger`" continues the method of the cell's previous route
                path = parts[0]
            assert method is not None, line
            routes.add((method, _normalise(path.split("?", 1)[0])))
    return routes


def _normalise(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path.rstrip("/") or "/")


def test_openapi_document_is_valid_31_and_lists_every_documented_route(api: Api) -> None:
    r = api.client.get("/schema/openapi.json")
    assert r.status_code == 200, r.text
    assert "json" in r.headers["content-type"]
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    errors = [str(e) for e in OPENAPI_31_VALIDATOR.iter_errors(doc)]
    assert not errors, errors[:5]
    assert {"bearer", "session"} <= set(doc["components"]["securitySchemes"])

    documented = {
        (method.upper(), _normalise(path))
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    readme = _readme_routes()
    assert len(readme) >= 30, sorted(readme)  # the table parsed: it has ~35 routes
    schema_routes = {r for r in readme if r[1].startswith("/schema")}
    assert schema_routes == {("GET", "/schema"), ("GET", "/schema/swagger"), ("GET", "/schema/openapi.json")}
    missing = sorted((readme - schema_routes) - documented)
    assert not missing, f"routes in the README's API table but not in the OpenAPI document: {missing}"

    fuzzed = set().union(*FUZZ_GROUPS.values(), NOT_FUZZED)
    unfuzzed = [
        f"{method.upper()} {path}"
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        if method in ("get", "post", "put", "patch", "delete") and not set(operation.get("tags", ())) & fuzzed
    ]
    assert not unfuzzed, f"operations in no FUZZ_GROUPS tag: {unfuzzed}"


def test_schema_ui_pages_are_served_without_auth(api: Api) -> None:
    page = api.client.get("/schema")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "scalar" in page.text.lower()
    swagger = api.client.get("/schema/swagger")
    assert swagger.status_code == 200
    assert swagger.headers["content-type"].startswith("text/html")
    assert "swagger" in swagger.text.lower()
    # no Authorization header anywhere above: the documentation is public
    assert api.client.get("/api/me").status_code == 401


# ------------------------------------------------------------------------------------------ fuzzing


def _seed(api: Api) -> dict[str, str]:
    """Resources for a second pass whose path parameters point at things that exist."""
    api.user("fuzz-user", password="fuzz-password-1")
    api.team("fuzz-team", {"fuzz-user": "admin"})
    integration = api.integration(api.admin, name="Fuzz Target")
    r = api.client.put(
        f"/api/integrations/{integration['id']}/shares/team:fuzz-team", json={"accessLevel": 1}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    r = api.client.post("/api/users/fuzz-user/tokens", json={"label": "fuzz"}, headers=api.admin)
    assert r.status_code == 201, r.text
    return {
        "ident": integration["id"],
        "principal_id": "team:fuzz-team",
        "user_id": "fuzz-user",
        "team_id": "fuzz-team",
        "token_id": r.json()["id"],
    }


def _error_shape(response: Any) -> str | None:
    if not 400 <= response.status_code < 500:
        return None
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} without a JSON body: {response.text[:200]!r}"
    if not isinstance(body, dict) or not {"statusCode", "error", "message"} <= set(body):
        return f"{response.status_code} without the error shape: {str(body)[:200]}"
    if body["statusCode"] != response.status_code:
        return f"statusCode {body['statusCode']} in a {response.status_code} response"
    return None


@pytest.mark.parametrize("group", list(FUZZ_GROUPS))
def test_fuzz_operations_as_admin(api: Api, group: str) -> None:
    """Positive and negative cases for every operation: never a 5xx, every 4xx in the error shape."""
    # The server's runtime is already started by the ``api`` client; this second app over the same
    # services leaves the lifespan to it (schemathesis starts an app's lifespan on first use).
    services = dataclasses.replace(api.runtime.services, on_start=lambda: None, on_stop=lambda: None)
    app = create_app(services)
    schema = schemathesis.openapi.from_asgi("/schema/openapi.json", app)
    schema.validate()
    known = _seed(api)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    operations = [op for op in (r.ok() for r in schema.get_all_operations()) if set(op.tags or ()) & FUZZ_GROUPS[group]]
    operations.sort(key=lambda op: (_METHOD_ORDER.get(op.method.upper(), 9), op.path))
    assert len(operations) >= 6, [f"{op.method} {op.path}" for op in operations]
    failures: list[str] = []
    seen_statuses: dict[int, int] = {}

    def run(operation: Any, mode: GenerationMode, path_parameters: dict[str, str] | None) -> None:
        strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

        @hypothesis_settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def check(case: Any) -> None:
            response = case.call(headers=auth)
            seen_statuses[response.status_code] = seen_statuses.get(response.status_code, 0) + 1
            label = f"{operation.method.upper()} {operation.path} [{mode.value}]"
            try:
                case.validate_response(response, checks=[not_a_server_error])
            except (AssertionError, FailureGroup) as e:  # collected, so that one run reports every 5xx
                failures.append(f"{label}: {str(e).strip()[:400]}\n  {case.as_curl_command()}")
                return
            problem = _error_shape(response)
            if problem:
                failures.append(f"{label}: {problem}\n  {case.as_curl_command()}")

        check()

    for operation in operations:
        params = {p.name for p in operation.path_parameters}
        fixed = {name: known[name] for name in params if name in known}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            # Random path parameters exercise id resolution; invalid bodies and query strings are
            # rejected before it, so the negative mode only runs against resources that exist.
            if not fixed or mode is GenerationMode.POSITIVE:
                run(operation, mode, None)
            if fixed:
                run(operation, mode, fixed)

    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures[:30])
    # A write the read models cannot apply would only show later, as every read waiting for it.
    ready = api.client.get("/ready")
    assert ready.status_code == 200, ready.text
    assert sum(seen_statuses.values()) >= 10 * len(operations), seen_statuses
    assert any(200 <= s < 300 for s in seen_statuses), seen_statuses


# ------------------------------------------------------------------- regressions the fuzzing found


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])  # PostgreSQL is where NUL and int32 broke
def test_input_the_stores_cannot_hold_is_a_400_and_the_read_models_stay_up(api: Api) -> None:
    c, admin = api.client, api.admin
    iid = api.integration(admin)["id"]
    refused = [
        c.get("/api/integrations/we%00ird", headers=admin),  # bare slug: a read-model query
        c.get("/api/integrations", params={"q": "a\x00b"}, headers=admin),
        c.post("/api/integrations", json={"name": "N\x00", "authType": "none"}, headers=admin),
        c.patch(f"/api/integrations/{iid}", json={"description": "d\x00"}, headers=admin),
        c.post("/api/teams", json={"id": "t1", "name": "T\x00"}, headers=admin),
        c.post("/api/users", json={"id": "u1", "custom": {"k": "v\x00"}}, headers=admin),
        c.put(f"/api/integrations/{iid}/shares/admin", json={"accessLevel": 2**31}, headers=admin),
        c.post(
            "/api/users",
            content=b'{"id": "u2", "custom": {"k": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
            headers={**admin, "Content-Type": "application/json"},
        ),
        c.post(
            "/api/users",
            content=b'{"id": "u3", "custom": {"k": ' + b"[" * 40 + b"]" * 40 + b"}}",
            headers={**admin, "Content-Type": "application/json"},
        ),
        c.get("/api/integrations", headers={**admin, "X-Wait-For-Position": str(2**70)}),
    ]
    for r in refused:
        assert r.status_code == 400, (r.request.method, r.request.url, r.status_code, r.text)
        assert _error_shape(r) is None, r.text
    # the escaped text "\\u0000" is not a NUL character, and moderate nesting is fine
    r = c.patch(f"/api/integrations/{iid}", json={"description": "a \\u0000 b"}, headers=admin)
    assert r.status_code == 200 and r.json()["description"] == "a \\u0000 b", r.text
    r = c.post("/api/users", json={"id": "u4", "custom": {"k": [[[{"a": [1]}]]]}}, headers=admin)
    assert r.status_code == 201, r.text
    listed = c.get("/api/integrations", headers=admin)
    assert listed.status_code == 200 and listed.json()["total"] == 1
    assert c.get("/ready").status_code == 200
