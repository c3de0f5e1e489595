"""The alert engine's timing: the schedule thread, LISTEN loops, and a bounded worker pool that runs batches of
alerts with single-flight per alert. What an evaluation does is evaluation.py's."""

from __future__ import annotations

import heapq
import itertools
import logging
import math
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
import query_analysis
import rules
from cluster import Membership
from config import Settings
from evaluation import UNAVAILABLE_RETRY_SECONDS, Batch, Evaluator, Outcome, SourceHealth
from metrics import Metrics

logger = logging.getLogger(__name__)

# Event re-runs of one alert start at least this long after the previous evaluation's query began: a burst of
# commits costs a few evaluations, and the first event of a quiet period is still served at once.
EVENT_RERUN_SPACING_SECONDS = 0.1
# An incremental re-run costs what the new rows cost, not a scan of the table: it waits less, unless more than
# INCREMENTAL_BURST_CHANGES commits came while the last evaluation ran (a burst, gathered as a full re-run's is).
INCREMENTAL_RERUN_SPACING_SECONDS = 0.02
INCREMENTAL_BURST_CHANGES = 10
LISTENER_PING_SECONDS = 10.0
LISTENER_MAX_BACKOFF_SECONDS = 30.0
WAKEUP_CHECK_SECONDS = 1
# Alerts waiting on one data source are evaluated together, this many at most: one snapshot, one write.
BATCH_MAX_ALERTS = 50
# A query that has run this long hands the rest of its batch to another worker, and its alert runs in a batch of
# its own from then on: a slow query holds up only itself.
SLOW_QUERY_SECONDS = 0.25
HAND_OFF_CHECK_SECONDS = 0.05
# How often what alert queries depend on is looked up again in the data sources' catalogs (a change trigger
# dropped, a column renamed, a table made a hypertable: none of them fires a trigger). Until then a scheduled run
# may be skipped on what was true before.
STABILITY_CHECK_SECONDS = 5
# Changed rows the triggers logged are kept this long: an evaluation that comes later (a long backlog) runs the
# full query instead.
CHANGE_LOG_KEEP_SECONDS = 120
CHANGE_LOG_PRUNE_SECONDS = 30


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
    """One data source's share of the workers: how many drain its queue now, and the alerts waiting in it (alert,
    cause, whether its last query was slow)."""

    running: int = 0
    waiting: deque = field(default_factory=deque)
    # Catch-up evaluations (at start, after the listener reconnects) wait apart and take every other batch, so
    # thousands of them do not delay the events and scheduled runs that come meanwhile, nor starve under them.
    catching_up: deque = field(default_factory=deque)
    catch_up_turn: bool = False
    slow: int = 0  # how many waiting alerts (in either queue) are known to be slow

    def queued(self) -> int:
        return len(self.waiting) + len(self.catching_up)


@dataclass
class _Flight:
    """Single-flight bookkeeping of one alert: at most one evaluation runs, at most one more is pending."""

    running: bool = False
    pending: str | None = None
    # Monotonic times: when the running evaluation's query began, and when the last event arrived. An event that
    # arrived before the query began was committed before it, so its rows are already in that result.
    query_started: float = 0.0
    last_event: float = 0.0
    # When the evaluation now queued or running was asked for: while its query has not begun (query_started is
    # older), it will see everything committed so far.
    requested: float = 0.0
    # The logged changes (ids, in commit order) the next evaluation may be computed from instead of the full query;
    # None when something else asked for it (a schedule, a change that logged no rows), so it must run in full.
    deltas: list[int] | None = field(default_factory=list)
    # The first change notification no query has begun after yet, and the one the running evaluation answers:
    # how long after it that evaluation is stored is the commit-to-evaluation lag.
    unseen_change: float | None = None
    answering_change: float | None = None


_TOKENS = itertools.count()
_RESUME = -1  # heap token of a deferred event re-run (registered alerts have tokens from 0 up)


@dataclass
class _Registered:
    """What the scheduler keeps in memory about one active alert."""

    data_source_id: UUID
    tables: tuple[str, ...]
    schedule: rules.Schedule
    version: int = 0
    token: int = field(default_factory=lambda: next(_TOKENS))
    events_error: str | None = "not yet recorded"
    # What the query's result depends on (None: the stored query no longer parses), and why a scheduled run must
    # execute even when no watched table changed (None: it may be skipped then).
    dependencies: query_analysis.QueryDependencies | None = None
    stable_reason: str | None = "not yet checked"
    # When the queries of the last stored evaluation began (monotonic), if it succeeded under this registration.
    clean_since: float | None = None
    slow: bool = False
    # Whether the query could be computed from the rows a statement changed (its shape, from the parser), and the
    # table whose logged rows it is computed from once the catalog agreed (None: always the full query).
    delta_form: query_analysis.DeltaForm | str = "not yet checked"
    delta_table: str | None = None


@dataclass
class ListenerState:
    """What /health reports about one data source's listener."""

    connected: bool = False
    reconnects: int = 0
    last_error: str | None = None
    tables: set[str] = field(default_factory=set)
    disconnected_since: datetime | None = None
    up_since: float | None = None  # monotonic: connected without a break since then


class AlertScheduler:
    """Runs alerts on their schedule and on committed changes to the tables they read."""

    def __init__(
        self, pool: database.Pool, settings: Settings, *, sources: database.SourcePools,
        on_outbox: Callable[[], None] = lambda: None, metrics: Metrics | None = None,
    ) -> None:
        # Set by attach() when instances share the service database: then only the data sources this instance
        # owns are listened to and evaluated here. Without it, this process owns them all.
        self.membership: Membership | None = None
        self.pool = pool
        self.settings = settings
        self.sources = sources
        self.on_outbox = on_outbox
        self.metrics = metrics or Metrics()
        self._executor = _Workers(settings.workers, "evaluate")
        # Each data source runs at most WORKERS_PER_DATA_SOURCE evaluations at once; the rest wait in its queue
        # without holding a worker, so a source that hangs cannot take every worker from the others.
        self._shares: dict[UUID | None, _Share] = {}
        self._share_lock = threading.Lock()
        self.evaluator = Evaluator(pool, settings, sources=sources, stopping=self._stop_requested,
                                   on_outbox=on_outbox, metrics=self.metrics, fence=self._fence)
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
        # When a notification last said a table changed (monotonic), for deciding which scheduled runs to skip.
        self._table_changed: dict[tuple[UUID, str], float] = {}
        self.skipped_runs = 0
        self._covered_runs = 0  # scheduled runs an evaluation queued at the time answered
        self.skipped_catch_ups = 0
        self._batches: dict[Batch, UUID | None] = {}  # running batches and their data sources
        self._table_versions: dict[UUID, dict[str, str]] = {}  # per data source: each read table's definition
        self._stability_lock = threading.Lock()
        self._batches_lock = threading.Lock()
        self._waiters: dict[UUID, list[threading.Event]] = {}
        # One-off evaluations an alert asked for: the end of a `for`, a `repeat_every` or a cooldown.
        self._wakeups: dict[UUID, datetime] = {}
        self._history_hypertable = False
        # Alert changes, trigger DDL and listener start/stop happen one at a time.
        self._change_lock = threading.RLock()

    # --- life cycle ------------------------------------------------------------------------------------------

    def attach(self, membership: Membership) -> None:
        """Share the work with the other instances on the service database (before start)."""
        self.membership = membership

    def _holds(self, source_id: UUID | None) -> bool:
        """Whether this instance evaluates the data source's alerts now."""
        return self.membership is None or (source_id is not None and self.membership.holds(source_id) is not None)

    def _fence(self) -> tuple[UUID, dict[UUID, int]] | None:
        """What an evaluation's store checks in its transaction: this instance and the epochs it holds."""
        if self.membership is None:
            return None
        return self.membership.instance_id, self.membership.owned()

    def start(self) -> None:
        """Register every active alert and start the schedule thread; without a membership, also start listeners
        and evaluate each alert once (with one, that happens per data source as this instance takes it)."""
        with self.pool.transaction() as cur:
            alerts = database.list_active_alerts(cur)
        with self._change_lock:
            for alert in alerts:
                try:
                    self._register(alert)
                except rules.RuleError as exc:
                    # One unusable stored alert must not keep every other alert from running.
                    logger.error("alert %s (%s) not scheduled: %s", alert["name"], alert["id"], exc)
            if self.membership is None:
                for source_id in {a["data_source_id"] for a in alerts}:
                    self._sync_source(source_id)
        self._history_hypertable = database.setup_evaluation_retention(
            self.pool, days=self.settings.evaluation_retention_days)
        self._guarded(self._prune_history)
        self._schedule.every(WAKEUP_CHECK_SECONDS).seconds.do(self._guarded, self._run_wakeups)
        self._schedule.every(STABILITY_CHECK_SECONDS).seconds.do(
            self._guarded, self._executor.submit, self._guarded, self._check_all_stability)
        # The DELETEs run on a worker: the schedule thread only hands work out.
        self._schedule.every(1).hours.do(self._guarded, self._executor.submit, self._guarded, self._prune_history)
        self._schedule.every(CHANGE_LOG_PRUNE_SECONDS).seconds.do(
            self._guarded, self._executor.submit, self._guarded, self._prune_changes)
        self._thread = threading.Thread(target=self._schedule_loop, name="schedule", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch_batches, name="batch-watch", daemon=True).start()
        if self.membership is None:
            self._catch_up_alerts(alerts)
        logger.info("scheduler started with %d active alert(s)", len(alerts))

    def _catch_up_alerts(self, alerts: list[dict]) -> None:
        """Evaluate alerts once as their data source's work starts here. Rows written while nobody evaluated them
        are found here; only the difference is sent. An alert whose result depends on nothing that can change (no
        table, no clock) and was stored under its current version needs no catch-up. (Without a record of changes
        made while nobody watched, every alert that reads a table is evaluated.)"""
        catch_up = []
        with self._state_lock:
            for alert in alerts:
                entry = self._registered.get(alert["id"])
                if (entry is not None and not entry.tables and entry.stable_reason is None
                        and alert["state_version"] == alert["version"] and alert["state_clean"]):
                    entry.clean_since = float("-inf")
                else:
                    catch_up.append(alert["id"])
        self.skipped_catch_ups += len(alerts) - len(catch_up)
        self.submit_many(catch_up, "catch_up")

    # --- data sources changing hands between instances ---------------------------------------------------------

    def source_acquired(self, source_id: UUID, epoch: int, starting: bool) -> None:
        """This instance now owns the data source: install its triggers, listen, and evaluate its alerts once.
        At start-up this happens before start-up ends; on a takeover, in a thread of its own, so a data source
        that hangs cannot hold up the lease or the other sources."""
        if starting:
            self._start_source(source_id)
        else:
            threading.Thread(target=self._guarded, args=(self._start_source, source_id),
                             name=f"acquire-{source_id}", daemon=True).start()

    def _start_source(self, source_id: UUID) -> None:
        with self._change_lock:
            if not self._holds(source_id):
                return
            with self._state_lock:
                used = any(e.data_source_id == source_id for e in self._registered.values())
            if used:  # a data source no alert reads is not even connected to
                self._sync_source(source_id)
        with self.pool.transaction() as cur:
            alerts = database.list_active_alerts(cur, data_source_id=source_id)
        self._catch_up_alerts(alerts)
        logger.info("data source %s: work started, %d alert(s)", source_id, len(alerts))

    def source_released(self, source_id: UUID, wait: float) -> None:
        """This instance no longer owns the data source: stop listening, let its running evaluations finish for
        up to `wait` seconds (what is still running then is refused at its store by the new epoch), and forget
        what later evaluations here would have built on."""
        with self._change_lock:
            self._stop_listener(source_id)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self._batches_lock:
                if source_id not in self._batches.values():
                    break
            time.sleep(0.02)
        with self._state_lock:
            alert_ids = [a for a, e in self._registered.items() if e.data_source_id == source_id]
        self.evaluator.forget_baselines(alert_ids)

    def peer_message(self, kind: str, ids: list[str]) -> None:
        """Another instance changed something or asks for something (see Membership.publish)."""
        if kind == "alerts":
            self.alerts_changed([UUID(i) for i in ids], from_peer=True)
        elif kind == "source":
            for source_id in ids:
                self.data_source_changed(UUID(source_id), from_peer=True)
        elif kind == "run":
            alert_ids = [UUID(i) for i in ids]
            with self._state_lock:
                owned = [a for a in alert_ids if a in self._registered
                         and self._holds(self._registered[a].data_source_id)]
            self.submit_many(owned, "manual")
        elif kind == "resync":
            self.resync()

    def resync(self) -> None:
        """Apply alert changes this instance was not told about (the stored versions differ from those registered)."""
        with self.pool.transaction() as cur:
            stored = database.active_alert_versions(cur)
        with self._state_lock:
            registered = {a: e.version for a, e in self._registered.items()}
        changed = [a for a in set(stored) | set(registered) if stored.get(a) != registered.get(a)]
        if changed:
            logger.info("%d alert(s) changed without this instance being told; applying", len(changed))
            self.alerts_changed(changed, from_peer=True)

    def _stop_requested(self) -> bool:
        return self._stop.is_set()

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
        self.alerts_changed([alert_id])

    def alerts_changed(self, alert_ids, cause: str = "manual", *, from_peer: bool = False) -> None:
        """Apply created, updated, paused, resumed or deleted alerts at once, each data source synced once (and
        tell the other instances, unless they told us)."""
        alert_ids = list(alert_ids)
        if self.membership is not None and not from_peer and alert_ids:
            self.membership.publish("alerts", alert_ids)
        active = []
        with self._change_lock:
            touched: set[UUID] = set()
            for alert_id in alert_ids:
                # Read under the lock, so two quick changes apply in order and the newest one wins.
                with self.pool.transaction() as cur:
                    alert = database.get_alert(cur, alert_id=alert_id)
                with self._state_lock:
                    old = self._unregister(alert_id)
                if old is not None:
                    touched.add(old.data_source_id)
                if alert is not None and alert["status"] == "ACTIVE":
                    try:
                        self._register(alert)
                    except rules.RuleError as exc:
                        logger.error("alert %s (%s) not scheduled: %s", alert["name"], alert["id"], exc)
                        continue
                    touched.add(alert["data_source_id"])
                    active.append(alert_id)
            for source_id in touched:
                if self.membership is not None and not self._holds(source_id):
                    # A data source nobody holds yet (just created) is taken here, if it belongs here, so its
                    # triggers exist before the API answers.
                    self.membership.claim(source_id)
                self._sync_source(source_id)
        self.submit_many(active, cause)

    def data_source_changed(self, data_source_id: UUID, *, from_peer: bool = False) -> None:
        """Reconnect to a data source whose connection changed (or let go of a deleted one): its triggers leave the
        database it read, its listener and pools start again from the stored row, and its alerts are evaluated
        once, as events sent meanwhile may have been missed."""
        if self.membership is not None and not from_peer:
            self.membership.publish("source", [data_source_id])
        with self._change_lock:
            with self._state_lock:
                alert_ids = [a for a, e in self._registered.items() if e.data_source_id == data_source_id]
                for alert_id in alert_ids:
                    self._unregister(alert_id)
            # With none of its alerts registered, this removes the triggers only they needed and stops the listener.
            self._sync_source(data_source_id)
            self._stop_listener(data_source_id)
            self.sources.forget(data_source_id)
            self._table_versions.pop(data_source_id, None)
            self.evaluator.source_health.pop(data_source_id, None)
            # Their last results' snapshots were of the database the source read before: nothing builds on them.
            self.evaluator.forget_baselines(alert_ids)
        self.alerts_changed(alert_ids, cause="catch_up", from_peer=True)

    def _register(self, alert: dict) -> None:
        alert_id = alert["id"]
        parsed = rules.parse_schedule(alert["schedule"])
        entry = _Registered(data_source_id=alert["data_source_id"], tables=tuple(alert["watched_tables"] or ()),
                            schedule=parsed, version=alert["version"])
        try:
            entry.dependencies = query_analysis.dependencies(alert["query"])
            if not (entry.dependencies.relations or entry.dependencies.functions):
                # Nothing to look up: decided here (SELECT 1 is stable, CURRENT_TIMESTAMP is not).
                entry.stable_reason = next(iter(entry.dependencies.time_dependent), None)
        except query_analysis.QueryRejected as exc:
            entry.stable_reason = f"the query does not parse: {exc}"
        entry.delta_form = _delta_form(alert, self.settings)
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
        keep a listener running exactly while some alert there is event-driven. Only the data source's owner
        does this; another instance leaves its triggers and listener to it."""
        if not self._holds(source_id):
            self._stop_listener(source_id)
            return
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
                # Tables some alert could be evaluated from the changed rows of also log those rows.
                capture = {t for e in self._registered.values() if e.data_source_id in same_database
                           and not isinstance(e.delta_form, str) for t in e.tables}
            errors = database.sync_triggers(self.sources.triggers(source_id), wanted=wanted_here, capture=capture)
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
        self._check_stability(source_id, with_triggers=wanted - set(errors))
        if wanted - set(errors):
            self._ensure_listener(source_id, wanted - set(errors))
        else:
            self._stop_listener(source_id)

    def _check_stability(self, source_id: UUID, *, with_triggers: set[str] | None = None) -> None:
        """Decide, for each alert on the data source whose query reads tables or calls functions, whether its
        result can change only when a watched table does (one catalog lookup for all of them)."""
        with self._state_lock:
            entries = [e for e in self._registered.values() if e.data_source_id == source_id
                       and e.dependencies is not None and (e.dependencies.relations or e.dependencies.functions)]
            if with_triggers is None:  # the tables as the last trigger sync left them
                here = [e for e in self._registered.values() if e.data_source_id == source_id]
                with_triggers = ({t for e in here for t in e.tables}
                                 - {t for e in here if e.events_error is not None for t in e.tables})
        if not entries:
            return
        try:
            facts = database.describe_dependencies(
                self.sources.get(source_id),
                relations=[(r.schema, r.name) for e in entries for r in e.dependencies.relations],
                functions=[f for e in entries for f in e.dependencies.functions])
        except database.DatabaseError as exc:
            reason = f"could not tell what the query depends on: {exc}"
            reasons = {id(e): reason for e in entries}
            delta_tables = {}
            redefined: set[str] = set()
            facts = {"tables": {}}
        else:
            versions = facts.pop("versions")
            delta_facts = {"delta_tables": facts.pop("delta_tables"), "delta_functions": facts.pop("delta_functions")}
            before = self._table_versions.get(source_id, {})
            redefined = {key for key, version in versions.items() if before.get(key, version) != version}
            self._table_versions[source_id] = versions
            reasons = {id(e): query_analysis.stable_reason(e.dependencies, watched_tables_with_triggers=with_triggers,
                                                           **facts) for e in entries}
            delta_tables = {id(e): query_analysis.delta_table(
                e.dependencies, e.delta_form, tables=facts["tables"], functions=facts["functions"], **delta_facts)[0]
                for e in entries}
        with self._state_lock:
            for entry in entries:
                entry.stable_reason = reasons[id(entry)]
                entry.delta_table = delta_tables.get(id(entry))
                if redefined & set(entry.tables) or any(facts["tables"].get((r.schema, r.name)) in redefined
                                                        for r in entry.dependencies.relations):
                    entry.clean_since = None  # its stored result says nothing about the table as it is now

    def _prune_changes(self) -> None:
        """Forget changed rows logged long ago on every answering data source whose tables log them."""
        with self._state_lock:
            sources = {e.data_source_id for e in self._registered.values() if not isinstance(e.delta_form, str)
                       and self._holds(e.data_source_id)}
        health = dict(self.evaluator.source_health)
        for source_id in sources:
            if health.get(source_id, SourceHealth()).not_answering_since is not None:
                continue
            try:
                database.prune_changes(self.sources.triggers(source_id), older_than_seconds=CHANGE_LOG_KEEP_SECONDS)
            except database.DatabaseError as exc:
                logger.info("could not prune the changed rows logged on data source %s: %s", source_id, exc)

    def _check_all_stability(self) -> None:
        """The catalog can change under a running service (a trigger disabled, a table made a hypertable): look
        again now and then. One look at a time, and none at a data source that does not answer, so these looks
        never hold more than one worker."""
        if not self._stability_lock.acquire(blocking=False):
            return
        try:
            with self._state_lock:
                sources = {e.data_source_id for e in self._registered.values() if self._holds(e.data_source_id)}
            health = dict(self.evaluator.source_health)
            for source_id in sources:
                if health.get(source_id, SourceHealth()).not_answering_since is None:
                    self._guarded(self._check_stability, source_id)
        finally:
            self._stability_lock.release()

    # --- single flight and batches ---------------------------------------------------------------------------

    def submit(self, alert_id: UUID, cause: str) -> None:
        """Ask for an evaluation; if one is running, remember that one more is needed after it."""
        self.submit_many([alert_id], cause)

    def submit_many(self, alert_ids, cause: str, *, deltas: dict[UUID, list[int]] | None = None) -> None:
        """Ask for evaluations of several alerts at once (they can then share a batch). For an event, `deltas` has
        the logged changes each alert may be evaluated from; any other request makes the next evaluation a full one."""
        starting = []
        covered: set[UUID] = set()
        if self.membership is not None:
            # Another instance evaluates the alerts of the data sources it owns.
            with self._state_lock:
                alert_ids = [a for a in alert_ids if a in self._registered
                             and self._holds(self._registered[a].data_source_id)]
        now = time.monotonic()
        with self._flight_lock:
            for alert_id in alert_ids:
                flight = self._flights.setdefault(alert_id, _Flight())
                ids = deltas.get(alert_id) if deltas is not None and cause == "event" else None
                if ids is None:
                    flight.deltas = None
                elif flight.deltas is not None:
                    flight.deltas.extend(ids)
                if cause == "event":
                    flight.last_event = now
                    if flight.unseen_change is None:
                        flight.unseen_change = now
                if flight.running and cause == "schedule" and flight.query_started < flight.requested:
                    # Its evaluation is queued and has not begun: it will find what this run would.
                    self._covered_runs += 1
                    covered.add(alert_id)
                    continue
                if flight.running:
                    # An initial report or a config change outranks a plain event as the recorded cause.
                    if flight.pending is None or cause in ("manual", "catch_up"):
                        flight.pending = cause
                    continue
                flight.running, flight.requested = True, now
                starting.append((alert_id, cause))
        self._enqueue(starting)
        if covered:
            self._promote(covered)

    def _enqueue(self, flights: list[tuple[UUID, str]], *, draining: UUID | None = None,
                 front: bool = False) -> None:
        """Put flights (marked running) in their data source's queue and start workers to drain it, as many as
        its share allows and its queue needs. A flight stays marked running while it waits, so later requests
        join it as its pending re-run: nothing is lost."""
        # Whether each alert is known to be slow is read first: the share lock is never held while taking the
        # state lock (the schedule loop holds the state lock while it hands out work).
        by_source: dict[UUID | None, list] = {}
        with self._state_lock:
            for alert_id, cause in flights:
                entry = self._registered.get(alert_id)
                by_source.setdefault(entry.data_source_id if entry is not None else None, []).append(
                    (alert_id, cause, entry is not None and entry.slow))
        for source_id, items in by_source.items():
            with self._share_lock:
                share = self._shares.setdefault(source_id, _Share())
                for queue_, queued in ((share.catching_up, [i for i in items if i[1] == "catch_up"]),
                                       (share.waiting, [i for i in items if i[1] != "catch_up"])):
                    if front:
                        queue_.extendleft(reversed(queued))
                    else:
                        queue_.extend(queued)
                share.slow += sum(1 for item in items if item[2])
                if source_id == draining:
                    continue  # the worker that re-queued these goes on draining this queue
                starting = self._workers_wanted(share)
            for _ in range(starting):
                self._submit_to_worker(source_id)

    def _workers_wanted(self, share: _Share) -> int:
        """How many more workers to start on a share (share lock held), counted as taken."""
        # Running workers are busy with their batch: new ones take what waits now, a slow alert alone.
        wanted = share.slow + math.ceil((share.queued() - share.slow) / BATCH_MAX_ALERTS)
        starting = max(0, min(self.settings.workers_per_data_source - share.running, wanted))
        share.running += starting
        return starting

    def _promote(self, alert_ids: set[UUID]) -> None:
        """A scheduled run fell due for alerts whose catch-up still waits: that evaluation answers the run, so it
        moves to the queue of what is due now."""
        by_source: dict[UUID, set[UUID]] = {}
        with self._state_lock:
            for alert_id in alert_ids:
                if (entry := self._registered.get(alert_id)) is not None:
                    by_source.setdefault(entry.data_source_id, set()).add(alert_id)
        for source_id, ids in by_source.items():
            starting = 0
            with self._share_lock:
                share = self._shares.get(source_id)
                if share is None or not share.catching_up:
                    continue
                moving = [item for item in share.catching_up if item[0] in ids]
                if moving:
                    share.catching_up = deque(item for item in share.catching_up if item[0] not in ids)
                    share.waiting.extend(moving)
                    starting = self._workers_wanted(share)
            for _ in range(starting):
                self._submit_to_worker(source_id)

    def _submit_to_worker(self, source_id: UUID | None) -> None:
        try:
            self._executor.submit(self._drain, source_id)
        except RuntimeError:  # the workers are shut down: we are stopping
            with self._share_lock:
                self._shares[source_id].running -= 1

    def _drain(self, source_id: UUID | None) -> None:
        """Evaluate the data source's waiting alerts batch by batch until its queue is empty."""
        while True:
            with self._share_lock:
                share = self._shares[source_id]
                batch = [] if self._stop.is_set() else self._take_batch(share)
                if not batch:
                    share.running -= 1
                    return
            if not self._holds(source_id):
                # Given up while these waited: the new owner evaluates them as it takes the data source over, and
                # a run asked for here stops waiting for an evaluation that will not happen here.
                with self._flight_lock:
                    for alert_id, _ in batch:
                        flight = self._flights[alert_id]
                        flight.running, flight.pending, flight.deltas = False, None, None
                        for waiter in self._waiters.pop(alert_id, []):
                            waiter.set()
                continue
            try:
                self._fly(source_id, batch)
            except Exception:
                logger.exception("a batch of %d evaluation(s) failed", len(batch))
                # End their flights, so a later request evaluates them; not those waiting in a queue again.
                with self._share_lock:
                    queued = {item[0] for share in self._shares.values()
                              for item in (*share.waiting, *share.catching_up)}
                with self._flight_lock:
                    for alert_id, _ in batch:
                        if alert_id not in queued:
                            self._flights[alert_id].running = False
                            self._flights[alert_id].deltas = None

    @staticmethod
    def _take_batch(share: _Share) -> list[tuple[UUID, str]]:
        """Up to BATCH_MAX_ALERTS alerts from the front of the queue; an alert known to be slow goes alone."""
        batch: list[tuple[UUID, str]] = []
        taking = share.waiting
        if share.catching_up and (share.catch_up_turn or not share.waiting):
            taking = share.catching_up
        share.catch_up_turn = taking is share.waiting
        while taking and len(batch) < BATCH_MAX_ALERTS:
            alert_id, cause, slow = taking[0]
            if slow and batch:
                break
            taking.popleft()
            share.slow -= slow
            batch.append((alert_id, cause))
            if slow:
                break
        return batch

    def _began(self, alert_ids: list[UUID]) -> None:
        now = time.monotonic()
        with self._flight_lock:
            for alert_id in alert_ids:
                flight = self._flights.setdefault(alert_id, _Flight())
                flight.query_started = now
                if flight.answering_change is None:
                    flight.answering_change = flight.unseen_change
                flight.unseen_change = None

    def _fly(self, source_id: UUID | None, requests: list[tuple[UUID, str]]) -> None:
        batch = Batch(requests)
        taken: dict[UUID, list[int]] = {}
        with self._flight_lock:
            for alert_id, _ in requests:
                batch.waiters[alert_id] = self._waiters.pop(alert_id, [])  # answered by this evaluation
                flight = self._flights.get(alert_id)
                if flight is not None:
                    # This evaluation answers the changes logged so far; the next ones gather for the next.
                    if flight.deltas:
                        taken[alert_id] = flight.deltas
                    flight.deltas = []
        if taken:
            with self._state_lock:
                for alert_id, ids in taken.items():
                    entry = self._registered.get(alert_id)
                    # delta_table is set only for an alert whose delta_form is a DeltaForm.
                    if entry is not None and entry.delta_table is not None:
                        batch.deltas[alert_id] = (entry.delta_form, entry.delta_table, ids)
        with self._batches_lock:
            self._batches[batch] = source_id
        try:
            outcomes = self.evaluator.evaluate(batch, began=self._began)
        except database.DatabaseUnavailable as exc:  # the service's own database
            logger.warning("%d alert(s) not evaluated, retrying in %ss: %s", len(requests),
                           UNAVAILABLE_RETRY_SECONDS, exc)
            outcomes = {alert_id: Outcome(retry_in=UNAVAILABLE_RETRY_SECONDS) for alert_id, _ in requests}
        except Exception:
            logger.exception("evaluation of %d alert(s) failed", len(requests))
            outcomes = {}
        finally:
            with self._batches_lock:
                del self._batches[batch]
        with self._flight_lock:
            for alert_id, _ in batch.kept():
                if outcomes.get(alert_id, Outcome()).outcome is None:
                    # Nothing was stored: the changes it took, or the full evaluation it was asked for, are still
                    # owed, and only a full query can pay them.
                    self._flights[alert_id].deltas = None
        kept = batch.kept()
        with self._flight_lock:
            answered = [event for alert_id, _ in kept for event in batch.waiters.pop(alert_id, [])]
        for event in answered:
            event.set()
        again = []
        for alert_id, cause in kept:
            rerun = self._land(alert_id, cause, outcomes.get(alert_id, Outcome()))
            if rerun is not None:
                again.append((alert_id, rerun))
        # Re-runs go to the back of the queue: an alert that keeps firing must not keep the share to itself.
        self._enqueue(again, draining=source_id)

    def _watch_batches(self) -> None:
        """Hand the rest of a batch whose current query runs long to other workers (first in their queue)."""
        while not self._stop.wait(HAND_OFF_CHECK_SECONDS):
            with self._batches_lock:
                batches = list(self._batches.items())
            for batch, source_id in batches:
                if batch.running_for() > SLOW_QUERY_SECONDS:
                    rest = batch.hand_off()
                    with self._flight_lock:  # whoever waits for these waits for the batch that takes them now
                        for alert_id, _ in rest:
                            self._waiters.setdefault(alert_id, []).extend(batch.waiters.pop(alert_id, []))
                            # What this batch was to do for it (its logged changes, or a full evaluation) is
                            # left undone: the batch that takes it runs the full query.
                            self._flights[alert_id].deltas = None
                    if rest:
                        logger.info("a slow query holds a batch on data source %s: %d alert(s) handed to another "
                                    "worker", source_id, len(rest))
                        self._enqueue(rest, front=True)

    def _land(self, alert_id: UUID, cause: str, outcome: Outcome) -> str | None:
        """Apply one alert's outcome and end its flight; return the cause of a re-run to queue now, if any."""
        if outcome.retry_in is not None:
            self._set_wakeup(alert_id, datetime.now(timezone.utc) + timedelta(seconds=outcome.retry_in))
        elif outcome.outcome is not None and not outcome.keep_wakeup:
            self._set_wakeup(alert_id, outcome.wake_at)
        if outcome.outcome is not None:
            # Before the flight lock: the schedule loop takes the state lock first and the flight lock inside it.
            with self._flight_lock:
                flight = self._flights[alert_id]
                started, change = flight.query_started, None
                if outcome.outcome != "error":  # a failed query saw no change: the next one that runs answers it
                    change, flight.answering_change = flight.answering_change, None
            if change is not None:
                self.metrics.change_answered(time.monotonic() - change)
            self._mark_clean(alert_id, started if outcome.outcome != "error" else None,
                             slow=outcome.query_seconds > SLOW_QUERY_SECONDS)
        with self._flight_lock:
            flight = self._flights[alert_id]
            forced = outcome.again and flight.pending is None
            if forced:
                flight.pending = cause  # someone stored a newer result meanwhile: measure against that
            if flight.pending == "event" and not forced:
                if outcome.incremental:
                    if flight.deltas == []:
                        flight.pending = None  # the changes of every event so far were in the rows it took
                elif flight.last_event < flight.query_started:
                    flight.pending = None  # every event so far was committed before the query ran: no re-run
                    flight.deltas = []
            if flight.pending is None or self._stop.is_set():
                flight.running = False
                flight.pending = None
                return None
            incremental = outcome.incremental and 0 < len(flight.deltas or ()) <= INCREMENTAL_BURST_CHANGES
            resume_at = flight.query_started + (INCREMENTAL_RERUN_SPACING_SECONDS if incremental
                                                else EVENT_RERUN_SPACING_SECONDS)
            if flight.pending == "event" and time.monotonic() < resume_at:
                defer = True
            else:
                defer = False
                cause, flight.pending, flight.requested = flight.pending, None, time.monotonic()
        if defer:
            # A burst of commits: gather it for a moment instead of one evaluation per commit. The flight stays
            # running, so later events join the same re-run, and the worker is free meanwhile. (Taken after the
            # flight lock is released: the schedule loop takes these two locks the other way round.)
            with self._state_lock:
                heapq.heappush(self._due, (resume_at, _RESUME, alert_id))
            self._tick.set()
            return None
        return cause

    def _mark_clean(self, alert_id: UUID, since: float | None, *, slow: bool) -> None:
        with self._state_lock:
            entry = self._registered.get(alert_id)
            if entry is not None:
                entry.clean_since, entry.slow = since, slow

    def _resume(self, alert_ids: list[UUID]) -> None:
        """Start the deferred re-runs of flights that are still marked running (together: they can share a batch)."""
        resumed = []
        with self._flight_lock:
            for alert_id in alert_ids:
                flight = self._flights.get(alert_id)
                if flight is None or not flight.running or flight.pending is None:
                    continue
                resumed.append((alert_id, flight.pending))
                flight.pending, flight.requested = None, time.monotonic()
        self._enqueue(resumed)

    def run_now(self, alert_id: UUID, timeout: float) -> None:
        """Evaluate an alert now and wait for that evaluation to finish (on another instance when that one owns
        the alert's data source: then until its evaluation is recorded)."""
        with self._state_lock:
            entry = self._registered.get(alert_id)
        if self.membership is not None and entry is not None and not self._holds(entry.data_source_id):
            with self.pool.transaction() as cur:
                before = database.count_evaluations(cur, alert_id=alert_id)
            self.membership.publish("run", [alert_id])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not self._stop.is_set():
                time.sleep(0.05)
                with self.pool.transaction() as cur:
                    if database.count_evaluations(cur, alert_id=alert_id) > before:
                        return
            return
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
                    if self.membership is not None:
                        due = [a for a in due if self._holds(self._registered[a].data_source_id)]
                    ran = [alert_id for alert_id in due if not self._result_unchanged(alert_id)]
                    self.skipped_runs += len(due) - len(ran)
                    due = ran
                except Exception:
                    logger.exception("schedule loop error; continuing")
                waits = [1.0, self._schedule.idle_seconds or 1.0]
                if self._due:
                    waits.append(self._due[0][0] - time.monotonic())
            self._resume(resume)
            self.submit_many(due, "schedule")
            self._tick.wait(max(min(waits), 0.001))

    def _result_unchanged(self, alert_id: UUID) -> bool:
        """True when a scheduled run of the alert would find what its last evaluation stored (state lock held)."""
        entry = self._registered.get(alert_id)
        if entry is None:
            return False
        listener = self.listener_states.get(entry.data_source_id)
        return rules.result_unchanged(
            stable_reason=entry.stable_reason, clean_since=entry.clean_since, events_error=entry.events_error,
            tables=entry.tables, listener_up_since=listener.up_since if listener is not None else None,
            last_changes=[self._table_changed.get((entry.data_source_id, table)) for table in entry.tables])

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
                state.up_since = time.monotonic()
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
                        changes = _changes_by_table([n.payload for n in conn.notifies])
                        conn.notifies.clear()
                        self._on_tables_changed(source_id, changes)
            except (psycopg2.Error, database.DatabaseError, OSError) as exc:
                state.connected, state.up_since = False, None
                state.last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if state.disconnected_since is None:
                    state.disconnected_since = datetime.now(timezone.utc)
                logger.warning("listener for data source %s lost: %s; retrying in %.1fs",
                               source_id, state.last_error, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, LISTENER_MAX_BACKOFF_SECONDS)
            except Exception:
                state.connected, state.up_since = False, None
                logger.exception("listener for data source %s crashed; restarting", source_id)
                stop.wait(backoff)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except psycopg2.Error:
                        pass
        state.connected, state.up_since = False, None

    def _on_tables_changed(self, source_id: UUID, changes: dict[str, list[int] | None]) -> None:
        """Notifications arrived: `changes` has, per table, the ids of the changes logged with their rows, in
        commit order (None when a statement's rows were not logged)."""
        now = time.monotonic()
        deltas: dict[UUID, list[int]] = {}
        with self._state_lock:
            for table in changes:
                self._table_changed[(source_id, table)] = now
            alert_ids = set().union(*(self._by_table.get((source_id, t), set()) for t in changes)) if changes else set()
            for alert_id in alert_ids:
                entry = self._registered.get(alert_id)
                ids = changes.get(entry.delta_table) if entry is not None and entry.delta_table else None
                if ids is not None and set(entry.tables) <= {entry.delta_table}:
                    deltas[alert_id] = ids
        self.submit_many(alert_ids, "event", deltas=deltas)

    def _catch_up(self, source_id: UUID) -> None:
        """Notifications sent while the listener was away are gone: evaluate every event-driven alert there."""
        with self._state_lock:
            alert_ids = [a for a, e in self._registered.items() if e.data_source_id == source_id and e.tables]
        self.submit_many(alert_ids, "catch_up")

    def status(self) -> dict:
        """The scheduler's state for /health, from memory only: it never waits for a data source."""
        with self._state_lock:
            active = len(self._registered)
            sources = {e.data_source_id for e in self._registered.values()}
        listeners = dict(self.listener_states)
        with self._share_lock:
            shares = {key: (share.running, share.queued()) for key, share in self._shares.items()}
        data_sources = {}
        source_health = dict(self.evaluator.source_health)
        for source_id in sorted(sources | set(source_health) | set(listeners), key=str):
            health = source_health.get(source_id, SourceHealth())
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
            "owned_alerts": sum(1 for e in list(self._registered.values()) if self._holds(e.data_source_id)),
            "skipped_scheduled_runs": self.skipped_runs + self._covered_runs,
            "skipped_catch_ups": self.skipped_catch_ups,
            "incremental_evaluations": self.evaluator.incremental_evaluations,
            "incremental_fallbacks": self.evaluator.incremental_fallbacks,
            "data_sources": data_sources,
            "listeners": {
                str(source_id): {"connected": s.connected, "reconnects": s.reconnects, "last_error": s.last_error,
                                 "disconnected_since": s.disconnected_since.isoformat() if s.disconnected_since
                                 else None, "watched_tables": sorted(s.tables)}
                for source_id, s in listeners.items()
            },
        }


def _changes_by_table(payloads: list[str]) -> dict[str, list[int] | None]:
    """Notification payloads (`schema.table`, followed by ` <id>` when the statement's rows were logged) as the
    ids logged per table, in order; None for a table when one of its statements logged no rows."""
    changes: dict[str, list[int] | None] = {}
    for payload in payloads:
        table, change = database.parse_notification(payload)
        known = changes.setdefault(table, [])
        if known is not None:
            changes[table] = None if change is None else known + [change]
    return changes


def _delta_form(alert: dict, settings: Settings) -> query_analysis.DeltaForm | str:
    """Whether the alert could be evaluated from the rows statements changed, as far as its text says."""
    if not settings.incremental_evaluation:
        return "incremental evaluation is switched off (INCREMENTAL_EVALUATION)"
    try:
        condition = rules.parse_condition(alert["condition"])
    except rules.RuleError as exc:
        return str(exc)
    if condition.type != "new_rows":
        return f"the condition is {condition.type}: only new_rows is decided by the added rows alone"
    return query_analysis.delta_form(alert["query"])


def _events_error(tables: tuple[str, ...], errors: dict[str, str]) -> str | None:
    if not tables:
        return "the query reads no table, so only the schedule runs it"
    failed = [f"{table}: {errors[table]}" for table in tables if table in errors]
    if not failed:
        return None
    return "no change trigger on " + "; ".join(failed) + " (the schedule still runs the alert)"
