"""``integrations``: the operator's command line.

  integrations serve [--host H] [--port P] [--data-dir DIR] [--workers N]
  integrations projections run|status|rebuild [NAME] [--drop-old]
  integrations events history ID | export [--after N] [--limit N] | replay
  integrations keys generate | rotate | status
  integrations principals bootstrap --token-env VAR | token USER [--label L]

Configuration comes from ``INTEGRATIONS_*`` environment variables (see the README); flags override.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from infrastructure.settings import Settings, SettingsError

log = logging.getLogger("integrations")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = Path(args.data_dir)
    return Settings.from_env(**overrides)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every outbound URL at INFO (query strings can hold API keys): keep it quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def worker_app() -> Any:
    """The ASGI app of one ``serve --workers N`` worker process (a uvicorn factory): each worker
    builds its own runtime from the ``INTEGRATIONS_*`` environment the supervisor passed on."""
    from cli.runtime import build_runtime

    _configure_logging(os.environ.get("INTEGRATIONS_LOG_LEVEL", "info"))
    return _served_app(build_runtime(Settings.from_env()).services)


def _served_app(services: Any) -> Any:
    """The app a server process serves: access-logged, its startup heap frozen once up."""
    from api.access_log import access_log_middleware
    from api.app import create_app

    services.freeze_heap_after_start = True
    return access_log_middleware(create_app(services))


def _serve_workers(args: argparse.Namespace, settings: Settings) -> int:
    """Several worker processes on one socket (uvicorn's supervisor restarts a worker that dies).
    Each worker keeps its own caches, bulkhead and connection pool; the projections run in their
    own process (``integrations projections run``), never once per worker."""
    import uvicorn

    if settings.postgres is None or settings.projections != "external":
        raise SettingsError(
            "serve --workers > 1 needs PostgreSQL and INTEGRATIONS_PROJECTIONS=external "
            "(run `integrations projections run` beside the server)"
        )
    if getattr(args, "data_dir", None):
        os.environ["INTEGRATIONS_DATA_DIR"] = str(args.data_dir)
    os.environ["INTEGRATIONS_LOG_LEVEL"] = args.log_level
    log.info("serving on http://%s:%d with %d workers (%s store)", args.host, args.port, args.workers, settings.backend)
    uvicorn.run("cli.main:worker_app", factory=True, workers=args.workers, **_uvicorn_options(args))
    return 0


def _uvicorn_options(args: argparse.Namespace) -> dict[str, Any]:
    """The same for one process or several: our own access log (no query strings), no uvicorn
    logging config, a bounded graceful shutdown, and no trust in forwarded headers."""
    return {
        "host": args.host,
        "port": args.port,
        "access_log": False,
        "log_config": None,
        "timeout_graceful_shutdown": 10,
        "proxy_headers": False,
        "server_header": False,
    }


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cli.runtime import build_runtime

    settings = _settings(args)
    if args.workers > 1:
        return _serve_workers(args, settings)
    runtime = build_runtime(settings)
    log.info("serving on http://%s:%d (%s store)", args.host, args.port, settings.backend)
    server = uvicorn.Server(uvicorn.Config(_served_app(runtime.services), **_uvicorn_options(args)))

    def stop(*_: object) -> None:
        server.should_exit = True

    # uvicorn handles SIGTERM/SIGINT itself while it serves, and after its graceful shutdown re-raises
    # the signal to the handler it found: with the default one the process died of the signal (-15)
    # instead of exiting 0. This one also covers a signal that arrives before uvicorn's are installed.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.run()
    return 0 if server.started else 3  # 3: startup failed (port in use, lifespan error), as uvicorn.run


def cmd_projections(args: argparse.Namespace) -> int:
    from cli import runtime as rt

    settings = _settings(args)
    if args.action == "status":
        print(json.dumps(rt.projection_status(settings), indent=2, default=str))
        return 0
    if args.action == "rebuild":
        report = rt.rebuild_projections(settings, args.name, drop_old=args.drop_old)
        print(json.dumps(report, indent=2, default=str))
        return 0
    # run: the supervised workers in the foreground until SIGTERM/SIGINT
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rt.run_projection_workers(settings, args.name, stop)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from cli import runtime as rt

    settings = _settings(args)
    if args.action == "history":
        for entry in rt.history(settings, args.id):
            print(json.dumps(entry, default=str))
    elif args.action == "export":
        for line in rt.export_events(settings, after=args.after, limit=args.limit):
            sys.stdout.write(line + "\n")
    elif args.action == "replay":
        print(json.dumps(rt.replay(settings), indent=2, default=str))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from cli import runtime as rt
    from infrastructure.keyring import generate_key

    if args.action == "generate":
        print(generate_key())
        return 0
    settings = _settings(args)
    print(json.dumps(rt.rotate_keys(settings) if args.action == "rotate" else rt.key_status(settings), indent=2))
    return 0


def cmd_principals(args: argparse.Namespace) -> int:
    from cli import runtime as rt

    settings = _settings(args)
    if args.action == "bootstrap":
        token = os.environ.get(args.token_env)
        if not token:
            print(f"set {args.token_env} to the admin API token", file=sys.stderr)
            return 2
        rt.bootstrap_admin(settings, token)
        print("admin ready")
    else:
        print(rt.issue_token(settings, args.user, args.label))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="integrations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default=os.environ.get("INTEGRATIONS_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    def with_data_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--data-dir", help="SQLite data directory (default ./.integrations)")
        return p

    serve = with_data_dir(sub.add_parser("serve", help="run the HTTP API"))
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("INTEGRATIONS_WORKERS", "1") or 1),
        help="worker processes (default 1; more needs PostgreSQL and INTEGRATIONS_PROJECTIONS=external)",
    )
    serve.set_defaults(func=cmd_serve)

    proj = with_data_dir(sub.add_parser("projections", help="read-model workers, status and rebuilds"))
    proj.add_argument("action", choices=["run", "status", "rebuild"])
    proj.add_argument("name", nargs="?", help="one read model (default: all)")
    proj.add_argument("--drop-old", action="store_true", help="drop the previous generation after a rebuild")
    proj.set_defaults(func=cmd_projections)

    events = with_data_dir(sub.add_parser("events", help="audit history, export and replay"))
    events.add_argument("action", choices=["history", "export", "replay"])
    events.add_argument("id", nargs="?", help="history: integration UUID or ownerId:slug, user:<id>, team:<id>")
    events.add_argument("--after", type=int, default=0, help="export: notifications after this id")
    events.add_argument("--limit", type=int, default=None, help="export: at most this many")
    events.set_defaults(func=cmd_events)

    keys = with_data_dir(sub.add_parser("keys", help="master keys: generate, rotate (re-wrap data keys), status"))
    keys.add_argument("action", choices=["generate", "rotate", "status"])
    keys.set_defaults(func=cmd_keys)

    principals = with_data_dir(sub.add_parser("principals", help="bootstrap the admin, issue tokens"))
    principals.add_argument("action", choices=["bootstrap", "token"])
    principals.add_argument("user", nargs="?", default="admin")
    principals.add_argument("--token-env", default="INTEGRATIONS_ADMIN_TOKEN")
    principals.add_argument("--label", default="cli")
    principals.set_defaults(func=cmd_principals)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    if args.command == "events" and args.action == "history" and not args.id:
        print("events history needs an id", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except SettingsError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
