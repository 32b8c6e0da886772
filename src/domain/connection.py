"""The Connection aggregate: one account linked to an integration (per user, or one shared).

Token values never enter an event: ``Established`` and ``TokenRefreshed`` carry vault references
(``{"ref", "fingerprint"}``) and metadata (expiry, scopes, account). ``generation`` counts the
credential versions, so a refresher that took the lock can tell whether someone else already
rotated the tokens it was about to refresh (double-check after acquiring, security note §4.2).
"""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from domain.audit import AuditedAggregate
from domain.errors import Conflict

_NS = uuid5(NAMESPACE_URL, "https://informer-integrations/connection")
SHARED_OWNER = "*shared*"

CONNECTED = "connected"
REAUTHORIZATION_REQUIRED = "reauthorization_required"
REVOKED = "revoked"

Ref = dict[str, str]


def connection_id(integration_id: UUID, owner_id: str | None) -> UUID:
    """Per-user connections are keyed by the user; the shared one by :data:`SHARED_OWNER`."""
    return uuid5(_NS, f"{integration_id}:{owner_id or SHARED_OWNER}")


class Connection(AuditedAggregate):
    TOPIC = "integrations/Connection"

    class Created(AuditedAggregate.Created):
        TOPIC = "integrations/Connection.Created.v1"
        integration_id: UUID
        owner_id: str  # the connecting user; SHARED_OWNER for the shared connection
        shared: bool

    class Established(AuditedAggregate.Event):
        TOPIC = "integrations/Connection.Established.v1"
        auth_type: str
        credentials: dict[str, Ref]  # "access_token", "refresh_token", "api_key", "password", ...
        scopes: list[str]
        token_expires_at: str | None
        refresh_token_expires_at: str | None
        account: dict[str, str] | None  # {"name", "email", "sub"} when the provider tells
        epoch: int  # the integration's connection epoch it was made under
        # Non-secret token-response fields the integration uses (``instance_url`` when its
        # apiBaseUri is ``$connection.instance_url``, PX-3). Added in class version 2.
        metadata: dict[str, str]

        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["metadata"] = {}

        def apply(self, aggregate: Connection) -> None:
            aggregate.status = CONNECTED
            aggregate.metadata = dict(self.metadata)
            aggregate.epoch = self.epoch
            aggregate.auth_type = self.auth_type
            aggregate.credentials = dict(self.credentials)
            aggregate.scopes = list(self.scopes)
            aggregate.token_expires_at = self.token_expires_at
            aggregate.refresh_token_expires_at = self.refresh_token_expires_at
            aggregate.account = self.account
            aggregate.last_authorized_at = self.timestamp.isoformat()
            aggregate.last_error = None
            aggregate.failures = 0
            aggregate.generation += 1

    class TokenRefreshed(AuditedAggregate.Event):
        TOPIC = "integrations/Connection.TokenRefreshed.v1"
        access_token: Ref
        refresh_token: Ref | None  # None: the provider sent none, the old one stays (OA-13)
        scopes: list[str]
        token_expires_at: str | None
        refresh_token_expires_at: str | None
        # The used token-response fields when the refresh answer carried them again (a tenant
        # moved to another instance); ``None``: unchanged. Added in class version 2.
        metadata: dict[str, str] | None

        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["metadata"] = None

        def apply(self, aggregate: Connection) -> None:
            aggregate.credentials["access_token"] = self.access_token
            if self.metadata is not None:
                aggregate.metadata = dict(self.metadata)
            if self.refresh_token is not None:
                aggregate.credentials["refresh_token"] = self.refresh_token
            if self.scopes:
                aggregate.scopes = list(self.scopes)
            aggregate.token_expires_at = self.token_expires_at
            if self.refresh_token_expires_at is not None or self.refresh_token is not None:
                aggregate.refresh_token_expires_at = self.refresh_token_expires_at
            aggregate.last_refreshed_at = self.timestamp.isoformat()
            aggregate.last_error = None
            aggregate.failures = 0
            aggregate.generation += 1

    class TokenRefreshFailed(AuditedAggregate.Event):
        TOPIC = "integrations/Connection.TokenRefreshFailed.v1"
        error: str  # an OAuth error code or a transport class, never a provider's free text
        kind: str  # "transient" | "configuration"
        retry_after: float | None

        def apply(self, aggregate: Connection) -> None:
            aggregate.last_error = {
                "error": self.error,
                "kind": self.kind,
                "at": self.timestamp.isoformat(),
                "retry_after": self.retry_after,
            }
            aggregate.failures += 1

    class ReauthorizationRequired(AuditedAggregate.Event):
        TOPIC = "integrations/Connection.ReauthorizationRequired.v1"
        reason: str  # "invalid_grant", "integration_repointed", ...

        def apply(self, aggregate: Connection) -> None:
            aggregate.status = REAUTHORIZATION_REQUIRED
            aggregate.last_error = {"error": self.reason, "kind": "reauthorization", "at": self.timestamp.isoformat()}
            aggregate.credentials = {}
            aggregate.generation += 1

    class Revoked(AuditedAggregate.Event):
        TOPIC = "integrations/Connection.Revoked.v1"
        reason: str  # "disconnected", "integration_deleted", "user_removed"
        provider_revocation: str  # "done", "pending" (retried later), "not_supported", "failed"
        # While the provider still has to be told (503 on revocation), the token to revoke stays
        # in the vault under this reference, and nowhere usable; see ``RevocationSettled``.
        pending: Ref | None

        def apply(self, aggregate: Connection) -> None:
            aggregate.status = REVOKED
            aggregate.credentials = {}
            aggregate.pending_revocation = self.pending
            aggregate.generation += 1

    class RevocationSettled(AuditedAggregate.Event):
        """A pending provider revocation ended: ``done``, or ``abandoned`` after its deadline."""

        TOPIC = "integrations/Connection.RevocationSettled.v1"
        outcome: str
        attempts: int

        def apply(self, aggregate: Connection) -> None:
            aggregate.pending_revocation = None

    @staticmethod
    def create_id(integration_id: UUID, owner_id: str, shared: bool) -> UUID:
        return connection_id(integration_id, None if shared else owner_id)

    def __init__(self, integration_id: UUID, owner_id: str, shared: bool) -> None:
        self.integration_id = integration_id
        self.owner_id = owner_id
        self.shared = shared
        self.status = REVOKED  # nothing usable until Established
        self.auth_type = ""
        self.credentials: dict[str, Ref] = {}
        self.scopes: list[str] = []
        self.token_expires_at: str | None = None
        self.refresh_token_expires_at: str | None = None
        self.account: dict[str, str] | None = None
        self.metadata: dict[str, str] = {}
        self.last_authorized_at: str | None = None
        self.last_refreshed_at: str | None = None
        self.last_error: dict[str, Any] | None = None
        self.failures = 0
        self.generation = 0
        self.epoch = 0
        self.pending_revocation: Ref | None = None

    @property
    def usable(self) -> bool:
        return self.status == CONNECTED

    def establish(
        self,
        *,
        auth_type: str,
        credentials: dict[str, Ref],
        scopes: list[str],
        token_expires_at: str | None,
        refresh_token_expires_at: str | None,
        account: dict[str, str] | None,
        epoch: int = 0,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """A new authorization (connect or re-connect) replaces whatever was there."""
        self.trigger_event(
            self.Established,
            auth_type=auth_type,
            credentials=credentials,
            scopes=scopes,
            token_expires_at=token_expires_at,
            refresh_token_expires_at=refresh_token_expires_at,
            account=account,
            epoch=epoch,
            metadata=dict(metadata or {}),
        )

    def refreshed(
        self,
        *,
        generation: int,
        access_token: Ref,
        refresh_token: Ref | None,
        scopes: list[str],
        token_expires_at: str | None,
        refresh_token_expires_at: str | None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Record a refresh made from credential ``generation`` (the one the refresher read)."""
        self._expect(generation)
        self.trigger_event(
            self.TokenRefreshed,
            access_token=access_token,
            refresh_token=refresh_token,
            scopes=scopes,
            token_expires_at=token_expires_at,
            refresh_token_expires_at=refresh_token_expires_at,
            metadata=metadata,
        )

    def refresh_failed(self, *, generation: int, error: str, kind: str, retry_after: float | None) -> None:
        self._expect(generation)
        self.trigger_event(self.TokenRefreshFailed, error=error, kind=kind, retry_after=retry_after)

    def require_reauthorization(self, reason: str) -> None:
        if self.status == CONNECTED:
            self.trigger_event(self.ReauthorizationRequired, reason=reason)

    def revoke(self, *, reason: str, provider_revocation: str, pending: Ref | None = None) -> None:
        if self.status != REVOKED:
            self.trigger_event(self.Revoked, reason=reason, provider_revocation=provider_revocation, pending=pending)

    def settle_revocation(self, outcome: str, attempts: int) -> None:
        if self.pending_revocation is not None:
            self.trigger_event(self.RevocationSettled, outcome=outcome, attempts=attempts)

    def _expect(self, generation: int) -> None:
        if not self.usable:
            raise Conflict("The connection is not connected any more.", {"status": self.status})
        if generation != self.generation:
            raise Conflict("The credentials changed since they were read.", {"generation": self.generation})
