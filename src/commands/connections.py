"""Connections: the OAuth connect flow, direct connects, single-flight token refresh, disconnect.

A connection links an integration to one account: per user (``mode: per-user``) or one for
everybody with access (``mode: shared``, made by a manager). Tokens and credentials live in the
vault under the integration's data key (deleting the integration shreds them); the
:class:`~domain.connection.Connection` events carry references, fingerprints and metadata only,
and each is written after the vault rows it references (a rotated refresh token is durable
before anything else happens, OA-13).

Single flight (DESIGN 6, security note §4.2): within a process, one refresh task per connection,
awaited by every caller that needs it; across processes, a lock per connection
(:class:`~commands.ports.RefreshLocks`: a PostgreSQL advisory lock, or a file lock beside the
SQLite store), taken by that task, after which the connection is read again: if its credential
generation moved, another process refreshed it and its result is used. So however many requests
and processes need a token at once, the provider sees one refresh request.

Failures are classified (OA-12, RL-5): ``invalid_grant`` ends in ``ReauthorizationRequired`` and
no retry; configuration errors are recorded as such; transient ones back off honouring
``Retry-After`` while the old access token is used as long as it is valid. A refresh whose
response was lost after the provider may have processed it is retried once with the same
refresh token; against a rotating provider that either works or ends in reauthorization, never
in a loop (§4.1).
"""

from __future__ import annotations

import asyncio
import logging
import secrets as pysecrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from eventsourcing.persistence import IntegrityError

from commands.ports import OAuthProvider, RefreshLocks
from commands.service import IntegrationsApp, Written, token_hash
from domain.access import AccessLevel, Actor
from domain.audit import SYSTEM_ACTOR, acting_as
from domain.authorization import CallbackRejected, PendingAuthorization, pending_authorization_id
from domain.connection import CONNECTED, REAUTHORIZATION_REQUIRED, SHARED_OWNER, Connection, connection_id
from domain.errors import Conflict, DomainError, Forbidden, NotFound, ValidationFailed, field_error
from domain.integration import Integration
from domain.oauth import ClientConfigError, InvalidGrant, OAuthError, ProtocolError, TokenSet, TransientError
from domain.settings import camel, connection_field

VERIFIER_FIELD = "pkce_verifier"  # the vault field of a pending authorization's PKCE verifier
PRUNE_GRACE = timedelta(minutes=5)  # beyond an authorization's expiry, before its verifier goes
log = logging.getLogger("integrations.connections")

Clock = Callable[[], datetime]
OAUTH_FIELDS = ("access_token", "refresh_token")
CREDENTIAL_FIELDS = {"apikey": ("api_key",), "basic": ("username", "password"), "bearer": ("bearer_token",)}


def _utcnow() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------------------
# Errors the API maps to statuses
# ------------------------------------------------------------------------------------------------


class NotConnected(Conflict):
    """409 ``integration_not_connected``: a per-user integration the caller has not connected."""

    code = "integration_not_connected"


class ReauthorizationNeeded(Conflict):
    """409 ``reauthorization_required``: the grant is dead (or the integration was re-pointed)."""

    code = "reauthorization_required"


class ProviderUnavailable(DomainError):
    """503: the token endpoint is failing and the access token has expired; ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message, {"retryAfter": retry_after})
        self.retry_after = retry_after


class ProviderRejected(DomainError):
    """502: the provider refused the integration's client configuration (``invalid_client`` ...)."""


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionPolicy:
    redirect_uri: str  # INTEGRATIONS_PUBLIC_URL + /oauth2/callback, never from request headers
    return_origins: tuple[str, ...] = ()  # origins a ?redirect= may point at (besides relative paths)
    pending_ttl: timedelta = timedelta(minutes=10)
    refresh_margin: timedelta = timedelta(seconds=60)  # refresh on use when expiring within it
    lock_timeout: float = 20.0  # longer than the token endpoint deadline
    failure_cooldown: float = 30.0  # after a transient failure without Retry-After
    revocation_deadline: timedelta = timedelta(days=1)  # stop retrying a provider revocation


@dataclass(frozen=True)
class StartedFlow:
    location: str  # the provider's authorization URL
    binding: str  # the nonce for the browser-binding cookie (secret)
    pending_id: UUID


@dataclass(frozen=True)
class CallbackOutcome:
    ok: bool
    error: str | None  # an OAuth error code or one of ours; never provider free text
    integration_id: UUID | None
    return_to: str | None
    position: int | None = None


@dataclass(frozen=True)
class Credentials:
    """What the proxy injects for one request (plaintext: memory only)."""

    auth_type: str
    values: Mapping[str, str] = field(repr=False)  # access_token | api_key | username+password | bearer_token
    connection_id: UUID | None
    generation: int
    expires_at: datetime | None = None  # the access token's expiry (oauth2)
    # Non-secret token-response fields kept with the connection (``instance_url``, PX-3).
    metadata: Mapping[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# The service
# ------------------------------------------------------------------------------------------------


class Connections:
    """Connection commands over the one event store of :class:`IntegrationsApp`.

    Async where it talks to a provider; the store calls are short and run in worker threads.
    """

    def __init__(
        self,
        app: IntegrationsApp,
        oauth: OAuthProvider,
        locks: RefreshLocks,
        policy: ConnectionPolicy,
        *,
        clock: Clock = _utcnow,
    ) -> None:
        self.app = app
        self.oauth = oauth
        self.locks = locks
        self.policy = policy
        self.clock = clock
        self._inflight: dict[UUID, asyncio.Task[Connection]] = {}
        self._tokens: dict[tuple[UUID, int], str] = {}  # (connection, generation) -> access token
        # A provider's Retry-After for a revocation: no new attempt before then (in this process;
        # a hint for the retry job, not state: a restart may retry once early).
        self._revoke_not_before: dict[UUID, datetime] = {}

    async def aclose(self) -> None:
        close = getattr(self.oauth, "aclose", None)
        if close is not None:
            await close()

    # ---------------------------------------------------------------- reading

    def _connection(self, cid: UUID) -> Connection | None:
        return self.app._get(cid, Connection)

    def connection_owner(self, actor: Actor, integration: Integration) -> str:
        return SHARED_OWNER if integration.shared_mode else actor.id

    def connection_of(self, actor: Actor, integration_id: UUID) -> tuple[Integration, Connection]:
        """The caller's connection (shared mode: the shared one); 404 when there is none."""
        integration = self.app.integration_for(actor, integration_id, AccessLevel.USE)
        connection = self._connection(connection_id(integration.id, self._owner_key(actor, integration)))
        if connection is None or connection.status not in (CONNECTED, REAUTHORIZATION_REQUIRED):
            raise NotFound("No connection for this integration.")
        return integration, self._effective(integration, connection)

    def refreshing(self, cid: UUID) -> bool:
        task = self._inflight.get(cid)
        return task is not None and not task.done()

    @staticmethod
    def _owner_key(actor: Actor, integration: Integration) -> str | None:
        return None if integration.shared_mode else actor.id

    @staticmethod
    def _effective(integration: Integration, connection: Connection) -> Connection:
        """A connection made under an older epoch (re-pointed, mode switched) is not usable."""
        if connection.status == CONNECTED and connection.epoch != integration.connection_epoch:
            connection.status = REAUTHORIZATION_REQUIRED  # display only: never saved from here
            connection.last_error = {"error": "integration_changed", "kind": "reauthorization", "at": None}
        return connection

    # ---------------------------------------------------------------- connect: start

    def start(self, actor: Actor, integration_id: UUID, return_to: str | None) -> StartedFlow:
        integration = self._connectable(actor, integration_id)
        if integration.settings.get("auth_type") != "oauth2":
            raise ValidationFailed(
                "Only oauth2 integrations connect by redirect; POST the credential to /connect instead.",
                [field_error("authType", "is not oauth2")],
            )
        return_to = self._check_return_to(return_to)
        request = self.oauth.authorization_request(integration.settings, self.policy.redirect_uri)
        binding = pysecrets.token_urlsafe(32)
        state_hash = token_hash(request.state)
        pid = pending_authorization_id(state_hash)
        verifier = self.app.vault.seal(pid, VERIFIER_FIELD, request.verifier)

        def attempt() -> Written[StartedFlow]:
            pending = PendingAuthorization(
                state_hash=state_hash,
                integration_id=integration.id,
                user_id=actor.id,
                connection_owner=self.connection_owner(actor, integration),
                binding_hash=token_hash(binding),
                verifier=dict(verifier),
                issuer=integration.settings.get("issuer"),
                redirect_uri=self.policy.redirect_uri,
                scope=request.scope,
                return_to=return_to,
                expires_at=(self.clock() + self.policy.pending_ttl).isoformat(),
                epoch=integration.connection_epoch,
            )
            return Written(StartedFlow(request.url, binding, pid), self.app._store(pending))

        return self.app._run(actor.id, attempt).value

    def _connectable(self, actor: Actor, integration_id: UUID) -> Integration:
        integration = self.app.integration_for(actor, integration_id, AccessLevel.USE)
        if integration.shared_mode and integration.level_for(actor) < AccessLevel.MANAGE:
            raise Forbidden("The shared connection of this integration is made by its managers (access level 3).")
        return integration

    def _check_return_to(self, return_to: str | None) -> str | None:
        """Relative paths or configured origins only: the callback is no open redirector (OA-4)."""
        if not return_to:
            return None
        bad = ValidationFailed(
            "redirect must be a relative path or an allowed origin.", [field_error("redirect", "not allowed")]
        )
        if any(c in return_to for c in "\r\n\t\\\x00") or len(return_to) > 2048:
            raise bad
        parts = urlsplit(return_to)
        if not parts.scheme and not parts.netloc:
            if not return_to.startswith("/") or return_to.startswith("//"):
                raise bad
            return return_to
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        if parts.scheme not in ("http", "https") or origin not in {o.lower() for o in self.policy.return_origins}:
            raise bad
        return return_to

    # ---------------------------------------------------------------- connect: callback

    async def callback(
        self,
        params: Mapping[str, str],
        binding: str | None,
        actor_of: Callable[[str], Actor | None] | None = None,
    ) -> CallbackOutcome:
        """The provider sent the browser back. Checks first, one token request at most.

        ``actor_of(user_id)`` gives the initiating user as they are now (None: removed): their
        access is checked again, since it may have been taken away during the flow."""
        state = params.get("state")
        if not state or len(state) > 512:
            raise CallbackRejected("unknown")
        pid = pending_authorization_id(token_hash(state))
        pending = await asyncio.to_thread(self.app._get, pid, PendingAuthorization)
        if pending is None:
            raise CallbackRejected("unknown")
        binding_hash = token_hash(binding) if binding else None

        def consume() -> PendingAuthorization:
            fresh = self.app._get(pid, PendingAuthorization)
            assert fresh is not None
            fresh.consume(now=self.clock(), binding_hash=binding_hash)
            try:
                self.app.save(fresh)
            except IntegrityError as e:  # a concurrent callback with the same state won
                raise CallbackRejected("replayed") from e
            return fresh

        with acting_as(pending.user_id):
            pending = await asyncio.to_thread(consume)
        try:
            verifier = await asyncio.to_thread(self.app.vault.open, pid, VERIFIER_FIELD, pending.verifier["ref"])
        finally:
            await asyncio.to_thread(self.app.vault.shred, pid)  # single use: the verifier goes now
        actor = None
        if actor_of is not None:
            actor = await asyncio.to_thread(actor_of, pending.user_id)
            if actor is None:
                await asyncio.to_thread(self._finish, pending, "access_denied")
                return CallbackOutcome(False, "access_denied", pending.integration_id, pending.return_to)
        return await self._complete(pending, params, verifier, actor)

    async def _complete(
        self, pending: PendingAuthorization, params: Mapping[str, str], verifier: str, actor: Actor | None = None
    ) -> CallbackOutcome:
        def done(error: str | None, position: int | None = None) -> CallbackOutcome:
            return CallbackOutcome(error is None, error, pending.integration_id, pending.return_to, position)

        async def fail(error: str) -> CallbackOutcome:
            await asyncio.to_thread(self._finish, pending, error)
            return done(error)

        iss = params.get("iss")
        if pending.issuer is not None and iss != pending.issuer:
            return await fail("issuer_mismatch")  # mix-up defence (OA-7), errors included (RFC 9207 §2.4)
        if params.get("error"):
            return await fail(_error_code(params["error"]))
        code = params.get("code")
        if not code or len(code) > 4096:
            return await fail("invalid_request")
        integration = await asyncio.to_thread(self.app._get, pending.integration_id, Integration)
        if integration is None or integration.deleted:
            return await fail("integration_deleted")
        if integration.connection_epoch != pending.epoch:
            return await fail("integration_changed")  # re-pointed since: the code is for the old server
        if actor is not None:
            need = AccessLevel.MANAGE if pending.connection_owner == SHARED_OWNER else AccessLevel.USE
            if integration.level_for(actor) < need:
                return await fail("access_denied")  # access taken away (or lowered) during the flow
        try:
            client_secret = await asyncio.to_thread(self._client_secret, integration)
            tokens = await self.oauth.exchange_code(
                integration.settings, client_secret, code, verifier, pending.redirect_uri
            )
        except OAuthError as e:
            log.info("code exchange failed for integration %s: %s", integration.id, e.error)
            return await fail(_error_code(e.error))
        account = await self._identity(integration, tokens)
        written = await asyncio.to_thread(
            self._establish_oauth, pending.user_id, integration, pending.connection_owner, tokens, account, pending
        )
        return done(None, written.position)

    def _finish(self, pending: PendingAuthorization, outcome: str) -> None:
        def attempt() -> int | None:
            fresh = self.app._get(pending.id, PendingAuthorization)
            assert fresh is not None
            fresh.finish(outcome)
            return self.app._store(fresh)

        self.app._run(pending.user_id, attempt)

    async def _identity(self, integration: Integration, tokens: TokenSet) -> dict[str, str] | None:
        try:
            found = await self.oauth.identity(integration.settings, tokens)
        except Exception:  # display only: never fail a connect over it
            log.info("identity lookup failed for integration %s", integration.id)
            return None
        return {k: v for k, v in found.items() if v} if found else None

    def _client_secret(self, integration: Integration) -> str:
        ref = integration.secrets.get("client_secret")
        if ref is None:
            raise ClientConfigError("missing_client_secret")
        return self.app.vault.open(integration.id, "client_secret", ref["ref"])

    # ---------------------------------------------------------------- establishing

    def _token_fields(self, tokens: TokenSet) -> dict[str, str]:
        values = {"access_token": tokens.access_token}
        if tokens.refresh_token:
            values["refresh_token"] = tokens.refresh_token
        return values

    def _establish_oauth(
        self,
        actor_id: str,
        integration: Integration,
        owner: str,
        tokens: TokenSet,
        account: dict[str, str] | None,
        pending: PendingAuthorization | None = None,
    ) -> Written[Connection]:
        cid = connection_id(integration.id, None if owner == SHARED_OWNER else owner)
        refs = self._seal(integration.id, cid, self._token_fields(tokens))
        return self._establish(
            actor_id,
            integration,
            owner,
            auth_type="oauth2",
            refs=refs,
            scopes=(
                tokens.scope or (pending.scope if pending else integration.settings.get("scope", "")) or ""
            ).split(),
            token_expires_at=tokens.expires_at.isoformat(),
            account=account,
            pending=pending,
            metadata=_metadata(integration, tokens),
        )

    def _seal(self, integration_id: UUID, cid: UUID, values: Mapping[str, str]) -> dict[str, dict[str, str]]:
        sealed = self.app.vault.seal_many(integration_id, {_field(cid, k): v for k, v in values.items()})
        return {k: dict(sealed[_field(cid, k)]) for k in values}

    def _establish(
        self,
        actor_id: str,
        integration: Integration,
        owner: str,
        *,
        auth_type: str,
        refs: dict[str, dict[str, str]],
        scopes: list[str],
        token_expires_at: str | None,
        account: dict[str, str] | None,
        pending: PendingAuthorization | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Written[Connection]:
        shared = owner == SHARED_OWNER
        cid = connection_id(integration.id, None if shared else owner)
        replaced: list[str] = []

        def attempt() -> Written[Connection]:
            replaced.clear()
            connection = self._connection(cid) or Connection(
                integration_id=integration.id, owner_id=owner, shared=shared
            )
            replaced.extend(r["ref"] for r in connection.credentials.values())
            if connection.pending_revocation:
                pass  # still owed to the provider; the retry job keeps its ref
            connection.establish(
                auth_type=auth_type,
                credentials=refs,
                scopes=scopes,
                token_expires_at=token_expires_at,
                refresh_token_expires_at=None,
                account=account,
                epoch=integration.connection_epoch,
                metadata=metadata,
            )
            touched: list[Any] = [connection]
            if pending is not None:
                fresh = self.app._get(pending.id, PendingAuthorization)
                if fresh is not None:
                    fresh.finish("connected")
                    touched.append(fresh)
            return Written(connection, self.app._store(*touched))

        try:
            written = self.app._run(actor_id, attempt)
        except BaseException:
            self.app.vault.discard(integration.id, [r["ref"] for r in refs.values()])
            raise
        if replaced:
            self.app.vault.discard(integration.id, replaced)  # the old grant's tokens: nothing uses them now
        return written

    async def connect_direct(self, actor: Actor, integration_id: UUID, body: Mapping[str, Any]) -> Written[Connection]:
        """``POST /connect``: oauth2 from a code (+ redirect URI) or a refresh token; other types
        from the credential itself. ``body`` keys are snake_case."""
        integration = await asyncio.to_thread(self._connectable, actor, integration_id)
        auth_type = integration.settings.get("auth_type")
        owner = self.connection_owner(actor, integration)
        if auth_type == "oauth2":
            tokens = await self._tokens_from_body(integration, body)
            account = await self._identity(integration, tokens)
            return await asyncio.to_thread(self._establish_oauth, actor.id, integration, owner, tokens, account)
        if auth_type not in CREDENTIAL_FIELDS:
            raise ValidationFailed(
                "This integration needs no connection.", [field_error("authType", f"{auth_type} has no credentials")]
            )
        wanted = CREDENTIAL_FIELDS[auth_type]
        values = {k: body[k] for k in wanted if isinstance(body.get(k), str) and body[k]}
        missing = [k for k in wanted if k not in values]
        if missing:
            raise ValidationFailed(
                f"An {auth_type} connection needs {', '.join(camel(k) for k in wanted)}.",
                [field_error(camel(k), "is required") for k in missing],
            )
        cid = connection_id(integration.id, None if owner == SHARED_OWNER else owner)

        def write() -> Written[Connection]:
            refs = self._seal(integration.id, cid, values)
            return self._establish(
                actor.id,
                integration,
                owner,
                auth_type=auth_type,
                refs=refs,
                scopes=[],
                token_expires_at=None,
                account=None,
            )

        return await asyncio.to_thread(write)

    async def _tokens_from_body(self, integration: Integration, body: Mapping[str, Any]) -> TokenSet:
        code, refresh_token = body.get("code"), body.get("refresh_token")
        if bool(code) == bool(refresh_token):
            raise ValidationFailed(
                "Give either code (with redirectUri) or refreshToken.",
                [field_error("code", "or refreshToken, exactly one")],
            )
        client_secret = await asyncio.to_thread(self._client_secret, integration)
        try:
            if code:
                redirect_uri = body.get("redirect_uri")
                if not redirect_uri:
                    raise ValidationFailed(
                        "redirectUri is required with code.", [field_error("redirectUri", "is required")]
                    )
                return await self.oauth.exchange_code(
                    integration.settings, client_secret, code, body.get("code_verifier"), redirect_uri
                )
            tokens = await self.oauth.refresh(integration.settings, client_secret, refresh_token)
        except InvalidGrant as e:
            raise ValidationFailed(
                f"The provider refused the grant ({e.error}).",
                [field_error("code" if code else "refreshToken", e.error)],
            ) from None
        except TransientError as e:
            raise ProviderUnavailable("The provider is unavailable; try again later.", e.retry_after) from None
        except OAuthError as e:
            raise ProviderRejected(f"The provider refused the request ({e.error}).") from None
        if tokens.refresh_token is None:  # keep the one the caller gave (OA-13)
            tokens = TokenSet(**{**tokens.__dict__, "refresh_token": refresh_token})
        return tokens

    # ---------------------------------------------------------------- disconnect

    async def disconnect(self, actor: Actor, integration_id: UUID) -> Written[None]:
        integration, connection = await asyncio.to_thread(self.connection_of, actor, integration_id)
        if connection.shared and integration.level_for(actor) < AccessLevel.MANAGE:
            raise Forbidden("The shared connection is disconnected by the integration's managers (access level 3).")
        return await self._revoke(actor.id, integration, connection.id, "disconnected")

    async def _revoke(self, actor_id: str, integration: Integration, cid: UUID, reason: str) -> Written[None]:
        """Revoke at the provider (RFC 7009) when it has an endpoint, then destroy our copies."""
        connection = await asyncio.to_thread(self._connection, cid)
        if connection is None:
            return Written(None, None)
        outcome, keep = "not_supported", None
        token_ref = connection.credentials.get("refresh_token") or connection.credentials.get("access_token")
        issued_by = await asyncio.to_thread(self._as_issued, integration, connection)
        revocation_uri = issued_by.settings.get("revocation_uri")
        if connection.auth_type == "oauth2" and token_ref and revocation_uri:
            hint = "refresh_token" if "refresh_token" in connection.credentials else "access_token"
            outcome = await self._provider_revoke(issued_by, cid, hint, token_ref["ref"])
            if outcome == "pending":
                keep = {**token_ref, "hint": hint}

        def attempt() -> Written[None]:
            fresh = self._connection(cid)
            if fresh is None:
                return Written(None, None)
            drop = [r["ref"] for r in fresh.credentials.values() if keep is None or r["ref"] != keep["ref"]]
            fresh.revoke(reason=reason, provider_revocation=outcome, pending=keep)
            position = self.app._store(fresh)
            self.app.vault.discard(integration.id, drop)
            return Written(None, position)

        written = await asyncio.to_thread(self.app._run, actor_id, attempt)
        self._forget(cid)
        return written

    def _as_issued(self, integration: Integration, connection: Connection) -> Integration:
        """The integration as it was configured when ``connection``'s tokens were obtained (its
        connection epoch). Tokens are revoked at the server that issued them, by the client they
        were issued to: after a re-point (OA-18) the current settings name another endpoint or
        client, which must not receive them (and would refuse them: ``invalid_client``)."""
        if connection.epoch == integration.connection_epoch:
            return integration
        for version in range(integration.version - 1, 0, -1):
            older = self.app.repository.get(integration.id, version=version)
            if older.connection_epoch == connection.epoch:
                return older
        return integration

    async def _provider_revoke(self, integration: Integration, cid: UUID, hint: str, ref: str) -> str:
        try:
            token = await asyncio.to_thread(self.app.vault.open, integration.id, _field(cid, hint), ref)
            client_secret = await asyncio.to_thread(self._client_secret, integration)
            await self.oauth.revoke(integration.settings, client_secret, token, hint)
        except TransientError as e:
            if e.retry_after:
                self._revoke_not_before[cid] = self.clock() + timedelta(seconds=e.retry_after)
            return "pending"
        except OAuthError as e:
            log.info("revocation refused for connection %s: %s", cid, e.error)
            return "failed"
        except Exception:  # the vault or the client secret is gone: nothing more we can do
            log.info("revocation impossible for connection %s", cid)
            return "failed"
        return "done"

    async def prune_expired_authorizations(self) -> int:
        """Crypto-shred the PKCE verifiers of authorizations that expired unused (a callback after
        expiry is refused before the verifier is read). The authorization's own events stay: its
        expiry is a time in them, not a change. How many were shredded."""
        grace = self.policy.pending_ttl + PRUNE_GRACE
        return await asyncio.to_thread(self.app.vault.prune, VERIFIER_FIELD, grace.total_seconds())

    async def retry_revocation(self, cid: UUID, attempts: int) -> str | None:
        """Retry a provider revocation that got 503; settles it when done or past its deadline."""
        connection = await asyncio.to_thread(self._connection, cid)
        if connection is None or connection.pending_revocation is None:
            return None
        integration = await asyncio.to_thread(self.app._get, connection.integration_id, Integration)
        pending = connection.pending_revocation
        if integration is None or integration.deleted:
            outcome = "abandoned"
        else:
            revoked_at = datetime.fromisoformat(connection.modified_on.isoformat())
            within_deadline = self.clock() - revoked_at < self.policy.revocation_deadline
            not_before = self._revoke_not_before.get(cid)
            if within_deadline and not_before is not None and self.clock() < not_before:
                return "pending"  # the provider's Retry-After has not passed: no call
            issued_by = await asyncio.to_thread(self._as_issued, integration, connection)
            outcome = await self._provider_revoke(issued_by, cid, pending["hint"], pending["ref"])
            if outcome == "pending" and within_deadline:
                return "pending"
            outcome = "abandoned" if outcome == "pending" else outcome
        self._revoke_not_before.pop(cid, None)

        def attempt() -> int | None:
            fresh = self._connection(cid)
            if fresh is None or fresh.pending_revocation is None:
                return None
            fresh.settle_revocation(outcome, attempts)
            position = self.app._store(fresh)
            if integration is not None and not integration.deleted:
                self.app.vault.discard(integration.id, [pending["ref"]])
            return position

        await asyncio.to_thread(self.app._run, SYSTEM_ACTOR, attempt)
        return outcome

    async def invalidate(self, actor_id: str, integration_id: UUID, connection_ids: list[UUID], reason: str) -> None:
        """After a re-point or mode switch: revoke the old connections' tokens (OA-18)."""
        await self.revoke_all(actor_id, integration_id, connection_ids, reason, only_stale=True)

    async def revoke_all(
        self, actor_id: str, integration_id: UUID, connection_ids: list[UUID], reason: str, *, only_stale: bool = False
    ) -> None:
        """Revoke these connections at the provider and here (integration or user removed).
        ``only_stale``: just those made under an older connection epoch."""
        integration = await asyncio.to_thread(self.app._get, integration_id, Integration)
        if integration is None:
            return
        for cid in connection_ids:
            connection = await asyncio.to_thread(self._connection, cid)
            if connection is None or connection.integration_id != integration.id:
                continue
            if only_stale and connection.epoch == integration.connection_epoch:
                continue
            await self._revoke(actor_id, integration, cid, reason)

    # ---------------------------------------------------------------- tokens for use

    async def credentials(
        self, actor: Actor, integration: Integration, *, force_refresh_from: int | None = None
    ) -> Credentials:
        """The credentials to inject for ``actor`` on ``integration`` (proxy, previews).

        ``force_refresh_from``: the generation whose access token the upstream answered 401 to;
        refreshes once unless another request already moved past it (RL-6).
        """
        auth_type = integration.settings.get("auth_type")
        cid = connection_id(integration.id, self._owner_key(actor, integration))
        connection = await asyncio.to_thread(self._connection, cid)
        if auth_type in CREDENTIAL_FIELDS and (connection is None or connection.status != CONNECTED):
            # The integration's own credential, when it has one (shared key): no connection needed.
            own = {k: integration.secrets[k] for k in CREDENTIAL_FIELDS[auth_type] if k in integration.secrets}
            if own or auth_type == "basic":
                values = await asyncio.to_thread(self._open_own, integration, own)
                if auth_type == "basic":
                    values.setdefault("username", str(integration.settings.get("username") or ""))
                return Credentials(auth_type, values, None, 0)
        if connection is None or connection.status == "revoked":
            raise NotConnected(
                "Connect this integration first.", {"connectUrl": f"/api/integrations/{integration.id}/connect"}
            )
        connection = self._effective(integration, connection)
        if connection.status != CONNECTED:
            raise ReauthorizationNeeded(
                "The connection needs to be authorized again.",
                {"connectUrl": f"/api/integrations/{integration.id}/connect"},
            )
        if auth_type != "oauth2":
            values = await asyncio.to_thread(self._open_connection, integration, connection)
            return Credentials(auth_type or "", values, connection.id, connection.generation)
        if force_refresh_from is not None and connection.generation == force_refresh_from:
            connection = await self._refreshed(integration, connection, force=True)
        elif self._expiring(connection):
            connection = await self._refreshed(integration, connection, force=False)
        token = await asyncio.to_thread(self._access_token, integration, connection)
        expires = datetime.fromisoformat(connection.token_expires_at) if connection.token_expires_at else None
        return Credentials(
            "oauth2", {"access_token": token}, connection.id, connection.generation, expires, connection.metadata
        )

    def _open_own(self, integration: Integration, refs: Mapping[str, dict[str, str]]) -> dict[str, str]:
        return {k: self.app.vault.open(integration.id, k, r["ref"]) for k, r in refs.items()}

    def _open_connection(self, integration: Integration, connection: Connection) -> dict[str, str]:
        return {
            k: self.app.vault.open(integration.id, _field(connection.id, k), r["ref"])
            for k, r in connection.credentials.items()
        }

    def _access_token(self, integration: Integration, connection: Connection) -> str:
        key = (connection.id, connection.generation)
        token = self._tokens.get(key)
        if token is None:
            ref = connection.credentials["access_token"]["ref"]
            token = self.app.vault.open(integration.id, _field(connection.id, "access_token"), ref)
            self._forget(connection.id)
            self._tokens[key] = token
        return token

    def _forget(self, cid: UUID) -> None:
        for key in [k for k in self._tokens if k[0] == cid]:
            self._tokens.pop(key, None)

    def fresh_for(self, credentials: Credentials, seconds: float) -> bool:
        """Whether ``credentials`` stay usable, by this service's clock and refresh margin, for
        ``seconds`` more: a cache may keep them that long without skipping a due refresh."""
        if credentials.expires_at is None:
            return True
        left = credentials.expires_at - self.clock() - self.policy.refresh_margin
        return left.total_seconds() > seconds

    def _expiring(self, connection: Connection, margin: timedelta | None = None) -> bool:
        if connection.token_expires_at is None:
            return False
        expires = datetime.fromisoformat(connection.token_expires_at)
        return expires - self.clock() <= (margin if margin is not None else self.policy.refresh_margin)

    def _expired(self, connection: Connection) -> bool:
        return self._expiring(connection, timedelta(0))

    # ---------------------------------------------------------------- refresh (single flight)

    async def refresh(self, cid: UUID, *, margin: timedelta | None = None) -> Connection | None:
        """Background refresher entry: refresh ``cid`` if it expires within ``margin``."""
        connection = await asyncio.to_thread(self._connection, cid)
        if connection is None or connection.status != CONNECTED or "refresh_token" not in connection.credentials:
            return connection
        integration = await asyncio.to_thread(self.app._get, connection.integration_id, Integration)
        if integration is None or integration.deleted or connection.epoch != integration.connection_epoch:
            return connection
        if margin is not None and not self._expiring(connection, margin):
            return connection
        try:
            return await self._refreshed(integration, connection, force=margin is None, margin=margin)
        except (ProviderUnavailable, ReauthorizationNeeded, ProviderRejected, NotConnected):
            return await asyncio.to_thread(self._connection, cid)

    async def _refreshed(
        self, integration: Integration, connection: Connection, *, force: bool, margin: timedelta | None = None
    ) -> Connection:
        """The connection after one refresh (ours, or one a concurrent caller or process made)."""
        task = self._inflight.get(connection.id)
        if task is None:
            lead = self._lead_refresh(integration, connection.id, connection.generation, force, margin)
            task = asyncio.ensure_future(lead)
            self._inflight[connection.id] = task
            task.add_done_callback(lambda _t, cid=connection.id: self._inflight.pop(cid, None))
        return await asyncio.shield(task)

    async def _lead_refresh(
        self, integration: Integration, cid: UUID, seen: int, force: bool, margin: timedelta | None = None
    ) -> Connection:
        async with self.locks.hold(cid, self.policy.lock_timeout) as locked:
            connection = await asyncio.to_thread(self._connection, cid)
            if connection is None or connection.status != CONNECTED:
                raise ReauthorizationNeeded("The connection needs to be authorized again.")
            moved = connection.generation != seen
            if moved and not self._expired(connection):
                return connection  # another request or process refreshed (or reconnected) meanwhile
            if not moved and not force and not self._expiring(connection, margin):
                return connection
            if not locked:
                if not self._expired(connection):
                    return connection
                raise ProviderUnavailable("Another process is refreshing this connection; retry shortly.", 1.0)
            return await self._refresh_locked(integration, connection)

    async def _refresh_locked(self, integration: Integration, connection: Connection) -> Connection:
        cooldown = self._cooldown(connection)
        if cooldown is not None:
            if not self._expired(connection):
                return connection
            raise ProviderUnavailable("The provider is failing; retry later.", cooldown)
        rt_ref = connection.credentials.get("refresh_token")
        if rt_ref is None:
            if not self._expired(connection):
                return connection
            await asyncio.to_thread(self._reauthorize, connection, "no_refresh_token")
            raise ReauthorizationNeeded("The access token expired and the provider gave no refresh token.")
        refresh_token, client_secret = await asyncio.to_thread(self._refresh_inputs, integration, connection, rt_ref)
        retried = False
        while True:
            try:
                tokens = await self.oauth.refresh(integration.settings, client_secret, refresh_token)
                break
            except TransientError as e:
                if not retried and (e.phase == "read" or e.retry_after is None):
                    retried = True  # once: a lost rotation then ends in invalid_grant (§4.1)
                    await asyncio.sleep(0.2)
                    continue
                await asyncio.to_thread(self._record_failure, connection, e.error, "transient", e.retry_after)
                if not self._expired(connection):
                    return connection  # the old token still works (RL-5)
                raise ProviderUnavailable(
                    "The provider is unavailable; retry later.", e.retry_after or self.policy.failure_cooldown
                ) from None
            except InvalidGrant as e:
                await asyncio.to_thread(self._reauthorize, connection, e.error)
                raise ReauthorizationNeeded(
                    "The provider refused the refresh token; the connection needs to be authorized again.",
                    {"connectUrl": f"/api/integrations/{integration.id}/connect"},
                ) from None
            except (ClientConfigError, ProtocolError, OAuthError) as e:
                await asyncio.to_thread(self._record_failure, connection, e.error, "configuration", None)
                if not self._expired(connection):
                    return connection
                raise ProviderRejected(
                    f"The provider refused the refresh ({e.error}); check the integration."
                ) from None
        stored = await asyncio.to_thread(self._store_refresh, integration, connection, tokens)
        if stored.status != CONNECTED:
            # Disconnected (or its grant declared dead) while the refresh was in flight: nothing
            # will use the new tokens, so tell the provider instead of leaving them live (§4.2).
            await self._revoke_orphaned(integration, connection.id, tokens)
            if stored.status == REAUTHORIZATION_REQUIRED:
                raise ReauthorizationNeeded("The connection needs to be authorized again.")
            raise NotConnected(
                "Connect this integration first.", {"connectUrl": f"/api/integrations/{integration.id}/connect"}
            )
        return stored

    async def _revoke_orphaned(self, integration: Integration, cid: UUID, tokens: TokenSet) -> None:
        if not integration.settings.get("revocation_uri"):
            return
        hint = "refresh_token" if tokens.refresh_token else "access_token"
        try:
            client_secret = await asyncio.to_thread(self._client_secret, integration)
            token = tokens.refresh_token or tokens.access_token
            await self.oauth.revoke(integration.settings, client_secret, token, hint)
        except Exception as e:  # best effort: our copies are gone already
            log.info("revoking the orphaned tokens of connection %s failed: %s", cid, type(e).__name__)

    def _cooldown(self, connection: Connection) -> float | None:
        error = connection.last_error
        if not error or error.get("kind") not in ("transient", "configuration") or not error.get("at"):
            return None
        wait = error.get("retry_after") or self.policy.failure_cooldown
        left = wait - (self.clock() - datetime.fromisoformat(error["at"])).total_seconds()
        return left if left > 0 else None

    def _refresh_inputs(
        self, integration: Integration, connection: Connection, rt_ref: dict[str, str]
    ) -> tuple[str, str]:
        rt = self.app.vault.open(integration.id, _field(connection.id, "refresh_token"), rt_ref["ref"])
        return rt, self._client_secret(integration)

    def _store_refresh(self, integration: Integration, connection: Connection, tokens: TokenSet) -> Connection:
        """Seal first (a rotated refresh token is durable before anything else), then record."""
        refs = self._seal(integration.id, connection.id, self._token_fields(tokens))
        old = [connection.credentials[k]["ref"] for k in refs if k in connection.credentials]

        def attempt() -> Connection:
            # Never dropped on a write conflict: we hold the lock, so a reload at the same
            # generation is the same credentials; if it moved (a reconnect), ours are stale.
            fresh = self._connection(connection.id)
            if fresh is None or fresh.generation != connection.generation or fresh.status != CONNECTED:
                raise Conflict("The connection changed during the refresh.")
            fresh.refreshed(
                generation=connection.generation,
                access_token=refs["access_token"],
                refresh_token=refs.get("refresh_token"),
                scopes=(tokens.scope or "").split(),
                token_expires_at=tokens.expires_at.isoformat(),
                refresh_token_expires_at=None,
                metadata=_metadata(integration, tokens),
            )
            self.app._store(fresh)
            return fresh

        try:
            refreshed = self.app._run(SYSTEM_ACTOR, attempt)
        except Conflict:
            self.app.vault.discard(integration.id, [r["ref"] for r in refs.values()])
            current = self._connection(connection.id)
            if current is None:
                raise
            return current
        self.app.vault.discard(integration.id, old)
        self._forget(connection.id)
        self._tokens[(refreshed.id, refreshed.generation)] = tokens.access_token
        return refreshed

    def _record_failure(self, connection: Connection, error: str, kind: str, retry_after: float | None) -> None:
        def attempt() -> None:
            fresh = self._connection(connection.id)
            if fresh is not None and fresh.generation == connection.generation and fresh.status == CONNECTED:
                fresh.refresh_failed(generation=fresh.generation, error=error[:64], kind=kind, retry_after=retry_after)
                self.app._store(fresh)

        self.app._run(SYSTEM_ACTOR, attempt)

    def _reauthorize(self, connection: Connection, reason: str) -> None:
        drop: list[str] = []

        def attempt() -> None:
            fresh = self._connection(connection.id)
            if fresh is not None and fresh.status == CONNECTED:
                drop[:] = [r["ref"] for r in fresh.credentials.values()]
                fresh.require_reauthorization(reason[:64])
                self.app._store(fresh)

        self.app._run(SYSTEM_ACTOR, attempt)
        self.app.vault.discard(connection.integration_id, drop)  # a dead grant's tokens are useless
        self._forget(connection.id)


def _field(cid: UUID, name: str) -> str:
    """The vault field of a connection credential (bound into the ciphertext's associated data)."""
    return f"connection:{cid}:{name}"


_ERROR_CODE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def _error_code(value: str) -> str:
    """An OAuth error code as we record and show it: lower-case ``[a-z0-9_]``, at most 64 chars."""
    code = value.strip().lower()[:64]
    return code if code and set(code) <= _ERROR_CODE_CHARS else "invalid_error_response"


def _metadata(integration: Integration, tokens: TokenSet) -> dict[str, str] | None:
    """The token-response fields this integration uses, when the response carried them: the
    field its ``apiBaseUri`` names (``$connection.instance_url``). Only that one: nothing else
    of a token response is kept (the parser already left out tokens and secret-looking fields)."""
    name = connection_field(integration.settings)
    if name is None:
        return None
    value = tokens.raw_extra.get(name)
    return {name: value} if isinstance(value, str) and value else None
