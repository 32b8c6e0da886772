"""The event store's PostgreSQL recorder: one statement per save (ADR 0014).

eventsourcing 9.5.6's ``PostgresApplicationRecorder`` writes a save as a pipeline of six
statements in an explicit transaction: ``BEGIN``, ``SET LOCAL lock_timeout``, ``LOCK TABLE ... IN
EXCLUSIVE MODE``, ``NOTIFY``, the ``INSERT ... RETURNING notification_id``, then a sync and a
``COMMIT``. Each statement costs Python CPU in psycopg, and the two syncs cost two round trips.
Its alternative, ``POSTGRES_ENABLE_DB_FUNCTIONS``, calls one function per save but that function
does not lock the table, so notification ids could commit out of order and a subscriber could
skip an event that commits late.

This recorder calls one function per save that does all of it, the table lock included, in the
statement's own transaction: the same rows, the same ordering guarantee (ids are assigned and
committed in lock order), the same ``NOTIFY`` for the subscriptions, one statement and one round
trip. A unique violation (a concurrent write of the same aggregate version) still surfaces as
eventsourcing's ``IntegrityError`` through the datastore's error mapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.utils import retry
from psycopg.sql import SQL, Composed, Identifier


class OneStatementPostgresApplicationRecorder(PostgresApplicationRecorder):
    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events") -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        function = f"integrations_insert_events_{datastore.originator_id_type}"
        self.check_identifier_length(function)
        self._function = function
        self._with_cache: dict[tuple[str, ...], Composed] = {}
        self._invoke = SQL("SELECT * FROM {schema}.{function}(%s, %s, %s, %s)").format(
            schema=Identifier(datastore.schema), function=Identifier(function)
        )
        # Replaces the library's function (which does not lock the table) in the DDL run at start.
        self.sql_create_statements[self.create_insert_function_statement_index] = SQL(
            "CREATE OR REPLACE FUNCTION {schema}.{function}("
            "ids {id_type}[], versions bigint[], topics text[], states bytea[]) "
            "RETURNS SETOF bigint "
            "LANGUAGE plpgsql "
            "AS $BODY$ "
            "BEGIN "
            "    SET LOCAL lock_timeout = '{lock_timeout}s'; "
            "    LOCK TABLE {schema}.{table} IN EXCLUSIVE MODE; "
            "    NOTIFY {channel}; "
            "    RETURN QUERY "
            "    INSERT INTO {schema}.{table} AS t (originator_id, originator_version, topic, state) "
            "    SELECT * FROM unnest(ids, versions, topics, states) "
            "    RETURNING notification_id; "
            "END; "
            "$BODY$"
        ).format(
            schema=Identifier(datastore.schema),
            function=Identifier(function),
            id_type=Identifier(datastore.originator_id_type),
            lock_timeout=datastore.lock_timeout,
            table=Identifier(self.events_table_name),
            channel=Identifier(self.channel_name),
        )

    accepts_co_writes = True  # commands.service: a vault seal can ride in a save's transaction

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(
        self, stored_events: Sequence[StoredEvent], *, co_writes: Sequence[Any] = (), **kwargs: Any
    ) -> Sequence[int] | None:
        """``co_writes``: ``(common table expressions, params)`` pairs (a new owner's vault seal)
        put in front of the save statement, so they commit with the events or not at all."""
        if not stored_events:
            return []
        # Four plain arrays, not an array of the composite type: psycopg dumps those natively,
        # a composite row by row in Python.
        columns = (
            [e.originator_id for e in stored_events],
            [e.originator_version for e in stored_events],
            [e.topic for e in stored_events],
            [e.state for e in stored_events],
        )
        statement, params = self._invoke, columns
        if co_writes:
            statement, params = (
                self._with(tuple(cte for cte, _ in co_writes)),
                (
                    *(p for _, cte_params in co_writes for p in cte_params),
                    *columns,
                ),
            )
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, params, prepare=True)
            return [row[self._function] for row in curs.fetchall()]

    def _with(self, ctes: tuple[str, ...]) -> Composed:
        """The save statement with ``ctes`` in front: one statement, so one implicit transaction
        (data-modifying CTEs run exactly once, whether or not the main query reads them)."""
        statement = self._with_cache.get(ctes)
        if statement is None:
            statement = self._with_cache[ctes] = SQL("WITH {ctes} {invoke}").format(
                ctes=SQL(", ".join(ctes)),
                invoke=self._invoke,  # type: ignore[arg-type]
            )
        return statement
