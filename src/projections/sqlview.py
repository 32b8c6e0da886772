"""SQL views (materialised read models) written once for PostgreSQL and SQLite.

A view is an eventsourcing ``TrackingRecorder`` subclass (notes §1.8, §2.3). Each read model writes
its SQL once, in PostgreSQL's parameter style (``%s``), with ``{name}`` placeholders for its tables,
indexes and a few dialect tokens; a dialect class expands the placeholders and, for SQLite, turns
``%s`` into ``?``. The read model's module then only declares which dialect a view class uses.

Every change is applied in the transaction that records the tracking position (exactly once). The
position is read first, inside that transaction (locked on PostgreSQL), and events at or before it
are skipped, so a redelivered event, or a batch that overlaps what a runner already applied, is a
no-op rather than a double application. One event and a batch of many take the same path: the
per-event code gets a :class:`Batch` (the transaction's cursor and a memo, so a row read or
written earlier in the batch is not read again, and row writes can wait for the batch's end).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.persistence import Tracking, TrackingRecorder
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from eventsourcing.projection import Projection
from eventsourcing.sqlite import SQLiteDatastore, SQLiteTrackingRecorder
from psycopg.sql import SQL

Row = dict[str, Any]
EventItem = tuple[Any, Tracking]
UNKNOWN: Any = object()  # apply_batch(expected=...): the caller does not know the view's position


class _PositionMoved(Exception):
    """The view's position was not where the writer expected: roll back, take the careful path."""


def iso(ts: datetime) -> str:
    """Fixed-width ISO-8601 in UTC, so timestamps sort as text alike on both backends."""
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def escape_like(text: str) -> str:
    """Make user input literal inside a LIKE pattern (used with ``ESCAPE '\\'``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def upsert(table: str, columns: Sequence[str], key: Sequence[str]) -> str:
    """``INSERT ... ON CONFLICT (key) DO UPDATE`` of every other column (both dialects)."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
    return (
        f"INSERT INTO {{{table}}} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))}) "
        f"ON CONFLICT ({', '.join(key)}) {action}"
    )


class ViewProjection(Projection["ReadModelView"]):
    """A projection whose view applies each event itself (with its tracking, exactly once)."""

    def process_event(self, domain_event: Any, tracking: Any) -> None:
        self.view.apply(domain_event, tracking)


class ReadModelView(TrackingRecorder, ABC):
    """What a projection and the rebuild need from any view."""

    @abstractmethod
    def apply(self, event: Any, tracking: Tracking) -> bool:
        """Apply one event with its tracking position; False if it was already applied."""

    @abstractmethod
    def apply_batch(self, items: list[EventItem], tracking: Tracking | None = None) -> bool:
        """Apply many events in one transaction, tracking ``tracking`` (default: the last item's);
        False if the view was already there."""

    @abstractmethod
    def reset(self, application_name: str) -> None:
        """Empty the view and forget the position (rebuild from the start)."""


@dataclass
class Batch:
    """One transaction: its cursor, rows memoised by key, and the keys of rows to write at its end."""

    cur: Any
    memo: dict[Any, Any] = field(default_factory=dict)
    dirty: dict[Any, None] = field(default_factory=dict)  # ordered set
    counts: Counter[str] = field(default_factory=Counter)


class _Names(dict[str, str]):
    def __init__(self, tokens: Mapping[str, str], name: Callable[[str], str]) -> None:
        super().__init__(tokens)
        self._name = name

    def __missing__(self, key: str) -> str:
        return self._name(key)


class SQLView(ReadModelView, ABC):
    """The dialect-neutral half: statements, the exactly-once apply path, reset, drop, dump."""

    TABLES: ClassVar[Mapping[str, str]] = {}  # logical table name -> ORDER BY for rows()
    JSON_COLUMNS: ClassVar[frozenset[str]] = frozenset()
    DDL: ClassVar[tuple[str, ...]] = ()
    TOKENS: ClassVar[Mapping[str, str]] = {}  # dialect: types and spellings
    datastore: Any

    # --- dialect hooks ---------------------------------------------------------------------

    @abstractmethod
    def _name(self, logical: str) -> str:
        """The SQL identifier of a logical table or index name ("tracking" included)."""

    @abstractmethod
    def _reading(self) -> Any:
        """Context manager giving a cursor for queries."""

    @abstractmethod
    def json_out(self, value: Any) -> Any:
        """A JSON column's value as Python data."""

    @abstractmethod
    def list_param(self, values: Sequence[str]) -> Any:
        """The parameter that ``{any}`` expects for a list of strings."""

    @abstractmethod
    def _apply_event(self, batch: Batch, event: Any) -> None:
        """Apply one event's change in the batch's transaction."""

    def _flush(self, batch: Batch) -> None:
        """Write what the events of the batch left for its end."""

    def _convert(self, sql: str) -> str:
        return sql

    def _pipeline(self, cur: Any) -> Any:
        return nullcontext()

    def ddl(self) -> list[str]:
        return list(self.DDL)

    # --- statements --------------------------------------------------------------------------

    def sql(self, template: str) -> str:
        cache: dict[str, str] = self.__dict__.setdefault("_sql_cache", {})
        statement = cache.get(template)
        if statement is None:
            statement = self._convert(template.format_map(_Names(self.TOKENS, self._name)))
            cache[template] = statement
        return statement

    @staticmethod
    def json_in(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"), sort_keys=True)

    def execute(self, cur: Any, template: str, params: Sequence[Any] = ()) -> None:
        cur.execute(self.sql(template), params)

    def fetch_one(self, cur: Any, template: str, params: Sequence[Any] = ()) -> Row | None:
        cur.execute(self.sql(template), params)
        row = cur.fetchone()
        return None if row is None else dict(row)

    def query(self, template: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._reading() as cur:
            cur.execute(self.sql(template), params)
            return [dict(r) for r in cur.fetchall()]

    def query_one(self, template: str, params: Sequence[Any] = ()) -> Row | None:
        rows = self.query(template, params)
        return rows[0] if rows else None

    # --- writes ------------------------------------------------------------------------------

    def apply(self, event: Any, tracking: Tracking) -> bool:
        return self.apply_batch([(event, tracking)])

    def apply_batch(self, items: list[EventItem], tracking: Tracking | None = None, *, expected: Any = UNKNOWN) -> bool:
        """Apply the events newer than the view's position and record ``tracking``, in one transaction.

        ``tracking`` defaults to the last item's. A runner passes the last notification it has seen,
        which may be an event of other topics after the last item: the position then also passes
        stretches of the log that hold nothing for this view (with no items, only the position
        moves). False if the view was already at or past ``tracking``.

        ``expected`` is the position the caller believes the view is at (None: no position yet),
        when it is the view's only writer. The transaction then starts writing at once and moves
        the position only from ``expected``, checked as its last statement; if it was elsewhere
        (another writer, a reset), the transaction rolls back and the batch takes the careful
        path: read (and lock) the position first, and apply only what is newer.
        """
        target = tracking if tracking is not None else (items[-1][1] if items else None)
        if target is None:
            return False
        if items and items[-1][1].notification_id > target.notification_id:
            raise ValueError("the tracking position to record is before the batch's last event")
        if (
            expected is not UNKNOWN
            and (expected is None or expected < target.notification_id)
            and self.datastore.single_row_tracking
        ):
            try:
                self._apply_from(items, target, expected)
                return True
            except _PositionMoved:
                pass
        with self.datastore.transaction(commit=True) as cur:
            with self._pipeline(cur):
                self._begin_write(cur)
                row = self.fetch_one(
                    cur,
                    "SELECT notification_id FROM {tracking} WHERE application_name = %s{for_update}",
                    (target.application_name,),
                )
            position = None if row is None else row["notification_id"]
            if position is not None and target.notification_id <= position:
                return False
            fresh = [(e, t) for e, t in items if position is None or t.notification_id > position]
            if fresh:
                batch = Batch(cur)
                with self._pipeline(cur):
                    for event, _ in fresh:
                        self._apply_event(batch, event)
                    self._flush(batch)
            # After the pipeline: the tracking insert reads its RETURNING row, and inside a long
            # pipeline that fetch can meet another statement's result ("didn't produce records").
            self._insert_tracking(cur, target)
        return True

    def _apply_from(self, items: list[EventItem], target: Tracking, expected: int | None) -> None:
        """One transaction: the events after ``expected``, then the position from ``expected`` to
        ``target`` (raises :class:`_PositionMoved`, rolling all back, if it was not there)."""
        fresh = [(e, t) for e, t in items if expected is None or t.notification_id > expected]
        with self._writing() as cur:  # pipelined already, where the dialect pipelines
            self._begin_write(cur)
            if fresh:
                batch = Batch(cur)
                for event, _ in fresh:
                    self._apply_event(batch, event)
                self._flush(batch)
            # Its own cursor: a fetch on the pipeline's shared one could read another statement's result.
            guard = self._cursor(cur)
            if expected is None:
                guard.execute(
                    self.sql(
                        "INSERT INTO {tracking} (application_name, notification_id) VALUES (%s, %s) "
                        "ON CONFLICT (application_name) DO NOTHING RETURNING notification_id"
                    ),
                    (target.application_name, target.notification_id),
                )
            else:
                guard.execute(
                    self.sql(
                        "UPDATE {tracking} SET notification_id = %s "
                        "WHERE application_name = %s AND notification_id = %s RETURNING notification_id"
                    ),
                    (target.notification_id, target.application_name, expected),
                )
            if guard.fetchone() is None:
                raise _PositionMoved

    def _writing(self) -> Any:
        """A write transaction (committed on a clean exit), giving its cursor."""
        return self.datastore.transaction(commit=True)

    def _cursor(self, cur: Any) -> Any:
        """Another cursor in ``cur``'s transaction."""
        return cur

    def advance(self, tracking: Tracking, *, expected: Any = UNKNOWN) -> bool:
        """Record ``tracking`` as the position without applying anything (nothing before it is
        for this view); False if the view was already there."""
        return self.apply_batch([], tracking, expected=expected)

    def _begin_write(self, cur: Any) -> None:
        """First statement of an apply transaction (a dialect's transaction settings)."""

    def reset(self, application_name: str) -> None:
        with self.datastore.transaction(commit=True) as cur:
            for table in self.TABLES:
                self.execute(cur, f"DELETE FROM {{{table}}}")
            self.execute(cur, "DELETE FROM {tracking} WHERE application_name = %s", (application_name,))

    def optimize(self) -> None:
        """Refresh the planner's statistics (after a bulk rebuild)."""
        with self.datastore.transaction(commit=True) as cur:
            for table in self.TABLES:
                self.execute(cur, f"ANALYZE {{{table}}}")

    def drop(self) -> None:
        """Remove this view's tables, its tracking included, and close it."""
        with self.datastore.transaction(commit=True) as cur:
            for table in (*self.TABLES, "tracking"):
                self.execute(cur, f"DROP TABLE IF EXISTS {{{table}}}")
        self.close()

    def close(self) -> None:
        self.datastore.close()

    # --- inspection --------------------------------------------------------------------------

    def rows(self) -> dict[str, list[Row]]:
        """Every row of every table in key order: for comparing two builds of a read model."""
        dump = {}
        for table, order in self.TABLES.items():
            rows = self.query(f"SELECT * FROM {{{table}}} ORDER BY {order}")
            for row in rows:
                for column, value in row.items():
                    if isinstance(value, UUID):
                        row[column] = str(value)
                for column in self.JSON_COLUMNS.intersection(row):
                    row[column] = self.json_out(row[column])
            dump[table] = rows
        return dump


class PostgresView(SQLView, PostgresTrackingRecorder):
    """Tables ``<projection name>_<table>`` in the configured schema, beside ``_tracking``."""

    TOKENS: ClassVar[Mapping[str, str]] = {
        "json": "jsonb",
        "bool": "boolean",
        "key": 'text COLLATE "C"',
        "uuid": "uuid",  # 16 bytes; sorts like its text form
        "any": "= ANY(%s)",
        "for_update": " FOR UPDATE",
    }
    datastore: PostgresDatastore

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        self.prefix = self.tracking_table_name.removesuffix("_tracking")
        self.sql_create_statements.extend(SQL(self.sql(statement)) for statement in self.ddl())  # type: ignore[arg-type]

    def _name(self, logical: str) -> str:
        name = f"{self.prefix}_{logical}"
        self.check_identifier_length(name)
        quoted = quote_ident(name)
        if logical in self.TABLES or logical == "tracking":
            return f"{quote_ident(self.datastore.schema)}.{quoted}"
        return quoted  # an index: created in its table's schema

    def _pipeline(self, cur: Any) -> Any:
        # Writes are sent without waiting for each result; a read (fetch) syncs.
        return cur.connection.pipeline()

    @contextmanager
    def _writing(self) -> Iterator[Any]:
        # The pipeline first, so that BEGIN, the statements, the position check and COMMIT go out
        # together: two round trips (the check's result, then the commit's) rather than one each.
        with self.datastore.get_connection() as conn, conn.pipeline(), conn.transaction():
            yield conn.cursor()

    def _cursor(self, cur: Any) -> Any:
        return cur.connection.cursor()

    def _begin_write(self, cur: Any) -> None:
        # A view is derived data, and its rows and tracking position commit together: a crash
        # may lose the last few milliseconds of view transactions, never half of one, and the
        # runner then re-applies those events from the older position (ADR 0011). So the commit
        # need not wait for the WAL flush, which would also queue behind the event store's.
        cur.execute("SET LOCAL synchronous_commit = off")

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        # Autocommit: one statement is one snapshot, with no BEGIN/ROLLBACK round trips.
        with self.datastore.get_connection() as conn, conn.cursor() as cur:
            yield cur

    def json_out(self, value: Any) -> Any:
        return value  # psycopg decodes json/jsonb

    def list_param(self, values: Sequence[str]) -> Any:
        return list(values)

    def extension_schema(self, extension: str) -> str | None:
        """The schema of an installed extension, or None."""
        with self.datastore.get_connection() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                "WHERE e.extname = %s",
                (extension,),
            )
            row = cur.fetchone()
        return None if row is None else row["nspname"]


class SQLiteView(SQLView, SQLiteTrackingRecorder):
    """One view per database file (the ``tracking`` table is per file): plain table names."""

    TOKENS: ClassVar[Mapping[str, str]] = {
        "json": "TEXT",
        "bool": "INTEGER",
        "key": "TEXT",
        "uuid": "TEXT",
        "any": "IN (SELECT value FROM json_each(%s))",
        "for_update": "",  # SQLite serialises writers
    }
    datastore: SQLiteDatastore

    def construct_create_table_statements(self) -> list[str]:
        return [*super().construct_create_table_statements(), *(self.sql(s) for s in self.ddl())]

    def _name(self, logical: str) -> str:
        return logical

    def _convert(self, sql: str) -> str:
        return sql.replace("%s", "?")

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        with self.datastore.transaction(commit=False) as cur:
            yield cur

    def json_out(self, value: Any) -> Any:
        return None if value is None else json.loads(value)

    def list_param(self, values: Sequence[str]) -> Any:
        return json.dumps(list(values))

    def drop(self) -> None:
        db_name = self.datastore.pool.db_name
        super().drop()
        if not self.datastore.pool.is_sqlite_memory_mode:
            for suffix in ("", "-wal", "-shm"):
                with suppress(FileNotFoundError):
                    os.remove(db_name + suffix)


def quote_ident(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
