"""The secrets vault: envelope encryption with a data key per owner, wrapped by the master keyring.

Each owner (an integration or a user, by aggregate UUID) gets a random 256-bit data key (DEK),
stored wrapped by the active master key with associated data ``dek|<owner>|v1``. Each secret is
AES-256-GCM under that DEK with associated data binding owner, ref and field, so a ciphertext
moved to another owner, field or row fails closed with :class:`VaultError`. Deleting the DEK
(``shred``) makes every secret of the owner unrecoverable; master-key rotation re-wraps DEKs only.

The crypto lives in :class:`EnvelopeVault`; the two backends differ only in connections and in the
few dialect words of :class:`_Dialect` (the SQL itself is written once, below).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import queue
import sqlite3
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID, uuid4

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from commands.ports import PreparedSeal, SecretRef, VaultError
from infrastructure.keyring import Keyring
from infrastructure.settings import PostgresConfig, Settings

VAULT_FILE = "vault.sqlite"
DEK_BYTES = 32
NONCE_BYTES = 12
FINGERPRINT_HEX = 12
_SECRET_FORMAT = b"\x01"
_SEAL_ATTEMPTS = 3
# The fingerprint key is derived from the DEK rather than being the DEK itself: one key, one job.
_FINGERPRINT_LABEL = b"integrations-vault fingerprint v1"


# -- SQL, written once; {names} are filled per dialect and %s becomes the driver's placeholder ------

_DDL = (
    """CREATE TABLE IF NOT EXISTS {keys} (
        owner_id TEXT PRIMARY KEY,
        kid TEXT NOT NULL,
        wrapped_dek {blob} NOT NULL,
        created_at {timestamp}
    )""",
    """CREATE TABLE IF NOT EXISTS {secrets} (
        ref TEXT PRIMARY KEY,
        owner_id TEXT NOT NULL REFERENCES {keys} (owner_id) ON DELETE CASCADE,
        field TEXT NOT NULL,
        ciphertext {blob} NOT NULL,
        created_at {timestamp}
    )""",
    "CREATE INDEX IF NOT EXISTS {secrets_owner_index} ON {secrets} (owner_id)",
)
_SELECT_DEK = "SELECT wrapped_dek FROM {keys} WHERE owner_id = %s"
_INSERT_DEK = "INSERT INTO {keys} (owner_id, kid, wrapped_dek) VALUES (%s, %s, %s) ON CONFLICT (owner_id) DO NOTHING"
_SELECT_STALE_DEKS = "SELECT owner_id, kid, wrapped_dek FROM {keys} WHERE kid <> %s"
_UPDATE_DEK = "UPDATE {keys} SET kid = %s, wrapped_dek = %s WHERE owner_id = %s AND kid = %s"
_DELETE_DEK = "DELETE FROM {keys} WHERE owner_id = %s"
_KEY_USAGE = "SELECT kid, COUNT(*) FROM {keys} GROUP BY kid"
# Owners whose every secret is of one field and older than a cutoff (by the store's clock): their
# key goes, and its secrets with it (ON DELETE CASCADE).
_PRUNE_OWNERS = """DELETE FROM {keys} WHERE owner_id IN (
    SELECT owner_id FROM {secrets} GROUP BY owner_id
    HAVING min(field) = %s AND max(field) = %s AND max(created_at) < {ago})"""
_INSERT_SEALED = "INSERT INTO {secrets} (ref, owner_id, field, ciphertext) VALUES (%s, %s, %s, %s)"
_SELECT_SEALED = "SELECT ciphertext FROM {secrets} WHERE ref = %s AND owner_id = %s"
_DELETE_SEALED = "DELETE FROM {secrets} WHERE owner_id = %s"
_DISCARD_SEALED = "DELETE FROM {secrets} WHERE owner_id = %s AND ref = %s"
# PostgreSQL: seal for an owner in one statement. A new owner's data key and its secrets go in
# together; for an owner that already has a key nothing is written and its wrapped key comes back
# (the outer SELECT reads the snapshot from before the statement), to seal under it instead.
# Each is one statement, so one autocommit transaction; ``set_config(..., true)`` makes that
# transaction's commit asynchronous (see PostgresVault._seal and ADR 0011 for why that is safe).
_PG_SEAL_NEW_OWNER = """WITH new_key AS (
        INSERT INTO {keys} (owner_id, kid, wrapped_dek) VALUES (%s, %s, %s)
        ON CONFLICT (owner_id) DO NOTHING RETURNING owner_id
    ), sealed AS (
        INSERT INTO {secrets} (ref, owner_id, field, ciphertext)
        SELECT s.ref, k.owner_id, s.field, s.ciphertext
        FROM new_key k, unnest(%s::text[], %s::text[], %s::bytea[]) AS s (ref, field, ciphertext)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM sealed) AS sealed,
        (SELECT wrapped_dek FROM {keys} WHERE owner_id = %s) AS existing,
        set_config('synchronous_commit', 'off', true) AS async_commit"""
# A new owner's key and first secrets as common table expressions of the event store's own save
# statement (PreparedSeal, ADR 0014): no ON CONFLICT, an existing owner makes the whole save fail.
_PG_SEAL_WITH_EVENTS = """vault_new_key AS (
        INSERT INTO {keys} (owner_id, kid, wrapped_dek) VALUES (%s, %s, %s) RETURNING owner_id
    ), vault_sealed AS (
        INSERT INTO {secrets} (ref, owner_id, field, ciphertext)
        SELECT s.ref, k.owner_id, s.field, s.ciphertext
        FROM vault_new_key k, unnest(%s::text[], %s::text[], %s::bytea[]) AS s (ref, field, ciphertext)
        RETURNING 1
    )"""
_PG_SEAL_EXISTING_OWNER = """INSERT INTO {secrets} (ref, owner_id, field, ciphertext)
    SELECT s.ref, %s, s.field, s.ciphertext
    FROM unnest(%s::text[], %s::text[], %s::bytea[]) AS s (ref, field, ciphertext),
        (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"""


@dataclass(frozen=True)
class _Dialect:
    keys: str
    secrets: str
    secrets_owner_index: str
    blob: str
    timestamp: str
    placeholder: str
    ago: str  # the store's own clock minus %s seconds, comparable with a created_at column

    def render(self, template: str) -> str:
        sql = template.format(
            keys=self.keys,
            secrets=self.secrets,
            secrets_owner_index=self.secrets_owner_index,
            blob=self.blob,
            timestamp=self.timestamp,
            ago=self.ago,
        )
        return sql.replace("%s", self.placeholder)


class _Cursor(Protocol):
    rowcount: int

    def fetchall(self) -> list[Any]: ...


class _Connection(Protocol):
    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...


# -- the crypto, shared ---------------------------------------------------------------------------


def _owner(owner_id: UUID | str) -> str:
    try:
        return str(owner_id if isinstance(owner_id, UUID) else UUID(str(owner_id)))
    except ValueError:
        raise VaultError("owner id is not a UUID") from None


def _dek_aad(owner: str) -> bytes:
    return b"dek|" + owner.encode() + b"|v1"


def _secret_aad(owner: str, field: str, ref: str) -> bytes:
    # owner and ref have fixed shapes (UUID, 32 hex), so the free-form field can go last unframed.
    return b"secret|v1|" + owner.encode() + b"|" + ref.encode() + b"|" + field.encode()


def _fingerprint(dek: bytes, field: str, plaintext: str) -> str:
    key = hmac.new(dek, _FINGERPRINT_LABEL, hashlib.sha256).digest()
    field_bytes = field.encode()
    message = struct.pack(">I", len(field_bytes)) + field_bytes + plaintext.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:FINGERPRINT_HEX]


def _valid_ref(ref: object) -> bool:
    return isinstance(ref, str) and len(ref) == 32 and all(c in "0123456789abcdef" for c in ref)


def _check_plaintexts(plaintexts: Mapping[str, str]) -> None:
    for field, plaintext in plaintexts.items():
        if not isinstance(field, str) or not field:
            raise VaultError("a secret needs a field name")
        if not isinstance(plaintext, str):
            raise VaultError("a secret must be a string")


def _columns(rows: list[tuple[str, str, bytes]]) -> list[list[Any]]:
    """Rows (ref, field, blob) as three arrays, for ``unnest``."""
    return [[r[i] for r in rows] for i in range(3)]


def _encrypt(
    dek: bytes, owner: str, plaintexts: Mapping[str, str]
) -> tuple[dict[str, SecretRef], list[tuple[str, str, bytes]]]:
    """Each field's reference, and its row (ref, field, stored blob) for the secrets table."""
    aead = AESGCM(dek)
    refs: dict[str, SecretRef] = {}
    rows = []
    for field, plaintext in plaintexts.items():
        ref = uuid4().hex
        nonce = os.urandom(NONCE_BYTES)
        sealed = aead.encrypt(nonce, plaintext.encode(), _secret_aad(owner, field, ref))
        rows.append((ref, field, _SECRET_FORMAT + nonce + sealed))
        refs[field] = SecretRef({"ref": ref, "fingerprint": _fingerprint(dek, field, plaintext)})
    return refs, rows


class EnvelopeVault(ABC):
    """:class:`commands.ports.SecretsVault` over any SQL store; subclasses bring connections."""

    _integrity_errors: tuple[type[Exception], ...] = ()

    def __init__(self, keyring: Keyring, dialect: _Dialect) -> None:
        self.keyring = keyring
        self._dialect = dialect

    # -- plumbing the backends provide

    @abstractmethod
    def _transaction(self, write: bool) -> AbstractContextManager[_Connection]:
        """A connection inside one transaction: committed on success, rolled back on error."""

    @abstractmethod
    def close(self) -> None: ...

    def _create_tables(self) -> None:
        with self._transaction(write=True) as conn:
            for statement in _DDL:
                conn.execute(self._dialect.render(statement))

    def _rows(self, conn: _Connection, template: str, params: tuple[Any, ...] = ()) -> list[Any]:
        cursor: _Cursor = conn.execute(self._dialect.render(template), params)
        return cursor.fetchall()

    def _count(self, conn: _Connection, template: str, params: tuple[Any, ...]) -> int:
        cursor: _Cursor = conn.execute(self._dialect.render(template), params)
        return cursor.rowcount

    # -- SecretsVault

    def seal(self, owner_id: UUID, field: str, plaintext: str) -> SecretRef:
        return self.seal_many(owner_id, {field: plaintext})[field]

    def seal_many(self, owner_id: UUID, plaintexts: Mapping[str, str]) -> dict[str, SecretRef]:
        """Seal several fields of one owner in one transaction (one commit, data key included)."""
        owner = _owner(owner_id)
        _check_plaintexts(plaintexts)
        for _ in range(_SEAL_ATTEMPTS):
            try:
                refs = self._seal(owner, plaintexts)
            except self._integrity_errors:
                continue  # the owner was shredded between reading its key and writing: start over
            if refs is not None:
                return refs
        raise VaultError(f"could not seal a secret for owner {owner}: its data key keeps disappearing")

    def _seal(self, owner: str, plaintexts: Mapping[str, str]) -> dict[str, SecretRef] | None:
        """One attempt: the owner's data key (created if missing) and the secrets, one transaction.
        None (or the backend's integrity error) to start over."""
        aad = _dek_aad(owner)
        with self._transaction(write=True) as conn:
            rows = self._rows(conn, _SELECT_DEK, (owner,))
            if not rows:
                wrapped = self.keyring.wrap(AESGCM.generate_key(bit_length=DEK_BYTES * 8), aad)
                conn.execute(self._dialect.render(_INSERT_DEK), (owner, self.keyring.active_kid, wrapped))
                rows = self._rows(conn, _SELECT_DEK, (owner,))
            refs, sealed = _encrypt(self.keyring.unwrap(bytes(rows[0][0]), aad), owner, plaintexts)
            for ref, field, blob in sealed:
                conn.execute(self._dialect.render(_INSERT_SEALED), (ref, owner, field, blob))
        return refs

    def open(self, owner_id: UUID, field: str, ref: str) -> str:
        owner = _owner(owner_id)
        if not _valid_ref(ref):
            raise VaultError("not a secret reference")
        dek = self._data_key(owner)
        with self._transaction(write=False) as conn:
            rows = self._rows(conn, _SELECT_SEALED, (ref, owner))
        if not rows:
            raise VaultError(f"no secret {ref} for owner {owner}")
        blob = bytes(rows[0][0])
        if blob[:1] != _SECRET_FORMAT or len(blob) < 1 + NONCE_BYTES + 16:
            raise VaultError(f"secret {ref} has an unknown format")
        nonce, sealed = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        try:
            plaintext = AESGCM(dek).decrypt(nonce, sealed, _secret_aad(owner, field, ref))
        except InvalidTag:
            raise VaultError(
                f"secret {ref} does not authenticate as owner {owner}'s {field!r} (moved or tampered)"
            ) from None
        return plaintext.decode()

    def discard(self, owner_id: UUID, refs: Iterable[str]) -> None:
        """Delete superseded secrets (a replaced client secret must not linger under the key)."""
        owner = _owner(owner_id)
        with self._transaction(write=True) as conn:
            for ref in refs:
                conn.execute(self._dialect.render(_DISCARD_SEALED), (owner, ref))

    def prepare_new_owner(self, owner_id: UUID, plaintexts: Mapping[str, str]) -> PreparedSeal | None:
        """Not supported by default: the vault's store is not the event store's (SQLite: another
        file). :class:`PostgresVault` shares the event store's server and supports it."""
        return None

    def shred(self, owner_id: UUID) -> None:
        owner = _owner(owner_id)
        with self._transaction(write=True) as conn:
            conn.execute(self._dialect.render(_DELETE_SEALED), (owner,))
            conn.execute(self._dialect.render(_DELETE_DEK), (owner,))

    def prune(self, field: str, older_than_seconds: float) -> int:
        """Crypto-shred every owner whose secrets are all ``field`` and were all sealed more than
        ``older_than_seconds`` ago (by the store's clock); how many owners went. For short-lived
        owners such as a pending authorization's PKCE verifier, which nothing reads after expiry."""
        with self._transaction(write=True) as conn:
            return self._count(conn, _PRUNE_OWNERS, (field, field, int(older_than_seconds)))

    # -- key management

    def rewrap(self) -> int:
        """Re-wrap every data key not under the active master key; secrets stay untouched."""
        active = self.keyring.active_kid
        with self._transaction(write=True) as conn:
            stale = self._rows(conn, _SELECT_STALE_DEKS, (active,))
            done = 0
            for owner, kid, wrapped in stale:
                aad = _dek_aad(owner)
                dek = self.keyring.unwrap(bytes(wrapped), aad)
                done += self._count(conn, _UPDATE_DEK, (active, self.keyring.wrap(dek, aad), owner, kid))
        return done

    def key_usage(self) -> dict[str, int]:
        """How many data keys each master key id wraps."""
        with self._transaction(write=False) as conn:
            return {kid: int(count) for kid, count in self._rows(conn, _KEY_USAGE)}

    def _data_key(self, owner: str) -> bytes:
        """The owner's existing DEK (``seal_many`` creates it, race-safe, inside its transaction)."""
        aad = _dek_aad(owner)
        with self._transaction(write=False) as conn:
            rows = self._rows(conn, _SELECT_DEK, (owner,))
        if not rows:
            raise VaultError(f"no data key for owner {owner} (shredded, or nothing sealed yet)")
        return self.keyring.unwrap(bytes(rows[0][0]), aad)

    def __enter__(self) -> EnvelopeVault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- SQLite ---------------------------------------------------------------------------------------


class SqliteVault(EnvelopeVault):
    """The vault in its own SQLite file (WAL, synchronous=FULL); safe across threads and processes.

    Connections are pooled, not pinned to threads, so short-lived threads leak nothing.
    """

    _integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: Path, keyring: Keyring) -> None:
        super().__init__(
            keyring,
            _Dialect(
                keys="vault_keys",
                secrets="vault_secrets",
                secrets_owner_index="vault_secrets_owner",
                blob="BLOB",
                timestamp="TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP",
                placeholder="?",
                ago="datetime('now', printf('%+d seconds', -CAST(%s AS INTEGER)))",
            ),
        )
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Wrapped keys are still key material: create the file (and so its -wal/-shm) owner-only.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._create_tables()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # seal() promises durability on return
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise VaultError("the vault is closed")
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            # IMMEDIATE takes the write lock up front, so busy_timeout applies instead of a
            # deadlock-prone read-to-write upgrade.
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if self._closed:
                conn.close()
            else:
                self._idle.put(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


# -- PostgreSQL -----------------------------------------------------------------------------------


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


class PostgresVault(EnvelopeVault):
    """The vault in ``integrations_vault_keys`` / ``integrations_vault_secrets`` of ``pg.schema``."""

    def __init__(self, pg: PostgresConfig, keyring: Keyring, max_connections: int = 4) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        schema = _quote(pg.schema)
        super().__init__(
            keyring,
            _Dialect(
                keys=f"{schema}.integrations_vault_keys",
                secrets=f"{schema}.integrations_vault_secrets",
                secrets_owner_index="integrations_vault_secrets_owner",
                blob="BYTEA",
                timestamp="TIMESTAMPTZ NOT NULL DEFAULT now()",
                placeholder="%s",
                ago="now() - make_interval(secs => %s)",
            ),
        )
        self._integrity_errors = (psycopg.IntegrityError,)
        self._schema = pg.schema
        self._pool = ConnectionPool(
            pg.conninfo(),
            min_size=1,
            max_size=max_connections,
            # Autocommit: a seal is one statement, so one round trip (no BEGIN and COMMIT of its own).
            kwargs={"connect_timeout": 10, "autocommit": True},
            name="integrations-vault",
            timeout=30,
            open=True,
        )
        try:
            self._pool.wait(timeout=30)
            self._create_tables()
        except BaseException:
            self._pool.close()
            raise

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Any]:
        # A write runs in a transaction (committed on a clean exit, rolled back on an exception);
        # a read is one statement, its own snapshot.
        with self._pool.connection() as conn:
            if write:
                with conn.transaction():
                    yield conn
            else:
                yield conn

    def _seal(self, owner: str, plaintexts: Mapping[str, str]) -> dict[str, SecretRef] | None:
        """One round trip for a new owner (every integration's create), two for a known one.

        The transaction commits with ``synchronous_commit = off``: it returns before its WAL
        record is flushed. That is safe because of what follows a seal. The secret matters only
        once an event references it, and that event is committed afterwards, synchronously, to
        the same PostgreSQL server (``open_vault`` and the event store use the same settings):
        WAL is one sequence, flushed in order, so the event's commit flushes the vault's first.
        The event can therefore never be durable without the secret it references. A crash in
        between can lose the secret only together with the event (the command never answered);
        if the event save fails instead, the sealed secret is an unreferenced orphan, harmless
        (``create_integration`` shreds it). The commit is visible to every other session at
        once, as with any commit; only its durability waits for the next flush (ADR 0011).
        """
        aad = _dek_aad(owner)
        dek = AESGCM.generate_key(bit_length=DEK_BYTES * 8)
        refs, rows = _encrypt(dek, owner, plaintexts)
        with self._pool.connection() as conn:  # autocommit: each statement is its own transaction
            wrapped = self.keyring.wrap(dek, aad)
            params = (owner, self.keyring.active_kid, wrapped, *_columns(rows), owner)
            cur = conn.execute(self._dialect.render(_PG_SEAL_NEW_OWNER), params)
            sealed, existing, _ = cur.fetchone() or (0, None, None)
            if sealed == len(rows) and existing is None:
                return refs
            if existing is None:
                return None  # another transaction created the owner's key meanwhile: start over
            refs, rows = _encrypt(self.keyring.unwrap(bytes(existing), aad), owner, plaintexts)
            conn.execute(self._dialect.render(_PG_SEAL_EXISTING_OWNER), (owner, *_columns(rows)))
        return refs

    def prepare_new_owner(self, owner_id: UUID, plaintexts: Mapping[str, str]) -> PreparedSeal | None:
        """A new owner's data key and secrets, encrypted here, as common table expressions (and
        their parameters) for the event store's recorder to put in front of its own save
        statement: the secrets commit with the event that references them, or not at all
        (``infrastructure.pg_recorder``). Needs the event store on the same server and schema,
        which ``open_vault`` and the application share."""
        owner = _owner(owner_id)
        _check_plaintexts(plaintexts)
        dek = AESGCM.generate_key(bit_length=DEK_BYTES * 8)
        refs, rows = _encrypt(dek, owner, plaintexts)
        wrapped = self.keyring.wrap(dek, _dek_aad(owner))
        params = (owner, self.keyring.active_kid, wrapped, *_columns(rows))
        return PreparedSeal(refs=refs, write=(self._dialect.render(_PG_SEAL_WITH_EVENTS), params))

    def _create_tables(self) -> None:
        # Concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalogue; serialise it.
        with self._transaction(write=True) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"integrations-vault:{self._schema}",))
            for statement in _DDL:
                conn.execute(self._dialect.render(statement))

    def close(self) -> None:
        self._pool.close()


def open_vault(settings: Settings, keyring: Keyring) -> EnvelopeVault:
    """The vault for ``settings``: its own SQLite file in the data dir, or tables in the PG schema."""
    if settings.postgres is None:
        return SqliteVault(settings.data_dir / VAULT_FILE, keyring)
    return PostgresVault(settings.postgres, keyring)
