"""The listing page's query plans on 100,000 integrations (PostgreSQL; 20-60 s, so not in CI).

    .venv/bin/pytest -s bench/listing_plans.py

Generates a synthetic read model straight into the view's tables (2,000 users, 200 teams, 60 % of
the integrations owned by users, 30 % shared 1-3 times, 5 % embedded), then checks that a caller
in 20 teams is served from the covering access sort indexes and touches ``items`` only for the page,
that a superuser's page walks a sort index, and prints EXPLAIN ANALYZE times and p50/p99 of
``view.page``. Plans are asserted; times are printed, not asserted (they depend on the machine).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import psycopg
import pytest
from tests.conftest import pg_schema  # noqa: F401  (the fixture, for a run outside tests/)

from infrastructure.persistence import projection_env
from infrastructure.settings import PostgresConfig, Settings
from projections.runtime import construct_view

pytestmark = [pytest.mark.store]

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega", "orion", "vega", "lyra", "draco", "cygnus", "aquila", "hydra", "pyxis", "sales", "drive", "crm", "ledger", "billing", "support", "wiki", "tickets", "storage", "analytics", "metrics", "payroll", "hr", "finance", "ops", "docs", "mail", "chat", "calendar"]  # fmt: skip
ISO = """'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'"""
GENERATE = f"""
CREATE TEMP TABLE gen AS
SELECT g, md5('i' || g)::uuid::text AS id,
  CASE WHEN random() < 0.6 THEN 'u' || floor(random() * 2000)::int ELSE 'team:t' || floor(random() * 200)::int END AS owner,
  initcap(w[1 + floor(random() * {len(WORDS)})::int]) || ' ' || w[1 + floor(random() * {len(WORDS)})::int] || ' ' || g AS name,
  w[1 + floor(random() * {len(WORDS)})::int] || ' integration for the ' || w[1 + floor(random() * {len(WORDS)})::int] || ' team' AS description,
  (ARRAY['custom','custom','custom','google-drive','onedrive','salesforce','dropbox'])[1 + floor(random() * 7)::int] AS type,
  random() < 0.05 AS embedded,
  to_char((timestamptz '2024-01-01' + g * interval '5 minutes') AT TIME ZONE 'UTC', {ISO}) AS created,
  to_char((timestamptz '2024-01-01' + (g * 5 + floor(random() * 500000)) * interval '1 minute') AT TIME ZONE 'UTC', {ISO}) AS updated
FROM generate_series(1, 100000) g, (SELECT %s::text[] AS w) words;

INSERT INTO {{items}}
SELECT id::uuid, owner, embedded, type IN ('google-drive', 'onedrive', 'sharepoint', 'dropbox'), lower(name),
  lower(description), 'slug-' || g, created, updated, name, description, type, 1 + mod(g, 7),
  jsonb_build_object('id', id, 'owner_id', owner, 'slug', 'slug-' || g, 'secret_fields', '["client_secret"]'::jsonb,
    'created_at', created, 'updated_at', updated, 'version', 1 + mod(g, 7),
    'settings', jsonb_build_object('name', name, 'description', description, 'type', type, 'embedded', embedded,
      'auth_type', 'oauth2', 'mode', 'per-user', 'category', 'storage', 'auth_uri', 'https://auth.example.com/authorize',
      'token_uri', 'https://auth.example.com/token', 'client_id', md5(id), 'scope', 'read write offline_access',
      'api_base_uri', 'https://api.example.com/v1', 'headers', '{{{{}}}}'::jsonb, 'tags', '[]'::jsonb))
FROM gen;
"""
KEYS = "i.embedded, i.supports_upload, i.name_key, i.description_key, i.slug, i.created_at, i.updated_at"
ACCESS = f"""
INSERT INTO {{access}} SELECT i.owner_id, i.integration_id, 3, {KEYS} FROM {{items}} i;
INSERT INTO {{access}}
SELECT DISTINCT ON (s.p, s.id) s.p, s.id::uuid, 1 + floor(random() * 3)::int, {KEYS} FROM (
  SELECT id, CASE WHEN random() < 0.5 THEN 'u' || floor(random() * 2000)::int
                  ELSE 'team:t' || floor(random() * 200)::int END AS p
  FROM gen, generate_series(1, 1 + floor(random() * 3)::int) WHERE mod(g, 10) < 3) s
JOIN {{items}} i ON i.integration_id = s.id::uuid
ON CONFLICT DO NOTHING;
INSERT INTO {{counts}}
SELECT 'all', count(*) FROM {{items}} UNION ALL
SELECT 'listed', count(*) FROM {{items}} WHERE NOT embedded UNION ALL
SELECT 'listed:' || CASE WHEN supports_upload THEN 'True' ELSE 'False' END, count(*) FROM {{items}}
WHERE NOT embedded GROUP BY supports_upload;
"""

USER = ["u0", *(f"team:t{i}" for i in range(20))]  # a user in 20 teams
CASES: list[tuple[str, list[str] | None, dict[str, Any]]] = [
    ("user, by name", USER, {}),
    ("user, -updatedAt", USER, {"sort": "-updatedAt"}),
    ("user, q=orion", USER, {"q": "orion"}),
    ("user, supportsUpload", USER, {"supports_upload": True}),
    ("user, start=3000", USER, {"start": 3000}),
    ("one-team user", ["u1", "team:t150"], {}),
    ("superuser, by name", None, {}),
    ("superuser, -createdAt", None, {"sort": "-createdAt"}),
    ("superuser, start=3000", None, {"start": 3000}),
    ("superuser, q=orion", None, {"q": "orion"}),
]


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += nodes(child)
    return found


def test_listing_page_plans_on_100k_integrations(pg_schema: PostgresConfig) -> None:
    settings = Settings(postgres=pg_schema)
    view = construct_view("listing", projection_env(settings, "listing"))
    try:
        with psycopg.connect(pg_schema.conninfo(), autocommit=True) as conn:
            conn.execute("SELECT setseed(0.42)")
            generate, fill = view.sql(GENERATE).split(";\n\n")
            conn.execute(generate, (WORDS,))
            conn.execute(fill)
            conn.execute(view.sql(ACCESS))
            for table in ("items", "access", "counts"):
                conn.execute(f"VACUUM ANALYZE {view.sql('{' + table + '}')}")
            for label, principal_ids, options in CASES:
                statement, params = view.page_statement(principal_ids, **options)
                [[explained]] = conn.execute(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + view.sql(statement), params
                ).fetchall()
                plan = explained[0]
                scans = {(n["Node Type"], n.get("Index Name") or n.get("Relation Name")) for n in nodes(plan["Plan"])}
                if principal_ids is not None:  # a caller's page: the access sort indexes' entries only
                    access = {(t, r) for t, r in scans if r and r.startswith(f"{view.prefix}_access_by_")}
                    assert access and all(t == "Index Only Scan" for t, _ in access), (label, scans)
                if principal_ids is not None or "q" not in options:  # a superuser's q may scan
                    big = {f"{view.prefix}_items", f"{view.prefix}_access"}
                    assert not any(t == "Seq Scan" and r in big for t, r in scans), (label, json.dumps(plan, indent=1))
                docs, total = view.page(principal_ids, **options)
                times = []
                for _ in range(200):
                    began = time.perf_counter()
                    view.page(principal_ids, **options)
                    times.append((time.perf_counter() - began) * 1000)
                times.sort()
                print(
                    f"{label:24s} total={total:6d} page={len(docs):3d} "
                    f"EXPLAIN ANALYZE {plan['Execution Time']:7.2f} ms  view.page min {times[0]:6.2f} "
                    f"p50 {statistics.median(times):6.2f} p99 {times[197]:6.2f} ms"
                )
    finally:
        view.close()
