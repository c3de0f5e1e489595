"""The alert engine: schedule thread, LISTEN loops, a bounded worker pool with single-flight, and evaluation."""

from __future__ import annotations

import logging
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable
from uuid import UUID

import psycopg2
import schedule

import database
import notification
import rules
from config import Settings

logger = logging.getLogger(__name__)

LISTENER_PING_SECONDS = 10.0
LISTENER_MAX_BACKOFF_SECONDS = 30.0
CRON_CHECK_SECONDS = 1


@dataclass
class _Flight:
    """Single-flight bookkeeping of one alert: at most one evaluation runs, at most one more is pending."""

    running: bool = False
    pending: str | None = None


@dataclass
class _Registered:
    """What the scheduler keeps in memory about one active alert."""

    data_source_id: UUID
    tables: tuple[str, ...]
    job: schedule.Job | None = None
    cron: rules.Schedule | None = None
    next_cron: datetime | None = None


@dataclass
class ListenerState:
    """What /health reports about one data source's listener."""

    connected: bool = False
    reconnects: int = 0
    last_error: str | None = None
    tables: set[str] = field(default_factory=set)


class AlertScheduler:
    """Runs alerts on their schedule and on committed changes to the tables they read."""

    def __init__(
        self, pool: database.Pool, settings: Settings, *, sources: database.SourcePools,
        on_outbox: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.sources = sources
        self.on_outbox = on_outbox
        self._executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="evaluate")
        self._flights: dict[UUID, _Flight] = {}
        self._flight_lock = threading.Lock()
        self._schedule = schedule.Scheduler()
        self._registered: dict[UUID, _Registered] = {}
        self._by_table: dict[tuple[UUID, str], set[UUID]] = {}
        self._state_lock = threading.RLock()
        self._listeners: dict[UUID, threading.Thread] = {}
        self.listener_states: dict[UUID, ListenerState] = {}
        self._listener_stops: dict[UUID, threading.Event] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Register every active alert, start listeners and the schedule thread, then evaluate each alert once."""
        with self.pool.transaction() as cur:
            alerts = database.list_active_alerts(cur)
        for alert in alerts:
            self._register(alert)
        for source_id in {a["data_source_id"] for a in alerts}:
            self._sync_source(source_id)
        self._schedule.every(CRON_CHECK_SECONDS).seconds.do(self._guarded, self._run_due_cron)
        self._thread = threading.Thread(target=self._schedule_loop, name="schedule", daemon=True)
        self._thread.start()
        # Rows written while the service was down are found here; only the difference is sent.
        for alert in alerts:
            self.submit(alert["id"], "startup")
        logger.info("scheduler started with %d active alert(s)", len(alerts))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the schedule thread, the listeners and the workers (waiting for running evaluations)."""
        self._stop.set()
        for stop in list(self._listener_stops.values()):
            stop.set()
        if self._thread:
            self._thread.join(timeout)
        for thread in list(self._listeners.values()):
            thread.join(timeout)
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def alive(self) -> bool:
        """True while the schedule thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def idle(self) -> bool:
        """True when no evaluation is running or pending (tests and benchmarks wait on this)."""
        with self._flight_lock:
            return not any(f.running for f in self._flights.values())

    # --- alert changes from the API --------------------------------------------------------------------------

    def alert_changed(self, alert_id: UUID) -> None:
        """Apply a created, updated, paused, resumed or deleted alert at once."""
        with self.pool.transaction() as cur:
            alert = database.get_alert(cur, alert_id=alert_id)
        with self._state_lock:
            old = self._unregister(alert_id)
        touched = {old.data_source_id} if old else set()
        if alert is not None and alert["status"] == "ACTIVE":
            self._register(alert)
            touched.add(alert["data_source_id"])
        for source_id in touched:
            self._sync_source(source_id)
        if alert is not None and alert["status"] == "ACTIVE":
            self.submit(alert_id, "change")

    def _register(self, alert: dict) -> None:
        alert_id = alert["id"]
        parsed = rules.parse_schedule(alert["schedule"])
        entry = _Registered(data_source_id=alert["data_source_id"], tables=tuple(alert["watched_tables"] or ()))
        with self._state_lock:
            if parsed.seconds is not None:
                entry.job = self._schedule.every(parsed.seconds).seconds.do(
                    self._guarded, self.submit, alert_id, "schedule"
                )
            else:
                entry.cron = parsed
                entry.next_cron = parsed.next_run(datetime.now(timezone.utc))
            self._registered[alert_id] = entry
            for table in entry.tables:
                self._by_table.setdefault((entry.data_source_id, table), set()).add(alert_id)

    def _unregister(self, alert_id: UUID) -> _Registered | None:
        entry = self._registered.pop(alert_id, None)
        if entry is None:
            return None
        if entry.job is not None:
            self._schedule.cancel_job(entry.job)
        for table in entry.tables:
            alerts = self._by_table.get((entry.data_source_id, table))
            if alerts is not None:
                alerts.discard(alert_id)
                if not alerts:
                    del self._by_table[(entry.data_source_id, table)]
        return entry

    def _sync_source(self, source_id: UUID) -> None:
        """Make the data source's triggers match its active alerts, record per alert why events are off, and
        keep a listener running exactly while some alert there is event-driven."""
        with self._state_lock:
            wanted = {t for (s, t) in self._by_table if s == source_id}
            alert_ids = [a for a, e in self._registered.items() if e.data_source_id == source_id]
        errors: dict[str, str] = {}
        try:
            pool = self.sources.get(source_id)
            errors = database.sync_triggers(pool, wanted=wanted)
        except database.DatabaseError as exc:
            errors = {table: str(exc) for table in wanted}
        with self.pool.transaction() as cur:
            for alert_id in alert_ids:
                entry = self._registered.get(alert_id)
                if entry is None:
                    continue
                database.set_alert_watch(
                    cur, alert_id=alert_id, watched_tables=list(entry.tables),
                    events_error=_events_error(entry.tables, errors),
                )
        if wanted - set(errors):
            self._ensure_listener(source_id, wanted - set(errors))
        else:
            self._stop_listener(source_id)

    # --- single flight ---------------------------------------------------------------------------------------

    def submit(self, alert_id: UUID, cause: str) -> None:
        """Ask for an evaluation; if one is running, remember that one more is needed after it."""
        with self._flight_lock:
            flight = self._flights.setdefault(alert_id, _Flight())
            if flight.running:
                # An initial report or a config change outranks a plain event as the recorded cause.
                if flight.pending is None or cause in ("change", "startup"):
                    flight.pending = cause
                return
            flight.running = True
        try:
            self._executor.submit(self._fly, alert_id, cause)
        except RuntimeError:  # the executor is shut down: we are stopping
            with self._flight_lock:
                flight.running = False

    def _fly(self, alert_id: UUID, cause: str) -> None:
        while True:
            try:
                self.evaluate(alert_id, cause)
            except database.DatabaseUnavailable as exc:
                # The listener's catch-up after reconnecting evaluates it again; nothing is lost by skipping.
                logger.warning("alert %s not evaluated: %s", alert_id, exc)
            except Exception:
                logger.exception("evaluation of alert %s failed", alert_id)
            with self._flight_lock:
                flight = self._flights[alert_id]
                if flight.pending is None or self._stop.is_set():
                    flight.running = False
                    flight.pending = None
                    return
                cause, flight.pending = flight.pending, None

    # --- evaluation --------------------------------------------------------------------------------------------

    def evaluate(self, alert_id: UUID, cause: str) -> str | None:
        """Run an alert's query, diff it against the stored result, and write state, incident and outbox rows in
        one transaction; returns the outcome (None when the alert is gone or paused)."""
        started_at = datetime.now(timezone.utc)
        started = time.perf_counter()
        with self.pool.transaction() as cur:
            alert = database.get_alert(cur, alert_id=alert_id)
            state = database.get_alert_state(cur, alert_id=alert_id) if alert else None
        if alert is None or alert["status"] != "ACTIVE":
            return None
        try:
            columns, rows, truncated = database.run_query(
                self.sources.get(alert["data_source_id"]), query=alert["query"],
                timeout_seconds=self.settings.query_timeout_seconds, max_rows=self.settings.max_result_rows,
            )
            identities = rules.identities(rows, rules.key_indexes(columns, alert["key_columns"]))
        except (database.DatabaseError, rules.RuleError) as exc:
            self._record_error(alert, cause, started_at, started, str(exc))
            return "error"

        initial = state is None
        if initial:
            report = rows
        else:
            previous = rules.unpack_fingerprints(state["fingerprints"])
            report = [rows[i] for i in rules.new_row_positions(previous, identities)]
        outcome = "initial_report" if initial else ("triggered" if report else "no_change")

        with self.pool.transaction() as cur:
            locked = database.lock_alert_version(cur, alert_id=alert_id)
            if locked is None or locked != (alert["version"], "ACTIVE"):
                # Changed, paused or deleted while we ran: the change queued a fresh evaluation.
                return None
            current = database.get_alert_state(cur, alert_id=alert_id)
            if (current is None) != (state is None) or (
                current is not None and current["evaluated_at"] != state["evaluated_at"]
            ):
                # Someone else stored a newer result meanwhile; ours was measured against an old one.
                self.submit(alert_id, cause)
                return None
            database.save_alert_state(
                cur, alert_id=alert_id, config_version=alert["version"],
                fingerprints=rules.pack_fingerprints(identities), row_count=len(rows),
            )
            queued = 0
            if initial or report:
                queued = self._write_alert_messages(cur, alert, columns, report, initial, truncated)
            database.insert_evaluation(
                cur, alert_id=alert_id, cause=cause, started_at=started_at,
                duration_ms=(time.perf_counter() - started) * 1000, row_count=len(rows),
                new_row_count=None if initial else len(report), truncated=truncated, outcome=outcome, error=None,
            )
        if queued:
            self.on_outbox()
        if outcome == "triggered":
            logger.info("alert %s (%s): %d new row(s), %d notification(s) queued",
                        alert["name"], alert_id, len(report), queued)
        return outcome

    def _write_alert_messages(self, cur, alert: dict, columns: list[str], report: list, initial: bool,
                              truncated: bool) -> int:
        kind = "initial_report" if initial else "incident"
        rendered = notification.render_alert_message(
            alert_name=alert["name"], priority=alert["priority"], kind=kind, columns=columns, rows=report,
            total_rows=len(report), description=alert["description"],
        )
        incident_id = None
        if not initial:
            data = {
                "columns": columns,
                "new_rows": [dict(zip(columns, map(rules.jsonable, row))) for row in report],
                "new_row_count": len(report),
                "result_truncated": truncated,
            }
            incident = database.insert_incident(
                cur, alert_id=alert["id"], alert_name=alert["name"], title=rendered.subject,
                description=rendered.text, priority=alert["priority"], incident_data=data,
            )
            incident_id = incident["id"]
            database.insert_activity(cur, action="created", incident_id=incident_id, alert_id=alert["id"],
                                     details={"new_row_count": len(report)})
        return database.insert_notifications(cur, notifications=notification.outbox_rows(
            rendered=rendered, channels=alert["notification_channels"], alert_id=alert["id"],
            incident_id=incident_id, kind=kind,
        ))

    def _record_error(self, alert: dict, cause: str, started_at: datetime, started: float, error: str) -> None:
        logger.warning("alert %s (%s) failed to evaluate: %s", alert["name"], alert["id"], error)
        try:
            with self.pool.transaction() as cur:
                database.insert_evaluation(
                    cur, alert_id=alert["id"], cause=cause, started_at=started_at,
                    duration_ms=(time.perf_counter() - started) * 1000, row_count=None, new_row_count=None,
                    truncated=False, outcome="error", error=error,
                )
        except database.DatabaseError as exc:
            logger.warning("could not record the failed evaluation of %s: %s", alert["id"], exc)

    # --- the schedule thread ---------------------------------------------------------------------------------

    def _guarded(self, function: Callable, *args) -> None:
        try:
            function(*args)
        except Exception:
            logger.exception("scheduled job %s failed", getattr(function, "__name__", function))

    def _run_due_cron(self) -> None:
        now = datetime.now(timezone.utc)
        due = []
        with self._state_lock:
            for alert_id, entry in self._registered.items():
                if entry.cron is not None and entry.next_cron is not None and entry.next_cron <= now:
                    due.append(alert_id)
                    entry.next_cron = entry.cron.next_run(now)
        for alert_id in due:
            self.submit(alert_id, "schedule")

    def _schedule_loop(self) -> None:
        while not self._stop.is_set():
            with self._state_lock:
                try:
                    self._schedule.run_pending()
                except Exception:
                    logger.exception("schedule loop error; continuing")
                idle = self._schedule.idle_seconds
            self._stop.wait(min(max(idle if idle is not None else 1.0, 0.005), 1.0))

    # --- listeners -------------------------------------------------------------------------------------------

    def _ensure_listener(self, source_id: UUID, tables: set[str]) -> None:
        state = self.listener_states.setdefault(source_id, ListenerState())
        state.tables = set(tables)
        thread = self._listeners.get(source_id)
        if thread is not None and thread.is_alive():
            return
        stop = threading.Event()
        connected = threading.Event()
        self._listener_stops[source_id] = stop
        thread = threading.Thread(
            target=self._listen, args=(source_id, stop, connected), name=f"listen-{source_id}", daemon=True
        )
        self._listeners[source_id] = thread
        thread.start()
        # Changes committed before LISTEN is active would be missed by events; the evaluation that follows
        # registration then covers them, so waiting here only has to be long enough for a healthy server.
        connected.wait(5.0)

    def _stop_listener(self, source_id: UUID) -> None:
        stop = self._listener_stops.pop(source_id, None)
        if stop is not None:
            stop.set()
        self._listeners.pop(source_id, None)
        self.listener_states.pop(source_id, None)

    def _listen(self, source_id: UUID, stop: threading.Event, connected: threading.Event) -> None:
        state = self.listener_states.setdefault(source_id, ListenerState())
        backoff = 0.2
        ever_connected = False
        while not stop.is_set() and not self._stop.is_set():
            conn = None
            try:
                conn = database.open_listener(self.sources.dsn(source_id))
                state.connected, state.last_error, backoff = True, None, 0.2
                connected.set()
                if ever_connected:
                    state.reconnects += 1
                    logger.info("listener for data source %s reconnected; catching up", source_id)
                    self._catch_up(source_id)
                ever_connected = True
                last_ping = time.monotonic()
                while not stop.is_set() and not self._stop.is_set():
                    readable, _, _ = select.select([conn], [], [], 0.5)
                    if readable:
                        conn.poll()
                        tables = {n.payload for n in conn.notifies}
                        conn.notifies.clear()
                        self._on_tables_changed(source_id, tables)
                    elif time.monotonic() - last_ping > LISTENER_PING_SECONDS:
                        database.listener_ping(conn)
                        last_ping = time.monotonic()
            except (psycopg2.Error, database.DatabaseError, OSError) as exc:
                state.connected = False
                state.last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                logger.warning("listener for data source %s lost: %s; retrying in %.1fs",
                               source_id, state.last_error, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, LISTENER_MAX_BACKOFF_SECONDS)
            except Exception:
                logger.exception("listener for data source %s crashed; restarting", source_id)
                stop.wait(backoff)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except psycopg2.Error:
                        pass
        state.connected = False

    def _on_tables_changed(self, source_id: UUID, tables: set[str]) -> None:
        with self._state_lock:
            alert_ids = set().union(*(self._by_table.get((source_id, t), set()) for t in tables)) if tables else set()
        for alert_id in alert_ids:
            self.submit(alert_id, "event")

    def _catch_up(self, source_id: UUID) -> None:
        """Notifications sent while the listener was away are gone: evaluate every event-driven alert there."""
        with self._state_lock:
            alert_ids = [a for a, e in self._registered.items() if e.data_source_id == source_id and e.tables]
        for alert_id in alert_ids:
            self.submit(alert_id, "catch_up")

    def status(self) -> dict:
        """The scheduler's state for /health."""
        with self._state_lock:
            active = len(self._registered)
        return {
            "running": self.alive,
            "active_alerts": active,
            "listeners": {
                str(source_id): {"connected": s.connected, "reconnects": s.reconnects, "last_error": s.last_error,
                                 "watched_tables": sorted(s.tables)}
                for source_id, s in list(self.listener_states.items())
            },
        }


def _events_error(tables: tuple[str, ...], errors: dict[str, str]) -> str | None:
    if not tables:
        return "the query reads no table, so only the schedule runs it"
    failed = [f"{table}: {errors[table]}" for table in tables if table in errors]
    if not failed:
        return None
    return "no change trigger on " + "; ".join(failed) + " (the schedule still runs the alert)"
