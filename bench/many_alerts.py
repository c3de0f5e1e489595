"""Scenario 5: many interval alerts on unchanged tables: start-up work, nothing re-sent on restart, memory, CPU after
start-up, schedule lateness, and how many scheduled runs the service skipped rather than executed. Part of the
alerts read nothing (`SELECT 1`), part read real tables that do not change (with the service's change triggers on
them), and one in a hundred calls now(), which no service can skip: their runs measure lateness whatever is
skipped."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg2
import psycopg2.extras

from bench.harness import (EMAIL_TO, BenchService, CpuMeter, Metric, ScenarioContext, configure_logging, execute,
                           insert_alerts_sql, loopback_servers, percentile, rss_mb, service_settings, table_key,
                           wait_until)
from bench.inserter import writer_process

# Every query returns the one row (1), so a state stored with SQL (initialise_with_sql) fits all of them.
QUERY = "SELECT 1 AS one"
VOLATILE_QUERY = "SELECT 1 AS one WHERE now() IS NOT NULL"
TABLE_ROWS = 1000
# Start-up work is over when every alert is registered and the start-up evaluations stopped coming for this long.
SETTLE_SECONDS = 1.5


def _table(k: int) -> str:
    return f"bench_static_{k:02d}"


def _alerts(n: int, tables: int, table_share: float) -> list[dict[str, Any]]:
    """n alert definitions: one in a hundred volatile (at least one), table_share of them reading a table each
    (a scan of TABLE_ROWS rows that finds one), the rest reading nothing."""
    volatile = max(1, n // 100)
    on_tables = int(n * table_share)
    alerts = []
    for i in range(n):
        alert = {"name": f"many #{i}", "query": QUERY, "schedule": None, "notification_channels": {"email": [EMAIL_TO]}}
        if i < volatile:
            alert["query"] = VOLATILE_QUERY
        elif i < volatile + on_tables:
            table = _table(i % tables)
            alert.update(query=f"SELECT 1 AS one FROM {table} WHERE note = 'marker' AND id > {-i}",
                         watched_tables=[table_key(table)])
        alerts.append(alert)
    return alerts


def _health_skips(service: BenchService) -> int | None:
    """Skipped runs as GET /health reports them (any number under a key that says "skip"); None when it says
    nothing about skipping."""
    found: list[float] = []

    def walk(node: Any, skipping: bool) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, skipping or "skip" in str(key).lower())
        elif isinstance(node, list):
            for value in node:
                walk(value, skipping)
        elif skipping and isinstance(node, (int, float)) and not isinstance(node, bool):
            found.append(node)

    try:
        walk(service.client.get("/health").json(), False)
    except Exception:  # noqa: BLE001 - a figure to report, not a reason to stop the run
        return None
    return int(sum(found)) if found else None


def _registered(service: BenchService) -> int | None:
    """Active alerts as GET /health reports them (None when it does not)."""
    try:
        return service.client.get("/health").json()["scheduler"]["active_alerts"]
    except Exception:  # noqa: BLE001
        return None


def _count(service: BenchService, statement: str, args: Any = None) -> int:
    return int(service.sql(statement, args)[0]["n"])


def initialise_with_service(dsn: str, directory: str, alerts: int, timeout: float) -> dict[str, float]:
    """First start, in a process of its own: every alert sends its initial report and stores its result, as on a
    first deployment. Runs in a spawned process, so the memory it takes is not in the measured restart."""
    configure_logging()
    with loopback_servers(Path(directory)) as servers:
        service = BenchService(service_settings(dsn, servers, Path(directory) / "data"))
        began = time.monotonic()
        try:
            service.start()
            done = (wait_until(lambda: _count(service, "SELECT count(*) AS n FROM alert_state") >= alerts, timeout, 0.2)
                    and servers.wait_for(alerts, 0, timeout) and service.wait_idle(timeout))
            if not done:
                raise RuntimeError(f"initialisation incomplete after {timeout} s: "
                                   f"{_count(service, 'SELECT count(*) AS n FROM alert_state')} of {alerts} states")
            return {"initialised_seconds": time.monotonic() - began, "initial_reports": servers.counts()[0]}
        finally:
            service.stop()


def initialise_with_sql(dsn: str) -> None:
    """Store every alert's current result as the service would after its initial report (what a first start of
    10,000 alerts takes minutes to do): the fingerprints of the queries' one row, computed with rules.py."""
    import rules

    import database

    packed = rules.pack_fingerprints(rules.identities([(1,)], None))
    conn = psycopg2.connect(database.service_dsn(dsn))
    try:
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO alert_state (alert_config_id, config_version, fingerprints, row_count) "
                        "SELECT id, version, %s, 1 FROM alert_config", (psycopg2.Binary(packed),))
    finally:
        conn.close()


def _due_times(service: BenchService) -> dict[UUID, float]:
    """Each alert's first scheduled run (epoch seconds), as the scheduler planned it (runs are spread over the
    interval, so the restart time plus the interval is not when a run is due); empty when the scheduler does not
    say (the restart time plus the interval is used then)."""
    next_runs = getattr(service.services.scheduler, "next_runs", None)
    return next_runs() if next_runs is not None else {}


def _cpu_percent(seconds: float) -> float:
    """This process's CPU use over the next `seconds`, in % of one core."""
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(seconds)
    return (time.process_time() - cpu) / (time.monotonic() - wall) * 100


def _startup_work(service: BenchService, n: int, since: float, began: float, limit: float) -> tuple[float, bool, int]:
    """(seconds from `began` until every alert was registered and the start-up evaluations stopped coming, whether
    that happened within `limit`, how many there were). A service that evaluates every alert at start is done at
    the n-th; one that skips what cannot have changed records fewer, so a count that stays put counts as done."""
    startup_sql = ("SELECT count(*) AS n FROM evaluation WHERE cause IN ('catch_up', 'startup') "
                   "AND started_at >= to_timestamp(%s)")
    deadline = began + limit
    last_change, last_count = time.monotonic(), -1
    while True:
        count = _count(service, startup_sql, (since,))
        registered = _registered(service)
        now = time.monotonic()
        if (registered is None or registered >= n) and count >= n:
            return now - began, True, count
        if (registered is not None and registered < n) or count != last_count:
            last_change, last_count = now, count
        elif now - last_change >= SETTLE_SECONDS:
            return last_change - began, True, count
        if now >= deadline:
            return now - began, False, count
        time.sleep(0.1)


def run(ctx: ScenarioContext) -> list[Metric]:
    sizes = ctx.sizes
    n, interval, limit = sizes.many_alerts, sizes.many_interval_seconds, sizes.many_wait_seconds
    window = sizes.idle_window_seconds
    details: dict[str, Any] = {}
    alerts = _alerts(n, sizes.many_tables, sizes.many_table_share)
    for alert in alerts:
        alert["schedule"] = f"interval:{interval}s"
    kinds = {"volatile (now())": sum(a["query"] == VOLATILE_QUERY for a in alerts),
             "on an unchanged table": sum(bool(a.get("watched_tables")) for a in alerts),
             "reading no table": sum(a["query"] == QUERY for a in alerts)}
    details["alerts"] = kinds
    with ctx.database() as dsn:
        ctx.progress(f"{n} alerts every {interval} s ({kinds}; inserted with SQL, one email recipient)")
        execute(dsn, "".join(f"CREATE TABLE {_table(k)} (id bigint PRIMARY KEY, note text NOT NULL); "
                             f"INSERT INTO {_table(k)} SELECT g, CASE WHEN g = {TABLE_ROWS // 2} THEN 'marker' "
                             f"ELSE 'row ' || g END FROM generate_series(1, {TABLE_ROWS}) g; ANALYZE {_table(k)};"
                             for k in range(sizes.many_tables)))
        insert_alerts_sql(dsn, alerts)
        if ctx.quick:
            ctx.progress("first start in its own process: initial reports and stored results")
            first = writer_process()
            try:
                details["initialisation"] = first.submit(
                    initialise_with_service, dsn, str(ctx.work_dir / "first"), n, limit).result(timeout=limit + 60)
            finally:
                first.shutdown()
            details["initialised_by"] = "the service (first start in a separate process)"
        else:
            initialise_with_sql(dsn)
            details["initialised_by"] = "SQL: alert_state rows with rules.py's fingerprints of the query's result"

        with ctx.service_environment(dsn) as (service, servers):
            gc.collect()
            rss_before = rss_mb()
            # This process before the service starts: the floor of the idle-CPU figure.
            cpu_floor = _cpu_percent(min(5.0, window))

            ctx.progress("restart: start_services")
            restart_wall = time.time()
            began = time.monotonic()
            start_seconds = service.start()
            due = _due_times(service)
            startup_seconds, startup_done, startup_count = _startup_work(service, n, restart_wall, began, limit)
            rss_after = rss_mb()
            ctx.progress(f"start_services took {start_seconds:.2f} s; start-up work done after {startup_seconds:.1f} s "
                         f"({startup_count} start-up evaluations recorded); measuring CPU for {window:.0f} s")
            meter = CpuMeter(dsn, servers.pids)
            meter.start()
            window_began = time.time()
            cpu_percent = _cpu_percent(window)
            by_process = {name: round(used / window * 100, 1) for name, used in sorted(meter.read().items())}
            window_evaluations = _count(service, "SELECT count(*) AS n FROM evaluation WHERE started_at >= "
                                                 "to_timestamp(%s)", (window_began,))
            rss_window = rss_mb()

            ctx.progress("waiting for every alert's first scheduled run")
            recorded_sql = ("SELECT count(DISTINCT alert_config_id) AS n FROM evaluation WHERE cause = 'schedule' "
                            "AND started_at >= to_timestamp(%s)")
            # A service that skips without a record leaves no trace per alert: wait for the runs due by then.
            scheduled_done = wait_until(
                lambda: _count(service, recorded_sql, (restart_wall,)) >= n
                or (time.time() > max(due.values(), default=restart_wall + interval) + 5
                    and _count(service, recorded_sql, (restart_wall,)) >= kinds["volatile (now())"]),
                max(interval + 30 - (time.time() - restart_wall), limit / 2), 0.5)
            waited_until = time.time()
            # A run is the first evaluation that began at or after the alert's due time: a scheduled one, or a
            # start-up evaluation that was still waiting then (the service lets it answer the run).
            firsts: dict = {}
            for row in service.sql(
                    "SELECT alert_config_id AS id, extract(epoch FROM started_at)::float8 AS started FROM evaluation "
                    "WHERE cause IN ('schedule', 'catch_up') AND started_at >= to_timestamp(%s) ORDER BY started_at",
                    (restart_wall,)):
                if row["id"] not in firsts and row["started"] >= due.get(row["id"], restart_wall + interval) - 0.001:
                    firsts[row["id"]] = row["started"]
            alert_kind = {row["id"]: row["query"] for row in service.sql("SELECT id, query FROM alert_config")}
            outcomes = {f"{row['cause']}: {row['outcome']}": int(row["n"]) for row in service.sql(
                "SELECT cause, outcome, count(*) AS n FROM evaluation WHERE started_at >= to_timestamp(%s) "
                "GROUP BY 1, 2", (restart_wall,))}
            health_skips = _health_skips(service)
            triggered_tables = _count(service, "SELECT count(DISTINCT tgrelid) AS n FROM pg_trigger WHERE NOT "
                                               "tgisinternal AND starts_with(tgrelid::regclass::text, 'bench_static_')")
            # The last start-up evaluation can land after the count looked settled: take its end if later.
            last_startup = service.sql(
                "SELECT extract(epoch FROM max(started_at + duration_ms * interval '1 millisecond'))::float8 AS t "
                "FROM evaluation WHERE cause IN ('catch_up', 'startup') AND started_at >= to_timestamp(%s)",
                (restart_wall,))[0]["t"]
            if startup_done and last_startup is not None:
                startup_seconds = max(startup_seconds, last_startup - restart_wall)
            startup_count = sum(v for k, v in outcomes.items() if k.split(": ", 1)[0] in ("catch_up", "startup"))
            resent = _count(service, "SELECT count(*) AS n FROM notification WHERE created_at >= to_timestamp(%s)",
                            (restart_wall,))
            delivered = sum(servers.counts())
            peak = _vm_hwm_mb()

    scheduled = {key.split(": ", 1)[1]: value for key, value in outcomes.items() if key.startswith("schedule: ")}
    skipped_records = sum(value for outcome, value in scheduled.items() if "skip" in outcome)
    executed = sum(scheduled.values()) - skipped_records
    skipped = max(skipped_records, health_skips or 0)
    skipped_from = ("evaluation records" if skipped_records >= (health_skips or 0) and skipped_records
                    else "GET /health" if health_skips else "nothing reports skipped runs")
    # An alert whose first scheduled run had not started by the end is at least that late, unless the service says
    # it skipped runs (it records nothing per alert then, so those alerts are left out).
    unrecorded = [a for a in alert_kind if a not in firsts]
    excused = min(len(unrecorded), health_skips or 0)
    late_ms = [(firsts[a] - due.get(a, restart_wall + interval)) * 1000 for a in firsts]
    if excused < len(unrecorded):
        late_ms += [(waited_until - due.get(a, restart_wall + interval)) * 1000 for a in unrecorded]
    volatile_late_ms = [(firsts[a] - due.get(a, restart_wall + interval)) * 1000 for a in firsts
                        if alert_kind[a] == VOLATILE_QUERY]
    details.update(
        due_times_from="schedule job next_run" if due else f"restart time + {interval} s",
        startup_work_done=startup_done, startup_evaluations_counted=startup_count,
        scheduled_runs_done=scheduled_done, evaluations_after_restart=outcomes, skipped_reported_by_health=health_skips,
        skipped_runs_read_from=skipped_from, tables_with_a_change_trigger=triggered_tables,
        alerts_without_recorded_scheduled_run=len(unrecorded),
        rss_before_start_mb=rss_before, rss_after_window_mb=rss_window, peak_rss_mb=peak,
        evaluations_in_cpu_window=window_evaluations, cpu_floor_percent=cpu_floor,
        cpu_percent_in_window_by_process=by_process,
        lateness_ms={"p50": percentile(late_ms, 50), "p90": percentile(late_ms, 90), "p99": percentile(late_ms, 99),
                     "max": max(late_ms, default=None), "min": min(late_ms, default=None)},
        volatile_lateness_ms={"p50": percentile(volatile_late_ms, 50), "p99": percentile(volatile_late_ms, 99)},
        note="alerts inserted with SQL; lateness of an alert not run by the end counts as the time waited")
    ctx.details.update(details)
    backends = sum(v for k, v in by_process.items() if k.startswith("postgres backends"))
    return [
        Metric("start_services returned", start_seconds, "s"),
        Metric("start-up work (registered, start-up evaluations done)", startup_seconds, "s", target=("<=", 5.0),
               note=None if startup_done else f"not done within {limit:.0f} s ({startup_count} evaluations)"),
        Metric("start-up evaluations recorded", startup_count, "evals", baseline=n, baseline_name="alerts"),
        Metric("notifications on restart", resent + delivered, "msgs", target=("==", 0), correctness=True),
        Metric("resident memory after start", rss_after, "MB", target=("<", 300), baseline=rss_before,
               baseline_name="before start"),
        Metric(f"CPU over {window:.0f} s after start-up", cpu_percent, "% core", target=("<=", 5),
               baseline=cpu_floor, baseline_name="bench alone"),
        Metric("PostgreSQL backends' CPU in that window", backends, "% core"),
        Metric("evaluations in that window", window_evaluations, "evals"),
        Metric("scheduled runs executed", executed, "runs"),
        Metric("scheduled runs skipped", skipped, "runs", note=f"read from {skipped_from}"),
        Metric("scheduled run lateness p50", percentile(late_ms, 50), "ms"),
        Metric("scheduled run lateness p99", percentile(late_ms, 99), "ms", target=("<=", 200)),
        Metric("scheduled run lateness max", max(late_ms, default=None), "ms"),
        Metric("volatile alerts' run lateness p99", percentile(volatile_late_ms, 99), "ms"),
        # Liveness, not a lost row: only a quick run (which always has time) treats it as a bug.
        Metric("alerts without a scheduled run by the end", len(unrecorded) - excused, "alerts", target=("==", 0),
               correctness=ctx.quick),
    ]


def _vm_hwm_mb() -> float:
    """Peak resident memory of this process in MB (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
