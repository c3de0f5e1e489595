"""Scenario 2: COMMIT -> incident and COMMIT -> email under load: many alerts over many tables, a writer process at
a steady rate (with TimescaleDB, once more with the tables as hypertables). The fan-out measurement here is shared
with the steady scenario."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from bench.harness import (EMAIL_TO, CpuMeter, Metric, ScenarioContext, alert_number, execute, insert_alerts_sql,
                           make_hypertables, rows_in_mails, summary, table_key, wait_until)
from bench.inserter import paced_single_rows, writer_process


@dataclass
class FanOut:
    """What one fan-out run measured: latencies per (row, alert) pair, and what was missed or repeated."""

    email_ms: list[float]  # COMMIT -> the first email that carries the row for the alert
    incident_ms: list[float]  # COMMIT -> the first incident of the alert that holds the row
    floor_ms: list[float]  # COMMIT -> a bare LISTEN connection's NOTIFY
    pairs: int  # (row, alert) pairs the writer's rows called for
    missed_emails: int  # pairs no email carried
    missed_incidents: int  # pairs no incident holds
    emailed_twice: int  # pairs carried by two or more different emails
    recorded_twice: int  # pairs held by two or more incidents
    rate: float  # commits per second the writer achieved
    drained: bool  # the service was idle again before the drain deadline
    drain_seconds: float
    event_evaluations: int
    details: dict[str, Any] = field(default_factory=dict)


def fan_out(ctx: ScenarioContext, *, label: str, tables: int, alerts: int, rate: float, seconds: float,
            drain_seconds: float, timescaledb: bool = False, hypertables: bool = False) -> FanOut:
    """`alerts` alerts spread evenly over `tables` tables, each reading its whole (small) table; single-row commits
    round-robin over the tables at `rate` per second for `seconds`; every (row, alert) pair is followed to its
    incident (the service database) and its first email (the text of what the SMTP server received)."""
    names = [f"bench_{label}_{k:03d}" for k in range(tables)]
    kind = "hypertables" if hypertables else "tables"
    with ctx.database(timescaledb=timescaledb) as dsn, ctx.service_environment(dsn) as (service, servers):
        ctx.progress(f"{len(names)} {kind} and {alerts} alerts (inserted with SQL, email only)")
        if hypertables:
            # A hypertable's unique indexes must include its time column.
            execute(dsn, "".join(f"CREATE TABLE {t} (id bigint NOT NULL, note text NOT NULL, created_at timestamptz "
                                 "NOT NULL DEFAULT now(), PRIMARY KEY (id, created_at));" for t in names))
            make_hypertables(dsn, names)
        else:
            execute(dsn, "".join(f"CREATE TABLE {t} (id bigint PRIMARY KEY, note text NOT NULL);" for t in names))
        # Several distinct alerts per table, each reading the whole table; alert j watches table j % tables.
        insert_alerts_sql(dsn, [
            {"name": f"{label} alert-{j}", "query": f"SELECT id, note FROM {names[j % tables]} WHERE id > {-1 - j}",
             "schedule": "interval:1h", "notification_channels": {"email": [EMAIL_TO]},
             "watched_tables": [table_key(names[j % tables])]} for j in range(alerts)])
        start_seconds = service.start()
        ctx.progress(f"service started in {start_seconds:.2f} s; waiting for {alerts} initial reports")
        if not (servers.wait_for(alerts, 0, 180) and service.wait_idle(60)):
            raise RuntimeError(f"initial reports incomplete: {servers.counts()[0]} of {alerts}")
        servers.clear()
        alert_ids = {alert_number(row["name"]): row["id"] for row in service.sql("SELECT id, name FROM alert_config")}
        alerts_on: dict[int, list[int]] = defaultdict(list)
        for j in range(alerts):
            alerts_on[j % tables].append(j)
        began_wall = time.time()
        baseline_eval = service.sql("SELECT coalesce(max(id), 0) AS id FROM evaluation")[0]["id"]

        writer = writer_process()
        try:
            meter = CpuMeter(dsn, {**servers.pids, "writer process": writer.submit(os.getpid).result(timeout=60)})
            ctx.progress(f"writer process: {rate:.0f} single-row commits/s for {seconds:.0f} s")
            meter.start()
            began = time.monotonic()
            written = writer.submit(paced_single_rows, dsn, names, rate, seconds, 1).result(timeout=2 * seconds + 60)
            # Where the machine's two cores went while the writer ran (the writer's own backend is not listed).
            cpu_percent = {name: round(used / (time.monotonic() - began) * 100, 1)
                           for name, used in sorted(meter.read().items())}
        finally:
            writer.shutdown()
        commits: list[tuple[int, int, float]] = written["commits"]
        last_commit = max((c[2] for c in commits), default=time.time())
        expected = sum(len(alerts_on[k]) for _, k, _ in commits)

        def recorded() -> int:
            rows = service.sql("SELECT coalesce(sum(jsonb_array_length(incident_data->'new_rows')), 0) AS n "
                               "FROM incident WHERE created_at >= to_timestamp(%s)", (began_wall,))
            return int(rows[0]["n"])

        ctx.progress(f"wrote {len(commits)} rows in {written['seconds']:.1f} s; waiting for {expected} (row, alert) "
                     "pairs")
        wait_until(lambda: recorded() >= expected, drain_seconds, 0.5)
        drained = service.wait_idle(max(5.0, drain_seconds - (time.time() - last_commit)))
        drain = time.time() - last_commit

        held = service.sql(
            "SELECT i.id AS incident, i.alert_config_id AS alert, (r->>'id')::bigint AS row_id, "
            "extract(epoch FROM i.created_at)::float8 AS created FROM incident i "
            "CROSS JOIN LATERAL jsonb_array_elements(i.incident_data->'new_rows') r "
            "WHERE i.created_at >= to_timestamp(%s)", (began_wall,))
        # An email shows at most so many rows; the rows it carries beyond those are found through its incident.
        mail_of_incident = {row["incident"]: row["provider_message_id"] for row in service.sql(
            "SELECT incident_id AS incident, provider_message_id FROM notification WHERE channel = 'email' "
            "AND status = 'SUCCESS' AND incident_id IS NOT NULL AND created_at >= to_timestamp(%s)", (began_wall,))}
        evaluations = service.sql(
            "SELECT cause, count(*) AS n, sum(duration_ms) AS ms FROM evaluation WHERE id > %s GROUP BY cause",
            (baseline_eval,))
        outcomes = {row["outcome"]: int(row["n"]) for row in service.sql(
            "SELECT outcome, count(*) AS n FROM evaluation WHERE id > %s GROUP BY 1", (baseline_eval,))}
        failed = service.sql("SELECT count(*) AS n FROM notification WHERE status = 'FAILED'")[0]["n"]
        mails = servers.mails()

    number_of = {alert_id: j for j, alert_id in alert_ids.items()}
    shown = rows_in_mails(mails)
    by_id = {m.message_id: m for m in mails}
    incident_of: dict[tuple[int, int], list[float]] = defaultdict(list)
    carried: dict[tuple[int, int], dict[str, float]] = defaultdict(dict)  # pair -> message id -> receipt (wall)
    for (j, row_id), found in shown.items():
        for mail in found:
            carried[(j, row_id)][mail.message_id] = mail.received_wall
    hidden_only = 0
    for p in held:
        pair = (number_of.get(p["alert"]), p["row_id"])
        incident_of[pair].append(p["created"])
        mail = by_id.get(mail_of_incident.get(p["incident"]))
        if mail is not None and mail.message_id not in carried[pair]:
            hidden_only += pair not in shown
            carried[pair][mail.message_id] = mail.received_wall

    email_ms, incident_ms, missed_emails, missed_incidents = [], [], 0, 0
    for row_id, k, wall in commits:
        for j in alerts_on[k]:
            messages = carried.get((j, row_id))
            if messages:
                email_ms.append((min(messages.values()) - wall) * 1000)
            else:
                missed_emails += 1
            if incident_of.get((j, row_id)):
                incident_ms.append((min(incident_of[(j, row_id)]) - wall) * 1000)
            else:
                missed_incidents += 1
    emailed_twice = sum(1 for messages in carried.values() if len(messages) > 1)
    recorded_twice = sum(1 for created in incident_of.values() if len(created) > 1)

    # The floor: the j-th notification of a table answers the j-th commit to it (one NOTIFY per transaction).
    notified: dict[str, list[float]] = defaultdict(list)
    for wall, payload in written["notified"]:
        notified[payload].append(wall)
    committed: dict[str, list[float]] = defaultdict(list)
    for _, k, wall in commits:
        committed[table_key(names[k])].append(wall)
    floor_ms = [(n - c) * 1000 for key, walls in committed.items() for c, n in zip(walls, notified[key])]

    by_cause = {row["cause"]: int(row["n"]) for row in evaluations}
    rows_per_mail = [len(pairs) for pairs in _pairs_per_mail(shown).values()]
    details = dict(
        email_ms=summary(email_ms), commit_to_incident_ms=summary(incident_ms), floor_ms=summary(floor_ms),
        evaluations_by_cause=by_cause, evaluation_outcomes=outcomes, drained=drained,
        drain_seconds_after_last_commit=drain, writer={k: v for k, v in written.items() if k not in ("commits",
                                                                                                     "notified")},
        expected_pairs=expected, incident_pairs=len(held), distinct_incident_pairs=len(incident_of),
        failed_notifications=failed, emails=len(mails), rows_shown_per_email=summary(rows_per_mail),
        pairs_found_only_through_their_incident=hidden_only, alerts_per_table=alerts / tables,
        evaluation_ms_total=sum(float(row["ms"] or 0) for row in evaluations),
        floor_notifications=len(written["notified"]), cpu_percent_while_writing=cpu_percent,
        note="alerts inserted with SQL; email recipient only; incident times are the storing transaction's start")
    return FanOut(email_ms=email_ms, incident_ms=incident_ms, floor_ms=floor_ms, pairs=expected,
                  missed_emails=missed_emails, missed_incidents=missed_incidents, emailed_twice=emailed_twice,
                  recorded_twice=recorded_twice, rate=len(commits) / written["seconds"] if written["seconds"] else 0.0,
                  drained=drained, drain_seconds=drain,
                  event_evaluations=by_cause.get("event", 0) + by_cause.get("catch_up", 0), details=details)


def _pairs_per_mail(shown: dict[tuple[int, int], list[Any]]) -> dict[str, set[tuple[int, int]]]:
    per_mail: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for pair, found in shown.items():
        for mail in found:
            per_mail[mail.message_id].add(pair)
    return per_mail


def correctness_metrics(ctx: ScenarioContext, run: FanOut) -> list[Metric]:
    """Missed and repeated (row, alert) pairs, and failed sends."""
    not_drained = None if run.drained else "the service was still busy at the drain deadline"
    # Pairs still queued at the deadline are late, not lost; a quick run always drains, so there it is a bug.
    strict = run.drained or ctx.quick
    failed = run.details["failed_notifications"]
    return [
        Metric("(row, alert) pairs without incident", run.missed_incidents, "pairs", target=("==", 0),
               correctness=strict, note=not_drained),
        Metric("(row, alert) pairs without email", run.missed_emails, "pairs", target=("==", 0), correctness=strict,
               note=not_drained),
        Metric("(row, alert) pairs in two emails or more", run.emailed_twice, "pairs", target=("==", 0),
               correctness=True),
        Metric("(row, alert) pairs in two incidents or more", run.recorded_twice, "pairs", target=("==", 0),
               correctness=True),
        Metric("failed notifications", failed, "msgs", target=("==", 0), correctness=True),
    ]


def run(ctx: ScenarioContext) -> list[Metric]:
    timescaledb = ctx.hypertables()
    # With TimescaleDB both passes have the extension in their database, so the kind of table is all that differs.
    metrics, ctx.details["plain"] = _measure(ctx, timescaledb=timescaledb, hypertables=False)
    if timescaledb:
        hypertable_metrics, ctx.details["hypertable"] = _measure(ctx, timescaledb=True, hypertables=True)
        for m in hypertable_metrics:
            m.name += " (hypertable)"
        metrics += hypertable_metrics
    return metrics


def _measure(ctx: ScenarioContext, timescaledb: bool, hypertables: bool) -> tuple[list[Metric], dict[str, Any]]:
    """One pass of the scenario, on plain tables or on hypertables: its figures and details."""
    sizes = ctx.sizes
    result = fan_out(ctx, label="load", tables=sizes.load_tables, alerts=sizes.load_alerts, rate=sizes.load_rate,
                     seconds=sizes.load_seconds, drain_seconds=sizes.load_drain_seconds, timescaledb=timescaledb,
                     hypertables=hypertables)
    incident, email, floor = summary(result.incident_ms), summary(result.email_ms), summary(result.floor_ms)
    metrics = [
        Metric("writer rate achieved", result.rate, "rows/s", baseline=sizes.load_rate, baseline_name="planned"),
        Metric("floor (NOTIFY) p99", floor["p99"], "ms"),
        Metric("incident p50", incident["p50"], "ms", baseline=floor["p50"], baseline_name="floor p50"),
        Metric("incident p99", incident["p99"], "ms", target=("<=", 250.0), baseline=floor["p99"],
               baseline_name="floor p99"),
        Metric("first email p50", email["p50"], "ms", baseline=floor["p50"], baseline_name="floor p50"),
        Metric("first email p99", email["p99"], "ms", target=("<=", 1000.0), baseline=floor["p99"],
               baseline_name="floor p99"),
        Metric("first email max", email["max"], "ms", baseline=floor["max"], baseline_name="floor max"),
        Metric("event evaluations", result.event_evaluations, "evals", baseline=result.pairs,
               baseline_name="row x alert wake-ups"),
        Metric("emails", result.details["emails"], "msgs", baseline=result.pairs, baseline_name="(row, alert) pairs"),
        Metric("drain after last commit", result.drain_seconds, "s"),
        *correctness_metrics(ctx, result),
    ]
    return metrics, result.details
