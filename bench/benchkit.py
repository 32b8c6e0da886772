"""Small helpers shared by the benchmark scripts (run as scripts: their folder is on sys.path)."""

from __future__ import annotations

import json
import socket
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

# Appended to every wrk script: one JSON line with the counts and the latency percentiles.
WRK_REPORT_LUA = r"""
done = function(summary, latency, requests)
  io.write(string.format(
    "WRKJSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"errors\":{\"connect\":%d,\"read\":%d,"
    .. "\"write\":%d,\"status\":%d,\"timeout\":%d},\"latency_us\":{\"min\":%d,\"max\":%d,\"mean\":%.1f,"
    .. "\"p50\":%d,\"p90\":%d,\"p99\":%d,\"p999\":%d}}\n",
    summary.requests, summary.duration, summary.bytes, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout, latency.min, latency.max,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"""


def run_wrk(wrk: str, url: str, script: Path, *, threads: int, concurrency: int, duration: float) -> dict[str, Any]:
    """One wrk run of ``script`` (which ends with :data:`WRK_REPORT_LUA`): rate, errors, latencies."""
    cmd = [
        wrk, f"-t{threads}", f"-c{concurrency}", f"-d{duration:g}s", "--timeout", "10s", "--latency",
        "-s", str(script), url,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=duration + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    seconds = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    return {
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "requests": raw["requests"],
        "rps": round(raw["requests"] / seconds, 1),
        "errors": raw["errors"],
        "p50_ms": lat["p50"] / 1000,
        "p90_ms": lat["p90"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "p999_ms": lat["p999"] / 1000,
        "mean_ms": round(lat["mean"] / 1000, 3),
        "max_ms": lat["max"] / 1000,
    }


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


def targets_table(targets: list[dict[str, Any]]) -> list[str]:
    """The markdown lines of a benchmark's target checks (``target``, ``value``, ``pass`` each)."""
    lines = ["| Target | measured | result |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'PASS' if t['pass'] else 'FAIL'} |" for t in targets]
    return lines
