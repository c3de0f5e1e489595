"""Scenario: a steady stream of commits fanned out to many alerts: 100 alerts over 10 tables, 50 single-row commits
a second, every (row, alert) pair followed from COMMIT to the SMTP server."""

from __future__ import annotations

from bench.harness import Metric, ScenarioContext, summary
from bench.load import correctness_metrics, fan_out


def run(ctx: ScenarioContext) -> list[Metric]:
    sizes = ctx.sizes
    result = fan_out(ctx, label="steady", tables=sizes.steady_tables, alerts=sizes.steady_alerts,
                     rate=sizes.steady_rate, seconds=sizes.steady_seconds, drain_seconds=sizes.steady_drain_seconds)
    ctx.details.update(result.details)
    email, floor = summary(result.email_ms), summary(result.floor_ms)
    return [
        Metric("writer rate achieved", result.rate, "rows/s", baseline=sizes.steady_rate, baseline_name="planned"),
        Metric("floor (NOTIFY) p50", floor["p50"], "ms"),
        Metric("floor (NOTIFY) p99", floor["p99"], "ms"),
        Metric("email p50", email["p50"], "ms", baseline=floor["p50"], baseline_name="floor p50"),
        Metric("email p99", email["p99"], "ms", target=("<=", 100.0), baseline=floor["p99"],
               baseline_name="floor p99"),
        Metric("email max", email["max"], "ms", baseline=floor["max"], baseline_name="floor max"),
        Metric("emails", result.details["emails"], "msgs", baseline=result.pairs, baseline_name="(row, alert) pairs"),
        Metric("event evaluations", result.event_evaluations, "evals"),
        *correctness_metrics(ctx, result),
    ]
