"""Given events / when command / then events: the domain's test idiom (DESIGN.md, Style).

    given(history(new_integration, lambda i: i.share("bob", 1)))
        .when(lambda i: i.share("bob", 2))
        .then(event(Integration.Shared, principal_id="bob", access_level=2))

*Given* real event objects, recorded by running the aggregate's own methods on a fresh aggregate
(:func:`history`). The aggregate is rebuilt from them the way eventsourcing 9.5.6 does it: the
``Created`` event's ``mutate(None)`` constructs it, each later event's ``mutate(aggregate)``
checks id and version and applies itself (:func:`replay`).

*When* a command runs on the rebuilt aggregate (with no history, the command gets ``None`` and
must return the aggregate it creates). Its pending events are collected; a ``DomainError`` it
raises is caught.

*Then* the new events are compared by exact type and the attributes named, or the error by type
and ``details``. Every outcome is also checked for replay fidelity: the given events plus the new
ones, replayed (directly and after a JSON round trip through the store's mapper), rebuild an
aggregate equal to the live one; and a failed command leaves the state it found.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from eventsourcing.domain import Aggregate
from eventsourcing.persistence import DatetimeAsISO, DecimalAsStr, JSONTranscoder, Mapper, UUIDAsHex

from domain.audit import acting_as
from domain.errors import DomainError

Command = Callable[[Any], Any]

_NO_ERROR = object()


def history(make: Callable[[], Aggregate], *commands: Command) -> list[Any]:
    """Past events: create an aggregate with ``make``, run ``commands`` on it, collect its events."""
    aggregate = make()
    for command in commands:
        command(aggregate)
    return list(aggregate.collect_events())


def replay(events: Iterable[Any]) -> Any:
    """The aggregate the events describe (``None`` for no events)."""
    return functools.reduce(lambda aggregate, e: e.mutate(aggregate), events, None)


def _mapper() -> Mapper[Any]:
    transcoder = JSONTranscoder()
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):  # what Application registers
        transcoder.register(transcoding)
    return Mapper(transcoder=transcoder)


_MAPPER = _mapper()


def stored(events: Iterable[Any]) -> list[Any]:
    """The events as the event store gives them back: mapped to stored records (JSON) and back."""
    return [_MAPPER.to_domain_event(_MAPPER.to_stored_event(e)) for e in events]


def by(actor_id: str, command: Command) -> Command:
    """``command`` run with ``actor_id`` as the acting principal, as the command layer does."""

    def run(aggregate: Any) -> Any:
        with acting_as(actor_id):
            return command(aggregate)

    return run


@dataclass(frozen=True)
class Expected:
    type: type
    attrs: dict[str, Any] = field(default_factory=dict)

    def mismatches(self, actual: Any) -> list[str]:
        if type(actual) is not self.type:
            return [f"type {type(actual).__qualname__} != {self.type.__qualname__}"]
        problems = []
        for name, value in self.attrs.items():
            if not hasattr(actual, name):
                problems.append(f"{name} is missing")
            elif getattr(actual, name) != value:
                problems.append(f"{name}={getattr(actual, name)!r} != {value!r}")
        return problems


def event(event_type: type, **attrs: Any) -> Expected:
    """An expected event: its exact class and the attribute values that matter to the test."""
    return Expected(event_type, attrs)


def _describe(events: Sequence[Any]) -> str:
    return "\n".join(f"  {e!r}" for e in events) or "  (none)"


class Outcome:
    """What a command did to an aggregate rebuilt from ``past``."""

    def __init__(self, past: list[Any], command: Command) -> None:
        self.past = past
        self.aggregate = replay(past)
        self.result: Any = None
        self.error: DomainError | None = None
        try:
            self.result = command(self.aggregate)
        except DomainError as e:
            self.error = e
        if self.aggregate is None and self.error is None:
            assert isinstance(self.result, Aggregate), "with no history, the command must return the new aggregate"
            self.aggregate = self.result
        self.events: list[Any] = list(self.aggregate.collect_events()) if self.aggregate is not None else []

    # --- assertions ------------------------------------------------------------------------

    def then(self, *expected: Expected) -> Outcome:
        """Exactly these new events, in this order; the command raised nothing."""
        if self.error is not None:
            raise AssertionError(f"expected events, the command raised {self.error!r} ({self.error.details!r})")
        problems = [] if len(self.events) == len(expected) else [f"{len(self.events)} events, {len(expected)} expected"]
        for n, (actual, wanted) in enumerate(zip(self.events, expected, strict=False)):
            problems.extend(f"event {n}: {p}" for p in wanted.mismatches(actual))
        if problems:
            raise AssertionError("\n".join(["events differ:", *problems, "actual events:", _describe(self.events)]))
        self._check_replay()
        return self

    def then_nothing(self) -> Outcome:
        """No new event and no error: the command was a no-op."""
        return self.then()

    def then_fails(
        self,
        error_type: type[DomainError],
        *,
        fields: list[str] | None = None,
        details: Any = _NO_ERROR,
        message: str | None = None,
    ) -> Outcome:
        """The command raised exactly ``error_type`` (with these ``details`` field names, details or
        message), emitted nothing and left the aggregate as it was."""
        if self.error is None:
            raise AssertionError(f"expected {error_type.__name__}, got events:\n{_describe(self.events)}")
        assert type(self.error) is error_type, f"{self.error!r} is not a {error_type.__name__}"
        if fields is not None:
            got = [d["field"] for d in self.error.details or []]
            assert got == fields, f"details fields {got} != {fields} ({self.error.details!r})"
        if details is not _NO_ERROR:
            assert self.error.details == details, f"details {self.error.details!r} != {details!r}"
        if message is not None:
            assert self.error.message == message, f"message {self.error.message!r} != {message!r}"
        assert self.events == [], f"a failed command emitted events:\n{_describe(self.events)}"
        assert self.aggregate == replay(self.past), "a failed command changed the aggregate"
        return self

    def returns(self, value: Any) -> Outcome:
        assert self.result == value, f"the command returned {self.result!r}, expected {value!r}"
        return self

    @property
    def state(self) -> Any:
        """The aggregate after the command."""
        return self.aggregate

    def _check_replay(self) -> None:
        everything = [*self.past, *self.events]
        assert replay(everything) == self.aggregate, "replaying the events does not rebuild the live aggregate"
        assert replay(stored(everything)) == self.aggregate, (
            "replaying the stored (JSON round-tripped) events does not rebuild the live aggregate"
        )


@dataclass(frozen=True)
class Given:
    past: list[Any]

    def when(self, command: Command) -> Outcome:
        return Outcome(list(self.past), command)


def given(events: Iterable[Any] = ()) -> Given:
    return Given(list(events))
