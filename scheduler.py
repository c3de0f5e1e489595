"""The alert engine: schedule thread, LISTEN loops, a bounded worker pool with single-flight, and evaluation."""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import select
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable
from uuid import UUID

import psycopg2
import schedule

import database
import notification
import rules
from config import Settings

logger = logging.getLogger(__name__)

DRY_RUN_ROWS = 100
UNAVAILABLE_RETRY_SECONDS = 5
# Event re-runs of one alert start at least this long after the previous evaluation's query began: a burst of
# commits costs a few evaluations, and the first event of a quiet period is still served at once.
EVENT_RERUN_SPACING_SECONDS = 0.1
LISTENER_PING_SECONDS = 10.0
LISTENER_MAX_BACKOFF_SECONDS = 30.0
WAKEUP_CHECK_SECONDS = 1
# A dry run waits this long for one of the DRY_RUN_WORKERS slots before the request is turned away (429).
DRY_RUN_QUEUE_SECONDS = 5.0


class DryRunsBusy(Exception):
    """Every dry-run slot is taken."""


class _Workers:
    """A fixed number of daemon threads taking jobs from a queue. Unlike ThreadPoolExecutor's threads, which the
    interpreter joins at exit, a thread stuck in a call that never returns cannot keep the process alive."""

    def __init__(self, size: int, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, function: Callable, *args) -> None:
        """Queue a call; RuntimeError once shut down."""
        if self._closed:
            raise RuntimeError("the worker pool is shut down")
        self._jobs.put((function, args))

    def shutdown(self, timeout: float) -> bool:
        """Drop queued jobs, let running ones finish for up to `timeout` seconds; True when all threads ended."""
        self._closed = True
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
        return not any(thread.is_alive() for thread in self._threads)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            function, args = job
            try:
                function(*args)
            except Exception:
                logger.exception("worker job %s failed", getattr(function, "__name__", function))


@dataclass
class _Share:
    """One data source's share of the workers: evaluations running on it, and those waiting for room."""

    running: int = 0
    waiting: deque = field(default_factory=deque)


@dataclass
class SourceHealth:
    """Whether a data source answers, as evaluations and the listener saw it last."""

    not_answering_since: datetime | None = None
    last_error: str | None = None


@dataclass
class _Flight:
    """Single-flight bookkeeping of one alert: at most one evaluation runs, at most one more is pending."""

    running: bool = False
    pending: str | None = None
    # Monotonic times: when the running evaluation's query began, and when the last event arrived. An event that
    # arrived before the query began was committed before it, so its rows are already in that result.
    query_started: float = 0.0
    last_event: float = 0.0


_TOKENS = itertools.count()
_RESUME = -1  # heap token of a deferred event re-run (registered alerts have tokens from 0 up)


@dataclass
class _Registered:
    """What the scheduler keeps in memory about one active alert."""

    data_source_id: UUID
    tables: tuple[str, ...]
    schedule: rules.Schedule
    token: int = field(default_factory=lambda: next(_TOKENS))
    events_error: str | None = "not yet recorded"


@dataclass
class ListenerState:
    """What /health reports about one data source's listener."""

    connected: bool = False
    reconnects: int = 0
    last_error: str | None = None
    tables: set[str] = field(default_factory=set)
    disconnected_since: datetime | None = None


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
        self._executor = _Workers(settings.workers, "evaluate")
        # Each data source runs at most WORKERS_PER_DATA_SOURCE evaluations at once; the rest wait in its queue
        # without holding a worker, so a source that hangs cannot take every worker from the others.
        self._shares: dict[UUID | None, _Share] = {}
        self._share_lock = threading.Lock()
        self._dry_runs = threading.BoundedSemaphore(settings.dry_run_workers)
        self.source_health: dict[UUID, SourceHealth] = {}
        self._flights: dict[UUID, _Flight] = {}
        self._flight_lock = threading.Lock()
        # Housekeeping runs as `schedule` jobs. Alert runs are kept in a heap of due times: one `schedule.Job` per
        # alert made every tick walk all jobs (measured: most of a core at 10,000 alerts).
        self._schedule = schedule.Scheduler()
        self._due: list[tuple[float, int, UUID]] = []
        self._tick = threading.Event()  # set when something earlier than the loop's sleep was pushed
        self._registered: dict[UUID, _Registered] = {}
        self._by_table: dict[tuple[UUID, str], set[UUID]] = {}
        self._state_lock = threading.RLock()
        self._listeners: dict[UUID, threading.Thread] = {}
        self.listener_states: dict[UUID, ListenerState] = {}
        self._listener_stops: dict[UUID, threading.Event] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waiters: dict[UUID, list[threading.Event]] = {}
        # One-off evaluations an alert asked for: the end of a `for`, a `repeat_every` or a cooldown.
        self._wakeups: dict[UUID, datetime] = {}
        self._history_hypertable = False
        # Alert changes, trigger DDL and listener start/stop happen one at a time.
        self._change_lock = threading.RLock()

    # --- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Register every active alert, start listeners and the schedule thread, then evaluate each alert once."""
        with self.pool.transaction() as cur:
            alerts = database.list_active_alerts(cur)
        with self._change_lock:
            for alert in alerts:
                try:
                    self._register(alert)
                except rules.RuleError as exc:
                    # One unusable stored alert must not keep every other alert from running.
                    logger.error("alert %s (%s) not scheduled: %s", alert["name"], alert["id"], exc)
            for source_id in {a["data_source_id"] for a in alerts}:
                self._sync_source(source_id)
        self._history_hypertable = database.setup_evaluation_retention(
            self.pool, days=self.settings.evaluation_retention_days)
        self._guarded(self._prune_history)
        self._schedule.every(WAKEUP_CHECK_SECONDS).seconds.do(self._guarded, self._run_wakeups)
        # The DELETE runs on a worker: the schedule thread only hands work out.
        self._schedule.every(1).hours.do(self._guarded, self._executor.submit, self._guarded, self._prune_history)
        self._thread = threading.Thread(target=self._schedule_loop, name="schedule", daemon=True)
        self._thread.start()
        # Rows written while the service was down are found here; only the difference is sent.
        for alert in alerts:
            self.submit(alert["id"], "catch_up")
        logger.info("scheduler started with %d active alert(s)", len(alerts))

    def stopping(self) -> None:
        """From now on, store no evaluation: what is cut short by the shutdown is evaluated again at the next start."""
        self._stop.set()
        self._tick.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the schedule thread, the listeners and the workers within about `timeout` seconds, whatever hangs:
        queries in progress are interrupted, and a worker that still does not return is abandoned."""
        deadline = time.monotonic() + timeout
        self.stopping()
        for stop in list(self._listener_stops.values()):
            stop.set()
        # Interrupt the queries in flight (cancel, then drop the connection): an evaluation on a hung data source
        # would otherwise hold its worker until its deadline.
        self.sources.close()
        if self._thread:
            self._thread.join(max(deadline - time.monotonic(), 0))
        for thread in list(self._listeners.values()):
            thread.join(max(deadline - time.monotonic(), 0))
        if not self._executor.shutdown(max(deadline - time.monotonic(), 0.1)):
            logger.warning("stopped with evaluations still running after %.0f s; they are abandoned", timeout)

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
        with self._change_lock:
            # Read under the lock, so two quick changes apply in order and the newest one wins.
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
            self.submit(alert_id, "manual")

    def _register(self, alert: dict) -> None:
        alert_id = alert["id"]
        parsed = rules.parse_schedule(alert["schedule"])
        entry = _Registered(data_source_id=alert["data_source_id"], tables=tuple(alert["watched_tables"] or ()),
                            schedule=parsed)
        with self._state_lock:
            self._unregister(alert_id)
            if parsed.seconds is not None:
                # Spread first runs over the interval (by id, so it is stable), or 10,000 alerts on the same
                # interval all fall due in the same second, every time.
                first = time.monotonic() + (alert_id.int % (parsed.seconds * 1000)) / 1000
            else:
                first = self._next_cron(parsed)
            heapq.heappush(self._due, (first, entry.token, alert_id))
            self._tick.set()
            self._registered[alert_id] = entry
            for table in entry.tables:
                self._by_table.setdefault((entry.data_source_id, table), set()).add(alert_id)

    @staticmethod
    def _next_cron(parsed: rules.Schedule) -> float:
        now = datetime.now(timezone.utc)
        return time.monotonic() + (parsed.next_run(now) - now).total_seconds()

    def _unregister(self, alert_id: UUID) -> _Registered | None:
        # Its heap entries stay behind and are dropped when they come up: their token no longer matches.
        entry = self._registered.pop(alert_id, None)
        if entry is None:
            return None
        for table in entry.tables:
            alerts = self._by_table.get((entry.data_source_id, table))
            if alerts is not None:
                alerts.discard(alert_id)
                if not alerts:
                    del self._by_table[(entry.data_source_id, table)]
        return entry

    def next_runs(self) -> dict[UUID, float]:
        """Each alert's next scheduled run, in epoch seconds."""
        with self._state_lock:
            offset = time.time() - time.monotonic()
            return {alert_id: when + offset for when, token, alert_id in self._due
                    if token != _RESUME and alert_id in self._registered
                    and self._registered[alert_id].token == token}

    def _pop_due(self, now: float) -> tuple[list[UUID], list[UUID]]:
        """Alerts whose scheduled run has come (each put back in the heap at its next run), and deferred
        event re-runs whose time has come."""
        due, resume = [], []
        while self._due and self._due[0][0] <= now:
            when, token, alert_id = heapq.heappop(self._due)
            if token == _RESUME:
                resume.append(alert_id)
                continue
            entry = self._registered.get(alert_id)
            if entry is None or entry.token != token:
                continue
            due.append(alert_id)
            if entry.schedule.seconds is not None:
                following = when + entry.schedule.seconds
                if following <= now:  # far behind (a stalled machine): skip the missed runs, do not burst
                    following = now + entry.schedule.seconds
            else:
                following = self._next_cron(entry.schedule)
            heapq.heappush(self._due, (following, token, alert_id))
        return due, resume

    def _sync_source(self, source_id: UUID) -> None:
        """Make the data source's triggers match its active alerts, record per alert why events are off, and
        keep a listener running exactly while some alert there is event-driven."""
        errors: dict[str, str] = {}
        try:
            here = self.sources.database_of(source_id)
            with self._state_lock:
                sources = {s for (s, _) in self._by_table} | {source_id}
            # Data sources that are the same database share its triggers: keep what any of them needs.
            same_database = {s for s in sources if s == source_id or self.sources.database_of(s) == here}
            with self._state_lock:
                wanted = {t for (s, t) in self._by_table if s == source_id}
                wanted_here = {t for (s, t) in self._by_table if s in same_database}
                alert_ids = [a for a, e in self._registered.items() if e.data_source_id == source_id]
            errors = database.sync_triggers(self.sources.triggers(source_id), wanted=wanted_here)
        except database.DatabaseError as exc:
            with self._state_lock:
                wanted = {t for (s, t) in self._by_table if s == source_id}
                alert_ids = [a for a, e in self._registered.items() if e.data_source_id == source_id]
            errors = {table: str(exc) for table in wanted}
        with self.pool.transaction() as cur:
            for alert_id in alert_ids:
                entry = self._registered.get(alert_id)
                if entry is None:
                    continue
                events_error = _events_error(entry.tables, errors)
                # Written only when it changes: creating the 10,000th alert must not rewrite the other 9,999.
                if entry.events_error != events_error:
                    database.set_alert_watch(cur, alert_id=alert_id, watched_tables=list(entry.tables),
                                             events_error=events_error)
                    entry.events_error = events_error
        if wanted - set(errors):
            self._ensure_listener(source_id, wanted - set(errors))
        else:
            self._stop_listener(source_id)

    # --- single flight ---------------------------------------------------------------------------------------

    def submit(self, alert_id: UUID, cause: str) -> None:
        """Ask for an evaluation; if one is running, remember that one more is needed after it."""
        with self._flight_lock:
            flight = self._flights.setdefault(alert_id, _Flight())
            if cause == "event":
                flight.last_event = time.monotonic()
            if flight.running:
                # An initial report or a config change outranks a plain event as the recorded cause.
                if flight.pending is None or cause in ("manual", "catch_up"):
                    flight.pending = cause
                return
            flight.running = True
        self._start_flight(alert_id, cause)

    def _start_flight(self, alert_id: UUID, cause: str) -> None:
        """Run a flight on a worker when its data source has room in its share, or queue it there (it stays
        marked running meanwhile, so later requests join it as its pending re-run: nothing is lost)."""
        source_id = self._source_of(alert_id)
        with self._share_lock:
            share = self._shares.setdefault(source_id, _Share())
            if share.running >= self.settings.workers_per_data_source:
                share.waiting.append((alert_id, cause))
                return
            share.running += 1
        self._submit_to_worker(source_id, alert_id, cause)

    def _source_of(self, alert_id: UUID) -> UUID | None:
        """The data source whose share an alert's flights run in (None once the alert is gone)."""
        with self._state_lock:
            entry = self._registered.get(alert_id)
            return entry.data_source_id if entry is not None else None

    def _submit_to_worker(self, source_id: UUID | None, alert_id: UUID, cause: str) -> None:
        try:
            self._executor.submit(self._fly_in_share, source_id, alert_id, cause)
        except RuntimeError:  # the workers are shut down: we are stopping
            with self._flight_lock:
                self._flights[alert_id].running = False

    def _fly_in_share(self, source_id: UUID | None, alert_id: UUID, cause: str) -> None:
        try:
            self._fly(alert_id, cause)
        finally:
            with self._share_lock:
                share = self._shares[source_id]
                following = share.waiting.popleft() if share.waiting else None
                if following is None:
                    share.running -= 1
            if following is not None:  # the share's slot passes straight to the next flight in its queue
                self._submit_to_worker(source_id, *following)

    def _fly(self, alert_id: UUID, cause: str) -> None:
        while True:
            with self._flight_lock:
                waiting = self._waiters.pop(alert_id, [])
            try:
                self.evaluate(alert_id, cause)
            except database.DatabaseUnavailable as exc:
                logger.warning("alert %s not evaluated, retrying in %ss: %s", alert_id, UNAVAILABLE_RETRY_SECONDS, exc)
                self._set_wakeup(alert_id, datetime.now(timezone.utc) + timedelta(seconds=UNAVAILABLE_RETRY_SECONDS))
            except Exception:
                logger.exception("evaluation of alert %s failed", alert_id)
            for event in waiting:
                event.set()
            with self._flight_lock:
                flight = self._flights[alert_id]
                if flight.pending == "event" and flight.last_event < flight.query_started:
                    flight.pending = None  # every event so far was committed before the query ran: no re-run
                if flight.pending is None or self._stop.is_set():
                    flight.running = False
                    flight.pending = None
                    return
                resume_at = flight.query_started + EVENT_RERUN_SPACING_SECONDS
                defer = flight.pending == "event" and time.monotonic() < resume_at
                if not defer:
                    cause, flight.pending = flight.pending, None
            if defer:
                # A burst of commits: gather it for a moment instead of one evaluation per commit. The flight stays
                # running, so later events join the same re-run, and the worker is free meanwhile. (Taken after
                # the flight lock is released: the schedule loop takes these two locks the other way round.)
                with self._state_lock:
                    heapq.heappush(self._due, (resume_at, _RESUME, alert_id))
                self._tick.set()
                return
            if self._queue_behind_others(alert_id, cause):
                return

    def _queue_behind_others(self, alert_id: UUID, cause: str) -> bool:
        """When other flights wait for this alert's data source, put its re-run at the back of that queue (it
        stays marked running) and return True: an alert that keeps firing must not keep the share to itself."""
        source_id = self._source_of(alert_id)
        with self._share_lock:
            share = self._shares.get(source_id)
            if share is None or not share.waiting:
                return False
            share.waiting.append((alert_id, cause))
            return True

    def _resume(self, alert_id: UUID) -> None:
        """Start a deferred re-run of a flight that is still marked running."""
        with self._flight_lock:
            flight = self._flights.get(alert_id)
            if flight is None or not flight.running or flight.pending is None:
                return
            cause, flight.pending = flight.pending, None
        self._start_flight(alert_id, cause)

    # --- evaluation --------------------------------------------------------------------------------------------

    def evaluate(self, alert_id: UUID, cause: str) -> str | None:
        """Run an alert's query, decide what the result means, and write state, evaluation, incident and outbox
        rows in one transaction; returns the outcome (None when the alert is gone or paused)."""
        started_at = datetime.now(timezone.utc)
        started = time.perf_counter()
        with self.pool.transaction() as cur:
            alert, row = database.get_alert_with_state(cur, alert_id=alert_id)
        if alert is None or alert["status"] != "ACTIVE":
            return None
        prior = state_from_row(row)
        if prior is None or not prior.initialized:
            cause = "initial"
        with self._flight_lock:
            self._flights.setdefault(alert_id, _Flight()).query_started = time.monotonic()
        now = datetime.now(timezone.utc)
        decision, columns, rows, truncated, error = self._run_and_decide(
            alert, prior, now=now, error_notify_after=self.settings.error_notify_after)
        if self._stop.is_set():
            return None  # interrupted by shutdown: that is not the data source's failure, so nothing is recorded
        if error:
            logger.warning("alert %s (%s) failed to evaluate: %s", alert["name"], alert_id, error)
        # Rendered before the transaction: a slow template must not hold the alert's row lock.
        rendered = [notification.render_message(alert=alert, notice=notice) for notice in decision.notices]
        if self._stop.is_set():
            return None  # a template render cut short by the shutdown is no message to store
        duration_ms = (time.perf_counter() - started) * 1000
        with self.pool.transaction() as cur:
            locked = database.lock_alert_version(cur, alert_id=alert_id)
            if locked is None or locked[:2] != (alert["version"], "ACTIVE"):
                return None  # changed, paused or deleted while we ran: the change queued a fresh evaluation
            if locked[2] != (row["evaluated_at"] if row else None):
                self.submit(alert_id, cause)  # someone stored a newer result meanwhile; measure against that
                return None
            queued = self._store(cur, alert, decision, rendered, row, prior, now=now, error=error,
                                 row_count=None if error else len(rows))
            summary = decision.summary or {}
            database.insert_evaluation(
                cur, alert_id=alert_id, cause=cause, started_at=started_at, duration_ms=duration_ms,
                row_count=None if error else len(rows),
                new_row_count=summary.get("triggering", summary.get("matching_rows")) if not error else None,
                truncated=truncated, outcome=decision.outcome, error=error,
            )
        if decision.outcome != "error":  # a failed run leaves the pending 'for', repeat or cooldown wake-up
            self._set_wakeup(alert_id, decision.wake_at)
        if queued:
            self.on_outbox()
        if decision.notices:
            logger.info("alert %s (%s): %s, %d notification(s) queued", alert["name"], alert_id,
                        ", ".join(n.headline for n in decision.notices), queued)
        return decision.outcome

    def _run_and_decide(self, alert: dict, prior: rules.AlertState | None, *, now: datetime,
                        error_notify_after: int, dry_run: bool = False,
                        ) -> tuple[rules.Decision, list[str], list, bool, str | None]:
        """Run the query and decide what it means: the decision, columns, rows, whether cut, and the error."""
        result = self.run_alert_query(alert, dry_run=dry_run)
        if isinstance(result, str):
            return rules.decide_error(prior=prior, error=result, error_notify_after=error_notify_after), \
                [], [], False, result
        columns, rows, truncated, keys = result
        decision = rules.decide(condition=rules.parse_condition(alert["condition"]), prior=prior, columns=columns,
                                rows=rows, keys=keys, now=now, truncated=truncated)
        return decision, columns, rows, truncated, None

    def run_alert_query(self, alert: dict, *, dry_run: bool = False,
                        ) -> tuple[list[str], list, bool, list[int] | None] | str:
        """The alert's result (columns, rows, whether cut, key positions), or the error as text."""
        source_id = alert["data_source_id"]
        try:
            try:
                columns, rows, truncated = database.run_query(
                    self.sources.get(source_id, for_api=dry_run), query=alert["query"],
                    timeout_seconds=self.settings.query_timeout_seconds, max_rows=self.settings.max_result_rows,
                    max_bytes=self.settings.max_result_bytes,
                )
            except database.DatabaseUnavailable as exc:
                if not self._stop.is_set():
                    self._source_answered(source_id, str(exc))
                raise
            except database.QueryFailed:
                self._source_answered(source_id)  # it answered, with an error
                raise
            self._source_answered(source_id)
            # `SELECT a.id, b.id` must keep both values in incidents, templates and messages.
            columns = rules.unique_columns(columns)
            condition = rules.parse_condition(alert["condition"])
            rules.check_condition_columns(condition, columns)
            if truncated and condition.type in ("row_count", "threshold"):
                # Judging a count or a threshold on part of the result would be a guess.
                return (f"the result was cut at MAX_RESULT_ROWS ({self.settings.max_result_rows} rows) or "
                        f"MAX_RESULT_BYTES ({self.settings.max_result_bytes} bytes) and {condition.type} needs "
                        "every row: aggregate in the query or raise the limit")
            return columns, rows, truncated, rules.key_indexes(columns, alert["key_columns"])
        except (database.DatabaseError, rules.RuleError) as exc:
            return str(exc)

    def _store(self, cur, alert: dict, decision: rules.Decision, rendered: list[notification.Rendered],
               prior_row: dict | None, prior: rules.AlertState | None, *, now: datetime, error: str | None,
               row_count: int | None) -> int:
        """Write one decision: state, incidents, activity and outbox rows. Returns the notifications queued."""
        state = decision.state
        is_state = rules.parse_condition(alert["condition"]).is_state
        muted = alert["muted_until"] is not None and alert["muted_until"] > now
        queued = 0
        firing_id = prior_row["firing_incident_id"] if prior_row else None
        if decision.resolve_incident and firing_id:
            database.resolve_incident(cur, incident_id=firing_id, resolved_by=None)
            database.insert_activity(cur, action="auto_resolved", incident_id=firing_id, alert_id=alert["id"])
        for notice, message in zip(decision.notices, rendered):
            incident_id = None
            if notice.open_incident:
                incident = database.insert_incident(
                    cur, alert_id=alert["id"], alert_name=alert["name"], title=message.subject,
                    description=message.text, priority=alert["priority"],
                    incident_data=_incident_data(notice, decision, is_state),
                )
                incident_id = incident["id"]
                database.insert_activity(cur, action="created", incident_id=incident_id, alert_id=alert["id"],
                                         details={"rows": len(notice.rows), "kind": notice.kind})
                if is_state:
                    state.firing_incident_id = incident_id
            elif notice.kind in ("repeat", "resolved"):
                incident_id = firing_id
            if muted:
                database.insert_activity(cur, action="muted", incident_id=incident_id, alert_id=alert["id"],
                                         details={"kind": notice.kind, "muted_until": alert["muted_until"].isoformat()})
                continue
            queued += database.insert_notifications(cur, notifications=notification.outbox_rows(
                rendered=message, channels=alert["notification_channels"], alert_id=alert["id"],
                incident_id=incident_id, kind=notice.kind,
            ))
        fields = state_to_row(state, alert["version"], row_count, prior_row,
                              prior.fingerprints if prior is not None else None)
        fields["last_error"] = error
        if not _same_state(fields, prior_row):
            database.save_alert_state(cur, alert_id=alert["id"], state=fields)
        return queued

    def _source_answered(self, source_id: UUID, error: str | None = None) -> None:
        """Record what an evaluation found out about its data source (error: it did not answer)."""
        health = self.source_health.setdefault(source_id, SourceHealth())
        if error is None:
            health.not_answering_since, health.last_error = None, None
        else:
            health.last_error = error
            if health.not_answering_since is None:
                health.not_answering_since = datetime.now(timezone.utc)

    def dry_run(self, alert: dict, state_row: dict | None) -> dict:
        """What an evaluation would do now (rows, diff, condition, messages) without storing or sending. Dry runs
        take one of DRY_RUN_WORKERS slots and their own connections, never an evaluation's; DryRunsBusy when no
        slot frees up within DRY_RUN_QUEUE_SECONDS."""
        if not self._dry_runs.acquire(timeout=DRY_RUN_QUEUE_SECONDS):
            raise DryRunsBusy(f"{self.settings.dry_run_workers} dry run(s) are already running (DRY_RUN_WORKERS); "
                              "try again when one has finished")
        try:
            # error_notify_after=1: a failing query shows the "alert is failing" message it would eventually send.
            decision, columns, rows, truncated, error = self._run_and_decide(
                alert, state_from_row(state_row), now=datetime.now(timezone.utc), error_notify_after=1,
                dry_run=True)
        finally:
            self._dry_runs.release()
        messages = []
        for notice in decision.notices:
            rendered = notification.render_message(alert=alert, notice=notice)
            messages.append({"kind": notice.kind, "email_subject": rendered.subject, "email_text": rendered.text,
                             "whatsapp_text": rendered.whatsapp})
        return {
            "outcome": decision.outcome, "error": error,
            "columns": columns, "rows": [[rules.jsonable(v) for v in r] for r in rows[:DRY_RUN_ROWS]],
            "row_count": len(rows), "truncated": truncated, "summary": decision.summary or {},
            "condition_state": decision.state.condition_state, "would_notify": bool(messages),
            "messages": messages,
        }

    def run_now(self, alert_id: UUID, timeout: float) -> None:
        """Evaluate an alert now and wait for that evaluation to finish."""
        done = threading.Event()
        with self._flight_lock:
            self._waiters.setdefault(alert_id, []).append(done)
        self.submit(alert_id, "manual")
        done.wait(timeout)

    def _set_wakeup(self, alert_id: UUID, when: datetime | None) -> None:
        with self._state_lock:
            if when is None:
                self._wakeups.pop(alert_id, None)
            else:
                self._wakeups[alert_id] = when

    # --- the schedule thread ---------------------------------------------------------------------------------

    def _guarded(self, function: Callable, *args) -> None:
        try:
            function(*args)
        except Exception:
            logger.exception("scheduled job %s failed", getattr(function, "__name__", function))

    def _run_wakeups(self) -> None:
        now = datetime.now(timezone.utc)
        with self._state_lock:
            due = [alert_id for alert_id, when in self._wakeups.items() if when <= now]
            for alert_id in due:
                del self._wakeups[alert_id]
        for alert_id in due:
            self.submit(alert_id, "schedule")

    def _prune_history(self) -> None:
        if self._history_hypertable:
            return  # TimescaleDB's retention policy drops old chunks
        with self.pool.transaction(deadline_seconds=None) as cur:  # may delete many rows
            deleted = database.prune_evaluations(cur, older_than_days=self.settings.evaluation_retention_days)
        if deleted:
            logger.info("deleted %d evaluation record(s) past retention", deleted)

    def _schedule_loop(self) -> None:
        while not self._stop.is_set():
            self._tick.clear()
            due: list[UUID] = []
            resume: list[UUID] = []
            with self._state_lock:
                try:
                    self._schedule.run_pending()
                    due, resume = self._pop_due(time.monotonic())
                except Exception:
                    logger.exception("schedule loop error; continuing")
                waits = [1.0, self._schedule.idle_seconds or 1.0]
                if self._due:
                    waits.append(self._due[0][0] - time.monotonic())
            for alert_id in resume:
                self._resume(alert_id)
            for alert_id in due:
                self.submit(alert_id, "schedule")
            self._tick.wait(max(min(waits), 0.001))

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
                state.connected, state.last_error, state.disconnected_since, backoff = True, None, None, 0.2
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
                    elif time.monotonic() - last_ping > LISTENER_PING_SECONDS:
                        database.listener_ping(conn)
                        last_ping = time.monotonic()
                    # Drained on every pass: the ping's round trip also reads notifications that were waiting.
                    if conn.notifies:
                        tables = {n.payload for n in conn.notifies}
                        conn.notifies.clear()
                        self._on_tables_changed(source_id, tables)
            except (psycopg2.Error, database.DatabaseError, OSError) as exc:
                state.connected = False
                state.last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if state.disconnected_since is None:
                    state.disconnected_since = datetime.now(timezone.utc)
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
        """The scheduler's state for /health, from memory only: it never waits for a data source."""
        with self._state_lock:
            active = len(self._registered)
            sources = {e.data_source_id for e in self._registered.values()}
        listeners = dict(self.listener_states)
        with self._share_lock:
            shares = {key: (share.running, len(share.waiting)) for key, share in self._shares.items()}
        data_sources = {}
        for source_id in sorted(sources | set(self.source_health) | set(listeners), key=str):
            health = self.source_health.get(source_id, SourceHealth())
            listener = listeners.get(source_id)
            since = [t for t in (health.not_answering_since,
                                 listener.disconnected_since if listener is not None else None) if t is not None]
            running, queued = shares.get(source_id, (0, 0))
            data_sources[str(source_id)] = {
                "status": "not answering" if since else "ok",
                "not_answering_since": min(since).isoformat() if since else None,
                "last_error": health.last_error or (listener.last_error if listener is not None else None),
                "running_evaluations": running, "queued_evaluations": queued,
            }
        return {
            "running": self.alive,
            "active_alerts": active,
            "data_sources": data_sources,
            "listeners": {
                str(source_id): {"connected": s.connected, "reconnects": s.reconnects, "last_error": s.last_error,
                                 "disconnected_since": s.disconnected_since.isoformat() if s.disconnected_since
                                 else None, "watched_tables": sorted(s.tables)}
                for source_id, s in listeners.items()
            },
        }


def _events_error(tables: tuple[str, ...], errors: dict[str, str]) -> str | None:
    if not tables:
        return "the query reads no table, so only the schedule runs it"
    failed = [f"{table}: {errors[table]}" for table in tables if table in errors]
    if not failed:
        return None
    return "no change trigger on " + "; ".join(failed) + " (the schedule still runs the alert)"


def state_from_row(row: dict | None) -> rules.AlertState | None:
    """An alert_state row as the rules see it."""
    if row is None:
        return None
    return rules.AlertState(
        initialized=row["initialized"], fingerprints=rules.unpack_fingerprints(row["fingerprints"]),
        snapshot=row["snapshot"], condition_state=row["condition_state"], pending_since=row["pending_since"],
        firing_incident_id=row["firing_incident_id"], last_notified_at=row["last_notified_at"],
        cooldown_until=row["cooldown_until"], digest=row["digest"], consecutive_errors=row["consecutive_errors"],
        error_notified=row["error_notified"],
    )


def state_to_row(state: rules.AlertState, config_version: int, row_count: int | None,
                 prior_row: dict | None = None, prior_fingerprints: frozenset[bytes] | None = None) -> dict:
    """The alert_state columns for a state (the stored fingerprints are reused when the set is unchanged)."""
    packed = None
    if prior_row is not None and prior_row["fingerprints"] is not None:
        stored = bytes(prior_row["fingerprints"])
        if state.fingerprints == (prior_fingerprints if prior_fingerprints is not None
                                  else rules.unpack_fingerprints(stored)):
            packed = stored
    return {
        "config_version": config_version, "initialized": state.initialized,
        "fingerprints": packed if packed is not None else rules.pack_fingerprints(state.fingerprints),
        "row_count": row_count or 0,
        "snapshot": state.snapshot, "condition_state": state.condition_state, "pending_since": state.pending_since,
        "firing_incident_id": state.firing_incident_id, "last_notified_at": state.last_notified_at,
        "cooldown_until": state.cooldown_until, "digest": state.digest,
        "consecutive_errors": state.consecutive_errors, "error_notified": state.error_notified, "last_error": None,
    }


def _same_state(fields: dict, prior_row: dict | None) -> bool:
    """True when storing `fields` would change nothing (most evaluations that find nothing new)."""
    if prior_row is None:
        return False
    for name, value in fields.items():
        stored = prior_row.get(name)
        if name == "fingerprints":
            stored = bytes(stored) if stored is not None else None
        if value != stored:
            return False
    return True


INCIDENT_MAX_ROWS = 1_000
INCIDENT_MAX_VALUE_CHARS = 1_000


def _incident_data(notice: rules.Notice, decision: rules.Decision, is_state: bool) -> dict:
    """What an incident keeps: the rows that caused it (as objects under the original design's `new_rows` for
    change conditions, as lists under `rows` for state conditions) and the evaluation's summary; at most
    INCIDENT_MAX_ROWS rows with values cut at INCIDENT_MAX_VALUE_CHARS, saying so under `cut`."""
    data: dict = {"kind": notice.kind, "columns": notice.columns, "summary": decision.summary or {}}
    rows, values_cut = [], False
    for row in notice.rows[:INCIDENT_MAX_ROWS]:
        kept = [_kept_value(v) for v in row]
        values_cut = values_cut or any(k is not v for k, v in zip(kept, row))
        rows.append(kept)
    if is_state:
        data.update(rows=rows, row_count=len(notice.rows))
    else:
        data.update(new_rows=[dict(zip(notice.columns, r)) for r in rows], new_row_count=len(notice.rows))
    if len(rows) < len(notice.rows) or values_cut:
        data["cut"] = (f"… {len(rows):,} of {len(notice.rows):,} rows kept, values cut at "
                       f"{INCIDENT_MAX_VALUE_CHARS:,} characters")
    return data


def _kept_value(value):
    """A result value as an incident keeps it: text (and arrays or JSON, as text) cut when too long."""
    if isinstance(value, str):
        return notification.cut_text(value, INCIDENT_MAX_VALUE_CHARS)
    if isinstance(value, (list, dict)) and len(text := str(value)) > INCIDENT_MAX_VALUE_CHARS:
        return notification.cut_text(text, INCIDENT_MAX_VALUE_CHARS)
    return value
