"""Map :class:`Settings` to the environment eventsourcing reads (application and projections).

On SQLite every store gets its own file in the data dir: the events, the vault, and one file per
projection (SQLite recorders share one ``tracking`` table per file, so views must not share).
On PostgreSQL everything lives in one schema, prefixed by the application or projection name.
"""

from __future__ import annotations

from infrastructure.settings import Settings

APP_NAME = "integrations"
_RECORDER = "infrastructure.sqlite_recorder:PollingSQLiteApplicationRecorder"
_PG_RECORDER = "infrastructure.pg_recorder:OneStatementPostgresApplicationRecorder"


def _store_keys(settings: Settings, prefix: str, sqlite_file: str, *, pool: tuple[int, int] = (1, 4)) -> dict[str, str]:
    """``pool`` = (connections kept open, extra ones opened under load) on PostgreSQL. Every
    view, runner and application has its own pool, so idle connections add up fast."""
    p = prefix.upper() + "_"
    if settings.postgres is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return {
            p + "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            p + "SQLITE_DBNAME": str(settings.data_dir / sqlite_file),
            p + "SQLITE_LOCK_TIMEOUT": "10",
            p + "CREATE_TABLE": "y",
        }
    pg = settings.postgres
    return {
        p + "PERSISTENCE_MODULE": "eventsourcing.postgres",
        p + "POSTGRES_DBNAME": pg.dbname,
        p + "POSTGRES_HOST": pg.host,
        p + "POSTGRES_PORT": str(pg.port),
        p + "POSTGRES_USER": pg.user,
        p + "POSTGRES_PASSWORD": pg.password,
        p + "POSTGRES_SCHEMA": pg.schema,
        p + "POSTGRES_LOCK_TIMEOUT": "5",
        p + "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": "5",
        p + "POSTGRES_CONNECT_TIMEOUT": "10",
        p + "POSTGRES_POOL_SIZE": str(pool[0]),
        p + "POSTGRES_MAX_OVERFLOW": str(pool[1]),
        p + "POSTGRES_ENABLE_DB_FUNCTIONS": "n",
        p + "CREATE_TABLE": "y",
    }


def application_env(settings: Settings) -> dict[str, str]:
    env = _store_keys(settings, APP_NAME, "events.sqlite", pool=(2, 18))
    recorder = _RECORDER if settings.postgres is None else _PG_RECORDER
    env[APP_NAME.upper() + "_APPLICATION_RECORDER_TOPIC"] = recorder
    return env


def projection_env(settings: Settings, projection_name: str) -> dict[str, str]:
    """What a ``ProjectionRunner`` needs: the application's keys plus the view's own.

    The runner's application instance only reads, and the event store's tables exist by then
    (the server or worker process builds its own application first), so it skips the DDL:
    concurrent ``CREATE OR REPLACE FUNCTION`` from several runners fails on PostgreSQL.
    """
    app = {**application_env(settings), APP_NAME.upper() + "_CREATE_TABLE": "n"}
    return {**app, **_store_keys(settings, projection_name, f"{projection_name}.sqlite")}
