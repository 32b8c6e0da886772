"""The command side: one eventsourcing Application holding every aggregate of the service.

Each command loads what it needs, checks the caller's rights and the rules, and saves all the
aggregates it touched in one atomic ``save()``. A conflicting concurrent write surfaces as the
store's ``IntegrityError`` on the primary key; the whole command is then re-run on fresh state
(bounded), or, when the caller pinned a version with ``If-Match``, answered with 412.
Secrets are sealed in the vault before the event that references them is written.
"""

from __future__ import annotations

import hashlib
import random
import secrets as pysecrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar
from uuid import UUID, uuid4

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError

from commands.messages import IntegrationBody, OwnerBody, UserBody, given, split_integration_body
from commands.ports import PasswordHasher, PreparedSeal, SecretRef, SecretsVault
from domain import settings as rules
from domain.access import (
    AccessLevel,
    Actor,
    is_team,
    normalise_principal,
    team_id_of,
    team_principal,
)
from domain.audit import SYSTEM_ACTOR, acting_as
from domain.errors import (
    Conflict,
    DomainError,
    Forbidden,
    NotFound,
    PreconditionFailed,
    ValidationFailed,
    field_error,
)
from domain.integration import Integration
from domain.principals import Team, User, check_principal_id, team_aggregate_id, user_aggregate_id
from domain.slugs import is_valid_slug, slugify
from domain.unique_key import SLUG, USERNAME, UniqueKey, unique_key_id
from domain.urls import UrlPolicy

T = TypeVar("T")
A = TypeVar("A", bound=Aggregate)

TOKEN_PREFIX = "iik_"  # noqa: S105  (a prefix, not a secret)
SESSION_PREFIX = "iis_"
BOOTSTRAP_TOKEN_ID = "bootstrap"  # noqa: S105
MAX_ATTEMPTS = 8


@dataclass(frozen=True)
class Written(Generic[T]):
    """A command's result and the notification id of its last event (None: nothing changed)."""

    value: T
    position: int | None


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once, never stored
    token_id: str
    user_id: str
    expires_at: str | None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class IntegrationsApp(Application[UUID]):
    name = "integrations"
    snapshotting_intervals = {Integration: 50, User: 50, Team: 100}

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        vault: SecretsVault | None = None,
        hasher: PasswordHasher | None = None,
        url_policy: UrlPolicy | None = None,
        session_ttl: timedelta = timedelta(hours=8),
    ) -> None:
        super().__init__(env)
        self._vault = vault
        self._hasher = hasher
        self.url_policy = url_policy or UrlPolicy()
        self.session_ttl = session_ttl

    # ------------------------------------------------------------------ plumbing

    @property
    def vault(self) -> SecretsVault:
        if self._vault is None:
            raise RuntimeError("this application instance was built without a secrets vault")
        return self._vault

    def _run(self, actor_id: str, attempt: Callable[[], T]) -> T:
        """Run a command with the actor recorded on its events; re-run on a write conflict."""
        with acting_as(actor_id):
            for n in range(1, MAX_ATTEMPTS + 1):
                try:
                    return attempt()
                except IntegrityError as e:
                    if n == MAX_ATTEMPTS:
                        raise Conflict("The resource was changed concurrently; try again.") from e
                    time.sleep(random.uniform(0.002, 0.02) * n)
        raise AssertionError("unreachable")

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        """``Application.save`` for our aggregates, without its two ``isinstance`` checks per object
        against runtime-checkable protocols (``DomainEventProtocol``, ``CollectEventsProtocol``):
        on Python 3.11 each walks the protocol's attributes, about a tenth of a create's CPU.
        Anything else (a bare event, ``None``) takes the library's own path."""
        if not objs or not all(isinstance(obj, Aggregate) for obj in objs):
            return super().save(*objs, **kwargs)
        processing_event: ProcessingEvent[UUID] = ProcessingEvent()
        for obj in objs:
            processing_event.events.extend(obj.collect_events())
            processing_event.aggregates[obj.id] = obj
        processing_event.saved_kwargs.update(kwargs)
        recordings = self._record(processing_event)
        self._take_snapshots(processing_event)
        self._notify(recordings)
        self.notify(processing_event.events)  # the library's deprecated hook, as it calls it
        return recordings

    def _store(self, *aggregates: Aggregate, co_writes: list[Any] | None = None) -> int | None:
        recordings = self.save(*aggregates, co_writes=co_writes) if co_writes else self.save(*aggregates)
        return recordings[-1].notification.id if recordings else None

    def _get(self, aggregate_id: UUID, cls: type[A]) -> A | None:
        try:
            aggregate = self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        return aggregate if isinstance(aggregate, cls) else None

    def _claim(self, namespace: str, key: str, ref: UUID) -> UniqueKey:
        index = self._get(unique_key_id(namespace, key), UniqueKey)
        if index is None:
            return UniqueKey(namespace=namespace, key=key, ref=ref)
        index.claim(ref)
        return index

    def _release(self, namespace: str, key: str, ref: UUID) -> UniqueKey | None:
        index = self._get(unique_key_id(namespace, key), UniqueKey)
        if index is not None:
            index.release(ref)
        return index

    def history(self, aggregate_id: UUID) -> Iterator[Any]:
        """Every event of one aggregate, oldest first (the audit trail)."""
        return iter(self.repository.event_store.get(aggregate_id))

    # ------------------------------------------------------------------ integrations: queries

    def find_integration_id(self, owner_id: str, slug: str) -> UUID | None:
        index = self._get(unique_key_id(SLUG, f"{normalise_principal(owner_id)}:{slug}"), UniqueKey)
        return index.ref if index else None

    def integration_for(self, actor: Actor, integration_id: UUID, need: AccessLevel = AccessLevel.USE) -> Integration:
        """The integration if the actor holds ``need``; 404 when invisible, 403 when visible only."""
        integration = self._get(integration_id, Integration)
        if integration is None or integration.deleted:
            raise NotFound("Integration not found.")
        level = integration.level_for(actor)
        if level < AccessLevel.USE:
            raise NotFound("Integration not found.")
        if level < need:
            raise Forbidden(f"This needs access level {int(need)} on the integration; you have {int(level)}.")
        return integration

    # ------------------------------------------------------------------ integrations: commands

    def create_integration(self, actor: Actor, body: IntegrationBody) -> Written[Integration]:
        if not actor.may("integrationCreation"):
            raise Forbidden("Creating integrations needs the integrationCreation permission.")
        settings_in, secrets_in = split_integration_body(body)
        owner_id = self._check_new_owner(actor, body.owner_id if isinstance(body.owner_id, str) else None)
        settings = rules.normalise({k: v for k, v in settings_in.items() if v is not None})
        plain = {k: v for k, v in secrets_in.items() if v is not None}
        slug = body.slug if isinstance(body.slug, str) else slugify(str(settings.get("name") or ""))
        _check_slug(slug)
        rules.check(settings, plain, self.url_policy)
        integration_id = uuid4()
        # On PostgreSQL the secrets are written in the save's own transaction (ADR 0014); on a
        # store that cannot share it, sealed first (ADR 0003: the event only ever follows them).
        prepared = self._prepare_seal(integration_id, plain)
        refs = {f: dict(r) for f, r in prepared.refs.items()} if prepared else self._seal_all(integration_id, plain)
        co_writes = [prepared.write] if prepared else []

        tries = 0

        def attempt() -> Written[Integration]:
            nonlocal tries
            tries += 1
            key = f"{owner_id}:{slug}"
            # Most slugs are new: claim without reading first. If the key exists, the save
            # collides on its primary key and the retry reads it (taken -> 409, released -> reuse).
            index = (
                UniqueKey(namespace=SLUG, key=key, ref=integration_id)
                if tries == 1
                else self._claim(SLUG, key, integration_id)
            )
            integration = Integration.new(integration_id, owner_id=owner_id, slug=slug, settings=settings, secrets=refs)
            return Written(integration, self._store(integration, index, co_writes=co_writes))

        try:
            return self._run(actor.id, attempt)
        except BaseException:
            if refs and not prepared:
                self.vault.shred(integration_id)  # sealed beforehand, and nothing references them
            raise

    def update_integration(
        self,
        actor: Actor,
        integration_id: UUID,
        body: IntegrationBody,
        *,
        partial: bool,
        expected_version: int | None = None,
    ) -> Written[Integration]:
        if isinstance(body.owner_id, str) or body.owner_id is None:
            raise ValidationFailed(
                "ownerId cannot be changed by an update.",
                [field_error("ownerId", "use PUT /api/integrations/{id}/owner to transfer ownership")],
            )
        self.integration_for(actor, integration_id, AccessLevel.EDIT)  # before sealing anything
        settings_in, secrets_in = split_integration_body(body)
        cleared = [k for k, v in secrets_in.items() if v is None]
        sealed = self._seal_all(integration_id, {k: v for k, v in secrets_in.items() if v is not None})

        def attempt() -> tuple[Written[Integration], list[str]]:
            integration = self.integration_for(actor, integration_id, AccessLevel.EDIT)
            _check_version(integration, expected_version)
            if partial:
                merged = {**integration.settings, **settings_in}
                settings = rules.normalise({k: v for k, v in merged.items() if v is not None})
            else:
                settings = rules.normalise({k: v for k, v in settings_in.items() if v is not None})
            slug = body.slug if isinstance(body.slug, str) else integration.slug
            _check_slug(slug)
            # A secret header no longer in the map (or no longer secret) loses its stored value.
            wanted = rules.secret_header_fields(settings)
            dropped = [k for k in integration.secrets if k.startswith(rules.SECRET_HEADER_PREFIX) and k not in wanted]
            present = (set(integration.secrets) - set(cleared) - set(dropped)) | set(sealed)
            rules.check(settings, present, self.url_policy)
            _check_repointing(actor, integration, settings)
            touched: list[Aggregate] = [integration]
            if slug != integration.slug:
                touched.append(self._claim(SLUG, f"{integration.owner_id}:{slug}", integration.id))
                old = self._release(SLUG, integration.natural_id, integration.id)
                touched.extend([old] if old else [])
            changed = integration.update(
                slug=slug, settings=settings, secrets_set=sealed, secrets_cleared=[*cleared, *dropped]
            )
            return Written(integration, self._store(*touched) if changed else None)

        try:
            return self._run(actor.id, attempt)
        except DomainError:
            # Refused before anything was saved (invalid, precondition, conflict): nothing refers
            # to what was sealed for it.
            if sealed:
                self.vault.discard(integration_id, [r["ref"] for r in sealed.values()])
            raise

    def header_secrets(self, integration: Integration) -> dict[str, str]:
        """The integration's secret header values by header name, opened (for the proxy)."""
        out = {}
        for name, value in (integration.settings.get("headers") or {}).items():
            field = rules.secret_header_field(name)
            ref = integration.secrets.get(field)
            if rules.is_secret_header(value) and ref is not None:
                out[name] = self.vault.open(integration.id, field, ref["ref"])
        return out

    def delete_integration(
        self, actor: Actor, integration_id: UUID, *, expected_version: int | None = None
    ) -> Written[Integration]:
        def attempt() -> Written[Integration]:
            integration = self.integration_for(actor, integration_id, AccessLevel.MANAGE)
            _check_version(integration, expected_version)
            index = self._release(SLUG, integration.natural_id, integration.id)
            integration.delete()
            return Written(integration, self._store(integration, *([index] if index else [])))

        written = self._run(actor.id, attempt)
        self.vault.shred(integration_id)  # crypto-shredding: the exported history keeps no usable secret
        return written

    def share_integration(
        self, actor: Actor, integration_id: UUID, principal_id: str, access_level: int
    ) -> Written[dict[str, Any]]:
        pid = normalise_principal(principal_id)
        self._require_principal(pid)

        def attempt() -> Written[dict[str, Any]]:
            integration = self.integration_for(actor, integration_id, AccessLevel.MANAGE)
            if pid == integration.owner_id:
                raise ValidationFailed(
                    "The owner already has every right.", [field_error("principalId", "is the owner")]
                )
            changed = integration.share(pid, access_level)
            position = self._store(integration) if changed else None
            return Written(integration.shares[pid], position)

        return self._run(actor.id, attempt)

    def unshare_integration(self, actor: Actor, integration_id: UUID, principal_id: str) -> Written[None]:
        pid = normalise_principal(principal_id)

        def attempt() -> Written[None]:
            integration = self.integration_for(actor, integration_id, AccessLevel.MANAGE)
            integration.unshare(pid)
            return Written(None, self._store(integration))

        return self._run(actor.id, attempt)

    def transfer_integration(self, actor: Actor, integration_id: UUID, body: OwnerBody) -> Written[Integration]:
        if (body.user_id is None) == (body.team_id is None):
            raise ValidationFailed(
                "Give exactly one of userId and teamId.", [field_error("userId", "or teamId, exactly one")]
            )
        if body.team_id is not None:
            new_owner = team_principal(body.team_id)
            self._require_principal(new_owner)
            if not actor.administers(body.team_id):
                raise Forbidden("Transferring to a team needs the admin role in that team.")
        else:
            new_owner = normalise_principal(str(body.user_id))
            self._require_principal(new_owner)

        def attempt() -> Written[Integration]:
            integration = self.integration_for(actor, integration_id, AccessLevel.MANAGE)
            if new_owner == integration.owner_id:
                return Written(integration, None)
            claimed = self._claim(SLUG, f"{new_owner}:{integration.slug}", integration.id)
            released = self._release(SLUG, integration.natural_id, integration.id)
            integration.transfer_to(new_owner)
            return Written(integration, self._store(integration, claimed, *([released] if released else [])))

        return self._run(actor.id, attempt)

    def _check_new_owner(self, actor: Actor, owner_id: str | None) -> str:
        owner = normalise_principal(owner_id) if owner_id else actor.id
        if is_team(owner):
            self._require_principal(owner)
            if not actor.administers(team_id_of(owner)):
                raise Forbidden("Only the team's admins can create integrations owned by the team.")
        elif owner != actor.id:
            if not actor.superuser:
                raise Forbidden("Only a superuser can create integrations owned by another user.")
            self._require_principal(owner)
        return owner

    def _require_principal(self, principal_id: str) -> None:
        if is_team(principal_id):
            team = self._get(team_aggregate_id(team_id_of(principal_id)), Team)
            if team is None or team.removed:
                raise NotFound(f"Unknown principal '{principal_id}'.")
        else:
            user = self._get(user_aggregate_id(principal_id), User)
            if user is None or user.removed:
                raise NotFound(f"Unknown principal '{principal_id}'.")

    def _prepare_seal(self, owner: UUID, plaintexts: dict[str, str]) -> PreparedSeal | None:
        """A new owner's seal to write with the save, when both the vault and the event store's
        recorder can share one transaction; else ``None``."""
        if not plaintexts or not getattr(self.recorder, "accepts_co_writes", False):
            return None
        return self.vault.prepare_new_owner(owner, plaintexts)

    def _seal_all(self, owner: UUID, plaintexts: dict[str, str]) -> dict[str, dict[str, str]]:
        if not plaintexts:
            return {}
        return {f: dict(ref) for f, ref in self.vault.seal_many(owner, plaintexts).items()}

    # ------------------------------------------------------------------ users

    def user(self, user_id: str) -> User:
        user = self._get(user_aggregate_id(user_id), User)
        if user is None or user.removed:
            raise NotFound(f"User '{user_id}' not found.")
        return user

    def create_user(self, actor: Actor, body: UserBody) -> Written[User]:
        _require_superuser(actor)
        if not isinstance(body.id, str):
            raise ValidationFailed("id is required.", [field_error("id", "is required")])
        check_principal_id("id", body.id)
        fields = given(body)
        username = fields.get("username") or body.id
        check_principal_id("username", username)
        profile = {
            "username": username,
            "email": fields.get("email", ""),
            "display_name": fields.get("display_name") or username,
            "superuser": bool(fields.get("superuser", False)),
            "permissions": sorted(set(fields.get("permissions", []))),
            "custom": fields.get("custom", {}),
        }
        aggregate_id = user_aggregate_id(body.id)
        password = self._seal_password(aggregate_id, fields.get("password"))

        def attempt() -> Written[User]:
            existing = self._get(aggregate_id, User)
            if existing is not None and not existing.removed:
                raise Conflict(f"User '{body.id}' already exists.")
            if existing is not None:  # a removed id is not reused: its history stays its own
                raise Conflict(f"User id '{body.id}' belonged to a removed user and cannot be reused.")
            index = self._claim(USERNAME, username, aggregate_id)
            user = User(user_id=str(body.id), profile=profile)
            if password:
                user.set_password(password)
            return Written(user, self._store(user, index))

        return self._run(actor.id, attempt)

    def update_user(self, actor: Actor, user_id: str, body: UserBody) -> Written[User]:
        _require_superuser(actor)
        if isinstance(body.id, str):
            raise ValidationFailed("id cannot be changed.", [field_error("id", "is immutable")])
        fields = given(body)
        if "username" in fields:
            check_principal_id("username", fields["username"])
        self.user(user_id)
        has_password = "password" in fields
        password = self._seal_password(user_aggregate_id(user_id), fields.pop("password", None))
        if actor.id == user_id and fields.get("superuser") is False:
            raise ValidationFailed("You cannot remove your own superuser flag.", [field_error("superuser", "")])
        if "permissions" in fields:
            fields["permissions"] = sorted(set(fields["permissions"]))

        def attempt() -> Written[User]:
            user = self.user(user_id)
            touched: list[Aggregate] = [user]
            new_username = fields.get("username", user.username)
            if new_username != user.username:
                touched.append(self._claim(USERNAME, new_username, user.id))
                old = self._release(USERNAME, user.username, user.id)
                touched.extend([old] if old else [])
            user.change_profile(fields)
            if has_password:
                user.set_password(password)
            return Written(user, self._store(*touched))

        return self._run(actor.id, attempt)

    def delete_user(self, actor: Actor, user_id: str) -> Written[None]:
        _require_superuser(actor)
        if user_id == actor.id:
            raise ValidationFailed("You cannot delete yourself.", [field_error("id", "is the caller")])

        def attempt() -> Written[None]:
            user = self.user(user_id)
            index = self._release(USERNAME, user.username, user.id)
            user.remove()
            return Written(None, self._store(user, *([index] if index else [])))

        written = self._run(actor.id, attempt)
        self.vault.shred(user_aggregate_id(user_id))
        return written

    def _seal_password(self, owner: UUID, password: str | None) -> dict[str, str] | None:
        if password is None:
            return None
        if self._hasher is None:
            raise RuntimeError("this application instance was built without a password hasher")
        return dict(self.vault.seal(owner, "password_hash", self._hasher.hash(password)))

    # ------------------------------------------------------------------ teams

    def team(self, team_id: str) -> Team:
        team = self._get(team_aggregate_id(team_id), Team)
        if team is None or team.removed:
            raise NotFound(f"Team '{team_id}' not found.")
        return team

    def create_team(self, actor: Actor, team_id: str, name: str) -> Written[Team]:
        _require_superuser(actor)
        check_principal_id("id", team_id)

        def attempt() -> Written[Team]:
            if self._get(team_aggregate_id(team_id), Team) is not None:
                raise Conflict(f"Team '{team_id}' already exists.")
            team = Team(team_id=team_id, name=name)
            return Written(team, self._store(team))

        return self._run(actor.id, attempt)

    def delete_team(self, actor: Actor, team_id: str) -> Written[None]:
        _require_superuser(actor)

        def attempt() -> Written[None]:
            team = self.team(team_id)
            team.remove()
            return Written(None, self._store(team))

        return self._run(actor.id, attempt)

    def set_member(self, actor: Actor, team_id: str, user_id: str, role: str) -> Written[Team]:
        if not actor.administers(team_id):
            raise Forbidden("Managing members needs the admin role in the team.")
        self.user(user_id)

        def attempt() -> Written[Team]:
            team = self.team(team_id)
            changed = team.set_member(user_id, role)
            return Written(team, self._store(team) if changed else None)

        return self._run(actor.id, attempt)

    def remove_member(self, actor: Actor, team_id: str, user_id: str) -> Written[Team]:
        if not actor.administers(team_id):
            raise Forbidden("Managing members needs the admin role in the team.")

        def attempt() -> Written[Team]:
            team = self.team(team_id)
            team.remove_member(user_id)
            return Written(team, self._store(team))

        return self._run(actor.id, attempt)

    # ------------------------------------------------------------------ tokens and sessions

    def issue_token(self, actor: Actor, user_id: str, label: str) -> Written[IssuedToken]:
        if not (actor.superuser or actor.id == user_id):
            raise NotFound(f"User '{user_id}' not found.")
        return self._issue(actor.id, user_id, TOKEN_PREFIX, label, kind="api", expires_at=None)

    def revoke_token(self, actor: Actor, user_id: str, token_id: str) -> Written[None]:
        if not (actor.superuser or actor.id == user_id):
            raise NotFound(f"User '{user_id}' not found.")

        def attempt() -> Written[None]:
            user = self.user(user_id)
            user.revoke_token(token_id)
            return Written(None, self._store(user))

        return self._run(actor.id, attempt)

    def login(self, username: str, password: str) -> Written[IssuedToken]:
        """A session token for a correct password; one generic error otherwise."""
        failure = DomainError("Invalid username or password.")
        index = self._get(unique_key_id(USERNAME, username), UniqueKey)
        user = self._get(index.ref, User) if index and index.ref else None
        encoded = None
        if user is not None and not user.removed and user.password:
            try:
                encoded = self.vault.open(user.id, "password_hash", user.password["ref"])
            except Exception:  # a shredded or unreadable hash is a failed login, not a 500
                encoded = None
        if self._hasher is None:
            raise RuntimeError("this application instance was built without a password hasher")
        if encoded is None:
            self._hasher.hash(password)  # same cost whether or not the user exists
            raise failure
        if not self._hasher.verify(password, encoded):
            raise failure
        assert user is not None
        expires = (datetime.now(UTC) + self.session_ttl).isoformat()
        return self._issue(user.user_id, user.user_id, SESSION_PREFIX, "session", kind="session", expires_at=expires)

    def logout(self, user_id: str, token_id: str) -> Written[None]:
        def attempt() -> Written[None]:
            user = self.user(user_id)
            if token_id not in user.tokens:
                return Written(None, None)
            user.revoke_token(token_id)
            return Written(None, self._store(user))

        return self._run(user_id, attempt)

    def _issue(
        self, actor_id: str, user_id: str, prefix: str, label: str, *, kind: str, expires_at: str | None
    ) -> Written[IssuedToken]:
        token = prefix + pysecrets.token_urlsafe(32)
        token_id = uuid4().hex[:16]

        def attempt() -> Written[IssuedToken]:
            user = self.user(user_id)
            now = datetime.now(UTC)
            for old_id, old in list(user.tokens.items()):  # expired sessions leave with the next login
                if (
                    old.get("kind") == "session"
                    and old.get("expires_at")
                    and datetime.fromisoformat(old["expires_at"]) <= now
                ):
                    user.revoke_token(old_id)
            user.issue_token(token_id, token_hash(token), label, kind=kind, expires_at=expires_at)
            return Written(IssuedToken(token, token_id, user_id, expires_at), self._store(user))

        return self._run(actor_id, attempt)

    def ensure_admin(self, token: str) -> int | None:
        """Start-up bootstrap: a superuser ``admin`` whose API token is ``token``. Idempotent."""
        wanted = token_hash(token)

        def attempt() -> int | None:
            user = self._get(user_aggregate_id("admin"), User)
            touched: list[Aggregate] = []
            if user is None:
                profile = {
                    "username": "admin",
                    "email": "",
                    "display_name": "Administrator",
                    "superuser": True,
                    "permissions": ["integrationCreation", "integrations.read"],
                    "custom": {},
                }
                user = User(user_id="admin", profile=profile)
                touched.append(self._claim(USERNAME, "admin", user.id))
            elif user.removed:
                raise Conflict("The 'admin' user was removed; it cannot be bootstrapped again.")
            current = user.tokens.get(BOOTSTRAP_TOKEN_ID)
            if current and current["hash"] == wanted:
                return None
            if current:
                user.revoke_token(BOOTSTRAP_TOKEN_ID)
            if not user.profile.get("superuser"):
                user.change_profile({"superuser": True})
            user.issue_token(BOOTSTRAP_TOKEN_ID, wanted, "INTEGRATIONS_ADMIN_TOKEN")
            return self._store(user, *touched)

        return self._run(SYSTEM_ACTOR, attempt)


def _require_superuser(actor: Actor) -> None:
    if not actor.superuser:
        raise Forbidden("This needs a superuser.")


def _check_repointing(actor: Actor, integration: Integration, settings: dict[str, Any]) -> None:
    """Where tokens come from or go to is the managers' call (OA-18): an editor could otherwise
    re-point other users' live credentials at a server they control."""
    moved = [k for k in rules.REPOINTING_FIELDS if integration.settings.get(k) != settings.get(k)]
    if moved and integration.level_for(actor) < AccessLevel.MANAGE:
        names = ", ".join(rules.camel(k) for k in moved)
        raise Forbidden(f"Changing {names} needs access level 3 (manage) on the integration.")


def _check_slug(slug: str) -> None:
    if not is_valid_slug(slug):
        raise ValidationFailed(
            "The slug is not valid.",
            [field_error("slug", "1-64 lowercase letters, digits and single hyphens, not at either end")],
        )


def _check_version(aggregate: Aggregate, expected: int | None) -> None:
    if expected is not None and aggregate.version != expected:
        raise PreconditionFailed(
            f"The resource is at version {aggregate.version}, not {expected}.",
            {"currentVersion": aggregate.version},
        )


__all__ = ["IntegrationsApp", "IssuedToken", "SecretRef", "Written", "token_hash"]
