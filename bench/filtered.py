"""Scenario: alerts with filters on a big table: 10 alerts, each with its own WHERE clause on the columns of a
1,000,000-row readings table (a hypertable on TimescaleDB), single-row commits at 100 a second; COMMIT -> email for
every row an alert's filter selects. No index serves the filters (as with an operator's ad-hoc condition), so a full
re-evaluation reads the whole table. When the service has an INCREMENTAL_EVALUATION setting, a second pass runs with
it off, and the ratio of the two is reported."""

from __future__ import annotations

import random
import time
from typing import Any, Callable

from bench.harness import (EMAIL_TO, HYPERTABLE_CHUNK_INTERVAL, BenchService, LoopbackServers, Metric,
                           ScenarioContext, execute, loopback_servers, make_hypertables, rows_in_mails,
                           service_settings, summary, wait_until)
from bench.inserter import paced_readings, writer_process

TABLE = "bench_readings"
SETTING = "incremental_evaluation"


def _alerts(count: int) -> list[tuple[str, Callable[[int, float], bool]]]:
    """(WHERE clause, the same predicate in Python) of each alert: three shapes of filter, alert k on device k."""
    alerts: list[tuple[str, Callable[[int, float], bool]]] = []
    for k in range(count):
        if k % 3 == 0:
            alerts.append((f"device_id = {k} AND value > 97", lambda d, v, k=k: d == k and v > 97))
        elif k % 3 == 1:
            alerts.append((f"device_id = {k} AND value < 3", lambda d, v, k=k: d == k and v < 3))
        else:
            alerts.append((f"device_id IN ({k}, {k + count}) AND value BETWEEN 1 AND 2",
                           lambda d, v, k=k: d in (k, k + count) and 1 <= v <= 2))
    return alerts


def _readings(count: int, alerts: int, first_id: int, seed: int) -> list[tuple[int, int, float]]:
    """New readings on the alerted devices and as many others; half of them with an extreme value, so that about
    one in six is selected by some alert and the rest are not."""
    rng = random.Random(seed)
    readings = []
    for i in range(count):
        value = rng.choice((rng.uniform(0, 3), rng.uniform(97, 100))) if rng.random() < 0.5 else rng.uniform(3, 97)
        readings.append((first_id + i, rng.randrange(2 * alerts), round(value, 2)))
    return readings


def run(ctx: ScenarioContext) -> list[Metric]:
    from config import Settings

    sizes = ctx.sizes
    hypertable = ctx.hypertables()
    has_switch = SETTING in Settings.model_fields
    alerts = _alerts(sizes.filtered_alerts)
    with ctx.database(timescaledb=hypertable) as dsn, loopback_servers(ctx.work_dir / "servers") as servers:
        ctx.progress(f"{sizes.filtered_rows:,} readings in {'a hypertable' if hypertable else 'a table'}")
        execute(dsn, f"CREATE TABLE {TABLE} (id bigint NOT NULL, device_id integer NOT NULL, value double precision "
                     "NOT NULL, note text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), "
                     "PRIMARY KEY (id, created_at))")
        if hypertable:
            make_hypertables(dsn, [TABLE])
        began = time.monotonic()
        # A week of readings, so that a hypertable has several chunks.
        execute(dsn, f"INSERT INTO {TABLE} (id, device_id, value, note, created_at) SELECT g, g %% %s, "
                     "round((random() * 100)::numeric, 2), 'seed', now() - (g %% 604800) * interval '1 second' "
                     "FROM generate_series(1, %s) g", (sizes.filtered_devices, sizes.filtered_rows))
        execute(dsn, f"ANALYZE {TABLE}")
        loaded = time.monotonic() - began
        ctx.details.update(rows=sizes.filtered_rows, load_seconds=loaded, hypertable=hypertable,
                           chunk_interval=HYPERTABLE_CHUNK_INTERVAL if hypertable else None,
                           filters=[where for where, _ in alerts])
        overrides = {SETTING: True} if has_switch else {}
        service = BenchService(service_settings(dsn, servers, ctx.work_dir / "data", **overrides))
        try:
            on = _pass(ctx, service, servers, alerts, first_id=sizes.filtered_rows + 1, create=True)
        finally:
            service.stop()
        ctx.details["incremental_on" if has_switch else "pass"] = on
        off = None
        if has_switch:
            ctx.progress("again with INCREMENTAL_EVALUATION off")
            service = BenchService(service_settings(dsn, servers, ctx.work_dir / "data", **{SETTING: False}))
            try:
                off = _pass(ctx, service, servers, alerts, first_id=sizes.filtered_rows + 10_000_001, create=False)
            finally:
                service.stop()
            ctx.details["incremental_off"] = off
        else:
            ctx.details["incremental_off"] = "not measured: the service has no INCREMENTAL_EVALUATION setting"

    email = on["email_ms"]
    metrics = [
        Metric("table load (generate_series)", loaded, "s"),
        Metric("writer rate achieved", on["rate"], "rows/s", baseline=sizes.filtered_rate, baseline_name="planned"),
        Metric("selected (row, alert) pairs", on["pairs"], "pairs"),
        Metric("email p50", email["p50"], "ms"),
        Metric("email p99", email["p99"], "ms", target=("<=", 50.0)),
        Metric("email max", email["max"], "ms"),
        *_correctness(ctx, on, ""),
    ]
    if off is not None:
        metrics += [
            Metric("email p50, incremental off", off["email_ms"]["p50"], "ms", baseline=email["p50"],
                   baseline_name="incremental on"),
            Metric("email p99, incremental off", off["email_ms"]["p99"], "ms", baseline=email["p99"],
                   baseline_name="incremental on"),
            *_correctness(ctx, off, ", incremental off"),
        ]
    else:
        metrics.append(Metric("passes with incremental evaluation off", 0, "passes",
                              note="the service has no INCREMENTAL_EVALUATION setting: one pass, as it evaluates"))
    return metrics


def _correctness(ctx: ScenarioContext, result: dict[str, Any], suffix: str) -> list[Metric]:
    # Pairs still queued at the deadline are late, not lost; a quick run always drains, so there it is a bug.
    strict = result["drained"] or ctx.quick
    return [
        Metric(f"(row, alert) pairs without email{suffix}", result["missed"], "pairs", target=("==", 0),
               correctness=strict),
        Metric(f"(row, alert) pairs in two emails or more{suffix}", result["twice"], "pairs", target=("==", 0),
               correctness=True),
        Metric(f"rows emailed to an alert whose filter rejects them{suffix}", result["wrong"], "pairs",
               target=("==", 0), correctness=True),
    ]


def _pass(ctx: ScenarioContext, service: BenchService, servers: LoopbackServers,
          alerts: list[tuple[str, Callable[[int, float], bool]]], first_id: int, create: bool) -> dict[str, Any]:
    """Start the service (creating the alerts on the first pass), write readings at the planned rate and follow
    every selected (row, alert) pair to its first email."""
    sizes = ctx.sizes
    service.start()
    if create:
        for k, (where, _) in enumerate(alerts):
            service.create_alert(name=f"filtered alert-{k}", query=f"SELECT id, device_id, value, note FROM {TABLE} "
                                 f"WHERE {where}", notification_channels={"email": [EMAIL_TO]})
        if not servers.wait_for(len(alerts), 0, 120):
            raise RuntimeError(f"initial reports incomplete: {servers.counts()[0]} of {len(alerts)}")
    if not service.wait_idle(120):
        raise RuntimeError("the service did not settle after start")
    servers.clear()
    baseline_eval = service.sql("SELECT coalesce(max(id), 0) AS id FROM evaluation")[0]["id"]
    readings = _readings(int(sizes.filtered_rate * sizes.filtered_seconds), len(alerts), first_id, seed=first_id)
    expected = {(k, row_id) for row_id, device, value in readings for k, (_, selects) in enumerate(alerts)
                if selects(device, value)}
    writer = writer_process()
    try:
        ctx.progress(f"writer process: {len(readings)} single-row commits at {sizes.filtered_rate:.0f}/s")
        written = writer.submit(paced_readings, service.dsn, TABLE, readings, sizes.filtered_rate).result(
            timeout=2 * sizes.filtered_seconds + 60)
    finally:
        writer.shutdown()
    committed = {row_id: wall for row_id, _, wall in written["commits"]}
    expected = {pair for pair in expected if pair[1] in committed}
    wait_until(lambda: expected <= set(rows_in_mails(servers.mails())), 120, 0.5)
    drained = service.wait_idle(60)
    shown = rows_in_mails(servers.mails())
    evaluations = {row["cause"]: [int(row["n"]), float(row["ms"] or 0)] for row in service.sql(
        "SELECT cause, count(*) AS n, sum(duration_ms) AS ms FROM evaluation WHERE id > %s GROUP BY cause",
        (baseline_eval,))}
    email_ms = [(min(m.received_wall for m in shown[pair]) - committed[pair[1]]) * 1000
                for pair in expected if pair in shown]
    return {"email_ms": summary(email_ms), "pairs": len(expected), "missed": len(expected - set(shown)),
            "twice": sum(1 for found in shown.values() if len({m.message_id for m in found}) > 1),
            "wrong": len(set(shown) - expected),
            "rate": len(written["commits"]) / written["seconds"] if written["seconds"] else 0.0,
            "drained": drained, "emails": servers.counts()[0], "evaluations_by_cause": evaluations,
            "writer_most_behind_seconds": written["most_behind_seconds"]}
