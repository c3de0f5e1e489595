"""Scenario 4: insert throughput into a watched table against an identical unwatched one, in alternating rounds."""

from __future__ import annotations

import logging
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import psycopg2

from bench.harness import EMAIL_TO, WHATSAPP_TO, BenchService, CpuMeter, Metric, ScenarioContext, Sizes, execute
from bench.inserter import batches, single_rows, writer_process

TABLES = {"watched": "bench_watched", "unwatched": "bench_unwatched"}
ROUND_IDS = 100_000_000  # every round writes fresh ids, so each round is new to the alert

logger = logging.getLogger(__name__)


def _rounds(ctx: ScenarioContext, dsn: str, writer: ProcessPoolExecutor, service: BenchService | None,
            meter: CpuMeter, label: str) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """Rows per second of each round, by kind ('single', 'batch') and table ('watched', 'unwatched'), and the
    CPU each process used during those rounds (as % of one core)."""
    sizes: Sizes = ctx.sizes
    rates: dict[str, dict[str, list[float]]] = {k: {"watched": [], "unwatched": []} for k in ("single", "batch")}
    cpu: dict[str, dict[str, float]] = {}
    busy: dict[str, float] = {}
    for kind in ("single", "batch"):
        ctx.progress(f"{label}: {sizes.overhead_rounds} alternating rounds of {kind}-row inserts")
        for r in range(sizes.overhead_rounds):
            # Alternate which table goes first, so a drift in machine speed favours neither.
            for which in ("watched", "unwatched") if r % 2 == 0 else ("unwatched", "watched"):
                if service is not None and not service.wait_idle(120):
                    raise RuntimeError("the service did not settle between rounds")
                table = TABLES[which]
                execute(dsn, f"TRUNCATE {table}")
                _checkpoint(dsn)
                first_id = (r + 1) * ROUND_IDS
                meter.start()
                if kind == "single":
                    seconds = writer.submit(single_rows, dsn, table, sizes.overhead_single_rows, first_id).result(600)
                    rows = sizes.overhead_single_rows
                else:
                    seconds = writer.submit(batches, dsn, table, sizes.overhead_batches, sizes.overhead_batch_rows,
                                            first_id).result(600)
                    rows = sizes.overhead_batches * sizes.overhead_batch_rows
                rates[kind][which].append(rows / seconds)
                key = f"{kind} {which}"
                busy[key] = busy.get(key, 0.0) + seconds
                for name, used in meter.read().items():
                    cpu.setdefault(key, {})[name] = cpu.get(key, {}).get(name, 0.0) + used
    percent = {key: {name: round(used / busy[key] * 100, 1) for name, used in sorted(by_name.items())}
               for key, by_name in cpu.items()}
    return rates, percent


def _checkpoint(dsn: str) -> None:
    """Start every round from the same WAL state (a checkpoint in the middle of one round would skew it)."""
    try:
        execute(dsn, "CHECKPOINT")
    except psycopg2.Error as exc:  # needs superuser or pg_checkpoint
        logger.warning("CHECKPOINT failed, rounds may be noisier: %s", exc)


def _ratio(rates: dict[str, list[float]]) -> float:
    """Median over rounds of watched/unwatched, each round against its own unwatched partner."""
    return statistics.median(w / u for w, u in zip(rates["watched"], rates["unwatched"]))


def run(ctx: ScenarioContext) -> list[Metric]:
    with ctx.database() as dsn, ctx.service_environment(dsn) as (service, servers):
        execute(dsn, "".join(f"CREATE TABLE {t} (id bigint PRIMARY KEY, note text NOT NULL, "
                             "created_at timestamptz NOT NULL DEFAULT now());" for t in TABLES.values()))
        service.start()
        service.create_alert(name="Watched", query="SELECT id, note FROM bench_watched ORDER BY id DESC LIMIT 100",
                             notification_channels={"email": [EMAIL_TO], "whatsapp": [WHATSAPP_TO]})
        if not (servers.wait_for(1, 1, 30) and service.wait_idle(30)):
            raise RuntimeError("the initial report never arrived")
        writer = writer_process()
        try:
            meter = CpuMeter(dsn, {**servers.pids, "writer process": writer.submit(os.getpid).result(timeout=60)})
            running, running_cpu = _rounds(ctx, dsn, writer, service, meter, "service running")
            evaluations = service.sql("SELECT count(*) AS n FROM evaluation WHERE cause = 'event'")[0]["n"]
            emails = servers.counts()[0]
            service.stop()
            # The trigger stays when the service stops: this separates the trigger's own cost from the cost of the
            # service's reaction (its queries and sends share the machine with the writer).
            trigger_only, trigger_only_cpu = _rounds(ctx, dsn, writer, None, meter, "service stopped, trigger kept")
        finally:
            writer.shutdown()

    details: dict[str, Any] = {"service_running": running, "trigger_only": trigger_only,
                               "cpu_percent_during_rounds": {"service running": running_cpu,
                                                             "service stopped": trigger_only_cpu},
                               "event_evaluations_while_running": evaluations, "emails_while_running": emails}
    ctx.details.update(details)
    metrics = []
    for kind, target, label in (("single", 0.92, "single-row"), ("batch", 0.98, f"{ctx.sizes.overhead_batch_rows}-row")):
        unwatched = statistics.median(running[kind]["unwatched"])
        watched = statistics.median(running[kind]["watched"])
        metrics += [
            Metric(f"{label}: unwatched", unwatched, "rows/s"),
            Metric(f"{label}: watched", watched, "rows/s"),
            Metric(f"{label}: watched/unwatched", _ratio(running[kind]), "x", target=(">=", target)),
            Metric(f"{label}: watched/unwatched, service stopped", _ratio(trigger_only[kind]), "x"),
        ]
    return metrics
