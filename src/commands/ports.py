"""Ports: what the command handlers need from the outside, implemented in ``infrastructure``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

from domain.oauth import TokenSet


class SecretRef(dict):
    """``{"ref": <opaque id>, "fingerprint": <short keyed hash>}``, the only trace a secret leaves
    in an event. The fingerprint is an HMAC under the owner's data key, so it dies with the key."""


class VaultError(Exception):
    """A secret cannot be opened: unknown ref, shredded owner, wrong binding, unknown key id."""


class SecretsVault(Protocol):
    def seal(self, owner_id: UUID, field: str, plaintext: str) -> SecretRef:
        """Encrypt and store ``plaintext`` for ``owner_id``'s ``field``. Durable once the next
        synchronous commit on the same store returns (on PostgreSQL the seal itself commits
        asynchronously, ADR 0011); write the referencing event afterwards, never before."""
        ...

    def seal_many(self, owner_id: UUID, plaintexts: Mapping[str, str]) -> dict[str, SecretRef]:
        """Several fields of one owner, atomically (one transaction)."""
        ...

    def open(self, owner_id: UUID, field: str, ref: str) -> str:
        """The plaintext behind ``ref``; raises :class:`VaultError` when it cannot be had."""
        ...

    def discard(self, owner_id: UUID, refs: Iterable[str]) -> None:
        """Delete secrets no event references any more (replaced or cleared)."""
        ...

    def shred(self, owner_id: UUID) -> None:
        """Destroy the owner's data key and every secret sealed under it (crypto-shredding)."""
        ...

    def prune(self, field: str, older_than_seconds: float) -> int:
        """Shred every owner whose secrets are all ``field`` and older than that; how many."""
        ...

    def prepare_new_owner(self, owner_id: UUID, plaintexts: Mapping[str, str]) -> PreparedSeal | None:
        """The seal of a new owner's first secrets, encrypted now and written later inside the
        event store's own transaction (``co_writes`` of a save, ADR 0014); ``None`` when this
        vault cannot share that transaction (then :meth:`seal_many` before the save)."""
        ...


@dataclass(frozen=True)
class PreparedSeal:
    """What :meth:`SecretsVault.prepare_new_owner` made: the references for the events, and an
    opaque write for the event store's recorder (it commits with the events or not at all)."""

    refs: dict[str, SecretRef]
    write: Any


class PasswordHasher(Protocol):
    def hash(self, password: str) -> str: ...

    def verify(self, password: str, encoded: str) -> bool: ...


@dataclass(frozen=True)
class AuthorizationRequest:
    """What ``/connect`` needs to redirect: the provider URL and the secrets it embeds."""

    url: str
    state: str = field(repr=False)
    verifier: str = field(repr=False)
    scope: str


class OAuthProvider(Protocol):
    """The OAuth 2.0 client side of an integration's authorization server.

    ``settings`` are the integration's settings (snake_case); ``client_secret`` its opened secret.
    Failures raise the :mod:`domain.oauth` errors (``InvalidGrant``, ``ClientConfigError``,
    ``TransientError``, ``ProtocolError``); none of them carries a secret.
    """

    def authorization_request(self, settings: Mapping[str, Any], redirect_uri: str) -> AuthorizationRequest: ...

    async def exchange_code(
        self, settings: Mapping[str, Any], client_secret: str, code: str, verifier: str | None, redirect_uri: str
    ) -> TokenSet: ...

    async def refresh(self, settings: Mapping[str, Any], client_secret: str, refresh_token: str) -> TokenSet: ...

    async def revoke(self, settings: Mapping[str, Any], client_secret: str, token: str, hint: str) -> None: ...

    async def identity(self, settings: Mapping[str, Any], tokens: TokenSet) -> dict[str, str | None] | None: ...


class RefreshLocks(Protocol):
    """Mutual exclusion per connection across every process sharing the store (DESIGN 6)."""

    def hold(self, key: UUID, timeout: float) -> AbstractAsyncContextManager[bool]:
        """Hold the lock for ``key`` while the block runs; yields False when ``timeout`` ran out."""
        ...
