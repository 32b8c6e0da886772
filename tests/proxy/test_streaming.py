"""A 200 MB body up and down through ``/proxy/...`` of a real ``integrations serve`` process, with
the server's memory measured (issue 4: "large uploads and downloads work in constant memory").

The upstream (a threading http.server in this process) generates the download on the fly and
hashes the upload as it arrives; neither side ever holds a body. The client uploads from a
generator (chunked) and hashes the download as it streams. While the bodies pass, a thread samples
the server's resident set (``/proc/<pid>/status`` VmRSS); where the kernel allows, the peak is also
read exactly from VmHWM after resetting it (``/proc/<pid>/clear_refs``). The growth over the idle
baseline must stay far below the body size.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.test_cli import ADMIN_TOKEN, Server, ok, service_env, serving

MiB = 1 << 20
BODY = 200 * MiB
CHUNK = 256 * 1024
MAX_GROWTH = 64 * MiB  # well below the body: a buffered body would show up as >= 200 MB
API_KEY = "stream-test-api-key"
_BASE = random.Random(20261127).randbytes(CHUNK)


def blocks(total: int) -> Iterator[bytes]:
    """Deterministic, position-dependent data (a reordered or repeated chunk changes the hash)."""
    sent, i = 0, 0
    while sent < total:
        n = min(CHUNK, total - sent)
        yield (i.to_bytes(8, "big") + _BASE[8:])[:n]
        sent += n
        i += 1


def expected_sha256(total: int) -> str:
    digest = hashlib.sha256()
    for block in blocks(total):
        digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------- the upstream


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _consume(self) -> tuple[int, str]:
        digest = hashlib.sha256()
        total = 0
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                while size:
                    chunk = self.rfile.read(min(size, MiB))
                    if not chunk:
                        raise ConnectionError("the body ended early")
                    digest.update(chunk)
                    total += len(chunk)
                    size -= len(chunk)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                chunk = self.rfile.read(min(remaining, MiB))
                if not chunk:
                    break
                digest.update(chunk)
                total += len(chunk)
                remaining -= len(chunk)
        return total, digest.hexdigest()

    def _handle(self) -> None:
        length, sha = self._consume()
        parts = urlsplit(self.path)
        self.seen.append({"method": self.command, "path": parts.path, "api_key": self.headers.get("X-Api-Key")})
        if parts.path.endswith("/download"):
            size = int(parse_qs(parts.query)["size"][0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            for block in blocks(size):
                self.wfile.write(block)
            return
        body = json.dumps({"length": length, "sha256": sha}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = _handle


@contextmanager
def streaming_upstream() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    handler = type("Handler", (_Handler,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="streaming-upstream", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------- memory probe


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


class RssProbe:
    """Samples VmRSS every few milliseconds; also resets and reads VmHWM where allowed."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self.exact = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-probe", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with suppress(OSError, LookupError):
                self.samples.append(_status_kib(self.pid, "VmRSS") * 1024)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssProbe:
        with suppress(OSError):  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.exact = True
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        if self.exact:
            self.samples.append(_status_kib(self.pid, "VmHWM") * 1024)

    @property
    def peak(self) -> int:
        return max(self.samples)


def rss(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


# -------------------------------------------------------------------------------------- the test


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    env = service_env(
        tmp_path / "data",
        None,
        INTEGRATIONS_ADMIN_TOKEN=ADMIN_TOKEN,
        INTEGRATIONS_EGRESS_ALLOW="127.0.0.1",
        INTEGRATIONS_PROXY_DEADLINE_SECONDS="120",
        INTEGRATIONS_LOG_LEVEL="warning",
    )
    with serving(env, tmp_path / "server.log") as server:
        yield server


def test_200_mb_up_and_down_in_constant_memory(server: Server) -> None:
    with streaming_upstream() as (upstream_url, seen):
        created = ok(
            server.http.post(
                "/api/integrations",
                json={
                    "name": "Bulk Store",
                    "authType": "apikey",
                    "apiKey": API_KEY,
                    "apiKeyName": "X-Api-Key",
                    "mode": "shared",
                    "apiBaseUri": upstream_url + "/v1",
                },
            ),
            201,
        )
        proxy = f"/api/integrations/{created['id']}/proxy"
        pid = server.proc.pid
        timeout = httpx.Timeout(60, connect=5)

        def upload(size: int) -> dict[str, Any]:
            r = server.http.put(
                f"{proxy}/upload",
                content=blocks(size),  # a generator: sent chunked, never held by the client
                headers={"Content-Type": "application/octet-stream"},
                timeout=timeout,
            )
            return dict(ok(r))

        def download(size: int) -> tuple[int, str, httpx.Headers]:
            digest = hashlib.sha256()
            total = 0
            with server.http.stream("GET", f"{proxy}/download", params={"size": size}, timeout=timeout) as r:
                assert r.status_code == 200, r.read()[:500]
                for chunk in r.iter_raw(CHUNK):
                    digest.update(chunk)
                    total += len(chunk)
                return total, digest.hexdigest(), r.headers

        # Warm up (imports, the connection pool, first-use allocations), then take the baseline.
        assert upload(4 * MiB) == {"length": 4 * MiB, "sha256": expected_sha256(4 * MiB)}
        assert download(4 * MiB)[:2] == (4 * MiB, expected_sha256(4 * MiB))
        time.sleep(0.3)
        baseline = rss(pid)
        want = expected_sha256(BODY)

        started = time.monotonic()
        with RssProbe(pid) as up_probe:
            assert upload(BODY) == {"length": BODY, "sha256": want}
        up_seconds = time.monotonic() - started

        started = time.monotonic()
        with RssProbe(pid) as down_probe:
            total, sha, headers = download(BODY)
        down_seconds = time.monotonic() - started
        assert (total, sha) == (BODY, want)
        assert headers["content-length"] == str(BODY)
        assert headers["x-content-type-options"] == "nosniff"

        assert [s["api_key"] for s in seen] == [API_KEY] * 4  # credentials injected on every call
        assert [s["path"] for s in seen] == ["/v1/upload", "/v1/download"] * 2

        growth_up = up_probe.peak - baseline
        growth_down = down_probe.peak - baseline
        report = (
            f"baseline RSS {baseline / MiB:.1f} MiB; upload {BODY // MiB} MiB in {up_seconds:.1f} s, peak growth "
            f"{growth_up / MiB:.1f} MiB ({len(up_probe.samples)} samples); download in {down_seconds:.1f} s, "
            f"peak growth {growth_down / MiB:.1f} MiB ({len(down_probe.samples)} samples); "
            f"exact VmHWM: {up_probe.exact}"
        )
        print(report)
        assert len(up_probe.samples) > 5 and len(down_probe.samples) > 5, report
        assert growth_up < MAX_GROWTH, report
        assert growth_down < MAX_GROWTH, report
