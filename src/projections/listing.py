"""The permission-filtered integration listing (``GET /api/integrations``, ``-list``, bare slugs).

``items`` holds one row per integration with the columns the listing filters and sorts on, and
``doc``, what the API renders. ``access`` holds who may see it: the owner with level 3 and each
share with its level. Each access row also repeats the item's filter and sort columns (rewritten
with the item in the same transaction), so a caller's page is an index-only range scan per
principal id (the user and ``team:<id>`` for each team) over a covering index, deduplicated and
cut to the page before ``items`` is touched, for the page's docs only. A superuser's page walks
the ``items`` sort indexes instead, and takes its total from ``counts`` (kept by the projection)
unless ``q`` filters it.

Sorting by name uses ``name_key`` (the case-folded name, compared bytewise on both backends), so
the order is the same on PostgreSQL and SQLite. Timestamps are fixed-width UTC ISO-8601 text.
On PostgreSQL, when the ``pg_trgm`` extension is installed, trigram indexes serve ``q``.
"""

from __future__ import annotations

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
_DDL = (
    "CREATE TABLE IF NOT EXISTS {items} (integration_id {uuid} PRIMARY KEY, owner_id {key} NOT NULL, "
    f"{_KEY_DDL}, name TEXT NOT NULL, description TEXT NOT NULL, type TEXT, version INTEGER NOT NULL, "
    "doc {json} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {access} (principal_id {key} NOT NULL, integration_id {uuid} NOT NULL, "
    f"level INTEGER NOT NULL, {_KEY_DDL}, PRIMARY KEY (principal_id, integration_id))",
    "CREATE INDEX IF NOT EXISTS {access_by_integration} ON {access} (integration_id)",
    # Covering: a caller's count and page read only this index (name/description only for q).
    "CREATE INDEX IF NOT EXISTS {access_listing} ON {access} "
    "(principal_id, embedded, integration_id, supports_upload, name_key, slug, created_at, updated_at)",
    "CREATE INDEX IF NOT EXISTS {items_by_slug} ON {items} (slug, integration_id)",
    # One per sort order, for the superuser's page and for broad visibility (partial: the
    # listing never shows embedded integrations).
    "CREATE INDEX IF NOT EXISTS {items_by_name} ON {items} (name_key, integration_id) WHERE NOT embedded",
    "CREATE INDEX IF NOT EXISTS {items_by_created} ON {items} (created_at, integration_id) WHERE NOT embedded",
    "CREATE INDEX IF NOT EXISTS {items_by_updated} ON {items} (updated_at, integration_id) WHERE NOT embedded",
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
_MATCHES = "({t}.name_key LIKE %s ESCAPE '\\' OR {t}.description_key LIKE %s ESCAPE '\\')"
# A caller's page: distinct visible ids with the sort key, counted, cut to the page, then joined.
_CALLER_PAGE = (
    "WITH v AS (SELECT a.integration_id, a.{column} AS k FROM {{access}} a WHERE {where} "
    "GROUP BY a.integration_id, a.{column}) "
    "SELECT i.doc, t.total FROM (SELECT count(*) AS total FROM v) t LEFT JOIN "
    "(SELECT integration_id, k FROM v ORDER BY k {direction}, integration_id {direction} LIMIT %s OFFSET %s) p "
    "ON 1 = 1 LEFT JOIN {{items}} i ON i.integration_id = p.integration_id "
    "ORDER BY p.k {direction}, p.integration_id {direction}"
)
# A superuser's page: the items sort index; the total from ``counts``, or counted when q filters.
_ALL_PAGE = (
    "SELECT p.doc, t.total FROM ({total}) t LEFT JOIN "
    "(SELECT i.doc, i.{column} AS k, i.integration_id FROM {{items}} i WHERE {where} "
    "ORDER BY i.{column} {direction}, i.integration_id {direction} LIMIT %s OFFSET %s) p "
    "ON 1 = 1 ORDER BY p.k {direction}, p.integration_id {direction}"
)
_SHARED = "EXISTS (SELECT 1 FROM {access} s WHERE s.integration_id = i.integration_id AND s.principal_id <> i.owner_id)"


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

    # --- applying events ------------------------------------------------------------------------
    # Docs are memoised per batch and written once at its end (with their access rows' keys);
    # access rows and counts change per event, counts summed over the batch.

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
            self.execute(batch.cur, _GRANT, (event.owner_id, integration_id, OWNER_LEVEL, *_keys(doc)))
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
                self.execute(batch.cur, _GRANT, (e.principal_id, integration_id, e.access_level, *_keys(doc)))
        elif isinstance(e, Integration.Unshared):
            if e.principal_id != owner:
                self.execute(batch.cur, _REVOKE, (e.principal_id, integration_id))
        elif isinstance(e, Integration.OwnershipTransferred):
            doc["owner_id"] = e.owner_id
            # As the aggregate does: the new owner's share is dropped, the old owner keeps nothing.
            self.execute(batch.cur, _REVOKE, (owner, integration_id))
            self.execute(batch.cur, _GRANT, (e.owner_id, integration_id, OWNER_LEVEL, *_keys(doc)))

    def _doc(self, batch: Batch, integration_id: str) -> dict[str, Any] | None:
        if integration_id not in batch.memo:
            row = self.fetch_one(batch.cur, _LOAD_DOC, (integration_id,))
            batch.memo[integration_id] = None if row is None else self.json_out(row["doc"])
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
            self.execute(batch.cur, _SYNC_ACCESS, (*_keys(doc), integration_id))
        for name, n in batch.counts.items():  # a zero too: then rows match event-by-event application
            self.execute(batch.cur, _ADD_COUNT, (name, n))

    # --- queries ---------------------------------------------------------------------------------

    def _where(
        self, principal_ids: Sequence[str] | None, q: str | None = None, supports_upload: bool | None = None
    ) -> tuple[str, list[Any]]:
        """Filters on ``items i`` (superuser) or on the caller's ``access a`` rows."""
        table = "i" if principal_ids is None else "a"
        clauses, params = [f"NOT {table}.embedded"], []
        if principal_ids is not None:
            clauses.insert(0, "a.principal_id {any}")
            params.append(self.list_param(principal_ids))
        if supports_upload is not None:
            clauses.append(f"{table}.supports_upload = %s")
            params.append(supports_upload)
        if q:
            pattern = f"%{escape_like(q.casefold())}%"
            clauses.append(_MATCHES.format(t=table))
            params += [pattern, pattern]
        return " AND ".join(clauses), params

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
        statement, params = self.page_statement(principal_ids, q, supports_upload, sort, start, limit)
        rows = self.query(statement, params)
        # Always one row at least: an empty page (doc NULL) still carries the total.
        return [self.json_out(r["doc"]) for r in rows if r["doc"] is not None], int(rows[0]["total"])

    def page_statement(
        self,
        principal_ids: Sequence[str] | None,
        q: str | None = None,
        supports_upload: bool | None = None,
        sort: str = "name",
        start: int = 0,
        limit: int = 50,
    ) -> tuple[str, list[Any]]:
        """The page's statement template and parameters (each row: a doc and the total)."""
        if sort not in SORTS:
            raise ValueError(f"Unknown sort {sort!r}; expected one of {', '.join(SORTS)}.")
        column, direction = SORTS[sort]
        where, params = self._where(principal_ids, q, supports_upload)
        paging = [max(limit, 0), max(start, 0)]
        if principal_ids is None:
            if q:
                total, total_params = f"SELECT count(*) AS total FROM {{items}} i WHERE {where}", params
            else:
                total, total_params = _TOTAL, [_LISTED if supports_upload is None else f"{_LISTED}:{supports_upload}"]
            statement = _ALL_PAGE.format(total=total, where=where, column=column, direction=direction)
            return statement, [*total_params, *params, *paging]
        return _CALLER_PAGE.format(where=where, column=column, direction=direction), [*params, *paging]

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


class PostgresListingView(SQLListingView, PostgresView):
    """The listing in PostgreSQL tables ``<projection name>_items`` and ``_access``."""

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
