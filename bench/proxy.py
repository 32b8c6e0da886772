"""Request-proxy benchmark: direct calls, ``/proxy/...`` and ``POST /request`` side by side, in one run.

    .venv/bin/python bench/proxy.py [--duration 5] [--concurrency 1,16,64] [--workers N] [--profile]

What it does:

1. Starts a fast local upstream on 127.0.0.1: nginx (``apt-get install -y nginx-light``) answering
   a small JSON body, or, without nginx, a minimal asyncio (uvloop) HTTP/1.1 server in a subprocess
   (``--upstream python``). With nginx it also starts an nginx ``proxy_pass`` that injects the same
   two headers as the integration (the floor for any proxy, as in the performance notes).
2. Starts the real server (``integrations serve``) on PostgreSQL (a fresh schema, dropped at the
   end) or SQLite (``--sqlite``), allowed to reach 127.0.0.1, with a non-superuser, an API token and
   an apikey integration in shared mode whose custom header expands ``${user.email}``: every
   proxied call injects two headers (the key and the expanded one).
3. For each concurrency (default 1, 16, 64) runs wrk (``-t1``, fixed duration) on: the upstream
   directly, the nginx floor, ``GET /api/integrations/{id}/proxy/items`` and ``POST
   /api/integrations/{id}/request`` (a Lua script sends the JSON body). Per case it records
   req/s, p50/p90/p99 latency, errors, the server's CPU time and its peak RSS (VmHWM, reset before
   each case through ``/proc/<pid>/clear_refs``; every worker process when there are several).
4. Reports the added latency (proxied p50 minus direct p50) and the throughput ratio (proxied /
   direct), checks the issue's targets (p50 added latency < 1 ms at c=1; >= 5,000 proxied req/s
   at c=64), writes ``bench/results/proxy-<UTC time>.json`` and appends a section to
   ``docs/benchmarks.md`` (``--no-docs`` to skip).
5. ``--profile``: one more ``/proxy`` pass at the highest concurrency under py-spy (on-CPU samples
   of every thread of the server and its workers), and the CPU time per request by area.

Not a test: nothing here asserts on time. The load generator, the upstream and the server share
the machine's cores; compare ratios taken in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchkit import WRK_REPORT_LUA, free_port, load_errors, log, run_wrk, sh, targets_table

ROOT = Path(__file__).resolve().parent.parent
ADDED_P50_TARGET_MS = 1.0
C64_RPS_TARGET = 5000
ADMIN_TOKEN = "bench-proxy-admin-token-0123456789"
API_KEY = "bench-upstream-api-key-0123456789"
UPSTREAM_BODY = b'{"ok":true,"items":[{"id":1,"name":"alpha"},{"id":2,"name":"beta"}]}'


def wait_http(url: str, proc: subprocess.Popen[Any] | None, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer within {seconds:g} s")
        time.sleep(0.2)


@contextlib.contextmanager
def popen(cmd: list[str], log_path: Path, **kw: Any) -> Iterator[subprocess.Popen[bytes]]:
    out = open(log_path, "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        out.close()


# ============================================================================ the upstream

_NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
    upstream origin {{
        server 127.0.0.1:{port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{floor_port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Api-Key "{api_key}";
            proxy_set_header X-User-Email "bench@example.com";
        }}
    }}
}}
"""


def _python_upstream(port: int) -> None:
    """A minimal keep-alive HTTP/1.1 server answering every request with the JSON body."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(UPSTREAM_BODY)).encode()
        + b"\r\n\r\n"
    )
    answer = head + UPSTREAM_BODY

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buffer = b""
            self.need = 0  # body bytes still to skip

        def data_received(self, data: bytes) -> None:
            buf = self.buffer + data
            out = []
            while True:
                if self.need:
                    take = min(self.need, len(buf))
                    buf = buf[take:]
                    self.need -= take
                    if self.need:
                        break
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                headers = buf[:end].lower()
                buf = buf[end + 4 :]
                at = headers.find(b"\r\ncontent-length:")
                if at >= 0:
                    stop = headers.find(b"\r\n", at + 2)
                    self.need = int(headers[at + 17 : stop if stop > 0 else None])
                out.append(answer)
            self.buffer = buf
            if out:
                self.transport.write(b"".join(out))

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()

    asyncio.run(main())


@contextlib.contextmanager
def upstream(kind: str, workdir: Path) -> Iterator[dict[str, Any]]:
    port = free_port()
    if kind == "nginx":
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        floor_port = free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(
            _NGINX_CONF.format(
                dir=workdir, port=port, floor_port=floor_port, body=UPSTREAM_BODY.decode(), api_key=API_KEY
            )
        )
        version = sh(nginx, "-v") or subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
        with popen([nginx, "-c", str(conf), "-p", str(workdir)], workdir / "nginx.log") as proc:
            wait_http(f"http://127.0.0.1:{port}/", proc, 15, "nginx")
            wait_http(f"http://127.0.0.1:{floor_port}/", proc, 15, "nginx proxy_pass")
            yield {
                "kind": "nginx",
                "version": version.replace("nginx version: ", ""),
                "url": f"http://127.0.0.1:{port}",
                "floor_url": f"http://127.0.0.1:{floor_port}",
                "pid": proc.pid,
            }
        return
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-upstream", str(port)]
    with popen(cmd, workdir / "upstream.log") as proc:
        wait_http(f"http://127.0.0.1:{port}/", proc, 15, "the Python upstream")
        yield {"kind": "python-asyncio (uvloop)", "url": f"http://127.0.0.1:{port}", "floor_url": None, "pid": proc.pid}


# ============================================================================ the server


@contextlib.contextmanager
def database(args: argparse.Namespace) -> Iterator[dict[str, str]]:
    """Environment for the store: a fresh PostgreSQL schema (dropped afterwards) or nothing (SQLite)."""
    if args.sqlite:
        yield {}
        return
    import psycopg

    url = args.database_url
    schema = f"bench_proxy_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield {
            "INTEGRATIONS_DATABASE_URL": url,
            "INTEGRATIONS_DATABASE_SCHEMA": schema,
            "INTEGRATIONS_MASTER_KEY": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        }
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextlib.contextmanager
def server(args: argparse.Namespace, workdir: Path, store_env: dict[str, str]) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTEGRATIONS_")}
    env.update(
        store_env,
        INTEGRATIONS_DATA_DIR=str(workdir / "data"),
        INTEGRATIONS_ADMIN_TOKEN=ADMIN_TOKEN,
        INTEGRATIONS_PUBLIC_URL=f"http://127.0.0.1:{port}",
        INTEGRATIONS_ALLOW_HTTP_HOSTS="127.0.0.1",
        INTEGRATIONS_EGRESS_ALLOW="127.0.0.1",
        INTEGRATIONS_LOG_LEVEL=args.log_level,
        INTEGRATIONS_PROXY_MAX_CONCURRENCY="1024",  # the bulkhead is not what is measured here
    )
    exe = ROOT / ".venv" / "bin" / "integrations"
    integrations = str(exe) if exe.exists() else "integrations"
    cmd = [
        integrations,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with contextlib.ExitStack() as stack:
        if args.workers > 1:  # the read models then run in their own process, as in production
            cmd += ["--workers", str(args.workers)]
            env["INTEGRATIONS_PROJECTIONS"] = "external"
            stack.enter_context(popen([integrations, "projections", "run"], workdir / "projections.log", env=env))
        proc = stack.enter_context(popen(cmd, workdir / "server.log", env=env, cwd=workdir))
        wait_http(f"http://127.0.0.1:{port}/ready", proc, 120, "the server (see server.log)")
        yield f"http://127.0.0.1:{port}", proc.pid


def server_pids(pid: int) -> list[int]:
    """The server and its worker processes (uvicorn --workers forks children)."""
    children = sh("pgrep", "-P", str(pid)).split()
    return [pid, *(int(c) for c in children)]


def _status_kib(pid: int, field: str) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak(pids: list[int]) -> bool:
    ok = True
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def setup_integration(base: str, upstream_url: str) -> dict[str, str]:
    """A non-superuser with a token, and an apikey integration (shared) with one templated header."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=base, timeout=30) as http:
        r = http.post(
            "/api/users",
            json={"id": "bench", "email": "bench@example.com", "displayName": "Bench",
                  "permissions": ["integrationCreation"]},
            headers=admin,
        )  # fmt: skip
        r.raise_for_status()
        r = http.post("/api/users/bench/tokens", json={"label": "bench"}, headers=admin)
        r.raise_for_status()
        token = r.json()["token"]
        user = {"Authorization": f"Bearer {token}"}
        r = http.post(
            "/api/integrations",
            json={
                "name": "Bench Upstream", "authType": "apikey", "apiKey": API_KEY, "apiKeyName": "X-Api-Key",
                "mode": "shared", "apiBaseUri": upstream_url + "/v1", "headers": {"X-User-Email": "${user.email}"},
            },
            headers=user,
        )  # fmt: skip
        r.raise_for_status()
        iid = r.json()["id"]
        # both ways in answer the upstream's body
        for _ in range(3):
            p = http.get(f"/api/integrations/{iid}/proxy/items", headers=user)
            q = http.post(f"/api/integrations/{iid}/request", json={"url": "/items", "method": "GET"}, headers=user)
            assert p.status_code == 200 and p.content == UPSTREAM_BODY, (p.status_code, p.text[:300])
            assert q.status_code == 200 and q.content == UPSTREAM_BODY, (q.status_code, q.text[:300])
    return {"token": token, "id": iid}


# ============================================================================ load (wrk)


def lua(token: str | None, body: str | None) -> str:
    lines = []
    if token:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {token}"')
    if body is not None:
        lines += ['wrk.method = "POST"', f"wrk.body = '{body}'", 'wrk.headers["Content-Type"] = "application/json"']
    return "\n".join(lines) + "\n" + WRK_REPORT_LUA


def wrk(url: str, script: str, concurrency: int, duration: float, workdir: Path) -> dict[str, Any]:
    path = workdir / f"wrk-{uuid.uuid4().hex[:8]}.lua"
    path.write_text(script)
    return run_wrk("wrk", url, path, threads=1, concurrency=concurrency, duration=duration)


# ============================================================================ profiling

PROFILE_RATE = 250
_IDLE_LEAVES = ("/threading.py", "/queue.py", "/concurrent/futures/thread.py", "/selectors.py", "time.sleep")
_AREAS = (  # (area, frame prefixes or path fragments); the innermost matching frame decides
    ("projection runner (background)", ("projections/runtime.py",)),
    ("auth middleware (token hash, cache, actor)", ("api/auth.py", "litestar/middleware/authentication.py")),
    ("proxy: integration + access (cached)", ("_integration (", "ProxyCache.")),
    ("proxy: credentials (cached)", ("_credentials (", "commands/connections.py")),
    ("proxy: upstream call (client)", ("infrastructure/upstream_http.py", "httptools/", "yarl/")),
    ("proxy: URL confinement", ("target_url (", "domain/paths.py", "httpx/_url")),
    (
        "proxy: headers, templates",
        ("request_headers (", "response_headers (", "expand_headers (", "domain/templates.py"),
    ),
    ("/request body decoding", ("_encode_data (", "msgspec")),
    ("litestar (routing, DI, response)", ("litestar/",)),
    ("uvicorn / httptools", ("uvicorn/",)),
    ("thread hop (anyio)", ("anyio/to_thread", "WorkerThread")),
    ("asyncio / uvloop event loop", ("asyncio/", "uvloop")),
)


def _area(frames: list[str]) -> str:
    for frame in reversed(frames):
        name = frame.strip()
        for area, marks in _AREAS:
            if any(name.startswith(m) or m in name.split(" (", 1)[-1] for m in marks):
                return area
    return "other"


def profile(pid: int, out: Path, duration: float, run: Any) -> dict[str, Any]:
    pyspy = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
    if not Path(pyspy).exists():
        log("WARNING: py-spy not installed (.venv/bin/pip install py-spy); skipping the profile")
        return {}
    cmd = [
        pyspy, "record", "--pid", str(pid), "--rate", str(PROFILE_RATE), "--duration", str(int(duration) + 2),
        "--format", "raw", "--threads", "--full-filenames", "--nonblocking", "--subprocesses",
        "--output", str(out),
    ]  # fmt: skip
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    h = run()
    _, err = spy.communicate(timeout=duration + 120)
    if not out.exists():
        log(f"WARNING: py-spy wrote no profile: {err[-500:]}")
        return {"http": h}
    areas: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        leaf = frames[-1] if frames else ""
        if (
            any(idle in leaf for idle in _IDLE_LEAVES)
            or "select (" in leaf
            or ("_run_once" in leaf and len(frames) < 4)
        ):
            continue
        areas[_area(frames)] += int(count)
        own[leaf.split(" (")[0] + " (" + leaf.rsplit("/", 1)[-1]] += int(count)
    per_sample_ms = 1000 / PROFILE_RATE
    n = max(1, h["requests"])
    return {
        "file": str(out),
        "http": h,
        "ms_per_request": {k: round(v * per_sample_ms / n, 4) for k, v in areas.most_common()},
        "top_own": [(k, round(v * per_sample_ms / n, 4)) for k, v in own.most_common(15)],
    }


# ============================================================================ the run


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import litestar
    import uvicorn

    versions = {"python": platform.python_version(), "uvicorn": uvicorn.__version__, "httpx": httpx.__version__}
    with contextlib.suppress(Exception):
        versions["litestar"] = litestar.__version__.formatted()  # type: ignore[attr-defined]
    for name in ("uvloop", "httptools"):
        with contextlib.suppress(ImportError):
            versions[name] = getattr(__import__(name), "__version__", "installed")
    return {
        "nproc": sh("nproc"),
        "cpu_model": cpu,
        "free_h": sh("free", "-h"),
        "wrk": (sh("wrk", "-v") or "wrk").splitlines()[0].split(" Copyright")[0],
        "versions": versions,
        "loadavg_at_start": os.getloadavg(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed (apt-get install -y wrk)")
    kind = args.upstream
    if kind == "auto":
        kind = "nginx" if (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) else "python"
        if kind == "python":
            log("nginx not found (apt-get install -y nginx-light): using the Python asyncio upstream")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {
        "date": sh("date", "-u") or datetime.now(UTC).isoformat(),
        "command": " ".join(["python", "bench/proxy.py", *sys.argv[1:]]),
        "git": sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
        "git_dirty": bool(sh("git", "-C", str(ROOT), "status", "--porcelain", "src")),
        "machine": machine(),
        "store": "sqlite" if args.sqlite else "postgresql",
        "workers": args.workers or 1,
        "duration": args.duration,
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        workdir = Path(tmp)
        with (
            upstream(kind, workdir) as up,
            database(args) as store_env,
            server(args, workdir, store_env) as (
                base,
                pid,
            ),
        ):
            results["upstream"] = {k: v for k, v in up.items() if k in ("kind", "version")}
            pids = server_pids(pid)
            time.sleep(1.0)
            setup = setup_integration(base, up["url"])
            iid, token = setup["id"], setup["token"]
            results["idle_rss_mb"] = round(sum(_status_kib(p, "VmRSS") for p in pids) / 1024, 1)
            body = json.dumps({"url": "/items", "method": "GET"})
            paths = {
                "direct": (f"{up['url']}/v1/items", lua(None, None)),
                "nginx proxy_pass floor": (f"{up['floor_url']}/v1/items", lua(None, None)) if up["floor_url"] else None,
                "/proxy": (f"{base}/api/integrations/{iid}/proxy/items", lua(token, None)),
                "/request": (f"{base}/api/integrations/{iid}/request", lua(token, body)),
            }
            # warm-up: connection pools, first-use allocations
            for name in ("/proxy", "/request"):
                url, script = paths[name]  # type: ignore[misc]
                wrk(url, script, max(concurrencies), 2, workdir)
            for c in concurrencies:
                for name, spec in paths.items():
                    if spec is None:
                        continue
                    url, script = spec
                    pids = server_pids(pid)
                    exact = reset_peak(pids)
                    cpu0 = cpu_seconds(pids)
                    h = wrk(url, script, c, args.duration, workdir)
                    if name in ("/proxy", "/request"):
                        h["server_cpu_cores"] = round((cpu_seconds(pids) - cpu0) / h["seconds"], 2)
                        h["server_cpu_us_per_request"] = round(h["server_cpu_cores"] * 1e6 / max(h["rps"], 1))
                        h["peak_rss_mb"] = round(sum(_status_kib(p, "VmHWM") for p in pids) / 1024, 1)
                        h["peak_rss_exact"] = exact
                    results["cases"].setdefault(name, {})[str(c)] = h
                    log(
                        f"{name:24s} c={c:<3d} {h['rps']:>9,.0f} req/s  p50 {h['p50_ms']:7.3f} ms  "
                        f"p99 {h['p99_ms']:7.3f} ms  errors {load_errors(h)}"
                        + (f"  cpu {h['server_cpu_cores']} cores ({h['server_cpu_us_per_request']} us/req)"
                           f"  peak RSS {h['peak_rss_mb']} MB"
                           if "peak_rss_mb" in h else "")
                    )  # fmt: skip
            if args.profile:
                c = max(concurrencies)
                url, script = paths["/proxy"]  # type: ignore[misc]
                out = Path(args.results_dir) / f"profile-proxy-{stamp}.txt"
                out.parent.mkdir(parents=True, exist_ok=True)
                log(f"profiling /proxy at c={c} with py-spy")
                results["profile"] = profile(
                    pid, out, args.duration, lambda: wrk(url, script, c, args.duration, workdir)
                )
            results["peak_rss_mb"] = max(
                h.get("peak_rss_mb", 0) for name in ("/proxy", "/request") for h in results["cases"][name].values()
            )
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["derived"] = derive(results)
    results["targets"] = targets(results)
    out = Path(args.results_dir) / f"proxy-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    log(f"results: {out}")
    return results


def derive(results: dict[str, Any]) -> dict[str, Any]:
    direct = results["cases"]["direct"]
    out: dict[str, Any] = {}
    for name in ("/proxy", "/request"):
        for c, h in results["cases"][name].items():
            d = direct[c]
            out.setdefault(name, {})[c] = {
                "added_p50_ms": round(h["p50_ms"] - d["p50_ms"], 3),
                "added_p99_ms": round(h["p99_ms"] - d["p99_ms"], 3),
                "throughput_ratio": round(h["rps"] / d["rps"], 4) if d["rps"] else None,
            }
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    derived = results["derived"]
    for name in ("/proxy", "/request"):
        if "1" in derived[name]:
            added = derived[name]["1"]["added_p50_ms"]
            rows.append(
                {"target": f"{name}: p50 added latency < {ADDED_P50_TARGET_MS:g} ms at c=1",
                 "value": f"{added:.3f} ms", "pass": added < ADDED_P50_TARGET_MS}
            )  # fmt: skip
        if "64" in results["cases"][name]:
            rps = results["cases"][name]["64"]["rps"]
            rows.append(
                {"target": f"{name}: >= {C64_RPS_TARGET:,} proxied req/s at c=64", "value": f"{rps:,.0f} req/s",
                 "pass": rps >= C64_RPS_TARGET}
            )  # fmt: skip
    return rows


def markdown(results: dict[str, Any]) -> str:
    cases, derived = results["cases"], results["derived"]
    conc = list(cases["direct"])
    lines = [
        "| path | c | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | throughput vs direct | errors"
        " | server CPU (cores) | server CPU per request (us) | server peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in conc:
        for name, per in cases.items():
            h = per.get(c)
            if h is None:
                continue
            d = derived.get(name, {}).get(c)
            if d is None and name != "direct":
                direct = cases["direct"][c]
                d = {
                    "added_p50_ms": h["p50_ms"] - direct["p50_ms"],
                    "added_p99_ms": h["p99_ms"] - direct["p99_ms"],
                    "throughput_ratio": h["rps"] / direct["rps"],
                }
            label = f"`{name}`" if name.startswith("/") else name
            lines.append(
                f"| {label} | {c} | {h['rps']:,.0f} | {h['p50_ms']:.3f} | {h['p99_ms']:.3f} | "
                + (
                    f"{d['added_p50_ms']:.3f} | {d['added_p99_ms']:.3f} | {d['throughput_ratio']:.3f} | "
                    if d
                    else "| | | "
                )
                + f"{load_errors(h)} | {h.get('server_cpu_cores', '')} | {h.get('server_cpu_us_per_request', '')} | "
                f"{h.get('peak_rss_mb', '')} |"
            )
    lines.append("")
    prof = results.get("profile") or {}
    if prof.get("ms_per_request"):
        lines.append(
            f"py-spy, `/proxy` at c={prof['http']['concurrency']} ({prof['http']['requests']:,} requests, "
            f"{prof['http']['rps']:,.0f} req/s under the profiler), CPU time per request by area: "
            + ", ".join(f"{k} {v * 1000:.0f} us" for k, v in prof["ms_per_request"].items() if v >= 0.002)
            + "."
        )
        lines.append("")
    lines += targets_table(results["targets"])
    return "\n".join(lines)


def append_docs(results: dict[str, Any], table: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    m = results["machine"]
    v = m["versions"]
    up = results["upstream"]
    section = [
        "",
        f"## Request proxy: direct, `/proxy` and `/request` ({results['date']})",
        "",
        f"Command: `{results['command']}` (`bench/proxy.py`; see `bench/README.md`).",
        "",
        f"Date (`date -u`): {results['date']}",
        "",
        f"Machine: `nproc` = {m['nproc']}; CPU: {m['cpu_model']}; Python {v['python']}; uvicorn {v['uvicorn']}"
        + "".join(f", {k} {v[k]}" for k in ("litestar", "httpx", "uvloop", "httptools") if k in v)
        + f"; load generator: {m['wrk']} (`-t1`, {results['duration']:g} s per case); upstream: {up['kind']}"
        + (f" {up['version']}" if up.get("version") else "")
        + f" answering {len(UPSTREAM_BODY)} bytes of JSON; store: {results['store']}; server: `integrations serve`, "
        f"{results['workers']} worker(s), idle RSS {results['idle_rss_mb']} MB. Code: git `{results['git']}`"
        + (" plus uncommitted changes" if results.get("git_dirty") else "")
        + ". Load average (1/5/15 min) at the start: "
        + ", ".join(f"{x:.2f}" for x in m["loadavg_at_start"])
        + "; at the end: "
        + ", ".join(f"{x:.2f}" for x in m["loadavg_at_end"])
        + " (other processes shared the 2 cores when this is above about 1).",
        "",
        "Every proxied call: token auth, access check, the shared API key injected as `X-Api-Key` and a "
        "custom header expanded from `${user.email}` (two injected headers, as the nginx floor's two "
        "`proxy_set_header`). Added latency: the path's p50/p99 minus the direct call's, at the same "
        "concurrency; throughput ratio: its req/s over the direct req/s.",
        "",
        table,
        "",
    ]
    with open(path, "a") as f:
        f.write("\n".join(section))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per case")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="integrations serve --workers N; above 1 the projections run in their own process (PostgreSQL only)",
    )
    parser.add_argument("--upstream", choices=["auto", "nginx", "python"], default="auto")
    parser.add_argument("--sqlite", action="store_true", help="SQLite store instead of PostgreSQL")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--log-level", default="info", help="the server's INTEGRATIONS_LOG_LEVEL")
    parser.add_argument("--profile", action="store_true", help="one more /proxy pass under py-spy")
    parser.add_argument("--no-docs", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--report", metavar="JSON", help="only print (and append to the docs) a saved result")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        _python_upstream(args.serve_upstream)
        return 0
    results = json.loads(Path(args.report).read_text()) if args.report else run(args)
    table = markdown(results)
    print(table)
    if not args.no_docs:
        append_docs(results, table)
        log("appended to docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
