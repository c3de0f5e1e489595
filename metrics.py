"""The service's figures for Prometheus: counters and histograms the evaluator and dispatcher record as they work,
and gauges read from the service database and the scheduler when /metrics is scraped."""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

import database

logger = logging.getLogger(__name__)

PREFIX = "alert_service"
CAUSES = ("initial", "schedule", "event", "manual", "catch_up")
OUTCOMES = ("no_change", "triggered", "resolved", "error")
# The channels the service has (the dispatcher's registry); these two when none are given.
CHANNELS = ("email", "whatsapp")
SEND_STATUSES = ("success", "retry", "failed")
PRIORITIES = ("LOW", "MEDIUM", "HIGH", "CRITICAL")
ALERT_STATES = ("new", "ok", "pending", "firing", "error", "inactive")
# A scrape reads four small aggregates; a service database that does not answer within this long is reported as
# down (alert_service_database_up 0) instead of holding the scrape until Prometheus gives up on it (10 s default).
SCRAPE_DEADLINE_SECONDS = 5.0
# From a cached single-row result (milliseconds) to QUERY_TIMEOUT_SECONDS' default of 30 s.
QUERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# A loopback relay answers in milliseconds; SEND_TIMEOUT_SECONDS defaults to 60.
SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Each counter would otherwise carry a `_created` series per label set, doubling the output for nothing a
# dashboard uses (Prometheus detects counter resets by itself).
prometheus_client.disable_created_metrics()


class Metrics:
    """The figures of one running service, in a registry of its own (apps started side by side in one process,
    as the tests do, never see each other's)."""

    def __init__(self, channels: Sequence[str] = CHANNELS) -> None:
        self.registry = CollectorRegistry()
        self.channels = tuple(channels)
        self._evaluations = Counter(
            f"{PREFIX}_evaluations", "Evaluations stored, by what asked for them and what they found",
            ["cause", "outcome"], registry=self.registry)
        self._evaluation_seconds = Histogram(
            f"{PREFIX}_evaluation_duration_seconds", "Time an alert query took to run, as stored with each evaluation",
            buckets=QUERY_BUCKETS, registry=self.registry)
        self._lag_seconds = Histogram(
            f"{PREFIX}_commit_to_evaluation_seconds",
            "From the change notification of a commit (PostgreSQL delivers it at commit) to the stored evaluation "
            "that saw the change; only evaluations that answer a change are measured",
            buckets=LAG_BUCKETS, registry=self.registry)
        self._notifications = Counter(
            f"{PREFIX}_notifications", "Outbox rows whose send was recorded, by channel and result (success, retry: "
            "will be tried again, failed: given up)", ["channel", "status"], registry=self.registry)
        self._send_seconds = Histogram(
            f"{PREFIX}_send_duration_seconds", "Time one message took to send (or to fail), by channel",
            ["channel"], buckets=SEND_BUCKETS, registry=self.registry)
        # Every label set from the start: rate() over a series that appears only at its first increment misses it.
        for cause in CAUSES:
            for outcome in OUTCOMES:
                self._evaluations.labels(cause=cause, outcome=outcome)
        for channel in self.channels:
            self._send_seconds.labels(channel=channel)
            for status in SEND_STATUSES:
                self._notifications.labels(channel=channel, status=status)

    def evaluated(self, *, cause: str, outcome: str, seconds: float) -> None:
        """Count one stored evaluation and its query's time."""
        self._evaluations.labels(cause=cause, outcome=outcome).inc()
        self._evaluation_seconds.observe(seconds)

    def change_answered(self, seconds: float) -> None:
        """Record how long after a change notification the evaluation that saw it was stored."""
        self._lag_seconds.observe(seconds)

    def sent(self, *, channel: str, seconds: float) -> None:
        """Record the time one send took, whatever its result."""
        self._send_seconds.labels(channel=channel).observe(seconds)

    def notified(self, *, channel: str, status: str, count: int) -> None:
        """Count outbox rows whose send result was recorded."""
        if count:
            self._notifications.labels(channel=channel, status=status).inc(count)

    def watch(self, *, pool: database.Pool, scheduler_status: Callable[[], dict]) -> None:
        """Also report, at each scrape, what the service database and the scheduler hold at that moment."""
        self.registry.register(_ServiceCollector(pool, scheduler_status, self.channels))

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The figures in the format the scraper asked for (Prometheus text, or OpenMetrics), and its media type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _ServiceCollector:
    """Gauges read when scraped: the outbox, open incidents and alerts from the service database (one query each),
    skipped evaluations and listeners from the scheduler's memory."""

    def __init__(self, pool: database.Pool, scheduler_status: Callable[[], dict], channels: Sequence[str]) -> None:
        self.pool = pool
        self.scheduler_status = scheduler_status
        self.channels = channels

    def collect(self) -> Iterable[Metric]:
        yield from self._from_scheduler()
        up = GaugeMetricFamily(f"{PREFIX}_database_up", "1 when the service database answered this scrape's queries")
        try:
            with self.pool.transaction(deadline_seconds=SCRAPE_DEADLINE_SECONDS) as cur:
                outbox = database.outbox_depth(cur)
                incidents = database.open_incidents_by_priority(cur)
                alerts = database.alerts_by_state(cur)
                sources = database.data_source_names(cur)
        except database.DatabaseError as exc:
            logger.warning("metrics: the service database did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _database_figures(outbox, incidents, alerts, sources, self.channels)

    def _from_scheduler(self) -> Iterable[Metric]:
        status = self.scheduler_status()
        skipped = CounterMetricFamily(
            f"{PREFIX}_evaluations_skipped", "Evaluations not run since start: scheduled runs that could only find "
            "the stored result or that an evaluation already queued answered (cause=schedule), and alerts that "
            "needed no evaluation at start (cause=catch_up)",
            labels=["cause"])
        skipped.add_metric(["schedule"], status["skipped_scheduled_runs"])
        skipped.add_metric(["catch_up"], status["skipped_catch_ups"])
        incremental = CounterMetricFamily(
            f"{PREFIX}_evaluations_incremental", "Evaluations computed from the rows statements changed instead of "
            "the full query (result=fallback: they ran the full query after all)", labels=["result"])
        incremental.add_metric(["incremental"],
                               status["incremental_evaluations"] - status["incremental_fallbacks"])
        incremental.add_metric(["fallback"], status["incremental_fallbacks"])
        connected = GaugeMetricFamily(f"{PREFIX}_listener_connected",
                                      "1 while the LISTEN connection to a data source is up", labels=["data_source_id"])
        reconnects = CounterMetricFamily(f"{PREFIX}_listener_reconnects",
                                         "Times a data source's LISTEN connection was re-established since it started",
                                         labels=["data_source_id"])
        for source_id, listener in status["listeners"].items():
            connected.add_metric([source_id], 1 if listener["connected"] else 0)
            reconnects.add_metric([source_id], listener["reconnects"])
        return [skipped, incremental, connected, reconnects]


def _database_figures(outbox: list[dict], incidents: list[dict], alerts: list[dict],
                      sources: list[dict], channels: Sequence[str]) -> list[Metric]:
    """The gauges made of the service database's aggregates, with a zero for every label set that has no row."""
    depth = GaugeMetricFamily(f"{PREFIX}_outbox_messages", "Notifications waiting in the outbox (pending: not yet "
                              "tried, retry: waiting out a retry delay)", labels=["channel", "status"])
    oldest = GaugeMetricFamily(f"{PREFIX}_outbox_oldest_message_age_seconds",
                               "Age of the oldest notification waiting in the outbox (0 when none waits)",
                               labels=["channel"])
    counts = {(row["channel"], row["status"].lower()): row["messages"] for row in outbox}
    ages: dict[str, float] = {}
    for row in outbox:
        ages[row["channel"]] = max(ages.get(row["channel"], 0.0), float(row["oldest_age_seconds"]))
    for channel in channels:
        for status in ("pending", "retry"):
            depth.add_metric([channel, status], counts.get((channel, status), 0))
        oldest.add_metric([channel], ages.get(channel, 0.0))
    open_incidents = GaugeMetricFamily(f"{PREFIX}_incidents_open", "Incidents not yet resolved, by priority and "
                                       "status (active, acknowledged)", labels=["priority", "status"])
    by_priority = {(row["priority"], row["status"].lower()): row["incidents"] for row in incidents}
    for priority in PRIORITIES:
        for status in ("active", "acknowledged"):
            open_incidents.add_metric([priority, status], by_priority.get((priority, status), 0))
    by_state = GaugeMetricFamily(
        f"{PREFIX}_alerts", "Alerts by state: new (not evaluated yet), ok, pending (waiting out 'for'), firing, "
        "error (its last evaluation failed), inactive (paused)", labels=["state"])
    states = {row["state"]: row["alerts"] for row in alerts}
    for state in ALERT_STATES:
        by_state.add_metric([state], states.get(state, 0))
    info = GaugeMetricFamily(f"{PREFIX}_data_source_info", "1 per data source, naming it (join on data_source_id)",
                             labels=["data_source_id", "name"])
    for source in sources:
        info.add_metric([str(source["id"]), source["name"]], 1)
    return [depth, oldest, open_incidents, by_state, info]
