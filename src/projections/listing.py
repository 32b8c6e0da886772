"""The permission-filtered integration listing (``GET /api/integrations``, ``-list``, bare slugs).

``items`` holds one row per integration with the columns the listing filters and sorts on, and
``doc``, what the API renders. ``access`` holds who may see it: the owner with level 3 and each
share with its level. Each access row also repeats the item's filter and sort columns (rewritten
with the item in the same transaction; the description only as its first ``DESCRIPTION_PREFIX``
characters, since it is in btree indexes), with one index per sort column, ``(principal_id, key,
integration_id)`` over the listed rows, covering the filter columns.

A caller's page (the user and ``team:<id>`` for each team) is a merge of one index range per
principal in the page's order, each cut at ``start + limit`` rows: an item reached through several
principals has the same key on each of its rows, so its copies arrive together and DISTINCT drops
them, and each principal's first ``start + limit`` rows hold every item the page can need. Only
the page's 50 rows touch ``items``. q filters the index rows (LIKE on the case-folded name and the
description prefix; ``items`` only for descriptions long enough to have been cut).

The total (count of distinct visible items) reads every visible index row, so it is remembered:
per view, per (principal set, q, supportsUpload), with the view's tracking position it was counted
at. Each page statement also reads the position, in the same snapshot; every change of the view
advances the position in the transaction that makes it (``apply_batch``; ``reset`` moves it back,
and replaying the same events to the same position rebuilds the same rows), so an equal position
means the rows the total was counted on, and the remembered total is exact. On any other
position the statement that counts is run (page, total and position in one snapshot), and its total
remembered. A superuser's page walks the ``items`` sort indexes instead, and takes its total from
``counts`` (kept by the projection) unless ``q`` filters it (then remembered the same way).

Sorting by name uses ``name_key`` (the case-folded name, compared bytewise on both backends), so
the order is the same on PostgreSQL and SQLite. Timestamps are fixed-width UTC ISO-8601 text.
On PostgreSQL, when the ``pg_trgm`` extension is installed, trigram indexes serve a superuser's ``q``.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from eventsourcing.utils import get_topic

from domain.access import AccessLevel
from domain.integration import Integration
from domain.settings import UPLOAD_TYPES
from projections.sqlview import (
    Batch,
    PostgresView,
    ReadModelView,
    SQLiteView,
    SQLView,
    ViewProjection,
    escape_like,
    iso,
    quote_ident,
    upsert,
)

OWNER_LEVEL = int(AccessLevel.MANAGE)

# API sort name -> (column, direction); the integration id breaks ties in the same direction.
SORTS: dict[str, tuple[str, str]] = {
    "name": ("name_key", "ASC"),
    "-name": ("name_key", "DESC"),
    "createdAt": ("created_at", "ASC"),
    "-createdAt": ("created_at", "DESC"),
    "updatedAt": ("updated_at", "ASC"),
    "-updatedAt": ("updated_at", "DESC"),
    "slug": ("slug", "ASC"),
    "-slug": ("slug", "DESC"),
}

# Rows of ``counts``: every item, the listed (non-embedded) ones, and those by supports_upload.
_ALL, _LISTED = "all", "listed"
_TOTAL = "SELECT coalesce(sum(n), 0) AS total FROM {counts} WHERE name = %s"

# Repeated on every access row of the item: what a caller's page filters and sorts on.
# ``name_key``/``description_key`` are case-folded in Python: q is a plain LIKE on them, bytewise,
# the same on both backends and much cheaper than ILIKE.
_KEY_COLUMNS = ("embedded", "supports_upload", "name_key", "description_key", "slug", "created_at", "updated_at")
_ITEM_COLUMNS = ("integration_id", "owner_id", *_KEY_COLUMNS, "name", "description", "type", "version", "doc")
_ACCESS_COLUMNS = ("principal_id", "integration_id", "level", *_KEY_COLUMNS)

_KEY_DDL = (
    "embedded {bool} NOT NULL, supports_upload {bool} NOT NULL, name_key {key} NOT NULL, "
    "description_key {key} NOT NULL, slug {key} NOT NULL, created_at {key} NOT NULL, updated_at {key} NOT NULL"
)
# ``access.description_key`` keeps only this many characters of the case-folded description: it is
# in the access indexes, and a btree entry has a size limit (2,704 bytes on PostgreSQL). q checks
# ``items`` for the rest of a description that long (rare).
DESCRIPTION_PREFIX = 200
_LONG = f"{{octet_length}}(description_key) >= {DESCRIPTION_PREFIX}"  # where it may have been cut

# A caller's page merges one index range per principal in sort order: one index per sort column,
# each carrying what the filters read (the q columns, supports_upload), so no access row is fetched.
_ACCESS_SORT_INDEXES = {
    "name_key": "access_by_name",
    "created_at": "access_by_created",
    "updated_at": "access_by_updated",
    "slug": "access_by_slug",
}


def _access_index_ddl(column: str, index: str, include: bool) -> str:
    """One caller sort index; PostgreSQL stores the filter columns as INCLUDE, SQLite as key columns."""
    covered = ", ".join(c for c in ("supports_upload", "name_key", "description_key") if c != column)
    columns = f"principal_id, {column}, integration_id" + (f") INCLUDE ({covered}" if include else f", {covered}")
    return f"CREATE INDEX IF NOT EXISTS {{{index}}} ON {{access}} ({columns}) WHERE NOT embedded"


_DDL = (
    "CREATE TABLE IF NOT EXISTS {items} (integration_id {uuid} PRIMARY KEY, owner_id {key} NOT NULL, "
    f"{_KEY_DDL}, name TEXT NOT NULL, description TEXT NOT NULL, type TEXT, version INTEGER NOT NULL, "
    "doc {json} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {access} (principal_id {key} NOT NULL, integration_id {uuid} NOT NULL, "
    f"level INTEGER NOT NULL, {_KEY_DDL}, PRIMARY KEY (principal_id, integration_id))",
    "CREATE INDEX IF NOT EXISTS {access_by_integration} ON {access} (integration_id)",
    "CREATE INDEX IF NOT EXISTS {items_by_slug} ON {items} (slug, integration_id)",
    # One per sort order, for the superuser's page and for broad visibility (partial: the
    # listing never shows embedded integrations).
    "CREATE INDEX IF NOT EXISTS {items_by_name} ON {items} (name_key, integration_id) WHERE NOT embedded",
    "CREATE INDEX IF NOT EXISTS {items_by_created} ON {items} (created_at, integration_id) WHERE NOT embedded",
    "CREATE INDEX IF NOT EXISTS {items_by_updated} ON {items} (updated_at, integration_id) WHERE NOT embedded",
    # For q's look-up of long descriptions, and for the planner's estimate of how few they are.
    "CREATE INDEX IF NOT EXISTS {items_by_description_length} ON {items} ({octet_length}(description_key))",
    "CREATE TABLE IF NOT EXISTS {counts} (name {key} PRIMARY KEY, n INTEGER NOT NULL)",
)
_TRIGRAM_DDL = (
    "CREATE INDEX IF NOT EXISTS {items_name_trgm} ON {items} USING gin (name_key {trgm_ops}) WHERE NOT embedded",
    "CREATE INDEX IF NOT EXISTS {items_description_trgm} ON {items} "
    "USING gin (description_key {trgm_ops}) WHERE NOT embedded",
)

_UPSERT_ITEM = upsert("items", _ITEM_COLUMNS, ("integration_id",))
_GRANT = upsert("access", _ACCESS_COLUMNS, ("principal_id", "integration_id"))
_SYNC_ACCESS = f"UPDATE {{access}} SET {', '.join(f'{c} = %s' for c in _KEY_COLUMNS)} WHERE integration_id = %s"
_REVOKE = "DELETE FROM {access} WHERE principal_id = %s AND integration_id = %s"
_ADD_COUNT = "INSERT INTO {counts} AS c (name, n) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET n = c.n + excluded.n"
_LOAD_DOC = "SELECT doc FROM {items} WHERE integration_id = %s"
_VISIBLE = "i.integration_id IN (SELECT a.integration_id FROM {access} a WHERE a.principal_id {any})"
# ``{like_escape}``: PostgreSQL's LIKE escapes with a backslash by default (an explicit ESCAPE on a
# parameter is re-evaluated per row in a generic plan); SQLite needs it spelled out.
_MATCHES = "({t}.name_key LIKE %s{{like_escape}} OR {t}.description_key LIKE %s{{like_escape}})"
# On access rows: the description's prefix, then, only where it may have been cut, the whole one
# on items: the few long ones that match, looked up once per statement (a correlated subquery is
# costed per row, and PostgreSQL JIT-compiles a plan costed that high at every execution).
_LONG_MATCHES = (
    "WITH long_matches AS (SELECT d.integration_id FROM {items} d "
    f"WHERE {_LONG.replace('description_key', 'd.description_key')} AND d.description_key LIKE %s{{like_escape}}) "
)
_ACCESS_MATCHES = (
    "(a.name_key LIKE %s{like_escape} OR a.description_key LIKE %s{like_escape} "
    f"OR ({_LONG.replace('description_key', 'a.description_key')} "
    "AND a.integration_id IN (SELECT integration_id FROM long_matches)))"
)
# The view's tracking position(s): every change of the view advances it in the same transaction.
_POSITION = "(SELECT coalesce(sum(notification_id), 0) FROM {{tracking}})"
# A caller's page: per principal, its first start+limit access rows in page order (an index range
# each, merged in order); an item reached through several principals has the same sort key on each
# row, so its copies are adjacent and DISTINCT drops them; then the page's docs. Each row also
# carries the total (or NULL when the caller has it cached) and the view's position. PostgreSQL's
# ``{distinct}`` is DISTINCT ON, which it can only do on ordered rows: so always the merge, which
# stops early, where a plain DISTINCT (GROUP BY) may be planned as a hash of every row then a sort
# when the per-principal row estimates are low.
_CALLER_BRANCH = (
    "SELECT * FROM (SELECT a.{column} AS k, a.integration_id FROM {{access}} a WHERE {where} "
    "ORDER BY a.{column} {direction}, a.integration_id {direction}{limit}) b{n}"
)
_CALLER_TOTAL = "(SELECT count(DISTINCT a.integration_id) FROM {{access}} a WHERE {where})"
_CALLER_PAGE = (
    f"SELECT i.doc, t.total, t.position FROM (SELECT {{total}} AS total, {_POSITION} AS position) t LEFT JOIN "
    "(SELECT {{distinct}} m.k, m.integration_id FROM ({branches}) m "
    "ORDER BY m.k {direction}, m.integration_id {direction} LIMIT %s OFFSET %s) p "
    "ON 1 = 1 LEFT JOIN {{items}} i ON i.integration_id = p.integration_id "
    "ORDER BY p.k {direction}, p.integration_id {direction}"
)
# More principals than this: one index scan over all of them, grouped and sorted (fewer branches
# to plan; the per-principal merge is for the usual case of a user in some tens of teams).
MAX_BRANCHES = 48
# A superuser's page: the items sort index; the total from ``counts``, or counted when q filters.
_ALL_PAGE = (
    f"SELECT p.doc, t.total, t.position FROM (SELECT ({{total}}) AS total, {_POSITION} AS position) t LEFT JOIN "
    "(SELECT i.doc, i.{column} AS k, i.integration_id FROM {{items}} i WHERE {where} "
    "ORDER BY i.{column} {direction}, i.integration_id {direction} LIMIT %s OFFSET %s) p "
    "ON 1 = 1 ORDER BY p.k {direction}, p.integration_id {direction}"
)
_SHARED = "EXISTS (SELECT 1 FROM {access} s WHERE s.integration_id = i.integration_id AND s.principal_id <> i.owner_id)"
# Totals remembered per view (principal set, q, supports_upload), each with the position it holds at.
TOTALS_KEPT = 4096


class ListingView(ReadModelView):
    """Query interface of the listing read model. ``principal_ids=None`` means a superuser."""

    @abstractmethod
    def page(
        self,
        principal_ids: Sequence[str] | None,
        *,
        q: str | None = None,
        supports_upload: bool | None = None,
        sort: str = "name",
        start: int = 0,
        limit: int = 50,
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of the docs visible to the caller (never embedded ones), and the total."""

    @abstractmethod
    def all_visible(self, principal_ids: Sequence[str] | None) -> list[dict[str, Any]]:
        """Every visible non-embedded doc, by name, each with ``shared``: whether it has a share."""

    @abstractmethod
    def by_slug(self, slug: str, principal_ids: Sequence[str] | None) -> list[dict[str, Any]]:
        """The visible docs with this slug, embedded included (for bare-slug addressing)."""

    @abstractmethod
    def count(self) -> int:
        """How many integrations the view holds (embedded included)."""


class SQLListingView(ListingView, SQLView):
    TABLES: ClassVar = {"items": "integration_id", "access": "principal_id, integration_id", "counts": "name"}
    JSON_COLUMNS: ClassVar = frozenset({"doc"})
    DDL: ClassVar = _DDL
    INCLUDE: ClassVar[bool] = False  # covering columns as INCLUDE (PostgreSQL), else as trailing keys

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._totals: dict[tuple[Any, ...], tuple[Any, int]] = {}
        self._seen: Any = None  # the latest position a page statement read
        self._totals_lock = threading.Lock()

    def ddl(self) -> list[str]:
        indexes = [_access_index_ddl(column, index, self.INCLUDE) for column, index in _ACCESS_SORT_INDEXES.items()]
        # The covering index the caller's page used before the sort indexes: only a write cost now.
        return [*super().ddl(), *indexes, f"DROP INDEX IF EXISTS {self._index_schema()}{{access_listing}}"]

    def _index_schema(self) -> str:
        """What qualifies an index name in DROP INDEX (PostgreSQL: its table's schema)."""
        return ""

    # --- applying events ------------------------------------------------------------------------
    # Docs are memoised per batch and written once at its end (with their access rows' keys);
    # access rows and counts change per event, counts summed over the batch. ``memo[("keys", id)]``
    # holds the keys every access row of the item has now (None: not all the same), so the end of
    # the batch rewrites access rows only when they differ from the doc's (not after a lone Created).

    def _apply_event(self, batch: Batch, event: Any) -> None:
        integration_id = str(event.originator_id)
        if isinstance(event, Integration.Created):
            doc = {
                "id": integration_id,
                "owner_id": event.owner_id,
                "slug": event.slug,
                "settings": dict(event.settings),
                "secret_fields": sorted(event.secrets),
                "created_at": iso(event.timestamp),
                "updated_at": iso(event.timestamp),
                "version": event.originator_version,
            }
            self._grant(batch, doc, event.owner_id, OWNER_LEVEL, synced=True)
            self._keep(batch, doc, set())
            return
        doc = self._doc(batch, integration_id)
        if doc is None:
            return  # deleted already (or never seen): nothing to change
        counted = _counters(doc)
        if isinstance(event, Integration.Deleted):
            self.execute(batch.cur, "DELETE FROM {access} WHERE integration_id = %s", (integration_id,))
            self.execute(batch.cur, "DELETE FROM {items} WHERE integration_id = %s", (integration_id,))
            batch.memo[integration_id] = None
            batch.dirty.pop(integration_id, None)
            batch.counts.subtract(counted)
            return
        doc["updated_at"] = iso(event.timestamp)
        doc["version"] = event.originator_version
        self._change(batch, doc, event)
        self._keep(batch, doc, counted)

    def _change(self, batch: Batch, doc: dict[str, Any], e: Any) -> None:
        owner, integration_id = doc["owner_id"], doc["id"]
        if isinstance(e, Integration.Updated):
            _merge_update(doc, e)
        elif isinstance(e, Integration.Shared):
            # The owner's row says "owner"; a share to the owner does not demote it.
            if e.principal_id != owner:
                self._grant(batch, doc, e.principal_id, e.access_level)
        elif isinstance(e, Integration.Unshared):
            if e.principal_id != owner:
                self.execute(batch.cur, _REVOKE, (e.principal_id, integration_id))
        elif isinstance(e, Integration.OwnershipTransferred):
            doc["owner_id"] = e.owner_id
            # As the aggregate does: the new owner's share is dropped, the old owner keeps nothing.
            self.execute(batch.cur, _REVOKE, (owner, integration_id))
            self._grant(batch, doc, e.owner_id, OWNER_LEVEL)

    def _grant(self, batch: Batch, doc: dict[str, Any], principal_id: str, level: int, synced: bool = False) -> None:
        """Write an access row with the doc's keys now; ``synced``: it is the item's only row."""
        keys = _access_keys(doc)
        self.execute(batch.cur, _GRANT, (principal_id, doc["id"], level, *keys))
        if not synced and batch.memo.get(("keys", doc["id"])) != keys:
            keys = None
        batch.memo["keys", doc["id"]] = keys

    def _doc(self, batch: Batch, integration_id: str) -> dict[str, Any] | None:
        if integration_id not in batch.memo:
            row = self.fetch_one(batch.cur, _LOAD_DOC, (integration_id,))
            doc = batch.memo[integration_id] = None if row is None else self.json_out(row["doc"])
            # Every batch ends with the item's access rows in step with its stored doc.
            batch.memo["keys", integration_id] = None if doc is None else _access_keys(doc)
        return batch.memo[integration_id]

    @staticmethod
    def _keep(batch: Batch, doc: dict[str, Any], counted: set[str]) -> None:
        batch.memo[doc["id"]] = doc
        batch.dirty[doc["id"]] = None
        counters = _counters(doc)
        batch.counts.update(counters - counted)  # only what changed: a counter is touched, or not
        batch.counts.subtract(counted - counters)

    def _flush(self, batch: Batch) -> None:
        for integration_id in batch.dirty:
            doc = batch.memo[integration_id]
            self.execute(batch.cur, _UPSERT_ITEM, _item_row(doc, self.json_in(doc)))
            keys = _access_keys(doc)
            if batch.memo.get(("keys", integration_id)) != keys:
                self.execute(batch.cur, _SYNC_ACCESS, (*keys, integration_id))
        for name, n in batch.counts.items():  # a zero too: then rows match event-by-event application
            self.execute(batch.cur, _ADD_COUNT, (name, n))

    # --- queries ---------------------------------------------------------------------------------

    def _filters(self, table: str, q: str | None, supports_upload: bool | None) -> tuple[list[str], list[Any]]:
        """What q and supportsUpload ask of ``items i`` (superuser) or of the caller's ``access a`` rows."""
        clauses, params = [f"NOT {table}.embedded"], []
        if supports_upload is not None:
            clauses.append(f"{table}.supports_upload = %s")
            params.append(supports_upload)
        if q:
            # On access rows, with _LONG_MATCHES ahead of the statement.
            clauses.append(_ACCESS_MATCHES if table == "a" else _MATCHES.format(t=table))
            params += [_pattern(q), _pattern(q)]
        return clauses, params

    def page(
        self,
        principal_ids: Sequence[str] | None,
        *,
        q: str | None = None,
        supports_upload: bool | None = None,
        sort: str = "name",
        start: int = 0,
        limit: int = 50,
    ) -> tuple[list[dict[str, Any]], int]:
        ids = None if principal_ids is None else list(dict.fromkeys(principal_ids))
        q = q or None
        # The total of a superuser's page without q comes from ``counts``: nothing to remember.
        key = None if ids is None and q is None else (None if ids is None else tuple(sorted(ids)), q, supports_upload)
        known = None if key is None else self._totals.get(key)
        # A total counted before the latest position seen is stale: no need to ask.
        if known is not None and known[0] == self._seen:
            statement, params = self.page_statement(ids, q, supports_upload, sort, start, limit, total=False)
            rows = self.query(statement, params)
            if rows[0]["position"] == known[0]:
                return self._docs(rows), known[1]
            self._remember(None, rows[0]["position"], 0)
        statement, params = self.page_statement(ids, q, supports_upload, sort, start, limit)
        rows = self.query(statement, params)
        total = int(rows[0]["total"])
        self._remember(key, rows[0]["position"], total)
        return self._docs(rows), total

    def _docs(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Always one row at least: an empty page (doc NULL) still carries the total and position.
        return [self.json_out(r["doc"]) for r in rows if r["doc"] is not None]

    def _remember(self, key: tuple[Any, ...] | None, position: Any, total: int) -> None:
        """Keep a total with the position it was counted at (oldest out first, past ``TOTALS_KEPT``).

        Also the position as the latest seen (``key`` None: only that). Positions only grow, but for a
        reset; a total passed over after a reset is merely counted again.
        """
        with self._totals_lock:
            self._seen = position if self._seen is None else max(self._seen, position)
            if key is None:
                return
            self._totals.pop(key, None)
            self._totals[key] = (position, total)
            while len(self._totals) > TOTALS_KEPT:
                del self._totals[next(iter(self._totals))]

    def page_statement(
        self,
        principal_ids: Sequence[str] | None,
        q: str | None = None,
        supports_upload: bool | None = None,
        sort: str = "name",
        start: int = 0,
        limit: int = 50,
        *,
        total: bool = True,
    ) -> tuple[str, list[Any]]:
        """The page's statement template and parameters (each row: a doc, the total, the position).

        ``total=False``: the total column is NULL, for a caller who holds the total at that position.
        """
        if sort not in SORTS:
            raise ValueError(f"Unknown sort {sort!r}; expected one of {', '.join(SORTS)}.")
        column, direction = SORTS[sort]
        start, limit = max(start, 0), max(limit, 0)
        if principal_ids is None:
            clauses, params = self._filters("i", q, supports_upload)
            where = " AND ".join(clauses)
            if not total:
                count, count_params = "SELECT NULL", []
            elif q:
                count, count_params = f"SELECT count(*) FROM {{items}} i WHERE {where}", params
            else:
                count = _TOTAL
                count_params = [_LISTED if supports_upload is None else f"{_LISTED}:{supports_upload}"]
            statement = _ALL_PAGE.format(total=count, where=where, column=column, direction=direction)
            return statement, [*count_params, *params, limit, start]
        ids = list(dict.fromkeys(principal_ids))
        clauses, params = self._filters("a", q, supports_upload)
        everyone = " AND ".join(["a.principal_id {any}", *clauses])
        count, count_params = "NULL", []
        if total:
            count, count_params = _CALLER_TOTAL.format(where=everyone), [self.list_param(ids), *params]
        branch = {"column": column, "direction": direction}
        if 0 < len(ids) <= MAX_BRANCHES:
            # Each principal's first start+limit rows are enough: none of them repeats an item.
            where = " AND ".join(["a.principal_id = %s", *clauses])
            branches = [_CALLER_BRANCH.format(where=where, limit=" LIMIT %s", n=n, **branch) for n in range(len(ids))]
            branch_params = [p for principal in ids for p in (principal, *params, start + limit)]
        else:
            branches = [_CALLER_BRANCH.format(where=everyone, limit="", n=0, **branch)]
            branch_params = [self.list_param(ids), *params]
        statement = _CALLER_PAGE.format(total=count, branches=" UNION ALL ".join(branches), direction=direction)
        if q:
            statement = _LONG_MATCHES + statement
            count_params.insert(0, _pattern(q))
        return statement, [*count_params, *branch_params, limit, start]

    def all_visible(self, principal_ids: Sequence[str] | None) -> list[dict[str, Any]]:
        where, params = "NOT i.embedded", []
        if principal_ids is not None:
            where += f" AND {_VISIBLE}"
            params.append(self.list_param(principal_ids))
        rows = self.query(
            f"SELECT i.doc, {_SHARED} AS shared FROM {{items}} i WHERE {where} ORDER BY i.name_key, i.integration_id",
            params,
        )
        return [{**self.json_out(r["doc"]), "shared": bool(r["shared"])} for r in rows]

    def by_slug(self, slug: str, principal_ids: Sequence[str] | None) -> list[dict[str, Any]]:
        where, params = "i.slug = %s", [slug]
        if principal_ids is not None:
            where += f" AND {_VISIBLE}"
            params.append(self.list_param(principal_ids))
        rows = self.query(f"SELECT i.doc FROM {{items}} i WHERE {where} ORDER BY i.owner_id, i.integration_id", params)
        return [self.json_out(r["doc"]) for r in rows]

    def count(self) -> int:
        row = self.query_one(_TOTAL, (_ALL,))
        return int(row["total"]) if row else 0


def _keys(doc: dict[str, Any]) -> tuple[Any, ...]:
    """The values of ``_KEY_COLUMNS`` for a doc."""
    settings = doc["settings"]
    name, description = _text(settings, "name"), _text(settings, "description")
    return (
        bool(settings.get("embedded")), settings.get("type") in UPLOAD_TYPES, name.casefold(),
        description.casefold(), doc["slug"], doc["created_at"], doc["updated_at"],
    )  # fmt: skip


def _access_keys(doc: dict[str, Any]) -> tuple[Any, ...]:
    """The values of ``_KEY_COLUMNS`` on an access row: the description cut to its indexed prefix."""
    keys = _keys(doc)
    return (*keys[:3], keys[3][:DESCRIPTION_PREFIX], *keys[4:])


def _pattern(q: str) -> str:
    """q as a LIKE pattern: a literal, case-folded substring."""
    return f"%{escape_like(q.casefold())}%"


def _text(settings: dict[str, Any], key: str) -> str:
    return str(settings.get(key) or "")


def _counters(doc: dict[str, Any]) -> set[str]:
    """The ``counts`` a doc is counted in."""
    embedded, supports_upload = _keys(doc)[:2]
    return {_ALL} if embedded else {_ALL, _LISTED, f"{_LISTED}:{supports_upload}"}


def _item_row(doc: dict[str, Any], doc_json: str) -> tuple[Any, ...]:
    """The values of ``_ITEM_COLUMNS`` for a doc."""
    settings = doc["settings"]
    return (
        doc["id"], doc["owner_id"], *_keys(doc), _text(settings, "name"), _text(settings, "description"),
        settings.get("type"), doc["version"], doc_json,
    )  # fmt: skip


def _merge_update(doc: dict[str, Any], e: Integration.Updated) -> None:
    if e.slug is not None:
        doc["slug"] = e.slug
    settings = doc["settings"]
    for key, value in e.changes.items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    secrets = set(doc["secret_fields"]).union(e.secrets_set).difference(e.secrets_cleared)
    doc["secret_fields"] = sorted(secrets)


class SQLiteListingView(SQLListingView, SQLiteView):
    """The listing in its own SQLite file."""

    TOKENS: ClassVar = {
        **SQLiteView.TOKENS,
        "like_escape": " ESCAPE '\\'",
        "octet_length": "length",
        "distinct": "DISTINCT",
    }


class PostgresListingView(SQLListingView, PostgresView):
    """The listing in PostgreSQL tables ``<projection name>_items`` and ``_access``."""

    TOKENS: ClassVar = {
        **PostgresView.TOKENS,
        "like_escape": "",
        "octet_length": "octet_length",
        "distinct": "DISTINCT ON (m.k, m.integration_id)",
    }
    INCLUDE: ClassVar[bool] = True

    def _index_schema(self) -> str:
        return f"{quote_ident(self.datastore.schema)}."

    def ddl(self) -> list[str]:
        trgm_schema = self.extension_schema("pg_trgm")
        if trgm_schema is None:
            return super().ddl()
        ops = f"{quote_ident(trgm_schema)}.gin_trgm_ops"
        return [*super().ddl(), *(s.replace("{trgm_ops}", ops) for s in _TRIGRAM_DDL)]


class IntegrationListing(ViewProjection):
    name = "listing"
    topics = tuple(
        get_topic(cls)
        for cls in (
            Integration.Created,
            Integration.Updated,
            Integration.Shared,
            Integration.Unshared,
            Integration.OwnershipTransferred,
            Integration.Deleted,
        )
    )
