"""UniqueKey: DESIGN.md's SlugIndex, generalised to any natural key (``ownerId:slug``, usernames).

Its id is ``uuid5(namespace:key)``, so two claims of a fresh key collide on the event store's
primary key inside the same atomic ``save()`` as the claiming aggregate. A released key keeps its
stream; claiming it again is an ordinary versioned write, so racing re-claims collide as well.
"""

from __future__ import annotations

from uuid import NAMESPACE_URL, UUID, uuid5

from domain.audit import AuditedAggregate
from domain.errors import Conflict

_NS = uuid5(NAMESPACE_URL, "https://informer-integrations/unique-key")

SLUG = "slug"
USERNAME = "username"


def unique_key_id(namespace: str, key: str) -> UUID:
    return uuid5(_NS, f"{namespace}:{key}")


class UniqueKey(AuditedAggregate):
    TOPIC = "integrations/UniqueKey"

    class Created(AuditedAggregate.Created):
        TOPIC = "integrations/UniqueKey.Created.v1"
        namespace: str
        key: str
        ref: UUID

    class Claimed(AuditedAggregate.Event):
        TOPIC = "integrations/UniqueKey.Claimed.v1"
        ref: UUID

        def apply(self, aggregate: UniqueKey) -> None:
            aggregate.ref = self.ref

    class Released(AuditedAggregate.Event):
        TOPIC = "integrations/UniqueKey.Released.v1"

        def apply(self, aggregate: UniqueKey) -> None:
            aggregate.ref = None

    @staticmethod
    def create_id(namespace: str, key: str, ref: UUID) -> UUID:  # same kwargs as __init__
        del ref
        return unique_key_id(namespace, key)

    def __init__(self, namespace: str, key: str, ref: UUID) -> None:
        self.namespace = namespace
        self.key = key
        self.ref: UUID | None = ref

    def claim(self, ref: UUID) -> None:
        if self.ref is not None and self.ref != ref:
            raise Conflict(f"'{self.key}' is already taken.")
        if self.ref is None:
            self.trigger_event(self.Claimed, ref=ref)

    def release(self, ref: UUID) -> None:
        if self.ref == ref:
            self.trigger_event(self.Released)
