"""The ``integrations`` command as an operator runs it: real processes, configured only through
``INTEGRATIONS_*`` environment variables, on SQLite and on PostgreSQL.

Every process is started in a ``with`` block that kills it in ``finally``; a test that wants a
graceful stop sends SIGTERM itself and checks the exit status.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from infrastructure.keyring import key_id
from infrastructure.settings import PostgresConfig, Settings
from tests.conftest import TEST_MASTER_KEY

ADMIN_TOKEN = "cli-admin-token-0123456789abcdef"
JANE_PASSWORD = "jane-password-0123"
API_KEY = "wk_live_plaintext_secret_0123456789"
STOP_TIMEOUT = 15.0
READY_TIMEOUT = 45.0

_script = Path(sys.executable).with_name("integrations")
COMMAND = [str(_script)] if _script.exists() else [sys.executable, "-m", "cli.main"]


# ----------------------------------------------------------------------------------------- helpers


def service_env(data_dir: Path, postgres: PostgresConfig | None, **overrides: str | None) -> dict[str, str]:
    """The environment of a service process: nothing of the test run's ``INTEGRATIONS_*`` leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTEGRATIONS_")}
    env.update(
        PYTHONUNBUFFERED="1",
        INTEGRATIONS_DATA_DIR=str(data_dir),
        INTEGRATIONS_ALLOW_HTTP_HOSTS="127.0.0.1,localhost",
        INTEGRATIONS_LOG_LEVEL="info",
    )
    if postgres is not None:
        auth = quote(postgres.user, safe="") + (":" + quote(postgres.password, safe="") if postgres.password else "")
        env["INTEGRATIONS_DATABASE_URL"] = f"postgresql://{auth}@{postgres.host}:{postgres.port}/{postgres.dbname}"
        env["INTEGRATIONS_DATABASE_SCHEMA"] = postgres.schema
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def env_for(settings: Settings, **overrides: str | None) -> dict[str, str]:
    return service_env(settings.data_dir, settings.postgres, **overrides)


def cli(env: dict[str, str], *args: str, expect: int = 0, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*COMMAND, *args], env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    assert result.returncode == expect, (
        f"integrations {' '.join(args)} exited {result.returncode}, not {expect}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
    return result


def cli_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(cli(env, *args).stdout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A long-running ``integrations`` process with its output in a log file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        self.args = args
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [*COMMAND, *args], env=env, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> float:
        """SIGTERM; the process must exit 0 within STOP_TIMEOUT. Returns the seconds it took."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"integrations {' '.join(self.args)} still running {STOP_TIMEOUT}s after SIGTERM\n{self.output()}"
            )
        assert code == 0, f"integrations {' '.join(self.args)} exited {code} on SIGTERM\n{self.output()}"
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()


class Server(Process):
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        super().__init__(env, log, "serve", "--host", "127.0.0.1", "--port", str(self.port))
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=15)

    def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT
        delay = 0.02
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited {self.proc.returncode} before it was ready\n{self.output()}")
            try:
                r = self.http.get("/ready", timeout=2)
                if r.status_code == 200:
                    return dict(r.json())
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready within {READY_TIMEOUT}s\n{self.output()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def kill(self) -> None:
        self.http.close()
        super().kill()


@contextmanager
def serving(env: dict[str, str], log: Path) -> Iterator[Server]:
    server = Server(env, log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.kill()


@contextmanager
def running(env: dict[str, str], log: Path, *args: str) -> Iterator[Process]:
    process = Process(env, log, *args)
    try:
        yield process
    finally:
        process.kill()


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url}: {response.status_code} {response.text[:500]}"
    )
    return response.json() if response.content else None


def create_jane(http: httpx.Client) -> None:
    ok(
        http.post(
            "/api/users",
            json={
                "id": "jane",
                "email": "jane@example.com",
                "password": JANE_PASSWORD,
                "permissions": ["integrationCreation"],
            },
        ),
        201,
    )


def create_weather(http: httpx.Client) -> dict[str, Any]:
    body = {
        "name": "Weather API",
        "authType": "apikey",
        "apiBaseUri": "https://api.weather.example.com/v2",
        "apiKey": API_KEY,
        "apiKeyName": "X-Api-Key",
        "description": "Forecasts",
    }
    created = ok(http.post("/api/integrations", json=body), 201)
    assert created["hasApiKey"] is True and created["slug"] == "weather-api"
    return dict(created)


def secrets_still_open(http: httpx.Client, integration_id: str) -> None:
    """What needs the master key: a login (opens jane's password hash) and a new secret (sealed
    under the integration's data key, which the master key unwraps)."""
    login = http.post(
        "/api/auth/login", json={"username": "jane", "password": JANE_PASSWORD}, headers={"Authorization": ""}
    )
    assert ok(login)["userId"] == "jane"
    patched = ok(http.patch(f"/api/integrations/{integration_id}", json={"description": "After restart"}))
    assert patched["description"] == "After restart" and patched["hasApiKey"] is True
    rotated = ok(http.patch(f"/api/integrations/{integration_id}", json={"apiKey": API_KEY + "-rotated"}))
    assert rotated["hasApiKey"] is True


def listed_ids(http: httpx.Client) -> set[str]:
    page = ok(http.get("/api/integrations", params={"limit": 500}))
    return {item["id"] for item in page["_embedded"]["inf:integration"]}


# -------------------------------------------------------------------------------------------- tests


def test_serve_stops_gracefully_and_restarts_on_the_same_store(settings: Settings, tmp_path: Path) -> None:
    sqlite = settings.postgres is None
    # SQLite: no INTEGRATIONS_MASTER_KEY, so the server generates <data dir>/master.key and must reuse it.
    env = env_for(
        settings, INTEGRATIONS_ADMIN_TOKEN=ADMIN_TOKEN, INTEGRATIONS_MASTER_KEY=None if sqlite else TEST_MASTER_KEY
    )
    key_file = settings.data_dir / "master.key"

    with serving(env, tmp_path / "first.log") as server:
        assert ok(server.http.get("/health", headers={"Authorization": ""})) == {"status": "ok"}
        me = ok(server.http.get("/api/me"))
        assert me["id"] == "admin" and me["superuser"] is True
        assert len(ok(server.http.get("/api/users/admin/tokens"))) == 1
        create_jane(server.http)
        weather = create_weather(server.http)
        r = server.http.get("/oauth2/callback", params={"state": "s3cret-state-value", "code": "s3cret-code"})
        assert r.status_code == 400
        assert server.stop() < STOP_TIMEOUT
        # One access line per request, never with its query string (the callback carries code/state).
        log_text = server.output()
        assert "GET /api/me 200" in log_text
        assert "GET /oauth2/callback 400" in log_text
        assert "s3cret" not in log_text

    if sqlite:
        assert key_file.is_file()
        key = key_file.read_bytes()
    else:
        assert not key_file.exists()

    with serving(env, tmp_path / "second.log") as server:
        tokens = ok(server.http.get("/api/users/admin/tokens"))
        assert len(tokens) == 1, tokens  # the bootstrap is idempotent
        again = ok(server.http.get(f"/api/integrations/{weather['id']}"))
        assert again["name"] == "Weather API" and again["hasApiKey"] is True
        assert ok(server.http.get("/api/integrations/admin:weather-api"))["id"] == weather["id"]
        assert listed_ids(server.http) == {weather["id"]}
        secrets_still_open(server.http, weather["id"])
        server.stop()

    if sqlite:
        assert key_file.read_bytes() == key


def test_postgres_without_master_key_refuses_to_start(pg_schema: PostgresConfig, tmp_path: Path) -> None:
    env = service_env(tmp_path / "data", pg_schema, INTEGRATIONS_ADMIN_TOKEN=ADMIN_TOKEN)
    result = cli(env, "serve", "--port", str(free_port()), expect=2, timeout=30)
    assert "INTEGRATIONS_MASTER_KEY is required" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "master.key").exists()


def test_external_projections_worker_on_postgres(pg_schema: PostgresConfig, tmp_path: Path) -> None:
    env = service_env(
        tmp_path / "data",
        pg_schema,
        INTEGRATIONS_ADMIN_TOKEN=ADMIN_TOKEN,
        INTEGRATIONS_MASTER_KEY=TEST_MASTER_KEY,
        INTEGRATIONS_PROJECTIONS="external",
    )
    # Both start at once, as a process manager would start them; the server's start-up waits for the
    # worker to project the admin bootstrap.
    with (
        running(env, tmp_path / "worker.log", "projections", "run") as worker,
        serving(env, tmp_path / "server.log") as server,
    ):
        ready = server.wait_ready()
        assert ready["checks"]["projections"]["caught_up"] is True
        created = server.http.post(
            "/api/integrations",
            json={
                "name": "Drive",
                "authType": "bearer",
                "apiBaseUri": "https://www.googleapis.com/drive/v3",
                "bearerToken": "ya29.plaintext",
            },
        )
        integration = ok(created, 201)
        position = int(created.headers["X-Event-Position"])
        # read-your-writes: the server waits until the worker's read model has the new integration
        assert integration["id"] in listed_ids(server.http)
        flat = ok(server.http.get("/api/integrations-list"))
        assert [i["id"] for i in flat] == [integration["id"]]

        status = cli_json(env, "projections", "status")
        assert status["caught_up"] is True, status
        assert status["head"] >= position
        for name in ("listing", "principals"):
            assert status[name]["lag"] == 0 and status[name]["generation"] == 1, status

        server.stop()
        assert worker.proc.poll() is None, worker.output()  # the worker does not depend on the server
        worker.stop()


def test_operator_commands(settings: Settings, tmp_path: Path) -> None:
    old_key = TEST_MASTER_KEY
    env = env_for(settings, INTEGRATIONS_ADMIN_TOKEN=ADMIN_TOKEN, INTEGRATIONS_MASTER_KEY=old_key)

    with serving(env, tmp_path / "first.log") as server:
        create_jane(server.http)
        weather = create_weather(server.http)
        ok(server.http.put(f"/api/integrations/{weather['id']}/shares/jane", json={"accessLevel": 2}))
        ok(server.http.patch(f"/api/integrations/{weather['id']}", json={"description": "Forecasts and alerts"}))
        other = ok(
            server.http.post(
                "/api/integrations",
                json={"name": "Status Page", "authType": "none", "apiBaseUri": "http://127.0.0.1:9/status"},
            ),
            201,
        )
        before = listed_ids(server.http)
        assert before == {weather["id"], other["id"]}

        # events export: NDJSON in log order, references and fingerprints only
        out = cli(env, "events", "export").stdout
        lines = [json.loads(line) for line in out.splitlines()]
        positions = [line["position"] for line in lines]
        assert positions == sorted(set(positions)) and len(positions) >= 8, positions
        assert API_KEY not in out and JANE_PASSWORD not in out
        assert any(line["type"].endswith("Integration.Created.v1") for line in lines)
        assert all({"position", "originatorId", "type", "at", "actorId", "data"} <= set(line) for line in lines)
        page = [
            json.loads(line)
            for line in cli(env, "events", "export", "--after", "2", "--limit", "3").stdout.splitlines()
        ]
        assert [line["position"] for line in page] == [p for p in positions if p > 2][:3]

        # events history: the integration's own events, each with the acting principal
        history = [json.loads(line) for line in cli(env, "events", "history", "admin:weather-api").stdout.splitlines()]
        assert [h["version"] for h in history] == [1, 2, 3]
        assert [h["type"].rsplit("/", 1)[-1] for h in history] == [
            "Integration.Created.v1",
            "Integration.Shared.v1",
            "Integration.Updated.v1",
        ]
        assert {h["actorId"] for h in history} == {"admin"}
        assert API_KEY not in json.dumps(history)
        cli(env, "events", "history", "admin:no-such-thing", expect=2)

        # events replay: every aggregate re-folded from the log
        replay = cli_json(env, "events", "replay")
        assert replay["events"] == len(lines)
        assert replay["aggregates"]["Integration"] == 2 and replay["aggregates"]["User"] == 2, replay

        # blue/green rebuild of the listing while the server runs: it switches to generation 2
        report = cli_json(env, "projections", "rebuild", "listing")
        assert len(report) == 1 and report[0]["read_model"] == "listing", report
        assert report[0]["generation"] == 2 and report[0]["previous"] == 1
        deadline = time.monotonic() + 15
        while True:  # /ready may say 503 for a moment while the runner moves to the new generation
            ready = server.http.get("/ready")
            if ready.status_code == 200 and ready.json()["checks"]["projections"]["listing"]["generation"] == 2:
                break
            assert time.monotonic() < deadline, f"the server did not switch to generation 2: {ready.text}"
            time.sleep(0.05)
        assert listed_ids(server.http) == before
        later = ok(server.http.post("/api/integrations", json={"name": "After Rebuild", "authType": "none"}), 201)
        assert listed_ids(server.http) == before | {later["id"]}  # generation 2 follows new events
        status = cli_json(env, "projections", "status")
        assert status["listing"]["generation"] == 2 and status["principals"]["generation"] == 1, status

        # a new master key
        new_key = cli(env, "keys", "generate").stdout.strip()
        assert len(base64.b64decode(new_key, validate=True)) == 32 and new_key != old_key
        server.stop()

    # rotation: put the new key first, re-wrap, and the old key is no longer needed
    rotating = {**env, "INTEGRATIONS_MASTER_KEY": f"{new_key},{old_key}"}
    new_kid, old_kid = key_id(base64.b64decode(new_key)), key_id(base64.b64decode(old_key))
    before_rotation = cli_json(rotating, "keys", "status")
    assert before_rotation["active"] == new_kid and before_rotation["configured"] == [new_kid, old_kid]
    data_keys = before_rotation["data_keys"][old_kid]
    assert data_keys >= 2 and set(before_rotation["data_keys"]) == {old_kid}  # jane's and the weather API's
    rotated = cli_json(rotating, "keys", "rotate")
    assert rotated["rewrapped"] == data_keys, rotated
    after = cli_json(rotating, "keys", "status")
    assert after["data_keys"] == {new_kid: data_keys}, after

    new_only = {**env, "INTEGRATIONS_MASTER_KEY": new_key}
    with serving(new_only, tmp_path / "second.log") as server:
        assert listed_ids(server.http) == before | {later["id"]}
        secrets_still_open(server.http, weather["id"])
        server.stop()


def test_serve_workers_need_postgres_and_external_projections(settings: Settings, tmp_path: Path) -> None:
    """Inline projections would run once per worker process: several workers are refused unless
    the read models run in their own process (and the store is PostgreSQL)."""
    env = env_for(settings, INTEGRATIONS_ADMIN_TOKEN=ADMIN_TOKEN, INTEGRATIONS_MASTER_KEY=TEST_MASTER_KEY)
    result = cli(env, "serve", "--workers", "2", "--port", str(free_port()), expect=2, timeout=30)
    assert "needs PostgreSQL and INTEGRATIONS_PROJECTIONS=external" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_served_app_freezes_its_startup_heap_and_a_test_app_does_not(settings: Settings) -> None:
    """A serving process moves what startup loaded out of the collector's reach (``gc.freeze``),
    so full collections stop pausing the loop for tens of milliseconds; an app built by tests
    does not (what is frozen is never collected)."""
    import gc

    from litestar.testing import TestClient

    from api.app import create_app
    from cli.main import _served_app
    from cli.runtime import build_runtime

    gc.unfreeze()
    try:
        with TestClient(app=create_app(build_runtime(settings).services)) as client:
            assert client.get("/health").status_code == 200
            assert gc.get_freeze_count() == 0
        served = _served_app(build_runtime(settings.with_(data_dir=settings.data_dir.parent / "served")).services)
        with TestClient(app=served) as client:
            assert client.get("/health").status_code == 200
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
