"""Scenario 5: many interval alerts: start time, nothing re-sent on restart, memory, idle CPU, schedule lateness."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg2
import psycopg2.extras

from bench.harness import (EMAIL_TO, BenchService, Metric, ScenarioContext, configure_logging, insert_alerts_sql,
                           loopback_servers, percentile, rss_mb, service_settings, wait_until)
from bench.inserter import writer_process

QUERY = "SELECT 1 AS one"


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
    10,000 alerts takes minutes to do): the fingerprints of QUERY's one row, computed with rules.py."""
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
    interval, so the restart time plus the interval is not when a run is due)."""
    return service.services.scheduler.next_runs()


def _cpu_percent(seconds: float) -> float:
    """This process's CPU use over the next `seconds`, in % of one core."""
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(seconds)
    return (time.process_time() - cpu) / (time.monotonic() - wall) * 100


def run(ctx: ScenarioContext) -> list[Metric]:
    sizes = ctx.sizes
    n, interval, limit = sizes.many_alerts, sizes.many_interval_seconds, sizes.many_wait_seconds
    window = sizes.idle_window_seconds
    details: dict[str, Any] = {}
    with ctx.database() as dsn:
        ctx.progress(f"{n} alerts '{QUERY}' every {interval} s (inserted with SQL, one email recipient)")
        insert_alerts_sql(dsn, [{"name": f"many #{i}", "query": QUERY, "schedule": f"interval:{interval}s",
                                 "notification_channels": {"email": [EMAIL_TO]}} for i in range(n)])
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
            # The evaluation each alert gets at start-up ('catch_up'; 'startup' in older versions).
            startup_sql = ("SELECT count(*) AS n FROM evaluation WHERE cause IN ('catch_up', 'startup') "
                           "AND started_at >= to_timestamp(%s)")
            startup_done = wait_until(lambda: _count(service, startup_sql, (restart_wall,)) >= n, limit, 0.25)
            startup_seconds = time.monotonic() - began
            startup_count = _count(service, startup_sql, (restart_wall,))
            rss_after = rss_mb()
            ctx.progress(f"start_services took {start_seconds:.2f} s; {startup_count} of {n} startup evaluations "
                         f"after {startup_seconds:.1f} s; measuring CPU for {window:.0f} s")
            window_began = time.time()
            cpu_percent = _cpu_percent(window)
            window_evaluations = _count(service, "SELECT count(*) AS n FROM evaluation WHERE started_at >= "
                                                 "to_timestamp(%s)", (window_began,))
            rss_window = rss_mb()

            ctx.progress("waiting for every alert's first scheduled run")
            scheduled_sql = ("SELECT count(DISTINCT alert_config_id) AS n FROM evaluation WHERE cause = 'schedule' "
                             "AND started_at >= to_timestamp(%s)")
            scheduled_done = wait_until(lambda: _count(service, scheduled_sql, (restart_wall,)) >= n,
                                        max(interval + 30 - (time.time() - restart_wall), limit / 2), 0.5)
            waited_until = time.time()
            firsts = {row["id"]: row["started"] for row in service.sql(
                "SELECT alert_config_id AS id, extract(epoch FROM min(started_at))::float8 AS started FROM evaluation "
                "WHERE cause = 'schedule' AND started_at >= to_timestamp(%s) GROUP BY 1", (restart_wall,))}
            alert_ids = [row["id"] for row in service.sql("SELECT id FROM alert_config")]
            outcomes = {row["outcome"]: int(row["n"]) for row in service.sql(
                "SELECT outcome, count(*) AS n FROM evaluation WHERE started_at >= to_timestamp(%s) GROUP BY 1",
                (restart_wall,))}
            resent = _count(service, "SELECT count(*) AS n FROM notification WHERE created_at >= to_timestamp(%s)",
                            (restart_wall,))
            delivered = sum(servers.counts())
            peak = _vm_hwm_mb()

    # An alert whose first scheduled run had not started by the end is at least that late.
    late_ms = [(firsts.get(a, waited_until) - due.get(a, restart_wall + interval)) * 1000 for a in alert_ids]
    unrun = sum(1 for a in alert_ids if a not in firsts)
    rate = startup_count / startup_seconds if startup_seconds else 0.0
    details.update(
        due_times_from="schedule job next_run" if due else f"restart time + {interval} s",
        startup_evaluations_done=startup_done, startup_evaluations_counted=startup_count,
        startup_evaluations_per_second=rate, scheduled_runs_done=scheduled_done, outcomes_after_restart=outcomes,
        rss_before_start_mb=rss_before, rss_after_window_mb=rss_window, peak_rss_mb=peak,
        evaluations_in_cpu_window=window_evaluations, cpu_floor_percent=cpu_floor,
        lateness_ms={"p50": percentile(late_ms, 50), "p90": percentile(late_ms, 90), "p99": percentile(late_ms, 99),
                     "max": max(late_ms, default=None), "min": min(late_ms, default=None)},
        note="alerts inserted with SQL; lateness of an alert not run by the end counts as the time waited")
    ctx.details.update(details)
    startup_name = "startup evaluations finished" + ("" if startup_done else " (projected)")
    return [
        Metric("start_services returned", start_seconds, "s"),
        Metric(startup_name, startup_seconds if startup_done else n / rate if rate else None, "s",
               note=None if startup_done else f"{startup_count} of {n} done in {startup_seconds:.0f} s"),
        Metric("notifications on restart", resent + delivered, "msgs", target=("==", 0), correctness=True),
        Metric("resident memory after start", rss_after, "MB", target=("<", 300), baseline=rss_before,
               baseline_name="before start"),
        Metric(f"CPU over {window:.0f} s after startup", cpu_percent, "% core", target=("<", 5),
               baseline=cpu_floor, baseline_name="bench alone"),
        Metric("evaluations in that window", window_evaluations, "evals"),
        Metric("scheduled run lateness p50", percentile(late_ms, 50), "ms"),
        Metric("scheduled run lateness p99", percentile(late_ms, 99), "ms", target=("<", 200)),
        Metric("scheduled run lateness max", max(late_ms, default=None), "ms"),
        # Liveness, not a lost row: only a quick run (which always has time) treats it as a bug.
        Metric("alerts without a scheduled run by the end", unrun, "alerts", target=("==", 0),
               correctness=ctx.quick),
    ]


def _vm_hwm_mb() -> float:
    """Peak resident memory of this process in MB (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
