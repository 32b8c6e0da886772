"""Who did it: every event records the acting principal.

The command layer sets the actor for the duration of a command with :func:`acting_as`; the
base event class reads it when an event is triggered, and the stored value is restored on
replay (the field is part of the event's state).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import field

from eventsourcing.domain import Aggregate

_actor: ContextVar[str | None] = ContextVar("actor_id", default=None)

SYSTEM_ACTOR = "system"


@contextmanager
def acting_as(actor_id: str) -> Iterator[None]:
    token = _actor.set(actor_id)
    try:
        yield
    finally:
        _actor.reset(token)


def current_actor() -> str | None:
    return _actor.get()


class AuditedAggregate(Aggregate):
    """Base of every aggregate: events carry ``actor_id`` and a timezone-aware ``timestamp``."""

    class Event(Aggregate.Event):
        actor_id: str | None = field(default_factory=_actor.get, init=False)

    class Created(Event, Aggregate.Created):
        pass
