"""Scenario 4: insert throughput into a watched table against an identical unwatched one, in alternating rounds
(with TimescaleDB, also a watched hypertable against an unwatched one)."""

from __future__ import annotations

import logging
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import psycopg2

from bench.harness import (EMAIL_TO, HYPERTABLE_CHUNK_INTERVAL, WHATSAPP_TO, BenchService, CpuMeter, Metric,
                           ScenarioContext, Sizes, execute, make_hypertables)
from bench.inserter import batches, single_rows, writer_process

# With TimescaleDB the same pair again as hypertables: the trigger's cost on a hypertable is measured against a
# hypertable without it, in the same rounds as the plain pair.
TABLES = {"plain": {"watched": "bench_watched", "unwatched": "bench_unwatched"},
          "hypertable": {"watched": "bench_watched_ht", "unwatched": "bench_unwatched_ht"}}
ROUND_IDS = 100_000_000  # every round writes fresh ids, so each round is new to the alert

logger = logging.getLogger(__name__)


def _rounds(ctx: ScenarioContext, dsn: str, writer: ProcessPoolExecutor, service: BenchService | None,
            meter: CpuMeter, label: str, variants: list[str]
            ) -> tuple[dict[str, dict[str, dict[str, list[float]]]], dict[str, Any]]:
    """Rows per second of each round, by variant ('plain', 'hypertable'), kind ('single', 'batch') and table
    ('watched', 'unwatched'), and the CPU each process used during those rounds (as % of one core)."""
    sizes: Sizes = ctx.sizes
    rates = {v: {k: {"watched": [], "unwatched": []} for k in ("single", "batch")} for v in variants}
    cpu: dict[str, dict[str, float]] = {}
    busy: dict[str, float] = {}
    sequence = [(variant, which) for variant in variants for which in ("watched", "unwatched")]
    for kind in ("single", "batch"):
        ctx.progress(f"{label}: {sizes.overhead_rounds} alternating rounds of {kind}-row inserts")
        for r in range(sizes.overhead_rounds):
            # Reverse the order every other round, so a drift in machine speed favours no table.
            for variant, which in sequence if r % 2 == 0 else sequence[::-1]:
                if service is not None and not service.wait_idle(120):
                    raise RuntimeError("the service did not settle between rounds")
                table = TABLES[variant][which]
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
                rates[variant][kind][which].append(rows / seconds)
                key = f"{kind} {which}" + (f" {variant}" if variant != "plain" else "")
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


def _paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b, each round's figure against its partner of the same round."""
    return statistics.median(x / y for x, y in zip(a, b))


def run(ctx: ScenarioContext) -> list[Metric]:
    variants = ["plain", "hypertable"] if ctx.hypertables() else ["plain"]
    with (ctx.database(timescaledb="hypertable" in variants) as dsn,
          ctx.service_environment(dsn) as (service, servers)):
        execute(dsn, "".join(f"CREATE TABLE {t} (id bigint PRIMARY KEY, note text NOT NULL, "
                             "created_at timestamptz NOT NULL DEFAULT now());" for t in TABLES["plain"].values()))
        if "hypertable" in variants:
            # A hypertable's unique indexes must include its time column.
            execute(dsn, "".join(f"CREATE TABLE {t} (id bigint NOT NULL, note text NOT NULL, created_at timestamptz "
                                 "NOT NULL DEFAULT now(), PRIMARY KEY (id, created_at));"
                                 for t in TABLES["hypertable"].values()))
            make_hypertables(dsn, list(TABLES["hypertable"].values()))
        service.start()
        for variant in variants:
            watched = TABLES[variant]["watched"]
            service.create_alert(name=f"Watched {variant}", query=f"SELECT id, note FROM {watched} ORDER BY id DESC "
                                 "LIMIT 100", notification_channels={"email": [EMAIL_TO], "whatsapp": [WHATSAPP_TO]})
        reports = len(variants)
        if not (servers.wait_for(reports, reports, 30) and service.wait_idle(30)):
            raise RuntimeError("the initial reports never arrived")
        writer = writer_process()
        try:
            meter = CpuMeter(dsn, {**servers.pids, "writer process": writer.submit(os.getpid).result(timeout=60)})
            running, running_cpu = _rounds(ctx, dsn, writer, service, meter, "service running", variants)
            evaluations = service.sql("SELECT count(*) AS n FROM evaluation WHERE cause = 'event'")[0]["n"]
            emails = servers.counts()[0]
            service.stop()
            # The trigger stays when the service stops: this separates the trigger's own cost from the cost of the
            # service's reaction (its queries and sends share the machine with the writer).
            trigger_only, trigger_only_cpu = _rounds(ctx, dsn, writer, None, meter, "service stopped, trigger kept",
                                                     variants)
        finally:
            writer.shutdown()

    details: dict[str, Any] = {"service_running": running["plain"], "trigger_only": trigger_only["plain"],
                               "cpu_percent_during_rounds": {"service running": running_cpu,
                                                             "service stopped": trigger_only_cpu},
                               "event_evaluations_while_running": evaluations, "emails_while_running": emails}
    if "hypertable" in variants:
        details.update(hypertable_service_running=running["hypertable"],
                       hypertable_trigger_only=trigger_only["hypertable"],
                       hypertable_chunk_interval=HYPERTABLE_CHUNK_INTERVAL)
    ctx.details.update(details)
    metrics = []
    for variant in variants:
        suffix = " (hypertable)" if variant == "hypertable" else ""
        for kind, target, label in (("single", 0.92, "single-row"),
                                    ("batch", 0.98, f"{ctx.sizes.overhead_batch_rows}-row")):
            on, off = running[variant][kind], trigger_only[variant][kind]
            metrics += [
                Metric(f"{label}: unwatched{suffix}", statistics.median(on["unwatched"]), "rows/s"),
                Metric(f"{label}: watched{suffix}", statistics.median(on["watched"]), "rows/s"),
                Metric(f"{label}: watched/unwatched{suffix}", _paired(on["watched"], on["unwatched"]), "x",
                       target=(">=", target)),
                Metric(f"{label}: watched/unwatched, service stopped{suffix}",
                       _paired(off["watched"], off["unwatched"]), "x"),
            ]
    if "hypertable" in variants:
        # What the hypertable itself costs, trigger aside: both unwatched tables, same rounds, service stopped.
        for kind, label in (("single", "single-row"), ("batch", f"{ctx.sizes.overhead_batch_rows}-row")):
            metrics.append(Metric(f"{label}: unwatched hypertable/plain table",
                                  _paired(trigger_only["hypertable"][kind]["unwatched"],
                                          trigger_only["plain"][kind]["unwatched"]), "x"))
    return metrics
