"""A real local HTTP upstream for the proxy tests: a threading http.server on 127.0.0.1 that
records every request it receives (method, raw target, headers, body) and answers by path.

Paths (under any prefix):
  .../echo...           200 JSON {method, target, headers, bodyLength, body (first 64 KiB as text)}
  .../binary            200 application/octet-stream, bytes 0..255 repeated (``?n=`` repeats)
  .../big?size=N        200, N bytes streamed in 64 KiB chunks
  .../headers-out       200 with Set-Cookie, hop-by-hop, CORS and CSP headers that must not pass
  .../redirect          302 to another origin
  .../ratelimit         429 with Retry-After: 7
  .../slow-headers      waits 10 s before answering
  .../trickle           headers at once, then one byte per second for 30 s
  .../status/<code>     that status with a small JSON body
  .../need-bearer/<t>   200 when Authorization is "Bearer <t>", else 401
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Received:
    method: str
    target: str  # the raw request target, as sent on the wire
    headers: list[tuple[str, str]]
    body_length: int
    body_sha256: str
    body_head: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def has(self, name: str) -> bool:
        return any(k.lower() == name.lower() for k, _ in self.headers)


@dataclass
class Upstream:
    url: str  # http://127.0.0.1:<port>
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def last(self) -> Received:
        with self.lock:
            assert self.received, "the upstream received no request"
            return self.received[-1]

    def count(self) -> int:
        with self.lock:
            return len(self.received)

    def clear(self) -> None:
        with self.lock:
            self.received.clear()


def _handler(upstream: Upstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _read_body(self) -> tuple[int, str, bytes]:
            digest = hashlib.sha256()
            total = 0
            head = bytearray()

            def take(chunk: bytes) -> None:
                nonlocal total
                digest.update(chunk)
                total += len(chunk)
                if len(head) < 65536:
                    head.extend(chunk[: 65536 - len(head)])

            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    remaining = size
                    while remaining:
                        chunk = self.rfile.read(min(remaining, 1 << 20))
                        take(chunk)
                        remaining -= len(chunk)
                    self.rfile.readline()
            else:
                remaining = int(self.headers.get("Content-Length") or 0)
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    take(chunk)
                    remaining -= len(chunk)
            return total, digest.hexdigest(), bytes(head)

        def _handle(self) -> None:
            length, sha, head = self._read_body()
            record = Received(self.command, self.path, list(self.headers.items()), length, sha, head)
            with upstream.lock:
                upstream.received.append(record)
            parts = urlsplit(self.path)
            path, query = parts.path, parse_qs(parts.query)
            if "/need-bearer/" in path:
                token = path.rsplit("/", 1)[1]
                if self.headers.get("Authorization") == f"Bearer {token}":
                    return self._json(200, {"ok": True})
                return self._json(401, {"error": "invalid_token"}, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
            if path.endswith("/binary"):
                n = int(query.get("n", ["1"])[0])
                return self._send(200, bytes(range(256)) * n, {"Content-Type": "application/octet-stream"})
            if path.endswith("/big"):
                size = int(query.get("size", ["0"])[0])
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                block = b"x" * 65536
                sent = 0
                while sent < size:
                    n = min(len(block), size - sent)
                    self.wfile.write(block[:n])
                    sent += n
                return None
            if path.endswith("/headers-out"):
                return self._send(
                    200,
                    b"<script>alert(1)</script>",
                    {
                        "Content-Type": "text/html",
                        "Set-Cookie": "session=upstream; Path=/",
                        "Connection": "X-Secret-Hop",
                        "X-Secret-Hop": "1",
                        "Keep-Alive": "timeout=5",
                        "Access-Control-Allow-Origin": "https://evil.example",
                        "Access-Control-Allow-Credentials": "true",
                        "Content-Security-Policy": "default-src *",
                        "Alt-Svc": 'h2=":443"',
                        "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
                        "Service-Worker-Allowed": "/",
                        "Cross-Origin-Opener-Policy": "unsafe-none",
                        "Permissions-Policy": "camera=*",
                        "X-Upstream": "kept",
                        "Cache-Control": "private, max-age=60",
                    },
                )
            if path.endswith("/redirect"):
                return self._send(302, b"", {"Location": "http://127.0.0.2:1/elsewhere"})
            if path.endswith("/ratelimit"):
                return self._json(429, {"error": "slow down"}, {"Retry-After": "7"})
            if path.endswith("/slow-headers"):
                time.sleep(10)
                return self._json(200, {"late": True})
            if path.endswith("/trickle"):
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "30")
                self.end_headers()
                try:
                    for _ in range(30):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(1)
                except OSError:
                    pass
                return None
            if "/status/" in path:
                code = int(path.rsplit("/", 1)[1])
                return self._json(code, {"status": code})
            return self._json(
                200,
                {
                    "method": self.command,
                    "target": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "bodyLength": length,
                    "body": head.decode("utf-8", "replace"),
                },
            )

        def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(doc).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

    return Handler


@contextmanager
def run_upstream() -> Iterator[Upstream]:
    upstream = Upstream(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream))
    server.daemon_threads = True
    upstream.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="test-upstream", daemon=True)
    thread.start()
    try:
        yield upstream
    finally:
        server.shutdown()
        server.server_close()
