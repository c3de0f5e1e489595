"""Scenario 3: how many evaluations a burst of single-row commits and one big INSERT cost."""

from __future__ import annotations

from typing import Any

from bench.harness import EMAIL_TO, WHATSAPP_TO, BenchService, Metric, ScenarioContext, execute, wait_until
from bench.inserter import burst, one_statement, writer_process

CHANNELS = {"email": [EMAIL_TO], "whatsapp": [WHATSAPP_TO]}


def _last_evaluation(service: BenchService) -> int:
    return service.sql("SELECT coalesce(max(id), 0) AS id FROM evaluation")[0]["id"]


def _reported_ids(service: BenchService, alert_id: str) -> list[int]:
    """Every row id the alert's incidents carried (with repeats)."""
    rows = service.sql("SELECT (r->>'id')::bigint AS id FROM incident i CROSS JOIN LATERAL "
                       "jsonb_array_elements(i.incident_data->'new_rows') r WHERE i.alert_config_id = %s", (alert_id,))
    return [row["id"] for row in rows]


def _reported_count(service: BenchService, alert_id: str) -> int:
    """How many rows the alert's incidents reported, counted from each incident's new_row_count (an incident keeps
    at most a thousand of its rows, so the ids alone undercount a big INSERT)."""
    rows = service.sql("SELECT coalesce(sum((incident_data->>'new_row_count')::bigint), 0) AS n FROM incident "
                       "WHERE alert_config_id = %s", (alert_id,))
    return int(rows[0]["n"])


def _event_evaluations(service: BenchService, alert_id: str, after: int) -> int:
    rows = service.sql("SELECT count(*) AS n FROM evaluation WHERE alert_config_id = %s AND id > %s "
                       "AND cause IN ('event', 'catch_up')", (alert_id, after))
    return int(rows[0]["n"])


def _settle(service: BenchService, alert_id: str, expected: int, timeout: float) -> bool:
    """Wait until the alert reported `expected` rows and the service is idle again."""
    return (wait_until(lambda: len(set(_reported_ids(service, alert_id))) >= expected, timeout, 0.1)
            and service.wait_idle(timeout))


def run(ctx: ScenarioContext) -> list[Metric]:
    sizes = ctx.sizes
    details: dict[str, Any] = {}
    with ctx.database() as dsn, ctx.service_environment(dsn) as (service, servers):
        execute(dsn, "CREATE TABLE bench_burst (id bigint PRIMARY KEY, note text NOT NULL);"
                     "CREATE TABLE bench_batch (id bigint PRIMARY KEY, note text NOT NULL);")
        service.start()
        burst_alert = service.create_alert(name="Burst", query="SELECT id, note FROM bench_burst",
                                           notification_channels=CHANNELS)["id"]
        batch_alert = service.create_alert(name="Batch", query="SELECT id, note FROM bench_batch",
                                           notification_channels=CHANNELS)["id"]
        if not (servers.wait_for(2, 2, 30) and service.wait_idle(30)):
            raise RuntimeError("the initial reports never arrived")
        servers.clear()
        writer = writer_process()
        try:
            before = _last_evaluation(service)
            ctx.progress(f"burst of {sizes.burst_inserts} single-row autocommit inserts from a writer process")
            written = writer.submit(burst, dsn, "bench_burst", sizes.burst_inserts, 1).result(timeout=120)
            burst_settled = _settle(service, burst_alert, sizes.burst_inserts, 60)
            burst_evaluations = _event_evaluations(service, burst_alert, before)
            # Each evaluation's start (ms after the first commit), duration and rows: why the burst cost what it did.
            timeline = service.sql(
                "SELECT round((extract(epoch FROM started_at) - %s) * 1000) AS start_ms, round(duration_ms) AS ms, "
                "new_row_count AS rows FROM evaluation WHERE alert_config_id = %s AND id > %s ORDER BY id",
                (written["first_commit"], burst_alert, before))
            burst_ids = _reported_ids(service, burst_alert)
            burst_mails = servers.mails(with_text=False)
            details["burst"] = {**written, "settled": burst_settled, "evaluations": burst_evaluations,
                                "evaluations_timeline": [[float(r["start_ms"]), float(r["ms"]), r["rows"]]
                                                         for r in timeline],
                                "emails": len(burst_mails),
                                "last_email_after_last_commit_ms":
                                    (max(m.received_wall for m in burst_mails) - written["last_commit"]) * 1000
                                    if burst_mails else None}
            servers.clear()

            before = _last_evaluation(service)
            ctx.progress(f"one INSERT of {sizes.batch_rows} rows")
            committed = writer.submit(one_statement, dsn, "INSERT INTO bench_batch (id, note) SELECT g, 'row ' || g "
                                      f"FROM generate_series(1, {sizes.batch_rows}) g").result(timeout=120)
            batch_settled = (wait_until(lambda: _reported_count(service, batch_alert) >= sizes.batch_rows, 60, 0.1)
                             and service.wait_idle(60))
            batch_evaluations = _event_evaluations(service, batch_alert, before)
            batch_reported = _reported_count(service, batch_alert)
            batch_mails = servers.mails(with_text=False)
            truncated = service.sql("SELECT bool_or(truncated) AS t FROM evaluation WHERE alert_config_id = %s "
                                    "AND id > %s", (batch_alert, before))[0]["t"]
            details["batch"] = {"settled": batch_settled, "evaluations": batch_evaluations, "emails": len(batch_mails),
                                "result_truncated": truncated,
                                "first_email_after_commit_ms":
                                    (min(m.received_wall for m in batch_mails) - committed) * 1000
                                    if batch_mails else None}
        finally:
            writer.shutdown()
    ctx.details.update(details)
    burst_missed = len(set(range(1, sizes.burst_inserts + 1)) - set(burst_ids))
    batch_missed = max(sizes.batch_rows - batch_reported, 0)
    return [
        Metric("burst: event evaluations", burst_evaluations, "evals", target=("<=", 3), baseline=sizes.burst_inserts,
               baseline_name="statements"),
        Metric("burst: emails", len(burst_mails), "msgs", baseline=sizes.burst_inserts, baseline_name="statements"),
        Metric("burst: writer time", written["seconds"] * 1000, "ms"),
        Metric("burst: last commit -> last email", details["burst"]["last_email_after_last_commit_ms"], "ms"),
        Metric("burst: rows missed", burst_missed, "rows", target=("==", 0), correctness=True),
        Metric("burst: rows reported twice", len(burst_ids) - len(set(burst_ids)), "rows"),
        Metric(f"{sizes.batch_rows}-row INSERT: event evaluations", batch_evaluations, "evals", target=("<=", 1),
               baseline=1, baseline_name="statements"),
        Metric(f"{sizes.batch_rows}-row INSERT: commit -> email", details["batch"]["first_email_after_commit_ms"],
               "ms"),
        Metric(f"{sizes.batch_rows}-row INSERT: rows missed", batch_missed, "rows", target=("==", 0),
               correctness=True),
    ]
