"""Shared helpers of the projection tests (no tests here): an application and views on one store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.application import Application
from eventsourcing.persistence import Tracking

from infrastructure.persistence import application_env, projection_env
from infrastructure.settings import Settings
from projections.runtime import READ_MODELS, construct_view


def lean(env: dict[str, str]) -> dict[str, str]:
    """Small PostgreSQL pools: a test opens many views, and the server's connections are shared."""
    sizes = {"_POSTGRES_POOL_SIZE": "1", "_POSTGRES_MAX_OVERFLOW": "4"}
    return {k: next((v for suffix, v in sizes.items() if k.endswith(suffix)), value) for k, value in env.items()}


class TestApp(Application[UUID]):
    __test__ = False
    name = "integrations"


class Store:
    """The application and any number of views on the settings' backend; closes them all."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = TestApp(env=lean(application_env(settings)))
        self._views: list[Any] = []

    def env_for(self, name: str) -> dict[str, str]:
        return lean(projection_env(self.settings, name))

    def view(self, read_model: str, name: str | None = None) -> Any:
        view = construct_view(read_model, self.env_for(name or read_model), name)
        self._views.append(view)
        return view

    def save(self, *aggregates: Any) -> int:
        """Save and return the position of the last event."""
        return self.app.save(*aggregates)[-1].notification.id

    def notifications(self, read_model: str, stop: int | None = None) -> list[Any]:
        topics = READ_MODELS[read_model].projection.topics
        return list(
            self.app.recorder.select_notifications(0, 1_000_000, stop=stop, topics=topics, inclusive_of_start=False)
        )

    def feed(self, view: Any, read_model: str, stop: int | None = None) -> None:
        """Process every event, one ``process_event`` (one transaction) each, as a runner does."""
        projection = READ_MODELS[read_model].projection(view=view)
        for n in self.notifications(read_model, stop):
            projection.process_event(self.app.mapper.to_domain_event(n), Tracking(self.app.name, n.id))

    def head(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def close(self) -> None:
        for view in self._views:
            view.close()
        self.app.close()


@pytest.fixture(name="store")
def store_fixture(settings: Settings) -> Iterator[Store]:
    """The application and views on the parametrised backend (import it into a test module)."""
    store = Store(settings)
    yield store
    store.close()


def workload(store: Store, rounds: int, tag: str = "w") -> int:
    """Save a mix of every projected event kind, ``rounds`` times; returns the last position."""
    from domain.connection import Connection
    from domain.integration import Integration
    from domain.principals import Team, User

    position = 0
    for i in range(rounds):
        key = f"{tag}{i}"
        owner, team = User(user_id=f"u-{key}", profile={"username": f"u-{key}"}), Team(team_id=f"t-{key}", name=key)
        item = Integration(owner_id=owner.user_id, slug=f"s-{key}", settings={"name": f"N {key}"}, secrets={})
        other = Integration(owner_id=f"team:t-{key}", slug=f"o-{key}", settings={"name": f"O {key}"}, secrets={})
        link = Connection(integration_id=item.id, owner_id=owner.user_id, shared=False)
        store.save(link, owner, team, item, other)  # link first: the last event stays the listing's
        link.establish(
            auth_type="oauth2", credentials={"access_token": {"ref": f"vault:{key}", "fingerprint": key}},
            scopes=["read"], token_expires_at=f"2030-01-01T{i % 24:02}:00:00+00:00", refresh_token_expires_at=None,
            account=None,
        )  # fmt: skip
        owner.issue_token(f"tok-{key}", f"hash-{key}", "label")
        team.set_member(owner.user_id, "admin")
        item.share(f"team:t-{key}", 2)
        item.update(
            slug=f"s2-{key}", settings={"name": f"N2 {key}", "type": "dropbox"}, secrets_set={}, secrets_cleared=[]
        )
        other.transfer_to(owner.user_id)
        link.refresh_failed(generation=1, error="temporarily_unavailable", kind="transient", retry_after=None)
        store.save(link, owner, team, item, other)
        if i % 3 == 0:
            item.unshare(f"team:t-{key}")
            other.delete()
            owner.change_profile({"display_name": f"User {key}"})
            team.remove()
            link.revoke(reason="disconnected", provider_revocation="done")
            store.save(link, item, other, owner, team)
        position = store.head()
    return position
