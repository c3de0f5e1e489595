"""Writers that run in their own process, as the applications writing to a monitored database would."""

from __future__ import annotations

import multiprocessing
import os
import select
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import psycopg2
from psycopg2 import sql

import database

CHANNEL = "alert_service_table_change"  # the channel the service's trigger notifies


def writer_process() -> ProcessPoolExecutor:
    """A one-process pool (spawned: the parent has threads) already warmed up, so start-up is not timed."""
    executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    executor.submit(os.getpid).result(timeout=60)
    return executor


class NotifyListener:
    """A bare LISTEN connection on the service's channel that timestamps every notification: the latency floor."""

    def __init__(self, dsn: str, channel: str = CHANNEL) -> None:
        self.dsn = dsn
        self.channel = channel
        self.received: list[tuple[float, float, str]] = []  # (monotonic, wall, payload)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def start(self) -> "NotifyListener":
        self._thread = threading.Thread(target=self._run, name="bench-listen", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"bench LISTEN connection not ready: {self.error}")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        try:
            conn = psycopg2.connect(self.dsn)
        except psycopg2.Error as exc:
            self.error = str(exc)
            return
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            self._ready.set()
            while not self._stop.is_set():
                if select.select([conn], [], [], 0.1)[0]:
                    conn.poll()
                    now, wall = time.monotonic(), time.time()
                    for notify in conn.notifies:  # the table's name, without the id of its logged rows
                        self.received.append((now, wall, database.parse_notification(notify.payload)[0]))
                    conn.notifies.clear()
        except psycopg2.Error as exc:
            self.error = str(exc)
        finally:
            conn.close()


def _connect(dsn: str, autocommit: bool) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(dsn, application_name="bench-writer")
    conn.autocommit = autocommit
    return conn


def spaced_single_rows(dsn: str, table: str, numbers: list[str], spacing: float) -> dict[str, Any]:
    """One single-row transaction per order number, `spacing` seconds apart; returns each one's time.monotonic()
    right after COMMIT returned, and every notification a bare LISTEN connection in this process received."""
    listener = NotifyListener(dsn).start()
    conn = _connect(dsn, autocommit=False)
    commits: list[tuple[str, float]] = []
    try:
        with conn.cursor() as cur:
            next_at = time.monotonic()
            for i, number in enumerate(numbers, start=1):
                cur.execute(f"INSERT INTO {table} (id, order_number) VALUES (%s, %s)", (i, number))
                conn.commit()
                commits.append((number, time.monotonic()))
                next_at += spacing
                time.sleep(max(0.0, next_at - time.monotonic()))
        time.sleep(0.2)  # the last notification's way to the listener
    finally:
        conn.close()
        listener.stop()
    return {"commits": commits, "notified": listener.received}


def paced_single_rows(dsn: str, tables: list[str], rate: float, seconds: float, first_id: int) -> dict[str, Any]:
    """Single-row transactions round-robin over tables at `rate` per second for `seconds` (each row's note is
    `row-<id>`, so messages can be searched for it); returns each row's (id, table index, wall-clock time right
    after COMMIT returned), and every notification a bare LISTEN connection in this process received (wall-clock
    time, payload): the floor."""
    statements = [f"INSERT INTO {table} (id, note) VALUES (%s, %s)" for table in tables]

    def write(cur: Any, i: int) -> tuple[int, int]:
        row_id, k = first_id + i, i % len(tables)
        cur.execute(statements[k], (row_id, f"row-{row_id}"))
        return row_id, k

    return _paced(dsn, rate, int(rate * seconds), seconds, write)


def paced_readings(dsn: str, table: str, readings: list[tuple[int, int, float]], rate: float) -> dict[str, Any]:
    """One single-row transaction per (id, device_id, value) at `rate` per second into a readings table (note
    `row-<id>`); returns what paced_single_rows does, with the table index always 0."""
    statement = f"INSERT INTO {table} (id, device_id, value, note) VALUES (%s, %s, %s, %s)"

    def write(cur: Any, i: int) -> tuple[int, int]:
        row_id, device_id, value = readings[i]
        cur.execute(statement, (row_id, device_id, value, f"row-{row_id}"))
        return row_id, 0

    return _paced(dsn, rate, len(readings), len(readings) / rate, write)


def _paced(dsn: str, rate: float, total: int, seconds: float, write: Any) -> dict[str, Any]:
    """Call write(cursor, i) and COMMIT for i in range(total), the i-th at start + i / rate."""
    listener = NotifyListener(dsn).start()
    conn = _connect(dsn, autocommit=False)
    commits: list[tuple[int, int, float]] = []
    most_behind = 0.0
    elapsed = 0.0
    try:
        with conn.cursor() as cur:
            start = time.monotonic()
            # Bounded in time as well as count: a writer that cannot keep up stops at twice the planned time.
            deadline = start + 2 * seconds + 5
            for i in range(total):
                due = start + i / rate
                now = time.monotonic()
                if now > deadline:
                    break
                if due > now:
                    time.sleep(due - now)
                else:
                    most_behind = max(most_behind, now - due)
                row_id, k = write(cur, i)
                conn.commit()
                commits.append((row_id, k, time.time()))
            elapsed = time.monotonic() - start
        time.sleep(0.2)  # the last notification's way to the listener
    finally:
        conn.close()
        listener.stop()
    return {"commits": commits, "seconds": elapsed, "planned": total, "most_behind_seconds": most_behind,
            "notified": [(wall, payload) for _, wall, payload in listener.received]}


def paced_rows_over_databases(dsns: list[str], tables: list[list[str]], rate: float, total: int,
                              first_id: int) -> dict[str, Any]:
    """`total` single-row transactions at up to `rate` per second, round-robin over the databases and, within each,
    over its tables (note `row-<id>`); all of them however far the writer falls behind, so that every run offers the
    same work. Returns each row's (id, database index, table index, wall-clock time right after COMMIT returned)."""
    conns = [_connect(dsn, autocommit=False) for dsn in dsns]
    commits: list[tuple[int, int, int, float]] = []
    most_behind, elapsed = 0.0, 0.0
    try:
        cursors = [conn.cursor() for conn in conns]
        start = time.monotonic()
        for i in range(total):
            due, now = start + i / rate, time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                most_behind = max(most_behind, now - due)
            row_id, k = first_id + i, i % len(dsns)
            t = (i // len(dsns)) % len(tables[k])
            cursors[k].execute(f"INSERT INTO {tables[k][t]} (id, note) VALUES (%s, %s)", (row_id, f"row-{row_id}"))
            conns[k].commit()
            commits.append((row_id, k, t, time.time()))
        elapsed = time.monotonic() - start
    finally:
        for conn in conns:
            conn.close()
    return {"commits": commits, "seconds": elapsed, "planned": total, "most_behind_seconds": most_behind}


def single_rows(dsn: str, table: str, count: int, first_id: int) -> float:
    """`count` single-row autocommit transactions as fast as possible; returns the elapsed seconds."""
    conn = _connect(dsn, autocommit=True)
    statement = f"INSERT INTO {table} (id, note) VALUES (%s, %s)"
    try:
        with conn.cursor() as cur:
            start = time.perf_counter()
            for row_id in range(first_id, first_id + count):
                cur.execute(statement, (row_id, "x"))
            return time.perf_counter() - start
    finally:
        conn.close()


def burst(dsn: str, table: str, count: int, first_id: int) -> dict[str, float]:
    """Like single_rows, also returning the wall-clock times of the first and last COMMIT."""
    conn = _connect(dsn, autocommit=True)
    statement = f"INSERT INTO {table} (id, note) VALUES (%s, %s)"
    try:
        with conn.cursor() as cur:
            first = last = 0.0
            start = time.perf_counter()
            for row_id in range(first_id, first_id + count):
                cur.execute(statement, (row_id, f"row {row_id}"))
                last = time.time()
                if row_id == first_id:
                    first = last
            return {"seconds": time.perf_counter() - start, "first_commit": first, "last_commit": last}
    finally:
        conn.close()


def batches(dsn: str, table: str, count: int, rows: int, first_id: int) -> float:
    """`count` INSERT statements of `rows` rows each, one transaction per statement; returns elapsed seconds."""
    conn = _connect(dsn, autocommit=True)
    statement = f"INSERT INTO {table} (id, note) SELECT g, 'x' FROM generate_series(%s::bigint, %s::bigint) g"
    try:
        with conn.cursor() as cur:
            start = time.perf_counter()
            for b in range(count):
                low = first_id + b * rows
                cur.execute(statement, (low, low + rows - 1))
            return time.perf_counter() - start
    finally:
        conn.close()


def one_statement(dsn: str, statement: str) -> float:
    """Run one statement in its own transaction; returns the wall-clock time right after COMMIT returned."""
    conn = _connect(dsn, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return time.time()
    finally:
        conn.close()
