"""Concurrent writers never lose an update: each wins, or retries on fresh state, or gets 409."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from domain.errors import Conflict
from tests.api.conftest import Api

FIELDS = {
    "description": "d",
    "category": "c",
    "scope": "s",
    "imageUrl": "https://img.example.com/i.svg",
    "type": "custom-x",
    "clientId": "cid",
    "apiKeyName": "X-Key",
    "username": "u",
}


def test_concurrent_partial_updates_from_threads_lose_nothing(api: Api) -> None:
    alice = api.user("alice")
    iid = api.integration(alice)["id"]
    barrier = threading.Barrier(len(FIELDS))

    def patch(field: str) -> int:
        barrier.wait()
        return api.client.patch(f"/api/integrations/{iid}", json={field: FIELDS[field]}, headers=alice).status_code

    with ThreadPoolExecutor(len(FIELDS)) as pool:
        statuses = list(pool.map(patch, FIELDS))
    final = api.client.get(f"/api/integrations/{iid}", headers=alice).json()
    for field, status in zip(FIELDS, statuses, strict=True):
        if status == 200:
            assert final[field] == FIELDS[field], field
        else:
            assert status == 409
    assert statuses.count(200) >= len(FIELDS) - 1
    assert final["version"] == 1 + statuses.count(200)


def test_two_application_instances_sharing_one_store_lose_no_share(api: Api) -> None:
    """Two independent app instances (own pools, own caches), as two processes would have."""
    from cli.runtime import build_runtime

    alice = api.user("alice")
    iid = api.integration(alice)["id"]
    users = [f"u{i}" for i in range(12)]
    for u in users:
        api.user(u)
    other = build_runtime(api.runtime.settings)
    try:
        apps = [api.runtime.services.app, other.services.app]
        actor = api.client.get("/api/me", headers=alice).json()
        from uuid import UUID

        from domain.access import Actor

        me = Actor(id=actor["id"], permissions=frozenset(actor["permissions"]))
        barrier = threading.Barrier(len(users))

        def share(i_user: tuple[int, str]) -> bool:
            i, user = i_user
            barrier.wait()
            try:
                apps[i % 2].share_integration(me, UUID(iid), user, 1 + i % 3)
            except Conflict:
                return False  # reported to the caller, who knows it did not happen
            return True

        with ThreadPoolExecutor(len(users)) as pool:
            outcomes = list(pool.map(share, enumerate(users)))
    finally:
        other.close()
    shares = api.client.get(f"/api/integrations/{iid}/shares", headers=alice).json()["_embedded"][
        "inf:integration-share"
    ]
    granted = {u: 1 + i % 3 for i, u in enumerate(users) if outcomes[i]}
    assert {s["principalId"]: s["accessLevel"] for s in shares} == granted  # every success kept, nothing else
    assert sum(outcomes) >= len(users) - 2  # retries on fresh state absorb almost all contention
