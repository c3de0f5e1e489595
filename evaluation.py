"""What an evaluation does: run the queries of a batch of alerts on one data source in one snapshot, decide what
each result means, render the messages, and store every decision of the batch in one transaction. The scheduler
decides when; dry runs come here directly from the API."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence
from uuid import UUID

import database
import notification
import query_analysis
import rules
from config import Settings
from metrics import Metrics

logger = logging.getLogger(__name__)

DRY_RUN_ROWS = 100
# A dry run waits this long for one of the DRY_RUN_WORKERS slots before the request is turned away (429).
DRY_RUN_QUEUE_SECONDS = 5.0
# A batch that could not reach the service's own database is tried again after this long.
UNAVAILABLE_RETRY_SECONDS = 5
INCIDENT_MAX_ROWS = 1_000
INCIDENT_MAX_VALUE_CHARS = 1_000


class DryRunsBusy(Exception):
    """Every dry-run slot is taken."""


@dataclass
class SourceHealth:
    """Whether a data source answers, as evaluations saw it last."""

    not_answering_since: datetime | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What became of one alert in a batch. `outcome` is None when nothing was stored: the alert is gone or paused,
    changed meanwhile, the service database did not answer (`retry_in`), someone stored a newer result (`again`),
    or the service is stopping."""

    outcome: str | None = None
    wake_at: datetime | None = None  # the one-off evaluation the decision asks for (a `for`, repeat or cooldown)
    keep_wakeup: bool = True  # a failed run leaves the pending wake-up as it was
    retry_in: float | None = None
    again: bool = False
    query_seconds: float = 0.0
    # Evaluated from logged rows, not in a snapshot: events that came while it ran are not in its result.
    incremental: bool = False


class Batch:
    """The alerts a worker evaluates together, in the order their queries run. While one query runs, the alerts
    after it can be handed to another worker (`hand_off`), so a query that turns out slow holds up only itself."""

    def __init__(self, requests: Sequence[tuple[UUID, str]]) -> None:
        self.requests = list(requests)
        self._lock = threading.Lock()
        self._order: list[UUID] = []
        self._next = 0  # position in _order of the next query to start
        self._running_since: float | None = None
        self._handed: set[UUID] = set()
        self.waiters: dict[UUID, list[threading.Event]] = {}  # run-now callers this batch answers (scheduler's)
        # For alerts that may be evaluated from the changes logged on their table instead of their full query: the
        # query's DeltaForm (as the scheduler parsed it when the alert was registered), the table's key and the
        # changes' ids, in commit order.
        self.deltas: dict[UUID, tuple[query_analysis.DeltaForm, str, list[int]]] = {}

    def plan(self, alert_ids: list[UUID]) -> None:
        """The order the queries will run in, by the alert each is for (an alert may have two in a row; alerts
        without a query to run are not in it)."""
        with self._lock:
            self._order = [alert_id for alert_id in alert_ids if alert_id not in self._handed]

    def proceed(self, position: int) -> bool:
        """Called before each query: False once that query (and every later one) was handed off."""
        with self._lock:
            if position >= len(self._order) or self._order[position] in self._handed:
                self._running_since = None
                return False
            self._next, self._running_since = position + 1, time.monotonic()
            return True

    def running_for(self) -> float:
        """How long the query in progress has been running (0 when none is)."""
        with self._lock:
            return 0.0 if self._running_since is None else time.monotonic() - self._running_since

    def hand_off(self) -> list[tuple[UUID, str]]:
        """Take away the alerts whose queries have not started; this batch will not evaluate them."""
        with self._lock:
            rest = list(dict.fromkeys(a for a in self._order[self._next:] if a not in self._handed))
            if self._next and rest and self._order[self._next - 1] == rest[0]:
                rest.pop(0)  # its first query runs now: it stays in this batch
            self._handed.update(rest)
            causes = dict(self.requests)
            return [(alert_id, causes[alert_id]) for alert_id in rest]

    def close(self) -> set[UUID]:
        """The queries are over: nothing can be handed off any more. Returns the alerts that were."""
        with self._lock:
            self._next, self._running_since = len(self._order), None
            return set(self._handed)

    def kept(self) -> list[tuple[UUID, str]]:
        """The requests this batch is answerable for (all but those handed off)."""
        with self._lock:
            return [(alert_id, cause) for alert_id, cause in self.requests if alert_id not in self._handed]


@dataclass
class _Job:
    """One alert of a batch on its way from query to stored decision."""

    alert: dict
    row: dict | None
    prior: rules.AlertState | None
    cause: str
    condition: rules.Condition | None = None
    result: tuple | str | None = None  # the checked result, or the error as text
    seconds: float = 0.0  # the query's own time
    # An incremental evaluation: the rows the logged statements added and removed, the result's size once they
    # are applied, and the queries that run over them (whose answers replace the full query's).
    delta: _Delta | None = None
    snapshot: str | None = None  # the snapshot a full query ran in
    decision: rules.Decision | None = None
    rendered: list[notification.Rendered] = field(default_factory=list)


@dataclass
class _Delta:
    """The logged changes an alert is evaluated from: the text of the arrays of rows they added and removed."""

    added: str
    removed: str
    table: str = ""
    shapes: frozenset[str | None] = frozenset()  # the table's pg_class version when each change was logged
    row_count: int = 0  # the full result's size once applied
    needs_full: bool = False  # the rows did not decide alone: the full query must


@dataclass
class _Writes:
    """Everything a batch stores, written with one statement per table."""

    resolved: list[tuple[UUID, UUID]] = field(default_factory=list)  # (incident, alert)
    incidents: list[dict] = field(default_factory=list)
    activities: list[dict] = field(default_factory=list)
    notifications: list[dict] = field(default_factory=list)
    states: list[tuple[UUID, dict]] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


class Evaluator:
    """Evaluates batches of alerts and dry runs. Thread-safe: workers call it concurrently, one batch each."""

    def __init__(self, pool: database.Pool, settings: Settings, *, sources: database.SourcePools,
                 stopping: Callable[[], bool] = lambda: False, on_outbox: Callable[[], None] = lambda: None,
                 metrics: Metrics | None = None,
                 fence: Callable[[], tuple[UUID, dict[UUID, int]] | None] = lambda: None) -> None:
        self.pool = pool
        # This instance and the data sources it owns, with their epochs, as a batch begins: its store is refused
        # for a data source that changed hands meanwhile (None: one instance owns everything).
        self.fence = fence
        self.settings = settings
        self.sources = sources
        self.stopping = stopping
        self.on_outbox = on_outbox
        self.metrics = metrics or Metrics()
        self.source_health: dict[UUID, SourceHealth] = {}
        self._dry_runs = threading.BoundedSemaphore(settings.dry_run_workers)
        # For each alert whose stored result came from a full query run by this evaluator: (the alert's version, the
        # snapshot that query ran in). Incremental evaluations build on it; anything else that happens to the alert
        # (an error, a newer result stored elsewhere, a changed alert) drops it, so the next run is a full one.
        self._baselines: dict[UUID, tuple[int, str]] = {}
        self._baselines_lock = threading.Lock()
        # Evaluations computed from logged rows, and those whose rows could not decide alone (for /health).
        self.incremental_evaluations = 0
        self.incremental_fallbacks = 0

    # --- batches ---------------------------------------------------------------------------------------------

    def evaluate(self, batch: Batch | Sequence[tuple[UUID, str]], *,
                 began: Callable[[list[UUID]], None] = lambda ids: None) -> dict[UUID, Outcome]:
        """Evaluate alerts together: their queries in one snapshot per data source, then one write transaction.
        `began` is called with the alerts whose queries are about to run, before the snapshot is taken. Alerts
        handed off while the batch runs are left out of the outcomes."""
        batch = batch if isinstance(batch, Batch) else Batch(batch)
        fence = self.fence()
        started_at = datetime.now(timezone.utc)
        causes = dict(batch.requests)
        outcomes = {alert_id: Outcome() for alert_id in causes}
        with self.pool.transaction() as cur:
            loaded = database.get_alerts_with_state(cur, alert_ids=list(causes))
        jobs = []
        for alert_id, (alert, row) in loaded.items():
            if alert["status"] != "ACTIVE":
                continue
            prior = state_from_row(row)
            cause = "initial" if prior is None or not prior.initialized else causes[alert_id]
            jobs.append(_Job(alert=alert, row=row, prior=prior, cause=cause))
        if not jobs:
            return outcomes
        began([job.alert["id"] for job in jobs])
        now = datetime.now(timezone.utc)
        by_source: dict[UUID, list[_Job]] = {}
        for job in jobs:
            try:
                job.condition = rules.parse_condition(job.alert["condition"])  # parsed once per evaluation
                by_source.setdefault(job.alert["data_source_id"], []).append(job)
            except rules.RuleError as exc:
                job.result = str(exc)
        planned = {source_id: self._plan_queries(source_id, source_jobs, batch.deltas)
                   for source_id, source_jobs in by_source.items()}
        batch.plan([job.alert["id"] for items in planned.values() for job, _, _ in items])
        offset = 0
        for source_id, items in planned.items():
            self._run_queries(source_id, items, proceed=lambda i, base=offset: batch.proceed(base + i))
            offset += len(items)
        handed = batch.close()
        for source_id, source_jobs in by_source.items():
            # Logged rows that could not decide alone (an error over them, a removed row that was in the result,
            # a table altered since or no longer wholly readable): the full query, in a snapshot of its own.
            again = [job for job in source_jobs if job.delta is not None and job.delta.needs_full
                     and job.alert["id"] not in handed]
            self.incremental_fallbacks += len(again)  # a statistic: a lost update under a race is harmless
            for job in again:
                job.delta, job.seconds = None, 0.0
            if again:
                self._run_queries(source_id, [(job, job.alert["query"], "full") for job in again])
        for alert_id in handed:
            outcomes.pop(alert_id, None)
        jobs = [job for job in jobs if job.alert["id"] not in handed]
        if self.stopping():
            return outcomes  # interrupted by shutdown: not the data source's failure, so nothing is recorded
        decided = []
        for job in jobs:
            job.decision = self._decide(job, now=now, error_notify_after=self.settings.error_notify_after)
            if isinstance(job.result, str):
                logger.warning("alert %s (%s) failed to evaluate: %s", job.alert["name"], job.alert["id"],
                               job.result)
            # Rendered before the transaction: a slow template must not hold the alerts' row locks.
            job.rendered = [notification.render_message(alert=job.alert, notice=notice)
                            for notice in job.decision.notices]
            decided.append(job)
        if self.stopping() or not decided:
            return outcomes  # a template render cut short by the shutdown is no message to store
        try:
            queued = self._store_batch(decided, outcomes, started_at=started_at, now=now, fence=fence)
        finally:
            self._note_baselines(jobs, outcomes)
        if queued:
            self.on_outbox()
        return outcomes

    def _plan_queries(self, source_id: UUID, jobs: list[_Job],
                      deltas: dict[UUID, tuple[query_analysis.DeltaForm, str, list[int]]]
                      ) -> list[tuple[_Job, str | database.DeltaQuery, str]]:
        """The queries to run for the jobs, in order: each alert's own query, or, for an alert that can be evaluated
        from the changes logged since its last result, its query over the rows they added (and, when they removed
        rows, over those too, to find out whether any was in the result)."""
        wanted = {job.alert["id"]: deltas[job.alert["id"]] for job in jobs
                  if job.alert["id"] in deltas and self._can_build_on(job)}
        changes: dict[int, dict] = {}
        if wanted:
            try:
                changes = database.read_changes(self.sources.triggers(source_id),
                                                ids=sorted({i for _, _, ids in wanted.values() for i in ids}))
            except database.DatabaseError as exc:
                logger.info("logged changes on data source %s could not be read (evaluating in full): %s",
                            source_id, exc)
        planned: list[tuple[_Job, str | database.DeltaQuery, str]] = []
        for job in jobs:
            form, key, ids = wanted.get(job.alert["id"], (None, None, None))
            delta = None
            if key is not None:
                delta = _delta(ids, changes, key, self._baselines[job.alert["id"]][1])
                if delta is not None and job.prior.digest and delta.added == "{}":
                    delta = None  # a digest due now is sent with the query's columns: the full query gives them
            if delta is None:
                planned.append((job, job.alert["query"], "full"))
                continue
            job.delta, delta.row_count = delta, job.row["row_count"]
            self.incremental_evaluations += 1
            job.result = ([], [], False, None)  # nothing added, until the query over the added rows says otherwise
            text = form.query(key)
            if delta.added != "{}":
                planned.append((job, database.DeltaQuery(text, delta.added), "added"))
            if delta.removed != "{}":
                planned.append((job, database.DeltaQuery(text, delta.removed), "removed"))
        return planned

    def _can_build_on(self, job: _Job) -> bool:
        """Whether the alert's stored result is one this evaluator computed, and a new_rows one an incremental
        evaluation can add to."""
        baseline = self._baselines.get(job.alert["id"])
        return (baseline is not None and baseline[0] == job.alert["version"] and job.row is not None
                and job.prior is not None and job.prior.initialized and not job.prior.error_notified
                and job.condition is not None and job.condition.type == "new_rows")

    def _run_queries(self, source_id: UUID, items: list[tuple[_Job, str | database.DeltaQuery, str]], *,
                     proceed: Callable[[int], bool] | None = None) -> None:
        """Run the queries on their data source in one snapshot and put each result (or error) on its job. Over
        removed rows, a query only says whether any of them was in the result (then the job needs its full query)."""
        snapshot: list[str] = []
        # What the queries' own snapshot says of the tables whose logged rows they read.
        tables: dict[str, dict] = {job.delta.table: {} for job, _, kind in items if kind != "full"}
        results = self._query(source_id, [query for _, query, _ in items], for_api=False, proceed=proceed,
                              snapshot=snapshot, tables=tables)
        for (job, _, kind), (result, seconds) in zip(items, results):
            job.seconds += seconds
            if kind != "full" and job.delta is None:
                continue  # an earlier query of the job lost the connection: it ended as that error
            if kind != "full" and not _rows_still_read_alike(job.delta, tables):
                job.delta.needs_full = True
                continue
            if kind == "full":
                job.snapshot = snapshot[0] if snapshot else None
                job.result = self._checked(job.alert, job.condition, result)
            elif isinstance(result, database.DatabaseUnavailable):
                job.delta, job.result = None, str(result)  # as the full query would have ended
            elif isinstance(result, database.DatabaseError) or result[2] or (kind == "removed" and result[1]):
                job.delta.needs_full = True  # the rows alone do not decide (an error over them, a removed row)
            elif kind == "added":
                job.result = self._checked(job.alert, job.condition, result)
                job.delta.row_count += len(result[1])

    def _query(self, source_id: UUID, queries: list[str | database.DeltaQuery], *, for_api: bool,
               proceed: Callable[[int], bool] | None = None, snapshot: list[str] | None = None,
               tables: dict[str, dict] | None = None) -> list[tuple[object, float]]:
        """Each query's result or error, with the time it took (fewer when `proceed` said stop); records whether
        the data source answered."""
        try:
            results = database.run_queries(
                self.sources.get(source_id, for_api=for_api), queries=queries,
                timeout_seconds=self.settings.query_timeout_seconds, max_rows=self.settings.max_result_rows,
                max_bytes=self.settings.max_result_bytes, proceed=proceed, snapshot=snapshot, tables=tables)
        except database.DatabaseError as exc:  # no connection to the data source (or no such data source)
            results = [(exc if isinstance(exc, database.DatabaseUnavailable) else database.QueryFailed(str(exc)),
                        0.0)] * len(queries)
        lost = next((r for r, _ in results if isinstance(r, database.DatabaseUnavailable)), None)
        if lost is None:
            self._source_answered(source_id)  # it answered, possibly with an error
        elif not self.stopping():
            self._source_answered(source_id, str(lost))
        return results

    def _checked(self, alert: dict, condition: rules.Condition, result) -> tuple | str:
        """A query's result as the rules take it (columns, rows, whether cut, key positions), or the error as text."""
        if isinstance(result, database.DatabaseError):
            return str(result)
        columns, rows, truncated = result
        try:
            # `SELECT a.id, b.id` must keep both values in incidents, templates and messages.
            columns = rules.unique_columns(columns)
            rules.check_condition_columns(condition, columns)
            if truncated and condition.type in ("row_count", "threshold"):
                # Judging a count or a threshold on part of the result would be a guess.
                return (f"the result was cut at MAX_RESULT_ROWS ({self.settings.max_result_rows} rows) or "
                        f"MAX_RESULT_BYTES ({self.settings.max_result_bytes} bytes) and {condition.type} needs "
                        "every row: aggregate in the query or raise the limit")
            return columns, rows, truncated, rules.key_indexes(columns, alert["key_columns"])
        except rules.RuleError as exc:
            return str(exc)

    @staticmethod
    def _decide(job: _Job, *, now: datetime, error_notify_after: int) -> rules.Decision:
        if isinstance(job.result, str):
            return rules.decide_error(prior=job.prior, error=job.result, error_notify_after=error_notify_after)
        columns, rows, truncated, keys = job.result
        if job.delta is not None:
            return rules.decide_added(condition=job.condition, prior=job.prior, columns=columns, rows=rows,
                                      keys=keys, now=now)
        return rules.decide(condition=job.condition, prior=job.prior, columns=columns, rows=rows, keys=keys,
                            now=now, truncated=truncated)

    def _store_batch(self, jobs: list[_Job], outcomes: dict[UUID, Outcome], *, started_at: datetime,
                     now: datetime, fence: tuple[UUID, dict[UUID, int]] | None = None) -> int:
        """Store the batch's decisions in one transaction; returns the notifications queued. When the batch cannot
        be stored whole (a bug, a constraint), each alert is stored on its own so one cannot hold up the rest."""
        try:
            with self.pool.transaction() as cur:
                queued = self._store_jobs(cur, jobs, outcomes, started_at=started_at, now=now, fence=fence)
            self._count(jobs, outcomes)
            return queued
        except database.DatabaseUnavailable:
            raise
        except Exception:
            if len(jobs) == 1:
                raise
            logger.exception("a batch of %d evaluations could not be stored together; storing each alone", len(jobs))
        queued = 0
        for job in jobs:
            try:
                with self.pool.transaction() as cur:
                    queued += self._store_jobs(cur, [job], outcomes, started_at=started_at, now=now, fence=fence)
                self._count([job], outcomes)
            except database.DatabaseUnavailable:
                raise
            except Exception:
                logger.exception("the evaluation of alert %s could not be stored", job.alert["id"])
        return queued

    def _count(self, jobs: list[_Job], outcomes: dict[UUID, Outcome]) -> None:
        """Count the evaluations a committed transaction stored."""
        for job in jobs:
            stored = outcomes.get(job.alert["id"])
            if stored is not None and stored.outcome is not None:
                self.metrics.evaluated(cause=job.cause, outcome=stored.outcome, seconds=job.seconds)

    def _store_jobs(self, cur, jobs: list[_Job], outcomes: dict[UUID, Outcome], *, started_at: datetime,
                    now: datetime, fence: tuple[UUID, dict[UUID, int]] | None = None) -> int:
        if fence is not None:
            # Checked in the transaction that stores, and held until it commits: an instance that lost a data
            # source (frozen past its lease, say) cannot store a decision the new owner makes too.
            instance_id, epochs = fence
            sources = {job.alert["data_source_id"] for job in jobs}
            held = database.held_sources(cur, instance_id=instance_id,
                                         epochs={s: epochs[s] for s in sources if s in epochs})
            refused = [job for job in jobs if job.alert["data_source_id"] not in held]
            if refused:
                logger.warning("%d evaluation(s) not stored: their data source changed hands while they ran",
                               len(refused))
                jobs = [job for job in jobs if job.alert["data_source_id"] in held]
        locked = database.lock_alert_versions(cur, alert_ids=[job.alert["id"] for job in jobs])
        recipients = _recipients(cur, [job.alert for job in jobs])
        writes = _Writes()
        stored: dict[UUID, Outcome] = {}
        for job in jobs:
            alert, decision = job.alert, job.decision
            version = locked.get(alert["id"])
            if version is None or version[:2] != (alert["version"], "ACTIVE"):
                continue  # changed, paused or deleted while we ran: the change queued a fresh evaluation
            if version[2] != (job.row["evaluated_at"] if job.row else None):
                stored[alert["id"]] = Outcome(again=True)  # someone stored a newer result: measure against that
                continue
            error = job.result if isinstance(job.result, str) else None
            row_count = None if error else job.delta.row_count if job.delta else len(job.result[1])
            _collect(writes, alert, decision, job.rendered, job.row, job.prior, now=now, error=error,
                     row_count=row_count, is_state=job.condition is not None and job.condition.is_state,
                     links=notification.Links(self.settings.public_base_url), recipients=recipients[alert["id"]])
            summary = decision.summary or {}
            writes.evaluations.append({
                "alert_config_id": alert["id"], "cause": job.cause, "started_at": started_at,
                "duration_ms": job.seconds * 1000, "row_count": row_count,
                "new_row_count": summary.get("triggering", summary.get("matching_rows")) if not error else None,
                "truncated": False if error else job.result[2], "outcome": decision.outcome, "error": error,
            })
            stored[alert["id"]] = Outcome(decision.outcome, wake_at=decision.wake_at,
                                          keep_wakeup=decision.outcome == "error", query_seconds=job.seconds,
                                          incremental=job.delta is not None)
            if decision.notices:
                logger.info("alert %s (%s): %s", alert["name"], alert["id"],
                            ", ".join(n.headline for n in decision.notices))
        database.store_evaluations(
            cur, resolved=writes.resolved, incidents=writes.incidents, activities=writes.activities,
            notifications=writes.notifications, states=writes.states, evaluations=writes.evaluations)
        outcomes.update(stored)  # only once the statements went through
        return len(writes.notifications)

    def forget_baselines(self, alert_ids: Sequence[UUID]) -> None:
        """The alerts' next evaluations run their full queries (their data source now reads another database)."""
        with self._baselines_lock:
            for alert_id in alert_ids:
                self._baselines.pop(alert_id, None)

    def _note_baselines(self, jobs: list[_Job], outcomes: dict[UUID, Outcome]) -> None:
        """Remember the snapshot of each stored full result, keep it under a stored incremental one, and forget
        it for every other alert of the batch."""
        with self._baselines_lock:
            for job in jobs:
                alert_id, outcome = job.alert["id"], outcomes.get(job.alert["id"], Outcome())
                if outcome.outcome in (None, "error"):
                    self._baselines.pop(alert_id, None)
                elif job.delta is None:
                    if job.snapshot is None:
                        self._baselines.pop(alert_id, None)
                    else:
                        self._baselines[alert_id] = (job.alert["version"], job.snapshot)

    # --- dry runs --------------------------------------------------------------------------------------------

    def dry_run(self, alert: dict, state_row: dict | None) -> dict:
        """What an evaluation would do now (rows, diff, condition, messages) without storing or sending. Dry runs
        take one of DRY_RUN_WORKERS slots and their own connections, never an evaluation's; DryRunsBusy when no
        slot frees up within DRY_RUN_QUEUE_SECONDS."""
        if not self._dry_runs.acquire(timeout=DRY_RUN_QUEUE_SECONDS):
            raise DryRunsBusy(f"{self.settings.dry_run_workers} dry run(s) are already running (DRY_RUN_WORKERS); "
                              "try again when one has finished")
        try:
            job = _Job(alert=alert, row=state_row, prior=state_from_row(state_row), cause="dry_run")
            try:
                job.condition = rules.parse_condition(alert["condition"])
                [(result, job.seconds)] = self._query(alert["data_source_id"], [alert["query"]], for_api=True)
                job.result = self._checked(alert, job.condition, result)
            except rules.RuleError as exc:
                job.result = str(exc)
            # error_notify_after=1: a failing query shows the "alert is failing" message it would eventually send.
            decision = self._decide(job, now=datetime.now(timezone.utc), error_notify_after=1)
        finally:
            self._dry_runs.release()
        error = job.result if isinstance(job.result, str) else None
        columns, rows, truncated = ([], [], False) if error else job.result[:3]
        messages = []
        for notice in decision.notices:
            rendered = notification.render_message(alert=alert, notice=notice)
            messages.append({"kind": notice.kind, "email_subject": rendered.subject, "email_text": rendered.text,
                             "whatsapp_text": rendered.whatsapp,
                             "texts": {name: text.body for name, text in rendered.texts.items()},
                             "whatsapp_template": rendered.texts["whatsapp"].template})
        return {
            "outcome": decision.outcome, "error": error,
            "columns": columns, "rows": [[rules.jsonable(v) for v in r] for r in rows[:DRY_RUN_ROWS]],
            "row_count": len(rows), "truncated": truncated, "summary": decision.summary or {},
            "condition_state": decision.state.condition_state, "would_notify": bool(messages),
            "messages": messages,
        }

    def _source_answered(self, source_id: UUID, error: str | None = None) -> None:
        """Record what an evaluation found out about its data source (error: it did not answer)."""
        health = self.source_health.setdefault(source_id, SourceHealth())
        if error is None:
            health.not_answering_since, health.last_error = None, None
        else:
            health.last_error = error
            if health.not_answering_since is None:
                health.not_answering_since = datetime.now(timezone.utc)


def _delta(ids: list[int], changes: dict[int, dict], key: str, baseline: str) -> _Delta | None:
    """The rows the logged changes added to and removed from the table since the baseline snapshot, or None when a
    change is no longer kept, was too large to log its rows, or is on another table."""
    added, removed, shapes = [], [], set()
    for change_id in ids:
        change = changes.get(change_id)
        if change is None or change["table_key"] != key or change["new_rows"] is None or change["old_rows"] is None:
            return None
        if visible_in(int(change["xid"]), baseline):
            continue  # committed before the full query's snapshot: its rows are in that result already
        added.append(change["new_rows"])
        removed.append(change["old_rows"])
        shapes.add(change["shape"])
    return _Delta(added=join_arrays(added), removed=join_arrays(removed), table=key, shapes=frozenset(shapes))


def _rows_still_read_alike(delta: _Delta, tables: dict[str, dict]) -> bool:
    """Whether, in the queries' snapshot, the logged rows read as they were written (the table's definition has
    not changed since) and the role sees the whole table (no row-level security, every column)."""
    facts = tables.get(delta.table) or {}
    return (facts.get("shape") is not None and delta.shapes <= {facts["shape"]} and not facts["row_security"]
            and bool(facts["readable"]))


def visible_in(xid: int, snapshot: str) -> bool:
    """Whether a committed transaction is visible in a snapshot, given as pg_current_snapshot() prints it
    (xmin:xmax:in-progress ids)."""
    xmin, xmax, running = snapshot.split(":")
    return xid < int(xmin) or (xid < int(xmax) and str(xid) not in running.split(","))


def join_arrays(arrays: list[str]) -> str:
    """One array literal with the elements of several one-dimensional ones, in order ({a,b} and {c}: {a,b,c})."""
    inner = [text[1:-1] for text in arrays if text != "{}"]
    return "{" + ",".join(inner) + "}"


def _collect(writes: _Writes, alert: dict, decision: rules.Decision, rendered: list[notification.Rendered],
             prior_row: dict | None, prior: rules.AlertState | None, *, now: datetime, error: str | None,
             row_count: int | None, is_state: bool, links: notification.Links,
             recipients: dict[str, list[str]]) -> None:
    """Add one decision's rows to the batch's writes: state, incidents, activity and outbox rows."""
    state = decision.state
    muted = alert["muted_until"] is not None and alert["muted_until"] > now
    firing_id = prior_row["firing_incident_id"] if prior_row else None
    if decision.resolve_incident and firing_id:
        writes.resolved.append((firing_id, alert["id"]))
    # The decision's identity: the alert's version and the stored state it was made from. Any instance that makes
    # it again makes the same keys, and the outbox queues each key once.
    basis = f"{alert['id']}/{alert['version']}/{prior_row['evaluated_at'].isoformat() if prior_row else '-'}"
    for index, (notice, message) in enumerate(zip(decision.notices, rendered)):
        incident_id = None
        if notice.open_incident:
            incident_id = uuid.uuid4()
            writes.incidents.append({
                "id": incident_id, "alert_config_id": alert["id"], "alert_name": alert["name"],
                "title": message.subject, "description": message.text, "priority": alert["priority"],
                "incident_data": _incident_data(notice, decision, is_state),
            })
            writes.activities.append({"action": "created", "incident_id": incident_id, "alert_config_id": alert["id"],
                                      "details": {"rows": len(notice.rows), "kind": notice.kind}})
            if is_state:
                state.firing_incident_id = incident_id
        elif notice.kind in ("repeat", "resolved"):
            incident_id = firing_id
        if muted:
            writes.activities.append({"action": "muted", "incident_id": incident_id, "alert_config_id": alert["id"],
                                      "details": {"kind": notice.kind,
                                                  "muted_until": alert["muted_until"].isoformat()}})
            continue
        writes.notifications += notification.outbox_rows(
            rendered=message, channels=recipients, alert_id=alert["id"],
            incident_id=incident_id, kind=notice.kind, links=links, decision_key=f"{basis}/{index}",
        )
    fields = state_to_row(state, alert["version"], row_count, prior_row,
                          prior.fingerprints if prior is not None else None)
    fields["last_error"] = error
    if not _same_state(fields, prior_row):
        writes.states.append((alert["id"], fields))


def _recipients(cur, alerts: list[dict]) -> dict[Any, dict[str, list[str]]]:
    """Each alert's addresses per channel, with the current addresses of the users and teams it names (one query
    for the batch, and none when no alert names anyone)."""
    user_ids, team_ids = set(), set()
    for alert in alerts:
        users, teams = notification.referenced_people(alert["notification_channels"])
        user_ids.update(users)
        team_ids.update(teams)
    found = database.people(cur, user_ids=list(user_ids), team_ids=list(team_ids)) if user_ids or team_ids else []
    expanded = {}
    for alert in alerts:
        users, teams = notification.referenced_people(alert["notification_channels"])
        named = [p for p in found if str(p["id"]) in users or (p["team_id"] and str(p["team_id"]) in teams)]
        expanded[alert["id"]] = notification.expand_recipients(alert["notification_channels"], named)
        if (users or teams) and not named:
            logger.warning("alert %s names users or teams that have no members now", alert["id"])
    return expanded


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
