"""Small helpers shared by the benchmark scripts (run as scripts: their folder is on sys.path)."""

from __future__ import annotations

import socket
import subprocess
from datetime import datetime
from typing import Any


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sh(*cmd: str) -> str:
    """A command's stdout, or "" when it is missing or fails (machine facts for the report)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def load_errors(h: dict[str, Any]) -> int:
    """All errors of one load-tool result (connect, read, write, status, timeout)."""
    return sum(int(v) for v in h.get("errors", {}).values())
