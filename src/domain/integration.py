"""The Integration aggregate: configuration, ownership and shares of one third-party service."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from domain.access import AccessLevel, Actor, effective_level
from domain.audit import AuditedAggregate
from domain.errors import NotFound, ValidationFailed, field_error
from domain.settings import REPOINTING_FIELDS

SecretRefs = dict[str, dict[str, str]]  # field -> {"ref", "fingerprint"}


class Integration(AuditedAggregate):
    TOPIC = "integrations/Integration"

    # Class defaults, so snapshots taken before these attributes existed still load.
    connection_epoch = 0  # moves when tokens must not be used any more (see __init__)
    epoch_moved_at = 0  # the version whose event last moved it

    class Created(AuditedAggregate.Created):
        TOPIC = "integrations/Integration.Created.v1"
        owner_id: str
        slug: str
        settings: dict[str, Any]
        secrets: SecretRefs

    class Updated(AuditedAggregate.Event):
        TOPIC = "integrations/Integration.Updated.v1"
        slug: str | None  # set when the slug changed
        changes: dict[str, Any]  # settings whose value changed (None = removed)
        secrets_set: SecretRefs
        secrets_cleared: list[str]
        repointed: list[str]  # REPOINTING_FIELDS among the changes

        def apply(self, aggregate: Integration) -> None:
            if self.slug is not None:
                aggregate.slug = self.slug
            for key, value in self.changes.items():
                if value is None:
                    aggregate.settings.pop(key, None)
                else:
                    aggregate.settings[key] = value
            aggregate.secrets.update(self.secrets_set)
            for key in self.secrets_cleared:
                aggregate.secrets.pop(key, None)
            if self.repointed:
                aggregate.move_connection_epoch(self.originator_version)

    class ModeChanged(AuditedAggregate.Event):
        """Per-user <-> shared: the connections made under the old mode stop being used.

        Emitted beside the ``Updated`` that carries the new ``mode`` setting, so the switch is an
        explicit line in the audit trail and moves the connection epoch.
        """

        TOPIC = "integrations/Integration.ModeChanged.v1"
        previous_mode: str
        mode: str

        def apply(self, aggregate: Integration) -> None:
            aggregate.move_connection_epoch(self.originator_version)

    class Shared(AuditedAggregate.Event):
        TOPIC = "integrations/Integration.Shared.v1"
        principal_id: str
        access_level: int

        def apply(self, aggregate: Integration) -> None:
            share = aggregate.shares.get(self.principal_id)
            created = share["created_at"] if share else self.timestamp.isoformat()
            aggregate.shares[self.principal_id] = {
                "access_level": self.access_level,
                "created_at": created,
                "updated_at": self.timestamp.isoformat(),
            }

    class Unshared(AuditedAggregate.Event):
        TOPIC = "integrations/Integration.Unshared.v1"
        principal_id: str

        def apply(self, aggregate: Integration) -> None:
            aggregate.shares.pop(self.principal_id, None)

    class OwnershipTransferred(AuditedAggregate.Event):
        TOPIC = "integrations/Integration.OwnershipTransferred.v1"
        previous_owner_id: str
        owner_id: str

        def apply(self, aggregate: Integration) -> None:
            aggregate.owner_id = self.owner_id
            # Sharing with the new owner is redundant; the previous owner keeps nothing implicit.
            aggregate.shares.pop(self.owner_id, None)

    class Deleted(AuditedAggregate.Event):
        TOPIC = "integrations/Integration.Deleted.v1"

        def apply(self, aggregate: Integration) -> None:
            aggregate.deleted = True
            aggregate.secrets = {}

    @classmethod
    def new(
        cls, integration_id: UUID, *, owner_id: str, slug: str, settings: dict[str, Any], secrets: SecretRefs
    ) -> Integration:
        """Create with a known id: secrets are sealed under the id before the first event."""
        return cls._create(
            cls.Created, id=integration_id, owner_id=owner_id, slug=slug, settings=settings, secrets=secrets
        )

    def __init__(self, owner_id: str, slug: str, settings: dict[str, Any], secrets: SecretRefs) -> None:
        self.owner_id = owner_id
        self.slug = slug
        self.settings = dict(settings)
        self.secrets = dict(secrets)
        self.shares: dict[str, dict[str, Any]] = {}
        self.deleted = False
        # connection_epoch moves when tokens must not be used any more: re-pointing (OA-18) or a
        # mode switch. A connection established under an older epoch needs reauthorization.

    # --- queries ---------------------------------------------------------------------------

    @property
    def natural_id(self) -> str:
        return f"{self.owner_id}:{self.slug}"

    def level_for(self, actor: Actor) -> AccessLevel:
        if self.deleted:
            return AccessLevel.NONE
        return effective_level(actor, self.owner_id, {p: s["access_level"] for p, s in self.shares.items()})

    @property
    def created_at(self) -> datetime:
        return self.created_on

    @property
    def updated_at(self) -> datetime:
        return self.modified_on

    # --- commands (validate here, then trigger) ---------------------------------------------

    def update(
        self,
        *,
        slug: str,
        settings: Mapping[str, Any],
        secrets_set: SecretRefs,
        secrets_cleared: list[str],
    ) -> bool:
        """Replace the settings with ``settings``; returns whether anything changed."""
        changes = {k: v for k, v in settings.items() if self.settings.get(k) != v}
        changes.update({k: None for k in self.settings if k not in settings})
        cleared = [k for k in secrets_cleared if k in self.secrets]
        new_slug = slug if slug != self.slug else None
        if not (changes or secrets_set or cleared or new_slug):
            return False
        previous_mode = self.settings.get("mode", "per-user")
        self.trigger_event(
            self.Updated,
            slug=new_slug,
            changes=changes,
            secrets_set=dict(secrets_set),
            secrets_cleared=cleared,
            repointed=[k for k in REPOINTING_FIELDS if k in changes],
        )
        mode = self.settings.get("mode", "per-user")
        if mode != previous_mode:
            self.trigger_event(self.ModeChanged, previous_mode=previous_mode, mode=mode)
        return True

    def move_connection_epoch(self, version: int) -> None:
        self.connection_epoch += 1
        self.epoch_moved_at = version

    @property
    def epoch_moved_by_last_write(self) -> bool:
        """Whether the newest event re-pointed the integration or switched its mode."""
        return self.epoch_moved_at == self.version

    @property
    def shared_mode(self) -> bool:
        return self.settings.get("mode") == "shared"

    def share(self, principal_id: str, access_level: int) -> bool:
        if access_level < AccessLevel.USE:
            raise ValidationFailed(
                "accessLevel must be 1 or more.", [field_error("accessLevel", "must be greater than 0")]
            )
        current = self.shares.get(principal_id)
        if current and current["access_level"] == access_level:
            return False
        self.trigger_event(self.Shared, principal_id=principal_id, access_level=access_level)
        return True

    def unshare(self, principal_id: str) -> None:
        if principal_id not in self.shares:
            raise NotFound(f"No share for principal '{principal_id}'.")
        self.trigger_event(self.Unshared, principal_id=principal_id)

    def transfer_to(self, owner_id: str) -> bool:
        if owner_id == self.owner_id:
            return False
        self.trigger_event(self.OwnershipTransferred, previous_owner_id=self.owner_id, owner_id=owner_id)
        return True

    def delete(self) -> None:
        self.trigger_event(self.Deleted)
