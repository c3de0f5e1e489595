"""Scenario 2: COMMIT -> email under load: many alerts over many tables, a writer process at a steady rate (with
TimescaleDB, once more with the tables as hypertables)."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any

from bench.harness import (EMAIL_TO, CpuMeter, Metric, ScenarioContext, execute, insert_alerts_sql,
                           make_hypertables, summary, table_key, wait_until)
from bench.inserter import paced_single_rows, writer_process


def _table(k: int) -> str:
    return f"bench_load_{k:03d}"


def run(ctx: ScenarioContext) -> list[Metric]:
    timescaledb = ctx.hypertables()
    # With TimescaleDB both passes have the extension in their database, so the kind of table is all that differs.
    metrics, details = _measure(ctx, timescaledb=timescaledb, hypertables=False)
    ctx.details.update(details)
    if timescaledb:
        hypertable_metrics, ctx.details["hypertable"] = _measure(ctx, timescaledb=True, hypertables=True)
        for m in hypertable_metrics:
            m.name += " (hypertable)"
        metrics += hypertable_metrics
    return metrics


def _measure(ctx: ScenarioContext, timescaledb: bool, hypertables: bool) -> tuple[list[Metric], dict[str, Any]]:
    """One pass of the scenario, on plain tables or on hypertables: its figures and details."""
    sizes = ctx.sizes
    tables = [_table(k) for k in range(sizes.load_tables)]
    kind = "hypertables" if hypertables else "tables"
    with ctx.database(timescaledb=timescaledb) as dsn, ctx.service_environment(dsn) as (service, servers):
        ctx.progress(f"{len(tables)} {kind} and {sizes.load_alerts} alerts (inserted with SQL, email only)")
        if hypertables:
            # A hypertable's unique indexes must include its time column.
            execute(dsn, "".join(f"CREATE TABLE {t} (id bigint NOT NULL, note text NOT NULL, created_at timestamptz "
                                 "NOT NULL DEFAULT now(), PRIMARY KEY (id, created_at));" for t in tables))
            make_hypertables(dsn, tables)
        else:
            execute(dsn, "".join(f"CREATE TABLE {t} (id bigint PRIMARY KEY, note text NOT NULL);" for t in tables))
        # Several distinct alerts per table, each reading the whole (small) table.
        alerts = [{"name": f"load {_table(j % len(tables))} #{j // len(tables)}",
                   "query": f"SELECT id, note FROM {_table(j % len(tables))} WHERE id > {-1 - j // len(tables)}",
                   "schedule": "interval:1h", "notification_channels": {"email": [EMAIL_TO]},
                   "watched_tables": [table_key(_table(j % len(tables)))]} for j in range(sizes.load_alerts)]
        insert_alerts_sql(dsn, alerts)
        start_seconds = service.start()
        ctx.progress(f"service started in {start_seconds:.2f} s; waiting for {len(alerts)} initial reports")
        if not (servers.wait_for(len(alerts), 0, 180) and service.wait_idle(60)):
            raise RuntimeError(f"initial reports incomplete: {servers.counts()[0]} of {len(alerts)}")
        servers.clear()
        table_of = {row["id"]: tables.index(row["watched_tables"][0].split(".", 1)[1])
                    for row in service.sql("SELECT id, watched_tables FROM alert_config")}
        alerts_on: dict[int, list] = defaultdict(list)
        for alert_id, k in table_of.items():
            alerts_on[k].append(alert_id)
        baseline_eval = service.sql("SELECT coalesce(max(id), 0) AS id FROM evaluation")[0]["id"]

        writer = writer_process()
        try:
            meter = CpuMeter(dsn, {**servers.pids, "writer process": writer.submit(os.getpid).result(timeout=60)})
            ctx.progress(f"writer process: {sizes.load_rate:.0f} single-row commits/s for {sizes.load_seconds:.0f} s")
            meter.start()
            began = time.monotonic()
            written = writer.submit(paced_single_rows, dsn, tables, sizes.load_rate, sizes.load_seconds, 1).result(
                timeout=2 * sizes.load_seconds + 60)
            # Where the machine's two cores went while the writer ran (the writer's own backend is not listed).
            cpu_percent = {name: round(used / (time.monotonic() - began) * 100, 1)
                           for name, used in sorted(meter.read().items())}
        finally:
            writer.shutdown()
        commits: list[tuple[int, int, float]] = written["commits"]
        last_commit = max((c[2] for c in commits), default=time.time())
        expected = sum(len(alerts_on[k]) for _, k, _ in commits)

        def reported() -> int:
            rows = service.sql("SELECT coalesce(sum(new_row_count), 0) AS n FROM evaluation WHERE id > %s "
                               "AND outcome = 'triggered'", (baseline_eval,))
            return int(rows[0]["n"])

        ctx.progress(f"wrote {len(commits)} rows in {written['seconds']:.1f} s; waiting for {expected} reports")
        wait_until(lambda: reported() >= expected, sizes.load_drain_seconds, 0.5)
        drained = service.wait_idle(max(5.0, sizes.load_drain_seconds - (time.time() - last_commit)))
        drain_seconds = time.time() - last_commit

        pairs = service.sql(
            "SELECT i.id AS incident, i.alert_config_id AS alert, (r->>'id')::bigint AS row_id, "
            "extract(epoch FROM i.created_at)::float8 AS created FROM incident i "
            "CROSS JOIN LATERAL jsonb_array_elements(i.incident_data->'new_rows') r")
        mail_ids = {row["incident"]: row["provider_message_id"] for row in service.sql(
            "SELECT incident_id AS incident, provider_message_id FROM notification "
            "WHERE channel = 'email' AND status = 'SUCCESS' AND incident_id IS NOT NULL")}
        outcomes = {row["outcome"]: int(row["n"]) for row in service.sql(
            "SELECT outcome, count(*) AS n FROM evaluation WHERE id > %s GROUP BY 1", (baseline_eval,))}
        evaluations = service.sql(
            "SELECT cause, count(*) AS n, sum(duration_ms) AS ms FROM evaluation WHERE id > %s GROUP BY cause",
            (baseline_eval,))
        failed = service.sql("SELECT count(*) AS n FROM notification WHERE status = 'FAILED'")[0]["n"]
        received = {m.message_id: m.received_wall for m in servers.mails(with_text=False)}

    # Every row must reach every alert on its table; the first email that carries it measures its latency.
    reported_pairs = {(p["alert"], p["row_id"]) for p in pairs}
    missed = sum(1 for row_id, k, _ in commits for alert_id in alerts_on[k] if (alert_id, row_id) not in reported_pairs)
    first_mail: dict[int, float] = {}
    for p in pairs:
        wall = received.get(mail_ids.get(p["incident"]))
        if wall is not None and wall < first_mail.get(p["row_id"], float("inf")):
            first_mail[p["row_id"]] = wall
    email_ms = [(first_mail[row_id] - wall) * 1000 for row_id, _, wall in commits if row_id in first_mail]
    # Where the time goes: COMMIT -> the first incident carrying the row (waiting for and running an evaluation),
    # and incident -> its email (the outbox and the send).
    first_incident: dict[int, float] = {}
    outbox_ms = {}
    for p in pairs:
        first_incident[p["row_id"]] = min(first_incident.get(p["row_id"], float("inf")), p["created"])
        wall = received.get(mail_ids.get(p["incident"]))
        if wall is not None:
            outbox_ms[p["incident"]] = (wall - p["created"]) * 1000
    incident_ms = [(first_incident[row_id] - wall) * 1000 for row_id, _, wall in commits if row_id in first_incident]

    # The floor: the j-th notification of a table answers the j-th commit to it (one NOTIFY per transaction).
    notified: dict[str, list[float]] = defaultdict(list)
    for wall, payload in written["notified"]:
        notified[payload].append(wall)
    committed: dict[str, list[float]] = defaultdict(list)
    for _, k, wall in commits:
        committed[table_key(tables[k])].append(wall)
    floor_ms = [(n - c) * 1000 for key, walls in committed.items() for c, n in zip(walls, notified[key])]

    email, floor = summary(email_ms), summary(floor_ms)
    by_cause = {row["cause"]: int(row["n"]) for row in evaluations}
    event_evaluations = by_cause.get("event", 0) + by_cause.get("catch_up", 0)
    rate = len(commits) / written["seconds"] if written["seconds"] else 0.0
    details = dict(
        email_ms=email, floor_ms=floor, evaluations_by_cause=by_cause, drained=drained,
        drain_seconds_after_last_commit=drain_seconds, writer=dict((k, v) for k, v in written.items() if k != "commits"),
        expected_reports=expected, reported_pairs=len(pairs), distinct_reported_pairs=len(reported_pairs),
        failed_notifications=failed, emails=len(received), alerts_per_table=sizes.load_alerts / sizes.load_tables,
        evaluation_ms_total=sum(float(row["ms"] or 0) for row in evaluations),
        floor_notifications=len(written["notified"]), cpu_percent_while_writing=cpu_percent,
        commit_to_incident_ms=summary(incident_ms), incident_to_email_ms=summary(list(outbox_ms.values())),
        evaluation_outcomes=outcomes,
        note="alerts inserted with SQL; email recipient only")
    not_drained = None if drained else "the service was still busy at the drain deadline"
    # Rows still queued at the deadline are late, not lost; a quick run always drains, so there it is a bug.
    strict = drained or ctx.quick
    metrics = [
        Metric("writer rate achieved", rate, "rows/s", baseline=sizes.load_rate, baseline_name="planned"),
        Metric("floor (NOTIFY) p50", floor["p50"], "ms"),
        Metric("floor (NOTIFY) p99", floor["p99"], "ms"),
        Metric("email p50", email["p50"], "ms", baseline=floor["p50"], baseline_name="floor p50"),
        Metric("email p99", email["p99"], "ms", target=("<=", 250.0), baseline=floor["p99"],
               baseline_name="floor p99"),
        Metric("email max", email["max"], "ms", baseline=floor["max"], baseline_name="floor max"),
        Metric("event evaluations", event_evaluations, "evals", baseline=len(commits) * len(alerts_on[0]),
               baseline_name="row x alert wake-ups"),
        Metric("drain after last commit", drain_seconds, "s"),
        Metric("(row, alert) pairs missed", missed, "pairs", target=("==", 0), correctness=strict, note=not_drained),
        Metric("rows without email", len(commits) - len(email_ms), "rows", target=("==", 0), correctness=strict,
               note=not_drained),
        Metric("duplicate (row, alert) reports", len(pairs) - len(reported_pairs), "pairs"),
        Metric("failed notifications", failed, "msgs", target=("==", 0), correctness=True),
    ]
    return metrics, details
