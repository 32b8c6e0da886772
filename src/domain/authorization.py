"""A pending OAuth authorization: the server-side half of one ``/connect`` redirect (OA-1).

Its id is derived from the hash of the ``state`` sent to the provider, so the callback finds it
without a read model and without the state itself ever being stored. It records who started the
flow, for which integration and connection, the browser binding (a hash of the nonce in the
``HttpOnly`` binding cookie), the vault reference of the PKCE verifier, the expected issuer, the
exact redirect URI and scope, where to send the browser afterwards, and when it expires.

Single use comes from the event store: consuming appends ``Consumed`` at version 2, so two
callbacks racing with the same state collide on the primary key and only one proceeds to the
token endpoint. A callback that fails the checks (expired, other browser) appends nothing.
"""

from __future__ import annotations

from datetime import datetime
from uuid import NAMESPACE_URL, UUID, uuid5

from domain.audit import AuditedAggregate
from domain.errors import ValidationFailed

_NS = uuid5(NAMESPACE_URL, "https://informer-integrations/pending-authorization")


def pending_authorization_id(state_hash: str) -> UUID:
    return uuid5(_NS, state_hash)


class CallbackRejected(ValidationFailed):
    """The callback does not match a live pending authorization of this browser (400).

    ``reason`` is for logs and tests (``unknown``, ``replayed``, ``expired``, ``wrong_browser``);
    the caller gets one message for all of them, so probing learns nothing.
    """

    def __init__(self, reason: str) -> None:
        super().__init__("This authorization link is invalid, expired or already used; start the connection again.")
        self.reason = reason


class PendingAuthorization(AuditedAggregate):
    TOPIC = "integrations/PendingAuthorization"

    class Created(AuditedAggregate.Created):
        TOPIC = "integrations/PendingAuthorization.Created.v1"
        state_hash: str
        integration_id: UUID
        user_id: str  # who clicked connect
        connection_owner: str  # the user, or the shared owner marker
        binding_hash: str  # sha256 of the browser-binding cookie's nonce
        verifier: dict[str, str]  # vault ref of the PKCE verifier
        issuer: str | None  # expected ``iss`` (None: the integration names no issuer)
        redirect_uri: str
        scope: str
        return_to: str | None  # where the browser goes after the callback (checked on start)
        expires_at: str  # ISO-8601 UTC
        epoch: int  # the integration's connection epoch when the flow started

    class Consumed(AuditedAggregate.Event):
        TOPIC = "integrations/PendingAuthorization.Consumed.v1"

        def apply(self, aggregate: PendingAuthorization) -> None:
            aggregate.consumed = True

    class Finished(AuditedAggregate.Event):
        """How the flow ended: ``connected``, or an error code (never provider free text)."""

        TOPIC = "integrations/PendingAuthorization.Finished.v1"
        outcome: str

        def apply(self, aggregate: PendingAuthorization) -> None:
            aggregate.outcome = self.outcome

    @staticmethod
    def create_id(state_hash: str, **_: object) -> UUID:
        return pending_authorization_id(state_hash)

    def __init__(
        self,
        state_hash: str,
        integration_id: UUID,
        user_id: str,
        connection_owner: str,
        binding_hash: str,
        verifier: dict[str, str],
        issuer: str | None,
        redirect_uri: str,
        scope: str,
        return_to: str | None,
        expires_at: str,
        epoch: int,
    ) -> None:
        self.state_hash = state_hash
        self.integration_id = integration_id
        self.user_id = user_id
        self.connection_owner = connection_owner
        self.binding_hash = binding_hash
        self.verifier = dict(verifier)
        self.issuer = issuer
        self.redirect_uri = redirect_uri
        self.scope = scope
        self.return_to = return_to
        self.expires_at = expires_at
        self.epoch = epoch
        self.consumed = False
        self.outcome: str | None = None

    def consume(self, *, now: datetime, binding_hash: str | None) -> None:
        """Check the callback against this record and use it up; raises :class:`CallbackRejected`."""
        if self.consumed:
            raise CallbackRejected("replayed")
        if binding_hash is None or binding_hash != self.binding_hash:
            raise CallbackRejected("wrong_browser")  # nothing recorded: a stranger cannot burn it
        if now >= datetime.fromisoformat(self.expires_at):
            raise CallbackRejected("expired")
        self.trigger_event(self.Consumed)

    def finish(self, outcome: str) -> None:
        if self.outcome is None:
            self.trigger_event(self.Finished, outcome=outcome[:64])
