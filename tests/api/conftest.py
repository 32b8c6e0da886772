"""HTTP-level fixtures: a real app on the parametrised backend, driven through Litestar's TestClient."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from litestar.testing import TestClient

from cli.runtime import build_runtime
from infrastructure.settings import Settings

ADMIN_TOKEN = "admin-test-token-0123456789abcdef"


class ForwardsPosition:
    """A client session that forwards the highest ``X-Event-Position`` it has seen, as a real
    client does to read its own writes consistently across principals and processes. Mixed into
    an ``httpx.Client`` (a real socket) or Litestar's ``TestClient`` (in-process)."""

    position: int = 0

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", None) or {})
        if self.position and "X-Wait-For-Position" not in headers:
            headers["X-Wait-For-Position"] = str(self.position)
        response = super().request(method, url, headers=headers, **kwargs)  # type: ignore[misc]
        if response.headers.get("X-Event-Position"):
            self.position = max(self.position, int(response.headers["X-Event-Position"]))
        return response


class ConsistentClient(ForwardsPosition, TestClient[Any]):
    """Litestar's in-process test client, forwarding event positions."""


@dataclass
class Api:
    client: TestClient[Any]
    runtime: Any

    def as_(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.as_(ADMIN_TOKEN)

    def user(
        self, user_id: str, *, permissions: list[str] | None = None, superuser: bool = False, **extra: Any
    ) -> dict[str, str]:
        """Create a user with an API token; returns the auth headers."""
        body = {
            "id": user_id,
            "email": f"{user_id}@example.com",
            "displayName": user_id.title(),
            "permissions": permissions if permissions is not None else ["integrationCreation"],
            "superuser": superuser,
            **extra,
        }
        r = self.client.post("/api/users", json=body, headers=self.admin)
        assert r.status_code == 201, r.text
        r = self.client.post(f"/api/users/{user_id}/tokens", json={"label": "test"}, headers=self.admin)
        assert r.status_code == 201, r.text
        return self.as_(r.json()["token"])

    def team(self, team_id: str, members: dict[str, str]) -> None:
        r = self.client.post("/api/teams", json={"id": team_id, "name": team_id.title()}, headers=self.admin)
        assert r.status_code == 201, r.text
        for user_id, role in members.items():
            r = self.client.put(f"/api/teams/{team_id}/members/{user_id}", json={"role": role}, headers=self.admin)
            assert r.status_code == 200, r.text

    def integration(self, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
        body = {
            "name": "Example",
            "authType": "apikey",
            "apiBaseUri": "https://api.example.com/v1",
            "apiKey": "sk-test-secret-value",
            **fields,
        }
        r = self.client.post("/api/integrations", json=body, headers=headers)
        assert r.status_code == 201, r.text
        return r.json()


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.with_(admin_token=ADMIN_TOKEN)


@pytest.fixture
def api(api_settings: Settings) -> Iterator[Api]:
    runtime = build_runtime(api_settings)
    from api.app import create_app

    with ConsistentClient(app=create_app(runtime.services), base_url="http://127.0.0.1:8000") as client:
        yield Api(client, runtime)
