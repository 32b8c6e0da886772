"""Listing, rebuild and write-path benchmark on PostgreSQL, in one run.

    .venv/bin/python bench/listing.py [--integrations 100000 --users 2000 --teams 200 --duration 10 ...]

What it does, in a fresh schema of the PostgreSQL server (dropped at the end unless ``--keep``):

1. Generates a data set through the real write model (domain aggregates saved with
   ``IntegrationsApp.save`` in batches): users, teams with skewed memberships, integrations owned
   by users and teams, shares (most private, a minority shared with 1-5 principals, a few widely),
   the admin (``app.ensure_admin``) and API tokens for two non-superusers: a "typical" one in
   about 20 teams who sees a few thousand integrations, and one in a single team.
2. Times the batched blue/green rebuild of the read models (``cli.runtime.rebuild_projections``)
   beside a raw ``select_notifications`` (+ ``mapper.to_domain_event``) read of the same log.
3. Starts the real server (``integrations serve``, one uvicorn worker and inline projections, or
   ``--workers N`` and an ``integrations projections run`` process) and
   measures ``GET /api/integrations`` with wrk (fixed duration per case) beside the same page
   through the view in-process and as raw SQL with psycopg.
4. Measures ``POST /api/integrations`` with wrk beside a bare eventsourcing aggregate create+save.
5. Prints a table, writes ``bench/results/listing-<date>.json`` and appends a section to
   ``docs/benchmarks.md``.

Not a test: nothing here asserts on time. Targets are reported as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate

from benchkit import WRK_REPORT_LUA, free_port, load_errors, log, run_wrk, sh, targets_table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from api.auth import actor_from_row  # noqa: E402
from api.controllers.common import visible_to  # noqa: E402
from cli.runtime import rebuild_projections  # noqa: E402
from commands.service import IntegrationsApp, token_hash  # noqa: E402
from domain import settings as rules  # noqa: E402
from domain.access import Actor, team_principal  # noqa: E402
from domain.audit import SYSTEM_ACTOR, acting_as  # noqa: E402
from domain.integration import Integration  # noqa: E402
from domain.principals import Team, User  # noqa: E402
from domain.slugs import slugify  # noqa: E402
from domain.unique_key import SLUG, USERNAME, UniqueKey  # noqa: E402
from domain.urls import UrlPolicy  # noqa: E402
from infrastructure.keyring import generate_key, load_keyring  # noqa: E402
from infrastructure.passwords import ScryptHasher  # noqa: E402
from infrastructure.persistence import application_env, projection_env  # noqa: E402
from infrastructure.settings import PostgresConfig, Settings  # noqa: E402
from infrastructure.vault import open_vault  # noqa: E402
from projections.runtime import Generations, construct_view, generation_name  # noqa: E402

GET_P99_TARGET_MS = 15.0
POST_RATIO_TARGET = 0.5
PAGE_LIMIT = 50
DEEP_START = 1000


# ============================================================================ the data set

# (vendor name, type, auth type, API base URI, weight). "Zuora" is the rare search term.
VENDORS: tuple[tuple[str, str, str, str, float], ...] = (
    ("Google Drive", "google-drive", "oauth2", "https://www.googleapis.com/drive/v3", 18),
    ("Salesforce", "salesforce", "oauth2", "https://acme.my.salesforce.com/services/data/v60.0", 14),
    ("OneDrive", "onedrive", "oauth2", "https://graph.microsoft.com/v1.0", 6),
    ("SharePoint", "sharepoint", "oauth2", "https://graph.microsoft.com/v1.0/sites", 6),
    ("Dropbox", "dropbox", "oauth2", "https://api.dropboxapi.com/2", 4),
    ("HubSpot", "hubspot", "oauth2", "https://api.hubapi.com", 6),
    ("Jira", "jira", "basic", "https://acme.atlassian.net/rest/api/3", 6),
    ("Zendesk", "zendesk", "bearer", "https://acme.zendesk.com/api/v2", 4),
    ("Stripe", "stripe", "apikey", "https://api.stripe.com/v1", 5),
    ("Shopify", "shopify", "apikey", "https://acme.myshopify.com/admin/api/2024-01", 3),
    ("Mailchimp", "mailchimp", "apikey", "https://us1.api.mailchimp.com/3.0", 3),
    ("Twilio", "twilio", "basic", "https://api.twilio.com/2010-04-01", 2),
    ("Datadog", "datadog", "apikey", "https://api.datadoghq.com/api/v1", 3),
    ("ServiceNow", "servicenow", "basic", "https://acme.service-now.com/api/now", 3),
    ("Workday", "workday", "oauth2", "https://wd5-services1.myworkday.com/ccx/api/v1", 3),
    ("NetSuite", "netsuite", "oauth2", "https://acme.suitetalk.api.netsuite.com/services/rest", 2),
    ("QuickBooks", "quickbooks", "oauth2", "https://quickbooks.api.intuit.com/v3", 2),
    ("Xero", "xero", "oauth2", "https://api.xero.com/api.xro/2.0", 2),
    ("Asana", "asana", "bearer", "https://app.asana.com/api/1.0", 2),
    ("Airtable", "airtable", "bearer", "https://api.airtable.com/v0", 2),
    ("Notion", "notion", "bearer", "https://api.notion.com/v1", 2),
    ("GitHub", "github", "oauth2", "https://api.github.com", 3),
    ("Snowflake", "snowflake", "basic", "https://acme.snowflakecomputing.com/api/v2", 2),
    ("Weather API", "custom", "apikey", "https://api.weather.example.com/v2", 3),
    ("Internal REST", "custom", "none", "https://internal.example.com/api", 4),
    ("Zuora", "zuora", "oauth2", "https://rest.zuora.com/v1", 0.15),
)
DEPARTMENTS = ("Sales", "Marketing", "Finance", "HR", "Support", "Engineering", "Operations", "Legal", "Analytics")
DEPARTMENT_WEIGHTS = (3, 2, 2, 1, 2, 2, 1, 0.5, 1.5)
REGIONS = ("EMEA", "APAC", "NA", "LATAM", "Global", "UK", "DACH", "Nordics")
OBJECTS = ("files", "reports", "accounts", "tickets", "invoices", "contacts", "orders", "events", "issues", "leads")
ROLES = ("member", "memberPlus", "designer", "dataWizard", "publisher", "admin")
ROLE_WEIGHTS = (60, 10, 10, 8, 7, 5)
COMMON_Q = "sales"  # in "Salesforce" and the Sales department: about a third of the names
RARE_Q = "zuora"  # about one integration in a thousand


@dataclass
class DataSet:
    users: list[str]
    user_teams: dict[str, dict[str, str]]  # user -> team -> role
    user_permissions: dict[str, list[str]]
    teams: list[str]
    owners: list[str] = field(default_factory=list)  # per integration
    access: dict[str, set[int]] = field(default_factory=dict)  # principal -> integration indexes
    embedded: set[int] = field(default_factory=set)
    events: dict[str, int] = field(default_factory=dict)
    shared: dict[str, int] = field(default_factory=dict)  # "private", "1-5", "wide", "all teams"
    sealed: int = 0

    def visible(self, user: str) -> set[int]:
        seen = set(self.access.get(user, ()))
        for team in self.user_teams[user]:
            seen |= self.access.get(team_principal(team), set())
        return seen - self.embedded


def _weighted_sample(rng: random.Random, items: Sequence[str], weights: Sequence[float], k: int) -> list[str]:
    """k distinct items, drawn with probability proportional to weight (Efraimidis-Spirakis)."""
    keys = sorted(((rng.random() ** (1.0 / w), item) for item, w in zip(items, weights, strict=True)), reverse=True)
    return [item for _, item in keys[:k]]


def _zipf(n: int, s: float) -> list[float]:
    return [1.0 / (rank**s) for rank in range(1, n + 1)]


def plan_principals(rng: random.Random, n_users: int, n_teams: int) -> DataSet:
    users = [f"u{i:05d}" for i in range(n_users)]
    teams = [f"t{i:03d}" for i in range(n_teams)]
    team_popularity = _zipf(n_teams, 0.7)
    rng.shuffle(team_popularity)
    # Teams per user: 1..20, heavy at the low end (about 3.5 on average, a few in 15-20).
    sizes = list(range(1, min(20, n_teams) + 1))
    size_weights = [1.0 / (k**1.3) for k in sizes]
    user_teams: dict[str, dict[str, str]] = {}
    permissions: dict[str, list[str]] = {}
    for user in users:
        k = rng.choices(sizes, size_weights)[0]
        chosen = _weighted_sample(rng, teams, team_popularity, k)
        user_teams[user] = {t: rng.choices(ROLES, ROLE_WEIGHTS)[0] for t in chosen}
        permissions[user] = ["integrationCreation"] if rng.random() < 0.7 else ["integrations.read"]
    # Every team with members has at least one admin.
    members: dict[str, list[str]] = {t: [] for t in teams}
    for user, roles in user_teams.items():
        for t in roles:
            members[t].append(user)
    for t, who in members.items():
        if who and not any(user_teams[u][t] == "admin" for u in who):
            user_teams[rng.choice(who)][t] = "admin"
    return DataSet(users=users, user_teams=user_teams, user_permissions=permissions, teams=teams)


def integration_settings(rng: random.Random, n: int) -> tuple[dict[str, Any], str]:
    """Realistic settings (as the API would store them) and the secret field the auth type needs."""
    vendor, kind, auth, base, _ = rng.choices(VENDORS, [v[4] for v in VENDORS])[0]
    dept = rng.choices(DEPARTMENTS, DEPARTMENT_WEIGHTS)[0]
    region = rng.choice(REGIONS)
    name = f"{vendor} {dept} {region} {n}"
    settings: dict[str, Any] = {
        "name": name,
        "type": kind,
        "category": dept.lower(),
        "description": f"{rng.choice(OBJECTS).title()} from {vendor} for the {dept} team ({region}).",
        "mode": "shared" if rng.random() < 0.3 else "per-user",
        "auth_type": auth,
        "api_base_uri": base,
        "embedded": rng.random() < 0.02,
        "tags": rng.sample(["prod", "staging", "finance", "crm", "files", "reporting", "pii"], rng.randint(0, 3)),
    }
    if rng.random() < 0.2:
        settings["headers"] = {"X-Tenant": "${tenant.id}", "X-User": "${user.email}"}
    secret = ""
    if auth == "oauth2":
        settings.update(
            auth_uri="https://login.example.com/oauth2/authorize",
            token_uri="https://login.example.com/oauth2/token",
            client_id=uuid.UUID(int=rng.getrandbits(128)).hex,
            scope="read write offline_access",
        )
        secret = "client_secret"
    elif auth == "apikey":
        settings.update(api_key_name="X-Api-Key", api_key_location="header")
        secret = "api_key"
    elif auth == "basic":
        settings["username"] = f"svc-{dept.lower()}"
        secret = "password"
    elif auth == "bearer":
        secret = "bearer_token"
    return rules.normalise(settings), secret


def generate(app: IntegrationsApp, args: argparse.Namespace, rng: random.Random) -> DataSet:
    data = plan_principals(rng, args.users, args.teams)
    policy = UrlPolicy()
    counts: dict[str, int] = {}

    def save(batch: list[Any]) -> None:
        for aggregate in batch:
            for event in aggregate.pending_events:
                counts[type(event).__qualname__] = counts.get(type(event).__qualname__, 0) + 1
        app.save(*batch)

    started = time.perf_counter()
    batch: list[Any] = []
    with acting_as("admin"):
        for user in data.users:
            profile = {
                "username": user,
                "email": f"{user}@example.com",
                "display_name": f"User {user[1:]}",
                "superuser": False,
                "permissions": data.user_permissions[user],
                "custom": {"department": rng.choice(DEPARTMENTS)},
            }
            u = User(user_id=user, profile=profile)
            batch += [u, UniqueKey(namespace=USERNAME, key=user, ref=u.id)]
            if len(batch) >= args.batch:
                save(batch)
                batch = []
        members: dict[str, list[tuple[str, str]]] = {t: [] for t in data.teams}
        for user, roles in data.user_teams.items():
            for t, role in roles.items():
                members[t].append((user, role))
        for t in data.teams:
            team = Team(team_id=t, name=f"{rng.choice(DEPARTMENTS)} {rng.choice(REGIONS)} {t[1:]}")
            for user, role in members[t]:
                team.set_member(user, role)
            batch.append(team)
            if sum(len(a.pending_events) for a in batch) >= args.batch:
                save(batch)
                batch = []
        if batch:
            save(batch)
            batch = []
    log(f"principals: {len(data.users)} users, {len(data.teams)} teams in {time.perf_counter() - started:.1f}s")

    # Owners: 65 % users (a few prolific), 35 % teams (mildly skewed).
    user_weights = _zipf(len(data.users), 0.6)
    rng.shuffle(user_weights)
    team_weights = _zipf(len(data.teams), 0.5)
    rng.shuffle(team_weights)
    team_admins = {t: [u for u, role in members[t] if role == "admin"] or ["admin"] for t in data.teams}
    all_principals = data.users + [team_principal(t) for t in data.teams]
    principal_weights = user_weights + [w * 4 for w in team_weights]  # teams get shared with more often
    started = time.perf_counter()
    pending = 0
    for n in range(args.integrations):
        if rng.random() < 0.65:
            owner = rng.choices(data.users, user_weights)[0]
            actor = owner
        else:
            team = rng.choices(data.teams, team_weights)[0]
            owner = team_principal(team)
            actor = rng.choice(team_admins[team])
        settings, secret_field = integration_settings(rng, n)
        rules.check(settings, [secret_field] if secret_field else [], policy)
        slug = f"{slugify(settings['name'])}-{n}"[-64:].lstrip("-")
        integration_id = uuid.uuid4()
        secrets: dict[str, dict[str, str]] = {}
        if secret_field and rng.random() < args.sealed_fraction:
            secrets[secret_field] = dict(app.vault.seal(integration_id, secret_field, f"sk_{uuid.uuid4().hex}"))
            data.sealed += 1
        with acting_as(actor):
            integration = Integration.new(integration_id, owner_id=owner, slug=slug, settings=settings, secrets=secrets)
            roll = rng.random()
            if roll < 0.0002:
                grantees = [team_principal(t) for t in data.teams]
                data.shared["all teams"] = data.shared.get("all teams", 0) + 1
            elif roll < 0.02:
                grantees = _weighted_sample(rng, all_principals, principal_weights, rng.randint(10, 60))
                data.shared["wide (10-60)"] = data.shared.get("wide (10-60)", 0) + 1
            elif roll < 0.17:
                grantees = _weighted_sample(rng, all_principals, principal_weights, rng.randint(1, 5))
                data.shared["1-5"] = data.shared.get("1-5", 0) + 1
            else:
                grantees = []
                data.shared["private"] = data.shared.get("private", 0) + 1
            for grantee in grantees:
                if grantee != owner:
                    integration.share(grantee, rng.choices((1, 2, 3), (85, 12, 3))[0])
        data.owners.append(owner)
        data.access.setdefault(owner, set()).add(n)
        for grantee in integration.shares:
            data.access.setdefault(grantee, set()).add(n)
        if settings["embedded"]:
            data.embedded.add(n)
        batch += [integration, UniqueKey(namespace=SLUG, key=f"{owner}:{slug}", ref=integration_id)]
        pending += len(integration.pending_events) + 1
        if pending >= args.batch:
            save(batch)
            batch, pending = [], 0
            if (n + 1) % 10_000 < 300:
                rate = (n + 1) / (time.perf_counter() - started)
                log(f"  {n + 1} integrations ({rate:,.0f}/s)")
    if batch:
        save(batch)
    data.events = dict(sorted(counts.items()))
    log(f"integrations: {args.integrations} in {time.perf_counter() - started:.1f}s")
    return data


def choose_users(data: DataSet, target_visible: int) -> tuple[str, str]:
    """(typical: about 20 teams, a few thousand visible; few: one team), both with integrationCreation."""
    creators = [u for u in data.users if "integrationCreation" in data.user_permissions[u]]
    most = max(len(data.user_teams[u]) for u in creators)
    low, high = target_visible // 2, target_visible * 2
    typical = None
    for floor in range(most, 0, -1):  # the most teams first, as long as the visible count is "a few thousand"
        fits = [u for u in creators if len(data.user_teams[u]) >= floor and low <= len(data.visible(u)) <= high]
        if fits:
            typical = min(fits, key=lambda u: (-len(data.user_teams[u]), abs(len(data.visible(u)) - target_visible)))
            break
    if typical is None:
        typical = min(creators, key=lambda u: abs(len(data.visible(u)) - target_visible))
    singles = [u for u in creators if len(data.user_teams[u]) == 1] or creators
    few = min(singles, key=lambda u: abs(len(data.visible(u)) - 300))
    return typical, few


# ============================================================================ measurement helpers


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan"),
        "max_ms": round(max(ms), 3) if ms else float("nan"),
    }


def timed(fn: Callable[[], Any], iterations: int, warmup: int = 20) -> dict[str, float]:
    for _ in range(min(warmup, iterations)):
        fn()
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return latency_stats(samples)


def machine(conninfo: str) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with psycopg.connect(conninfo) as conn:
        pg = conn.execute("SELECT version()").fetchone()[0]  # type: ignore[index]
        trgm = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'").fetchone() is not None
        pg_settings = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("shared_buffers", "autovacuum", "synchronous_commit", "max_connections")
        }
    import eventsourcing
    import litestar
    import uvicorn

    return {
        "nproc": sh("nproc"),
        "free_h": subprocess.run(["free", "-h"], capture_output=True, text=True, check=False).stdout.rstrip(),
        "cpu_model": cpu,
        "postgresql": pg,
        "pg_trgm_installed": trgm,
        "pg_settings": pg_settings,
        "python": platform.python_version(),
        "eventsourcing": eventsourcing.__version__ if hasattr(eventsourcing, "__version__") else "9.5.6",
        "litestar": litestar.__version__.formatted() if hasattr(litestar.__version__, "formatted") else "",
        "uvicorn": uvicorn.__version__,
        "wrk": (sh("wrk", "-v") or "wrk").splitlines()[0].split(" Copyright")[0] if shutil.which("wrk") else None,
        "loadavg_at_start": os.getloadavg(),
    }


# ============================================================================ load generation

_LUA_GET = 'wrk.headers["Authorization"] = "Bearer {token}"\n' + WRK_REPORT_LUA

_LUA_POST = (
    r"""
local threads = {}
local counter = 0
setup = function(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
request = function()
  counter = counter + 1
  local slug = string.format("%s-%d-%d", "{prefix}", tid, counter)
  local body = string.format('{"name":"Bench %s","slug":"%s","authType":"apikey",'
    .. '"apiBaseUri":"https://api.weather.example.com/v2","apiKeyName":"X-Api-Key",'
    .. '"apiKey":"wk_live_%s_%08x","description":"Forecasts for the benchmark",'
    .. '"type":"custom","tags":["bench"]}', slug, slug, slug, math.random(0, 2147483647))
  return wrk.format("POST", "/api/integrations",
    {["Authorization"] = "Bearer {token}", ["Content-Type"] = "application/json"}, body)
end
"""
    + WRK_REPORT_LUA
)


def post_body(prefix: str, n: int) -> dict[str, Any]:
    slug = f"{prefix}-py-{n}"
    return {
        "name": f"Bench {slug}",
        "slug": slug,
        "authType": "apikey",
        "apiBaseUri": "https://api.weather.example.com/v2",
        "apiKeyName": "X-Api-Key",
        "apiKey": f"wk_live_{slug}_{random.getrandbits(32):08x}",
        "description": "Forecasts for the benchmark",
        "type": "custom",
        "tags": ["bench"],
    }


class Load:
    """wrk when installed (fixed duration, latency percentiles); else an asyncio httpx client."""

    def __init__(self, base: str, workdir: Path, force_python: bool = False) -> None:
        self.base = base
        self.workdir = workdir
        self.wrk = None if force_python else shutil.which("wrk")
        if self.wrk is None:
            why = "--python-client given" if force_python else "wrk not found (apt-get install -y wrk)"
            log(
                f"WARNING: {why}; using a Python httpx client, "
                "which costs CPU on the same cores and inflates the latencies"
            )
        self.tool = "wrk" if self.wrk else "python-httpx"

    def run(
        self, *, token: str, concurrency: int, duration: float, path: str = "", post_prefix: str | None = None
    ) -> dict[str, Any]:
        if self.wrk:
            return self._wrk(token, concurrency, duration, path, post_prefix)
        return asyncio.run(self._python(token, concurrency, duration, path, post_prefix))

    def _wrk(self, token: str, concurrency: int, duration: float, path: str, post_prefix: str | None) -> dict[str, Any]:
        script = self.workdir / f"wrk-{uuid.uuid4().hex[:8]}.lua"
        template = _LUA_POST if post_prefix else _LUA_GET
        script.write_text(template.replace("{token}", token).replace("{prefix}", post_prefix or ""))
        threads = 1 if concurrency == 1 else min(2, os.cpu_count() or 1)
        url = self.base + (path or "/api/integrations")
        assert self.wrk is not None
        result = run_wrk(self.wrk, url, script, threads=threads, concurrency=concurrency, duration=duration)
        return {"tool": "wrk", "threads": threads, **result}

    async def _python(
        self, token: str, concurrency: int, duration: float, path: str, post_prefix: str | None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        samples: list[float] = []
        errors = 0
        counter = iter(range(10**9))
        deadline = time.perf_counter() + duration
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=self.base, headers=headers, limits=limits, timeout=10) as client:

            async def worker(wid: int) -> None:
                nonlocal errors
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    if post_prefix:
                        r = await client.post(
                            "/api/integrations", json=post_body(f"{post_prefix}-{wid}", next(counter))
                        )
                    else:
                        r = await client.get(path or "/api/integrations")
                    samples.append(time.perf_counter() - t0)
                    if r.status_code >= 400:
                        errors += 1

            began = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            seconds = time.perf_counter() - began
        stats = latency_stats(samples)
        return {
            "tool": "python-httpx",
            "threads": 1,
            "concurrency": concurrency,
            "seconds": round(seconds, 3),
            "requests": len(samples),
            "rps": round(len(samples) / seconds, 1),
            "errors": {"status": errors},
            **{k: v for k, v in stats.items() if k != "n"},
        }


# ============================================================================ the server


@contextlib.contextmanager
def server(
    settings: Settings, admin_token: str, workdir: Path, log_path: Path, projections: str = "inline", workers: int = 1
) -> Iterator[tuple[str, int]]:
    """``integrations serve``; with ``workers`` > 1, ``serve --workers N`` and the read models in
    their own ``integrations projections run`` process, as in production."""
    assert settings.postgres is not None
    pg = settings.postgres
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTEGRATIONS_")}
    env.update(
        INTEGRATIONS_DATABASE_URL=f"postgresql://{pg.user}@{pg.host}:{pg.port}/{pg.dbname}",
        INTEGRATIONS_DATABASE_SCHEMA=pg.schema,
        INTEGRATIONS_MASTER_KEY=str(settings.master_keys),
        INTEGRATIONS_ADMIN_TOKEN=admin_token,
        INTEGRATIONS_DATA_DIR=str(workdir / "data"),
        INTEGRATIONS_PUBLIC_URL=f"http://127.0.0.1:{port}",
        INTEGRATIONS_PROJECTIONS="external" if workers > 1 else projections,
    )
    if pg.password:
        env["PGPASSWORD"] = pg.password
    exe = ROOT / ".venv" / "bin" / "integrations"
    integrations = str(exe) if exe.exists() else "integrations"
    cmd = [integrations, "serve", "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    procs: list[subprocess.Popen[bytes]] = []
    outs = []
    base = f"http://127.0.0.1:{port}"
    try:
        if workers > 1:
            outs.append(open(log_path.with_name("projections.log"), "w"))  # noqa: SIM115 (closed below)
            procs.append(
                subprocess.Popen(
                    [integrations, "projections", "run"],
                    env=env,
                    stdout=outs[-1],
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                )
            )
        outs.append(open(log_path, "w"))  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(cmd, env=env, stdout=outs[-1], stderr=subprocess.STDOUT, cwd=workdir)
        procs.append(proc)
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(base + "/ready", timeout=5)
                if r.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within 300 s; see {log_path}")
            time.sleep(0.5)
        yield base, proc.pid
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for out in outs:
            out.close()


# ============================================================================ profiling (--profile)

PROFILE_RATE = 250  # samples per second and thread


def pyspy_path() -> str | None:
    found = shutil.which("py-spy")
    local = ROOT / ".venv" / "bin" / "py-spy"
    return found or (str(local) if local.exists() else None)


def profile_server(pid: int, out: Path, duration: float, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``run`` (a load) while py-spy samples every thread of the server (idle included)."""
    pyspy = pyspy_path()
    if pyspy is None:
        log("WARNING: py-spy not installed (.venv/bin/pip install py-spy); skipping the profile")
        return {}
    cmd = [
        pyspy, "record", "--pid", str(pid), "--rate", str(PROFILE_RATE), "--duration", str(int(duration) + 2),
        "--format", "raw", "--threads", "--idle", "--full-filenames", "--nonblocking", "--output", str(out),
    ]  # fmt: skip
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    h = run()
    _, err = spy.communicate(timeout=duration + 120)
    if not out.exists():
        log(f"WARNING: py-spy wrote no profile: {err[-500:]}")
        return {"http": h}
    return {"file": str(out), "http": h, **summarise_profile(out, h["requests"])}


_IDLE_LEAVES = ("/threading.py", "/queue.py", "/concurrent/futures/thread.py", "/selectors.py", "time.sleep")


def _category(thread: str, frames: list[str]) -> str | None:
    """What a sample of one thread was doing; None when the thread was idle (waiting for work)."""
    stack = ";".join(frames)
    leaf = frames[-1] if frames else ""

    def calls(function: str, file: str = "") -> bool:  # py-spy names frames "Class.function (file:line)"
        return any((f.startswith(function + " (") or f".{function} (" in f) and file in f for f in frames)

    if not frames or any(p in leaf for p in _IDLE_LEAVES) or "(_listen)" in thread:
        return None
    if leaf.startswith("_batches (") and "/projections/runtime.py" in leaf:
        return None  # the projection feed's gather pause (time.sleep shows as its caller)
    in_sql = any(p in leaf for p in ("/psycopg/", "/psycopg_pool/", "/psycopg_binary/"))
    kind = "SQL round trip (psycopg)" if in_sql else "Python"
    if thread.startswith("projection-") or (thread.startswith("Thread-") and "(_" in thread):
        return f"projection runner (background): {kind}"
    if calls("authenticate_request") or calls("user_by_token_hash"):
        if thread == "MainThread":
            return "auth: event-loop side (headers, anyio thread hop)"
        return f"auth lookup: {kind}"
    if calls("list_integrations"):
        if calls("page", "projections/listing.py"):
            return f"listing.page(): {kind}"
        if "/api/render.py" in stack:
            return "render (HAL docs)"
        if calls("consistent_read"):
            return f"consistent_read: {kind}"
        return f"handler, other: {kind}"
    if calls("create", "api/controllers/integrations.py"):
        if "/infrastructure/vault.py" in stack:
            return f"POST: vault seal: {kind}"
        if calls("_claim"):
            return f"POST: slug claim (load UniqueKey): {kind}"
        if calls("_store"):
            return f"POST: event store save: {kind}"
        if "/api/render.py" in stack:
            return "POST: render"
        if "/src/domain/" in stack:
            return "POST: domain rules"
        return f"POST: other: {kind}"
    if thread != "MainThread":
        return f"other thread ({thread.split(' ')[0]}): {kind}" if "/src/" in stack or "/litestar/" in stack else None
    # the event loop thread (uvloop runs the loop in C: an idle loop shows no litestar/uvicorn frame)
    if not any(p in stack for p in ("/litestar/", "/uvicorn/protocols/", "/src/api/", "/msgspec/", "/anyio/")):
        return None
    if "/msgspec/" in stack or "/litestar/serialization" in stack or "encode_json" in stack or "decode_json" in stack:
        return "event loop: JSON encode/decode"
    if "/anyio/" in leaf or "run_sync" in leaf or "to_thread" in leaf:
        return "event loop: thread hop (anyio)"
    if "/uvicorn/protocols/" in leaf or "httptools" in leaf:
        return "event loop: uvicorn/httptools"
    if "/litestar/" in stack:
        return "event loop: litestar (routing, middleware, DI, response)"
    return "event loop: other"


def summarise_profile(path: Path, requests: int) -> dict[str, Any]:
    busy: dict[str, int] = {}
    idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        head, _, rest = stack.partition(";")
        thread = head.split(":", 1)[1].strip() if ":" in head else head
        category = _category(thread, rest.split(";") if rest else [])
        if category is None:
            idle += int(count)
        else:
            busy[category] = busy.get(category, 0) + int(count)
    per_request = {
        k: round(v / PROFILE_RATE / max(requests, 1) * 1000, 3) for k, v in sorted(busy.items(), key=lambda kv: -kv[1])
    }
    return {
        "rate_hz": PROFILE_RATE,
        "requests": requests,
        "busy_samples": sum(busy.values()),
        "idle_samples": idle,
        "ms_per_request": per_request,
        "ms_per_request_total": round(sum(per_request.values()), 3),
    }


# ============================================================================ the phases


class Thing(Aggregate):
    """The bare aggregate: one attribute, one Created event."""

    def __init__(self, n: int) -> None:
        self.n = n


class BareBench(Application[uuid.UUID]):
    name = "barebench"


def bare_rate(pg: PostgresConfig, seconds: float, threads: int) -> dict[str, Any]:
    """Create + save of a minimal aggregate, one per save, in a scratch Application (same server)."""
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": pg.dbname,
        "POSTGRES_HOST": pg.host,
        "POSTGRES_PORT": str(pg.port),
        "POSTGRES_USER": pg.user,
        "POSTGRES_PASSWORD": pg.password,
        "POSTGRES_SCHEMA": pg.schema,
        "POSTGRES_POOL_SIZE": str(max(2, threads)),
        "POSTGRES_MAX_OVERFLOW": "2",
        "POSTGRES_ENABLE_DB_FUNCTIONS": "n",  # as the service's own store
        "CREATE_TABLE": "y",
    }
    app = BareBench(env)
    try:
        for n in range(50):  # warm the pool and the statement cache
            app.save(Thing(n))
        counts = [0] * threads
        deadline = time.perf_counter() + seconds

        def loop(i: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                app.save(Thing(n))
                n += 1
            counts[i] = n

        began = time.perf_counter()
        workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - began
    finally:
        app.close()
    return {
        "threads": threads,
        "seconds": round(elapsed, 3),
        "saves": sum(counts),
        "rps": round(sum(counts) / elapsed, 1),
    }


def write_parts(settings: Settings, user_id: str, token: str, iterations: int) -> dict[str, dict[str, float]]:
    """What one POST does, piece by piece, timed in-process on the same store (no HTTP, no server)."""
    from commands.messages import IntegrationBody

    vault = open_vault(settings, load_keyring(settings))
    app = IntegrationsApp(application_env(settings), vault=vault, hasher=ScryptHasher())
    generations = Generations.open(projection_env(settings, Generations.NAME))
    name = generation_name("principals", int(generations.active("principals") or 1))
    generations.close()
    principals = construct_view("principals", projection_env(settings, name), name)
    try:
        hashed = token_hash(token)
        row = principals.user_by_token_hash(hashed)
        assert row is not None and row["user_id"] == user_id
        actor = actor_from_row(row)
        settings_doc, _ = integration_settings(random.Random(7), 0)
        counter = iter(range(10**9))

        def body() -> IntegrationBody:
            n = next(counter)
            return IntegrationBody(
                name=f"Parts {n}",
                slug=f"parts-{uuid.uuid4().hex[:12]}",
                auth_type="apikey",
                api_base_uri="https://api.weather.example.com/v2",
                api_key_name="X-Api-Key",
                api_key=f"wk_live_{n}",
                description="Forecasts for the benchmark",
                type="custom",
                tags=["bench"],
            )

        def save_pair() -> None:
            iid = uuid.uuid4()
            slug = f"parts-{iid.hex[:12]}"
            with acting_as(user_id):
                integration = Integration.new(iid, owner_id=user_id, slug=slug, settings=settings_doc, secrets={})
                app.save(integration, UniqueKey(namespace=SLUG, key=f"{user_id}:{slug}", ref=iid))

        return {
            "auth lookup (principals.user_by_token_hash)": timed(
                lambda: principals.user_by_token_hash(hashed), iterations
            ),
            "vault.seal, new owner": timed(lambda: vault.seal(uuid.uuid4(), "api_key", "wk_live_x"), iterations),
            # Not on a create's usual path (it claims without reading); its retry on a taken key.
            "slug claim on retry (_claim: load the UniqueKey)": timed(
                lambda: app._claim(SLUG, f"{user_id}:none-{uuid.uuid4().hex}", uuid.uuid4()), iterations
            ),
            "app.save(Integration, UniqueKey)": timed(save_pair, iterations),
            "app.create_integration (the whole command)": timed(
                lambda: app.create_integration(actor, body()), iterations
            ),
        }
    finally:
        principals.close()
        app.close()
        vault.close()


def read_rates(app: IntegrationsApp, topics: Sequence[str]) -> dict[str, Any]:
    """Raw log read: select_notifications (batches of 1,000), then the same plus to_domain_event."""

    def scan(convert: bool, only: Sequence[str] = ()) -> tuple[int, float]:
        began = time.perf_counter()
        position, count = 0, 0
        while batch := app.recorder.select_notifications(
            start=position, limit=1000, topics=only, inclusive_of_start=False
        ):
            if convert:
                for n in batch:
                    app.mapper.to_domain_event(n)
            count += len(batch)
            position = batch[-1].id
        return count, time.perf_counter() - began

    scan(False)  # warm the cache, so every pass reads the same (hot) pages
    out: dict[str, Any] = {}
    for key, convert, only in (
        ("select", False, ()),
        ("select+map", True, ()),
        ("select+map, listing topics", True, topics),
    ):
        count, seconds = scan(convert, only)
        out[key] = {"events": count, "seconds": round(seconds, 3), "events_per_s": round(count / seconds)}
    return out


def listing_cases(visible: int, rare_visible: int, common_visible: int) -> list[dict[str, Any]]:
    def deep(total: int) -> int | None:
        if total > DEEP_START + PAGE_LIMIT:
            return DEEP_START
        middle = (total // 2) // PAGE_LIMIT * PAGE_LIMIT
        return middle if middle > 0 else None

    cases = []
    for label, q, total in (
        ("no q", None, visible),
        (f"q={COMMON_Q}", COMMON_Q, common_visible),
        (f"q={RARE_Q}", RARE_Q, rare_visible),
    ):
        cases.append({"label": f"first page, {label}", "q": q, "start": 0})
        start = deep(total)
        if start is not None:
            cases.append({"label": f"deep page start={start}, {label}", "q": q, "start": start})
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--integrations", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--teams", type=int, default=200)
    parser.add_argument("--target-visible", type=int, default=4000, help="how many the typical user should see")
    parser.add_argument("--batch", type=int, default=2000, help="events per save while generating")
    parser.add_argument("--sealed-fraction", type=float, default=0.01, help="integrations whose secret is sealed")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per HTTP case")
    parser.add_argument("--get-concurrency", default="1,16")
    parser.add_argument("--post-concurrency", default="1,8")
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument(
        "--database-url", default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    )
    parser.add_argument("--schema", default=None, help="default: bench_listing_<random>, created and dropped")
    parser.add_argument("--keep", action="store_true", help="keep the schema (and print how to reach it)")
    parser.add_argument("--python-client", action="store_true", help="use the Python client even if wrk exists")
    parser.add_argument("--no-docs", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument(
        "--no-vacuum",
        dest="vacuum",
        action="store_false",
        help="measure the read models as the rebuild leaves them (default: VACUUM (ANALYZE) them first)",
    )
    parser.add_argument(
        "--projections",
        choices=("inline", "external"),
        default="inline",
        help="the server's INTEGRATIONS_PROJECTIONS (external: no read-model workers run; POSTs are not projected)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serve --workers N; with N > 1 the read models run in an `integrations projections run` process",
    )
    parser.add_argument(
        "--profile", action="store_true", help="after the timed cases, profile GET and POST with py-spy"
    )
    parser.add_argument(
        "--post-only", action="store_true", help="skip the GET cases (and their profile): the write path only"
    )
    parser.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--report", metavar="JSON", help="only print (and append to the docs) a saved result")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(markdown(saved))
        if not args.no_docs:
            append_docs(saved, markdown(saved))
            log("appended a section to docs/benchmarks.md")
        return 0

    command = " ".join([".venv/bin/python", "bench/listing.py", *sys.argv[1:]])
    started_at = datetime.now(UTC)
    rng = random.Random(args.seed)
    base_pg = PostgresConfig.from_url(args.database_url)
    schema = args.schema or f"bench_listing_{uuid.uuid4().hex[:8]}"
    pg = PostgresConfig(base_pg.host, base_pg.port, base_pg.dbname, base_pg.user, base_pg.password, schema)
    admin_token = "iik_bench_admin_" + uuid.uuid4().hex
    workdir = Path(tempfile.mkdtemp(prefix="bench-listing-"))
    settings = Settings(data_dir=workdir / "data", postgres=pg, master_keys=generate_key(), admin_token=admin_token)
    results: dict[str, Any] = {
        "benchmark": "listing",
        "command": command,
        "date": started_at.strftime("%a %b %d %H:%M:%S UTC %Y"),
        "machine": machine(pg.conninfo()),
        "parameters": {k: v for k, v in vars(args).items() if k not in ("database_url",)},
        "schema": schema,
        "source": source_fingerprint(),
    }
    log(f"schema {schema} on {pg.host}:{pg.port}/{pg.dbname}; work dir {workdir}")
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        run(args, settings, admin_token, rng, workdir, results)
    finally:
        if args.keep:
            log(f'kept schema {schema} (drop it with: DROP SCHEMA "{schema}" CASCADE)')
        else:
            with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            log(f"dropped schema {schema}")
        shutil.rmtree(workdir, ignore_errors=True)

    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"listing-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = markdown(results)
    print()
    print(table)
    log(f"results: {out}")
    if not args.no_docs:
        append_docs(results, table)
        log("appended a section to docs/benchmarks.md")
    return 0


def run(
    args: argparse.Namespace,
    settings: Settings,
    admin_token: str,
    rng: random.Random,
    workdir: Path,
    results: dict[str, Any],
) -> None:
    assert settings.postgres is not None
    vault = open_vault(settings, load_keyring(settings))
    app = IntegrationsApp(application_env(settings), vault=vault, hasher=ScryptHasher())
    try:
        # ------------------------------------------------------------------ 1. the data set
        began = time.perf_counter()
        app.ensure_admin(admin_token)
        data = generate(app, args, rng)
        typical, few = choose_users(data, args.target_visible)
        system = Actor(id=SYSTEM_ACTOR, superuser=True)
        tokens = {u: app.issue_token(system, u, "bench").value.token for u in (typical, few)}
        head = app.recorder.max_notification_id() or 0
        generation_s = time.perf_counter() - began
        log(f"data set: {head} events in {generation_s:.1f}s ({head / generation_s:,.0f} events/s written)")

        results["dataset"] = {
            "users": len(data.users),
            "teams": len(data.teams),
            "integrations": args.integrations,
            "embedded": len(data.embedded),
            "sealed_secrets": data.sealed,
            "events": head,
            "events_by_type": data.events,
            "sharing": data.shared,
            "teams_per_user": _distribution([len(data.user_teams[u]) for u in data.users]),
            "team_sizes": _distribution([sum(1 for u in data.users if t in data.user_teams[u]) for t in data.teams]),
            "integrations_per_team_owner": _distribution(
                [len(data.access.get(team_principal(t), ())) for t in data.teams]
            ),
            "generation_seconds": round(generation_s, 1),
            "write_events_per_s": round(head / generation_s),
            "typical_user": {
                "id": typical,
                "teams": len(data.user_teams[typical]),
                "visible": len(data.visible(typical)),
            },
            "few_teams_user": {"id": few, "teams": len(data.user_teams[few]), "visible": len(data.visible(few))},
        }
        log(f"typical user {typical}: {len(data.user_teams[typical])} teams, sees {len(data.visible(typical))}")
        log(f"few-teams user {few}: {len(data.user_teams[few])} team(s), sees {len(data.visible(few))}")

        # ------------------------------------------------------------------ 2. rebuild vs raw read
        from projections.listing import IntegrationListing

        log("raw log read rates ...")
        results["read"] = read_rates(app, IntegrationListing.topics)
        for key, r in results["read"].items():
            log(f"  {key}: {r['events']} events in {r['seconds']}s = {r['events_per_s']:,} events/s")
        log("blue/green rebuild of every read model (rebuild_projections(settings, None, drop_old=True)) ...")
        t0 = time.perf_counter()
        reports = rebuild_projections(settings, None, drop_old=True)
        wall = time.perf_counter() - t0
        results["rebuild"] = {
            "wall_seconds": round(wall, 3),
            "read_models": reports,
            "events": sum(r["events"] for r in reports),
            "events_per_s_wall": round(sum(r["events"] for r in reports) / wall),
        }
        for r in reports:
            r["events_per_s"] = round(r["events"] / r["seconds"]) if r["seconds"] else None
            log(f"  {r['read_model']}: {r['events']} events in {r['seconds']}s = {r['events_per_s']:,} events/s")
        log(f"  all (wall, incl. ANALYZE and drop of the old generation): {wall:.2f}s")
        results["rebuild"]["tables_after_rebuild"] = table_stats(settings.postgres)
        for name, t in results["rebuild"]["tables_after_rebuild"].items():
            if "listing" in name or "principals" in name:
                log(f"  {name}: {t['live']:,} live rows, {t['dead']:,} dead, {t['total_mb']} MB")
        if args.vacuum:
            log("VACUUM (ANALYZE) of the read models' tables (the steady state; --no-vacuum to skip) ...")
            t0 = time.perf_counter()
            vacuum_read_models(settings.postgres)
            results["rebuild"]["vacuum_seconds"] = round(time.perf_counter() - t0, 2)
            results["rebuild"]["tables_after_vacuum"] = table_stats(settings.postgres)
            log(f"  {results['rebuild']['vacuum_seconds']}s")
    finally:
        app.close()
        vault.close()

    # ------------------------------------------------------------------ 3. the listing over HTTP
    penv = projection_env(settings, Generations.NAME)
    generations = Generations.open(penv)
    gen = generations.active("listing")
    pgen = generations.active("principals")
    generations.close()
    listing_name = generation_name("listing", int(gen or 1))
    principals_name = generation_name("principals", int(pgen or 1))
    listing = construct_view("listing", projection_env(settings, listing_name), listing_name)
    principals = construct_view("principals", projection_env(settings, principals_name), principals_name)
    raw = psycopg.connect(settings.postgres.conninfo(), autocommit=True)
    load = Load("", workdir, force_python=args.python_client)
    results["load_tool"] = load.tool
    server_log = workdir / "server.log"
    try:
        users = {}
        for label, user in (
            ("typical", results["dataset"]["typical_user"]["id"]),
            ("few", results["dataset"]["few_teams_user"]["id"]),
        ):
            row = principals.user_by_token_hash(token_hash(tokens[user]))
            assert row is not None, f"token of {user} not in the principals read model"
            users[label] = (user, tokens[user], visible_to(actor_from_row(row)))
        typical_ids = users["typical"][2]
        totals = {q: listing.page(typical_ids, q=q, limit=1)[1] for q in (None, COMMON_Q, RARE_Q)}
        results["dataset"]["typical_user"]["listing_totals"] = {str(k): v for k, v in totals.items()}
        cases = [dict(c, user="typical") for c in listing_cases(totals[None], totals[RARE_Q], totals[COMMON_Q])]
        cases.append({"label": "first page, no q (user in 1 team)", "q": None, "start": 0, "user": "few"})
        if args.post_only:
            cases = []
        get_conc = [int(c) for c in args.get_concurrency.split(",") if c]
        post_conc = [int(c) for c in args.post_concurrency.split(",") if c]

        with server(settings, admin_token, workdir, server_log, args.projections, args.workers) as (base, pid):
            load.base = base
            results["server"] = {
                "pid": pid,
                "workers": args.workers,
                "projections": "external (integrations projections run)" if args.workers > 1 else args.projections,
            }
            log(f"server ready at {base} (pid {pid})")
            get_rows = []
            for case in cases:
                user, token, ids = users[case["user"]]
                query = f"limit={PAGE_LIMIT}&start={case['start']}" + (f"&q={case['q']}" if case["q"] else "")
                path = f"/api/integrations?{query}"
                check = httpx.get(base + path, headers={"Authorization": f"Bearer {token}"}, timeout=30)
                check.raise_for_status()
                body = check.json()
                row: dict[str, Any] = {
                    "case": case["label"],
                    "user": user,
                    "path": path,
                    "total": body["total"],
                    "count": body["count"],
                    "response_bytes": len(check.content),
                    "loadavg_before": [round(x, 2) for x in os.getloadavg()],
                    "http": {},
                }
                for c in get_conc:
                    log(f"GET {path} as {user}, c={c}, {args.duration:g}s ...")
                    row["http"][str(c)] = load.run(token=token, concurrency=c, duration=args.duration, path=path)
                    h = row["http"][str(c)]
                    log(
                        f"  {h['rps']:,} req/s, p50 {h['p50_ms']:.2f} / p99 {h['p99_ms']:.2f} ms, errors {load_errors(h)}"
                    )
                iterations = max(200, min(20_000, int(row["http"][str(get_conc[0])]["requests"])))
                sql, params, count = page_sql(listing, ids, case["q"], case["start"])

                def raw_page(sql: str = sql, params: list[Any] = params, count: Any = count) -> None:
                    rows = raw.execute(sql, params).fetchall()
                    if not rows and count is not None:
                        raw.execute(*count).fetchall()

                def view_page(ids: Any = ids, q: Any = case["q"], start: int = case["start"]) -> None:
                    listing.page(ids, q=q, sort="name", start=start, limit=PAGE_LIMIT)

                hashed = token_hash(token)
                row["raw_sql"] = timed(raw_page, iterations)
                row["view_page"] = timed(view_page, iterations)
                row["auth_lookup"] = timed(lambda h=hashed: principals.user_by_token_hash(h), min(iterations, 2000))
                row["sql"] = {
                    "statement": sql,
                    "params": [p if not isinstance(p, list) else f"<{len(p)} principal ids>" for p in params],
                }
                row["explain"] = explain(raw, sql, params)
                log(
                    f"  raw SQL p50 {row['raw_sql']['p50_ms']:.2f} / p99 {row['raw_sql']['p99_ms']:.2f} ms; "
                    f"view.page() p50 {row['view_page']['p50_ms']:.2f} / p99 {row['view_page']['p99_ms']:.2f} ms; "
                    f"auth lookup p50 {row['auth_lookup']['p50_ms']:.2f} ms ({iterations} iterations)"
                )
                get_rows.append(row)
            results["get"] = get_rows

            profiles: dict[str, Any] = {}
            results["profile"] = profiles
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            out_dir = Path(args.results_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            if args.profile and not args.post_only:  # an extra pass, not part of the timed results; before any write
                user, token, _ = users["typical"]
                path = f"/api/integrations?limit={PAGE_LIMIT}&start=0"
                log(f"profiling GET {path} c=1 with py-spy ({args.duration:g}s) ...")
                profiles["GET first page, no q, c=1"] = profile_server(
                    pid,
                    out_dir / f"profile-{stamp}-get.txt",
                    args.duration,
                    lambda: load.run(token=token, concurrency=1, duration=args.duration, path=path),
                )
                log(f"  {json.dumps(profiles['GET first page, no q, c=1'].get('ms_per_request', {}))}")

            # ------------------------------------------------------------------ 4. POST vs bare
            post_rows = []
            user, token, _ = users["typical"]
            before = listing.count()
            for c in post_conc:
                prefix = f"b{uuid.uuid4().hex[:6]}c{c}"
                log(f"POST /api/integrations as {user}, c={c}, {args.duration:g}s ...")
                load_before = os.getloadavg()
                h = load.run(token=token, concurrency=c, duration=args.duration, post_prefix=prefix)
                log(f"  {h['rps']:,} req/s, p50 {h['p50_ms']:.2f} / p99 {h['p99_ms']:.2f} ms, errors {load_errors(h)}")
                post_rows.append({"concurrency": c, "http": h, "loadavg_before": [round(x, 2) for x in load_before]})
            time.sleep(2)
            created = listing.count() - before
            results["post"] = {"rows": post_rows, "created_in_read_model_after_2s": created}

            if args.profile:  # an extra pass, not part of the timed results above
                log("profiling POST c=1 with py-spy ...")
                prefix = f"p{uuid.uuid4().hex[:6]}"
                profiles["POST c=1"] = profile_server(
                    pid,
                    out_dir / f"profile-{stamp}-post.txt",
                    args.duration,
                    lambda: load.run(token=token, concurrency=1, duration=args.duration, post_prefix=prefix),
                )
                log(f"  {json.dumps(profiles['POST c=1'].get('ms_per_request', {}))}")
        log(f"server stopped; its log: {server_log.stat().st_size} bytes")
        results["server_log_tail"] = server_log.read_text()[-3000:]
    finally:
        raw.close()
        listing.close()
        principals.close()

    bare = {}
    for c in sorted({1, *post_conc}):
        log(f"bare aggregate create+save, {c} thread(s), {args.duration:g}s ...")
        bare[str(c)] = bare_rate(settings.postgres, args.duration, c)
        log(f"  {bare[str(c)]['rps']:,} saves/s")
    results["bare"] = bare
    log("the write path's parts in-process (no HTTP), 300 iterations each ...")
    typical_id = results["dataset"]["typical_user"]["id"]
    results["write_parts"] = write_parts(settings, typical_id, tokens[typical_id], 300)
    for key, stats in results["write_parts"].items():
        log(f"  {key}: p50 {stats['p50_ms']:.2f} / p99 {stats['p99_ms']:.2f} ms")
    results["targets"] = targets(results)
    results["machine"]["loadavg_at_end"] = os.getloadavg()


def page_sql(view: Any, ids: Any, q: str | None, start: int) -> tuple[str, list[Any], tuple[str, list[Any]] | None]:
    """The SQL and parameters the listing view runs for this page, from the view's own helper.

    ``page_statement`` (one statement whose rows carry the total) or the older ``page_statements``
    (the page, and a count run when the page is empty).
    """
    if hasattr(view, "page_statement"):
        statement, params = view.page_statement(ids, q, None, "name", start, PAGE_LIMIT)
        return view.sql(statement), list(params), None
    (statement, params), (count, count_params) = view.page_statements(ids, q, None, "name", start, PAGE_LIMIT)
    return view.sql(statement), list(params), (view.sql(count), list(count_params))


def source_fingerprint() -> dict[str, Any]:
    """Which code was measured: git HEAD, and hashes of the files still changing."""
    import hashlib

    files = ("src/projections/listing.py", "src/projections/runtime.py", "src/projections/sqlview.py")
    return {
        "git_head": sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
        "git_dirty": sh("git", "-C", str(ROOT), "status", "--porcelain", "--", "src").splitlines(),
        "sha256": {f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest()[:12] for f in files if (ROOT / f).exists()},
    }


def table_stats(pg: PostgresConfig) -> dict[str, dict[str, Any]]:
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(
            "SELECT relname, n_live_tup, n_dead_tup, pg_total_relation_size(relid) FROM pg_stat_user_tables "
            "WHERE schemaname = %s ORDER BY pg_total_relation_size(relid) DESC",
            (pg.schema,),
        ).fetchall()
    return {r[0]: {"live": r[1], "dead": r[2], "total_mb": round(r[3] / 2**20, 1)} for r in rows}


def vacuum_read_models(pg: PostgresConfig) -> None:
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s AND (tablename LIKE 'listing%%' "
            "OR tablename LIKE 'principals%%')",
            (pg.schema,),
        ).fetchall()
        for (table,) in tables:
            conn.execute(f'VACUUM (ANALYZE) "{pg.schema}"."{table}"')


def explain(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any]) -> list[str]:
    try:
        rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).fetchall()
        return [r[0] for r in rows]
    except psycopg.Error as e:
        return [f"EXPLAIN failed: {e}"]


def _distribution(values: Sequence[int]) -> dict[str, float]:
    return {
        "min": min(values),
        "p50": percentile(values, 50),
        "mean": round(statistics.fmean(values), 1),
        "p90": percentile(values, 90),
        "max": max(values),
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for row in results.get("get", []):
        h = row["http"].get("1")
        if h is None:
            continue
        out.append(
            {
                "target": f"GET {row['case']}: p99 < {GET_P99_TARGET_MS:g} ms through HTTP at c=1",
                "value": f"{h['p99_ms']:.2f} ms",
                "pass": h["p99_ms"] < GET_P99_TARGET_MS and not load_errors(h),
            }
        )
    bare = results.get("bare", {})
    for row in results.get("post", {}).get("rows", []):
        c = row["concurrency"]
        reference = bare.get(str(c))
        if reference is None:
            continue
        ratio = row["http"]["rps"] / reference["rps"] if reference["rps"] else 0.0
        out.append(
            {
                "target": f"POST c={c}: >= {POST_RATIO_TARGET:g} x bare create+save ({c} thread(s))",
                "value": f"{row['http']['rps']:,.0f} / {reference['rps']:,.0f} = {ratio:.2f}",
                "pass": ratio >= POST_RATIO_TARGET and not load_errors(row["http"]),
            }
        )
    return out


def markdown(results: dict[str, Any]) -> str:
    ds = results.get("dataset", {})
    lines = []
    if ds:
        tu, fu = ds["typical_user"], ds["few_teams_user"]
        lines += [
            f"Data set: {ds['users']:,} users, {ds['teams']} teams, {ds['integrations']:,} integrations "
            f"({ds['embedded']:,} embedded, {ds['sealed_secrets']:,} with a sealed secret), {ds['events']:,} events, "
            f"generated through the write model in {ds['generation_seconds']} s "
            f"({ds['write_events_per_s']:,} events/s, batched saves). Sharing: "
            + ", ".join(f"{k} {v:,}" for k, v in ds["sharing"].items())
            + f". Teams per user: mean {ds['teams_per_user']['mean']}, max {ds['teams_per_user']['max']}; "
            f"team size p50 {ds['team_sizes']['p50']}, max {ds['team_sizes']['max']}.",
            "",
            f"Callers: typical `{tu['id']}` in {tu['teams']} teams sees {tu['visible']:,} integrations "
            f"(`{COMMON_Q}` matches {tu.get('listing_totals', {}).get(COMMON_Q, '?')}, `{RARE_Q}` "
            f"{tu.get('listing_totals', {}).get(RARE_Q, '?')}); `{fu['id']}` in {fu['teams']} team(s) sees "
            f"{fu['visible']:,}. Load generator: {results.get('load_tool')}; "
            f"{results.get('server', {}).get('workers', 1)} uvicorn worker(s), "
            f"{results.get('server', {}).get('projections', 'inline')} projections.",
            "",
        ]
    if "rebuild" in results:
        rd, rb = results["read"], results["rebuild"]
        lines += ["| Read side (same log, same run) | events | seconds | events/s |", "|---|---:|---:|---:|"]
        for key, r in rd.items():
            lines.append(
                f"| raw `select_notifications` ({key}) | {r['events']:,} | {r['seconds']} | {r['events_per_s']:,} |"
            )
        for r in rb["read_models"]:
            lines.append(
                f"| rebuild `{r['read_model']}` (batched, blue/green) | {r['events']:,} | {r['seconds']} | "
                f"{r['events_per_s'] or 0:,} |"
            )
        lines.append(
            f"| `rebuild_projections(settings, None, drop_old=True)` wall | {rb['events']:,} | {rb['wall_seconds']} | "
            f"{rb['events_per_s_wall']:,} |"
        )
        lines.append("")
        after = rb.get("tables_after_rebuild", {})
        listed = {k: v for k, v in after.items() if k.startswith("listing_") and v["total_mb"] >= 1}
        if listed:
            lines.append(
                "Listing tables right after the rebuild: "
                + "; ".join(
                    f"`{k}` {v['live']:,} live / {v['dead']:,} dead rows, {v['total_mb']} MB" for k, v in listed.items()
                )
                + (
                    f". Then `VACUUM (ANALYZE)` of the read-model tables: {rb['vacuum_seconds']} s "
                    "(the HTTP cases below run on the vacuumed tables)."
                    if "vacuum_seconds" in rb
                    else ". Not vacuumed (`--no-vacuum`): the HTTP cases below run on the tables as the rebuild "
                    "left them."
                )
                + f" Server autovacuum: {results['machine'].get('pg_settings', {}).get('autovacuum', '?')}."
            )
            lines.append("")
    if results.get("get"):
        conc = list(results["get"][0]["http"])
        head = "| `GET /api/integrations?limit=50` | total |" + "".join(
            f" HTTP c={c} p50 / p99 ms | c={c} req/s |" for c in conc
        )
        head += " view.page() p50 / p99 ms | raw SQL p50 / p99 ms | auth lookup p50 ms |"
        lines += [head, "|---|---:|" + "---:|---:|" * len(conc) + "---:|---:|---:|"]
        for row in results["get"]:
            cells = f"| {row['case']} | {row['total']:,} |"
            for c in conc:
                h = row["http"][c]
                err = f" ({load_errors(h)} errors)" if load_errors(h) else ""
                cells += f" {h['p50_ms']:.2f} / {h['p99_ms']:.2f}{err} | {h['rps']:,.0f} |"
            cells += (
                f" {row['view_page']['p50_ms']:.2f} / {row['view_page']['p99_ms']:.2f} |"
                f" {row['raw_sql']['p50_ms']:.2f} / {row['raw_sql']['p99_ms']:.2f} |"
                f" {row['auth_lookup']['p50_ms']:.2f} |"
            )
            lines.append(cells)
        lines.append("")
    if results.get("post"):
        lines += [
            "| `POST /api/integrations` (apikey body, sealed secret) | req/s | p50 ms | p99 ms | errors"
            " | bare create+save/s (same threads) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in results["post"]["rows"]:
            h, b = row["http"], results.get("bare", {}).get(str(row["concurrency"]), {})
            lines.append(
                f"| c={row['concurrency']} | {h['rps']:,.0f} | {h['p50_ms']:.2f} | {h['p99_ms']:.2f} | {load_errors(h)} | "
                f"{b.get('rps', float('nan')):,.0f} |"
            )
        lines.append("")
    if results.get("write_parts"):
        lines += ["| One POST's parts, in-process on the same store (no HTTP) | p50 ms | p99 ms |", "|---|---:|---:|"]
        for key, stats in results["write_parts"].items():
            lines.append(f"| {key} | {stats['p50_ms']:.2f} | {stats['p99_ms']:.2f} |")
        bare1 = results.get("bare", {}).get("1")
        if bare1:
            lines.append(f"| bare aggregate create+save (for scale) | {1000 / bare1['rps']:.2f} (mean) | |")
        lines.append("")
    for label, prof in (results.get("profile") or {}).items():
        if prof.get("ms_per_request"):
            lines.append(
                f"py-spy, {label} ({prof['http']['requests']} requests, {prof['http']['p50_ms']:.2f} ms p50 under "
                f"the profiler), busy time per request by area: "
                + ", ".join(f"{k} {v:.2f} ms" for k, v in prof["ms_per_request"].items() if v >= 0.05)
                + "."
            )
            lines.append("")
    if results.get("targets"):
        lines += targets_table(results["targets"])
    return "\n".join(lines)


def append_docs(results: dict[str, Any], table: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    m = results["machine"]
    section = [
        "",
        f"## Listing, rebuild and write path on PostgreSQL ({results['date']})",
        "",
        f"Command: `{results['command']}` (`bench/listing.py`; see `bench/README.md`).",
        "",
        f"Date (`date -u`): {results['date']}",
        "",
        f"Machine: `nproc` = {m['nproc']}; CPU: {m['cpu_model']}; PostgreSQL: {m['postgresql'].split(' on ')[0]}"
        f" (pg_trgm {'installed' if m['pg_trgm_installed'] else 'not installed'}); Python {m['python']};"
        f" load generator: {m['wrk'] or 'python-httpx'}."
        + (
            " PostgreSQL settings: " + ", ".join(f"{k} {v}" for k, v in m["pg_settings"].items()) + "."
            if m.get("pg_settings")
            else ""
        )
        + f" Load average (1/5/15 min) at the start: {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}"
        + (f"; at the end: {', '.join(f'{x:.2f}' for x in m['loadavg_at_end'])}" if m.get("loadavg_at_end") else "")
        + " (other processes shared the machine when this is above 0). `free -h`:",
        "",
        "```",
        m["free_h"],
        "```",
        "",
        table,
        "",
    ]
    if not path.exists():
        path.write_text(
            "# Benchmarks\n\nMeasurements of the service, newest last. Absolute numbers drift between machines: "
            "compare ratios taken in one run.\n"
        )
    with open(path, "a") as f:
        f.write("\n".join(section))


if __name__ == "__main__":
    sys.exit(main())
