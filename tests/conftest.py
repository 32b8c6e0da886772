"""Shared fixtures: every store-touching test runs on SQLite and on PostgreSQL.

PostgreSQL is the local server at 127.0.0.1:5432 (trust auth, database ``test``), overridable with
``INTEGRATIONS_TEST_DATABASE_URL``. Each test gets a fresh schema, dropped afterwards. Where no
server answers, PostgreSQL tests skip with the reason, unless ``INTEGRATIONS_REQUIRE_POSTGRES=1``
(set by ``.ci/run``), which turns that skip into a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infrastructure.settings import PostgresConfig, Settings

PG_URL = os.environ.get("INTEGRATIONS_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("INTEGRATIONS_REQUIRE_POSTGRES") == "1"
TEST_MASTER_KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="  # base64 of 32 test bytes

_pg_ok = False


def postgres_available() -> tuple[bool, str]:
    """Probe until the first success (a transient failure is not remembered)."""
    global _pg_ok
    if _pg_ok:
        return True, ""
    try:
        import psycopg

        with psycopg.connect(PostgresConfig.from_url(PG_URL).conninfo(), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as e:  # any failure means: no usable server here, now
        return False, f"PostgreSQL not reachable at {PG_URL}: {type(e).__name__}: {e}"
    _pg_ok = True
    return True, ""


def require_postgres() -> None:
    ok, reason = postgres_available()
    if not ok:
        if REQUIRE_PG:
            pytest.fail(f"INTEGRATIONS_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture
def pg_schema() -> Iterator[PostgresConfig]:
    """A fresh, empty schema on the test server; dropped after the test."""
    require_postgres()
    import psycopg

    base = PostgresConfig.from_url(PG_URL)
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(base.conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield PostgresConfig(base.host, base.port, base.dbname, base.user, base.password, schema)
    finally:
        with psycopg.connect(base.conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings for one isolated store on the parametrised backend."""
    base = Settings(
        data_dir=tmp_path / "data",
        master_keys=TEST_MASTER_KEY,
        allow_http_hosts=frozenset({"127.0.0.1", "localhost"}),
        public_url="http://127.0.0.1:8000",
    )
    if backend == "postgres":
        return base.with_(postgres=request.getfixturevalue("pg_schema"))
    return base
