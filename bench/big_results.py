"""Scenario 6: diffing a big result against the previous one with rules.py's pure functions: time and memory."""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from typing import Any, Callable

from bench.harness import Metric, ScenarioContext, execute, migrate

QUERY = "SELECT id, customer, amount, created_at FROM bench_big ORDER BY id"


def _diff(rows: list[tuple], previous_packed: bytes) -> tuple[list[int], bytes]:
    """What an evaluation does with a result: fingerprints, the previous set, the new positions, the new state."""
    import rules

    identities = rules.identities(rows, None)
    previous = rules.unpack_fingerprints(previous_packed)
    positions = rules.new_row_positions(previous, identities)
    return positions, rules.pack_fingerprints(identities)


def _timed(function: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    result = function()
    return (time.perf_counter() - began) * 1000, result


def run(ctx: ScenarioContext) -> list[Metric]:
    import database
    import rules

    n = ctx.sizes.big_rows
    changed = max(1, int(n * ctx.sizes.big_changed_fraction))
    with ctx.database() as dsn:
        migrate(dsn)
        execute(dsn, "CREATE TABLE bench_big (id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(12, 2), "
                     "created_at timestamptz NOT NULL)")
        execute(dsn, "INSERT INTO bench_big SELECT g, 'customer ' || (g %% 997), (g %% 10000) / 100.0, "
                     "timestamptz '2026-01-01' + g * interval '1 second' FROM generate_series(1, %s) g", (n,))
        pool = database.Pool(dsn, size=1, name="bench")
        try:
            ctx.progress(f"fetching {n} rows once through database.run_query")
            fetch_ms, (columns, rows, truncated) = _timed(lambda: database.run_query(
                pool, query=QUERY, timeout_seconds=120, max_rows=n))
            # For scale: the Python memory of the fetched result itself, from a second, traced fetch.
            gc.collect()
            tracemalloc.start()
            try:
                database.run_query(pool, query=QUERY, timeout_seconds=120, max_rows=n)
                _, rows_peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        finally:
            pool.close()
    if len(rows) != n or truncated:
        raise RuntimeError(f"fetched {len(rows)} rows (truncated: {truncated}), expected {n}")

    # The previous result differs in 1 % of the rows, spread evenly: those are the "new" rows now.
    previous_rows = list(rows)
    step = n // changed
    for i in range(0, step * changed, step):
        row = previous_rows[i]
        previous_rows[i] = (row[0], row[1] + " (before)", row[2], row[3])
    previous_packed = rules.pack_fingerprints(rules.identities(previous_rows, None))
    del previous_rows

    ctx.progress(f"diffing {n} rows against the previous result, {ctx.sizes.big_repeats} times")
    steps: dict[str, list[float]] = {"identities": [], "unpack": [], "new_row_positions": [], "pack": []}
    totals: list[float] = []
    found = -1
    for _ in range(ctx.sizes.big_repeats):
        gc.collect()
        total_ms, (positions, _) = _timed(lambda: _diff(rows, previous_packed))
        totals.append(total_ms)
        found = len(positions)
        ms, identities = _timed(lambda: rules.identities(rows, None))
        steps["identities"].append(ms)
        ms, previous = _timed(lambda: rules.unpack_fingerprints(previous_packed))
        steps["unpack"].append(ms)
        ms, _ = _timed(lambda: rules.new_row_positions(previous, identities))
        steps["new_row_positions"].append(ms)
        ms, _ = _timed(lambda: rules.pack_fingerprints(identities))
        steps["pack"].append(ms)
        del identities, previous

    gc.collect()
    tracemalloc.start()
    try:
        _diff(rows, previous_packed)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # The whole pure decision an evaluation makes (diff plus the rows as JSON for the incident), when rules.py
    # has one: the diff alone is not all an evaluation pays per row.
    decide_ms: float | None = None
    decide_peak: float | None = None
    if hasattr(rules, "decide") and hasattr(rules, "AlertState"):
        from datetime import datetime, timezone

        def decision() -> Any:
            prior = rules.AlertState(initialized=True, fingerprints=rules.unpack_fingerprints(previous_packed))
            return rules.decide(condition=rules.parse_condition(None), prior=prior, columns=columns, rows=rows,
                                keys=None, now=datetime.now(timezone.utc))

        timings = []
        for _ in range(ctx.sizes.big_repeats):
            gc.collect()
            ms, made = _timed(decision)
            timings.append(ms)
        decide_ms = statistics.median(timings)
        gc.collect()
        tracemalloc.start()
        try:
            decision()
            decide_peak = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()
        ctx.details.update(decide_ms_each=timings, decide_outcome=made.outcome,
                           decide_notice_rows=sum(len(n.rows) for n in made.notices))

    diff_ms = statistics.median(totals)
    ctx.details.update(rows=n, changed=changed, columns=columns, fetch_ms=fetch_ms, diff_ms_each=totals,
                       step_ms_median={k: statistics.median(v) for k, v in steps.items()},
                       diff_peak_mb=peak / 2**20, fetch_peak_mb=rows_peak / 2**20)
    return [
        Metric(f"fetch {n} rows (run_query)", fetch_ms, "ms"),
        Metric(f"diff {n} rows, median", diff_ms, "ms", target=("<", 300), baseline=fetch_ms,
               baseline_name="fetch"),
        Metric("diff extra memory (tracemalloc peak)", peak / 2**20, "MB", target=("<", 50),
               baseline=rows_peak / 2**20, baseline_name="fetching the rows"),
        Metric("new rows found", found, "rows", target=("==", changed), correctness=True),
    ] + ([
        Metric(f"rules.decide {n} rows, median", decide_ms, "ms", baseline=diff_ms, baseline_name="diff"),
        Metric("rules.decide extra memory", decide_peak, "MB", baseline=peak / 2**20, baseline_name="diff"),
    ] if decide_ms is not None else [])
