"""Ports: what the command handlers need from the outside, implemented in ``infrastructure``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol
from uuid import UUID


class SecretRef(dict):
    """``{"ref": <opaque id>, "fingerprint": <short keyed hash>}``, the only trace a secret leaves
    in an event. The fingerprint is an HMAC under the owner's data key, so it dies with the key."""


class VaultError(Exception):
    """A secret cannot be opened: unknown ref, shredded owner, wrong binding, unknown key id."""


class SecretsVault(Protocol):
    def seal(self, owner_id: UUID, field: str, plaintext: str) -> SecretRef:
        """Encrypt and store ``plaintext`` for ``owner_id``'s ``field``; durable on return."""
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


class PasswordHasher(Protocol):
    def hash(self, password: str) -> str: ...

    def verify(self, password: str, encoded: str) -> bool: ...
