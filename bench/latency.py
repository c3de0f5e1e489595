"""Scenario 1: COMMIT -> email and WhatsApp for one alert, against the floor COMMIT -> a bare LISTEN's NOTIFY
(a LISTEN connection in the writer's process, on the channel the service's own trigger notifies)."""

from __future__ import annotations

import re
from collections import Counter

from bench.harness import EMAIL_TO, WHATSAPP_TO, Metric, ScenarioContext, summary, wait_until
from bench.inserter import spaced_single_rows, writer_process

TABLE = "bench_orders"
ORDER = re.compile(r"ORD-LAT-\d{6}")


def _first_receipts(items: list[tuple[float, str]]) -> dict[str, float]:
    """Order number -> earliest receipt time, from (time, text) pairs."""
    first: dict[str, float] = {}
    for received, text in items:
        for number in ORDER.findall(text):
            first[number] = min(first.get(number, received), received)
    return first


def _floor(commits: list[tuple[str, float]], received: list[tuple[float, float, str]], table: str) -> list[float]:
    """Match each COMMIT to the first notification of the table after the previous COMMIT's one (one each)."""
    times = sorted(t for t, _, payload in received if payload == table)
    floors, i = [], 0
    for k, (_, committed) in enumerate(commits):
        # A NOTIFY can reach the listener a hair before the writer sees commit() return; allow 5 ms of that.
        while i < len(times) and times[i] < committed - 0.005:
            i += 1
        following = commits[k + 1][1] if k + 1 < len(commits) else float("inf")
        if i < len(times) and times[i] < following - 0.005:
            floors.append((times[i] - committed) * 1000)
            i += 1
    return floors


def run(ctx: ScenarioContext) -> list[Metric]:
    sizes = ctx.sizes
    with ctx.database() as dsn, ctx.service_environment(dsn) as (service, servers):
        ctx.progress("starting the service")
        service.start()
        service.sql(f"CREATE TABLE public.{TABLE} (id bigint PRIMARY KEY, order_number text NOT NULL, "
                    "created_at timestamptz NOT NULL DEFAULT now())")
        service.create_alert(name="Latency", query=f"SELECT order_number FROM {TABLE}",
                             notification_channels={"email": [EMAIL_TO], "whatsapp": [WHATSAPP_TO]})
        if not (servers.wait_for(1, 1, 20) and service.wait_idle(20)):
            raise RuntimeError("the initial report never arrived")
        servers.clear()

        # The writer is another process (as an application would be), so the commit times it takes are not held
        # up by the service's threads; time.monotonic() is CLOCK_MONOTONIC, one clock for every process here.
        writer = writer_process()
        try:
            ctx.progress(f"writer process: {sizes.latency_inserts} single-row inserts "
                         f"{sizes.latency_spacing_seconds * 1000:.0f} ms apart")
            numbers = [f"ORD-LAT-{i:06d}" for i in range(1, sizes.latency_inserts + 1)]
            written = writer.submit(spaced_single_rows, dsn, TABLE, numbers, sizes.latency_spacing_seconds).result(
                timeout=sizes.latency_inserts * sizes.latency_spacing_seconds + 60)
        finally:
            writer.shutdown()
        commits: list[tuple[str, float]] = written["commits"]
        ctx.progress("waiting for every email and WhatsApp message")
        count = sizes.latency_inserts
        wanted = {number for number, _ in commits}

        def all_arrived() -> bool:
            # Rows may share a message, so count order numbers rather than messages.
            return (wanted <= set(ORDER.findall(" ".join(m.text for m in servers.mails())))
                    and wanted <= set(ORDER.findall(" ".join(w.body for w in servers.whatsapps()))))

        wait_until(all_arrived, 30, 0.1)
        drained = service.wait_idle(30)
        durations = [float(r["duration_ms"]) for r in service.sql(
            "SELECT duration_ms FROM evaluation WHERE cause = 'event' ORDER BY id")]

        mails = [(m.received_at, m.text) for m in servers.mails()]
        whatsapps = [(w.received_at, w.body) for w in servers.whatsapps()]
        first_mail, first_whatsapp = _first_receipts(mails), _first_receipts(whatsapps)
        email_ms = [(first_mail[n] - t) * 1000 for n, t in commits if n in first_mail]
        whatsapp_ms = [(first_whatsapp[n] - t) * 1000 for n, t in commits if n in first_whatsapp]
        floor_ms = _floor(commits, written["notified"], f"public.{TABLE}")
        rows_per_mail = [len(ORDER.findall(text)) for _, text in mails]
        mentions = Counter(number for _, text in mails for number in ORDER.findall(text))

    email, whatsapp, floor = summary(email_ms), summary(whatsapp_ms), summary(floor_ms)
    ctx.details.update(email_ms=email, whatsapp_ms=whatsapp, floor_ms=floor, drained=drained,
                       evaluation_duration_ms=summary(durations), evaluations=len(durations),
                       emails=len(mails), whatsapps=len(whatsapps), max_rows_in_one_email=max(rows_per_mail, default=0),
                       floor_matched=len(floor_ms), raw_email_ms=[round(v, 3) for v in email_ms],
                       raw_floor_ms=[round(v, 3) for v in floor_ms])
    metrics = [Metric(f"floor (NOTIFY) {p}", floor[p], "ms") for p in ("p50", "p90", "p99", "max")]
    targets = {"p50": ("<=", 8.0), "p99": ("<=", 20.0)}
    metrics += [Metric(f"email {p}", email[p], "ms", target=targets.get(p), baseline=floor[p],
                       baseline_name=f"floor {p}") for p in ("p50", "p90", "p99", "max")]
    metrics += [Metric(f"whatsapp {p}", whatsapp[p], "ms", baseline=floor[p], baseline_name=f"floor {p}")
                for p in ("p50", "p90", "p99", "max")]
    metrics += [
        Metric("rows without email", count - len(email_ms), "rows", target=("==", 0), correctness=True),
        Metric("rows without whatsapp", count - len(whatsapp_ms), "rows", target=("==", 0), correctness=True),
        Metric("rows emailed twice or more", sum(n > 1 for n in mentions.values()), "rows"),
    ]
    return metrics
