"""Scenario: scale-out. The load scenario's alerts and writer, with the tables spread over several data sources,
served in turn by one, two and three instances of the service (each `python main.py`, all on one service database).
Every pass writes the same rows; its throughput is the work (pairs, evaluations, emails) over the time from the
first commit to the email that carried the last pair, for two and three instances against one in the same run; and
nothing may be done twice."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psycopg2
import psycopg2.extras

from bench.harness import (EMAIL_TO, ROOT, CpuMeter, LoopbackServers, Mail, Metric, ScenarioContext, alert_number,
                           execute, loopback_servers, table_key, wait_until)
from bench.inserter import paced_rows_over_databases, writer_process

INSTANCE_COUNTS = (1, 2, 3)
# Enough data sources for three instances to own two each.
MAX_SOURCES = 6
# Each pass writes this share of the load scenario's rows, all of them whatever rate the writer achieves, so that
# the passes do the same work and their throughputs compare (a third: three passes take about as long as the load
# scenario's one).
ROWS_SHARE = 1 / 3
WRITER_TIMEOUT_SECONDS = 600
# Every new row on a line of its own, so that an email shows all it carries (the default message shows 100).
TEMPLATE = "{% for r in new_rows %}row-{{ r.id }}\n{% endfor %}"


@dataclass
class Pass:
    """What one pass (a number of instances) measured."""

    instances: int
    pairs: int  # (row, alert) pairs the writer's rows called for
    evaluations: int
    emails: int  # distinct Message-IDs received
    span_seconds: float  # first commit -> the email that carried the last pair to be reported
    writer_rate: float
    drained: bool
    missed: int  # pairs no email carried
    emailed_twice: int  # pairs shown twice or more by the emails of distinct Message-IDs
    resent: int  # emails received again under a Message-ID already received
    recorded_twice: int  # pairs held by two or more incidents
    failed: int
    details: dict[str, Any] = field(default_factory=dict)

    def per_second(self, count: int) -> float:
        return count / self.span_seconds if self.span_seconds > 0 else 0.0


class ServiceProcess:
    """One instance: `python main.py` in a session of its own, its output in a file."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self.port = free_port()
        with open(log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, stdout=out,
                                            stderr=subprocess.STDOUT, env={**env, "API_PORT": str(self.port)},
                                            start_new_session=True)

    def health(self) -> dict | None:
        """GET /health, or None when it does not answer within a second."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as response:
                return json.load(response)
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to everything it started if it has not exited within 15 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-10:])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def instance_env(dsn: str, servers: LoopbackServers, data_dir: Path) -> dict[str, str]:
    """The environment of every instance and of `main.py apply`: the service database and the loopback SMTP."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SMTP_", "TWILIO_", "DB_", "API_", "BENCH_", "INSTANCE_"))}
    env.update(DB_CONNECTION=dsn, API_HOST="127.0.0.1", LOG_FILE="", DATA_DIR=str(data_dir),
               ALLOW_PRIVILEGED_DATA_SOURCES="true", SMTP_HOST="127.0.0.1", SMTP_PORT=str(servers.smtp_port),
               SMTP_USERNAME=servers.smtp_username, SMTP_PASSWORD=servers.smtp_password,
               SMTP_FROM="alerts@example.com", SMTP_SECURITY="none", SMTP_TIMEOUT_SECONDS="5",
               SMTP_MAX_PER_SECOND="0", RETRY_DELAY_MINUTES="0.005", QUERY_TIMEOUT_SECONDS="10")
    return env


def insert_rows(dsn: str, statement: str, rows: list[tuple]) -> None:
    """Run an INSERT ... VALUES %s with many rows in one transaction."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            psycopg2.extras.execute_values(cur, statement, rows, page_size=1000)
    finally:
        conn.close()


def _outbox_waiting(dsn: str) -> int:
    return execute(dsn, "SELECT count(*) FROM alert_service.notification WHERE status IN ('PENDING', 'RETRY')")[0][0]


def _measure(ctx: ScenarioContext, instances: int) -> Pass:
    """One pass: fresh databases, `instances` instances, the load scenario's writer; every pair followed to its
    email."""
    sizes = ctx.sizes
    alerts, table_count = sizes.load_alerts, sizes.load_tables
    rows = int(sizes.load_rate * sizes.load_seconds * ROWS_SHARE)
    source_count = min(MAX_SOURCES, table_count)
    with ExitStack() as stack:
        dsn = stack.enter_context(ctx.database())
        source_dsns = [stack.enter_context(ctx.database()) for _ in range(source_count)]
        # Table g lives in source g % sources; alert j reads table j % tables, as in the load scenario.
        tables: list[list[str]] = [[] for _ in source_dsns]
        place: dict[int, tuple[int, int]] = {}
        for g in range(table_count):
            k = g % source_count
            place[g] = (k, len(tables[k]))
            tables[k].append(f"bench_scale_{g:03d}")
        for k, source in enumerate(source_dsns):
            execute(source, "".join(f"CREATE TABLE {t} (id bigint PRIMARY KEY, note text NOT NULL);"
                                    for t in tables[k]))
        servers = stack.enter_context(loopback_servers(ctx.work_dir / f"servers-{instances}"))
        env = instance_env(dsn, servers, ctx.work_dir / f"data-{instances}")

        # The data sources are applied as an operator would, before any instance starts; the alerts are inserted
        # with SQL, as the load scenario does (applying 1,000 alerts at once is refused: the change announcement
        # listing them all is longer than a NOTIFY payload may be).
        document = {"version": 1, "data_sources": [{"name": f"source-{k}", "dsn": source, "allow_privileged_role": True}
                                                   for k, source in enumerate(source_dsns)]}
        config = ctx.work_dir / f"sources-{instances}.yaml"
        config.write_text(json.dumps(document))  # JSON is YAML
        applied = subprocess.run([sys.executable, "main.py", "apply", str(config)], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=300)
        if applied.returncode != 0:
            raise RuntimeError(f"main.py apply failed: {applied.stderr[-2000:]}")
        source_ids = dict(execute(dsn, "SELECT name, id FROM alert_service.data_source"))
        channels = psycopg2.extras.Json({"email": [EMAIL_TO]})
        definitions = []
        for j in range(alerts):
            k, t = place[j % table_count]
            definitions.append((f"scale alert-{j}", f"SELECT id, note FROM {tables[k][t]} WHERE id > {-1 - j}",
                                source_ids[f"source-{k}"], TEMPLATE, channels, [table_key(tables[k][t])],
                                "interval:1h"))
        insert_rows(dsn, "INSERT INTO alert_service.alert_config (name, query, data_source_id, message_template, "
                         "notification_channels, watched_tables, schedule) VALUES %s", definitions)

        ctx.progress(f"{instances} instance(s): {alerts} alerts on {table_count} tables in {source_count} data "
                     "sources; starting")
        (ctx.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        procs = [ServiceProcess(f"instance {i}", env, ctx.work_dir / "logs" / f"{instances}-{i}.log")
                 for i in range(instances)]
        for proc in procs:
            stack.callback(proc.stop)
        for proc in procs:
            if not wait_until(lambda: proc.health() is not None, 60, 0.1):
                raise RuntimeError(f"{proc.name} did not answer /health within 60 s:\n{proc.log_tail()}")
        if not (servers.wait_for(alerts, 0, 180) and wait_until(lambda: _outbox_waiting(dsn) == 0, 60, 0.1)):
            raise RuntimeError(f"initial reports incomplete: {servers.counts()[0]} of {alerts}")
        owned = _wait_for_spread(procs)
        servers.clear()
        baseline_eval = execute(dsn, "SELECT coalesce(max(id), 0) FROM alert_service.evaluation")[0][0]

        alerts_on: dict[tuple[int, int], list[int]] = defaultdict(list)
        for j in range(alerts):
            alerts_on[place[j % table_count]].append(j)
        writer = writer_process()
        try:
            meter = CpuMeter(dsn, {**{p.name: p.process.pid for p in procs}, **servers.pids,
                                   "writer process": writer.submit(os.getpid).result(timeout=60)})
            meter.start()
            began, began_wall = time.monotonic(), time.time()
            ctx.progress(f"{instances} instance(s): writer: {rows} single-row commits at up to "
                         f"{sizes.load_rate:.0f}/s")
            written = writer.submit(paced_rows_over_databases, source_dsns, tables, sizes.load_rate, rows,
                                    1).result(timeout=WRITER_TIMEOUT_SECONDS)
        finally:
            writer.shutdown()
        commits: list[tuple[int, int, int, float]] = written["commits"]
        expected = {(j, row_id) for row_id, k, t, _ in commits for j in alerts_on[(k, t)]}

        def recorded() -> int:
            return int(execute(dsn, "SELECT coalesce(sum(jsonb_array_length(incident_data->'new_rows')), 0) "
                                    "FROM alert_service.incident WHERE created_at >= to_timestamp(%s)",
                               (began_wall,))[0][0])

        drained = wait_until(lambda: recorded() >= len(expected) and _outbox_waiting(dsn) == 0,
                             sizes.load_drain_seconds, 0.25)
        # Cores used from the first commit until drained, by each instance, the SMTP server and the PostgreSQL
        # sessions of the service database (the bench process's own entry is left out: it only waits here).
        cpu = {name: round(used / (time.monotonic() - began), 2) for name, used in sorted(meter.read().items())
               if not name.startswith("bench process")}
        evaluations = execute(dsn, "SELECT count(*) FROM alert_service.evaluation WHERE id > %s",
                              (baseline_eval,))[0][0]
        held = execute(dsn, "SELECT a.name, (r->>'id')::bigint, count(*) FROM alert_service.incident i "
                            "JOIN alert_service.alert_config a ON a.id = i.alert_config_id "
                            "CROSS JOIN LATERAL jsonb_array_elements(i.incident_data->'new_rows') r "
                            "WHERE i.created_at >= to_timestamp(%s) GROUP BY 1, 2", (began_wall,))
        failed = execute(dsn, "SELECT count(*) FROM alert_service.notification WHERE status = 'FAILED'")[0][0]
        time.sleep(0.5)  # a repeat of the last emails would arrive now
        mails = servers.mails()

    # A receiver drops a message whose Message-ID it has seen; what is left must show each pair once.
    distinct = {m.message_id: m for m in sorted(mails, key=lambda m: m.received_wall, reverse=True)}
    shown = pairs_shown(list(distinct.values()))
    first_receipt = {pair: min(m.received_wall for m in found) for pair, found in shown.items()}
    reported = [first_receipt[p] for p in expected if p in first_receipt]
    first_commit = min((c[3] for c in commits), default=time.time())
    span = (max(reported) if reported else time.time()) - first_commit
    return Pass(
        instances=instances, pairs=len(expected), evaluations=evaluations, emails=len(distinct),
        span_seconds=span, writer_rate=len(commits) / written["seconds"] if written["seconds"] else 0.0,
        drained=drained, missed=sum(1 for p in expected if p not in shown),
        emailed_twice=sum(1 for p in expected if len(shown.get(p, ())) > 1), resent=len(mails) - len(distinct),
        recorded_twice=sum(1 for _, _, n in held if n > 1), failed=failed,
        details=dict(owned_data_sources=owned, cpu_cores_used=cpu, commits=len(commits),
                     writer_most_behind_seconds=written["most_behind_seconds"], data_sources=source_count))


def pairs_shown(mails: list[Mail]) -> dict[tuple[int, int], list[Mail]]:
    """(alert number, row id) -> the emails showing that row for that alert, once per time shown: a row belongs to
    the alert named last before it (in a coalesced email, its update's heading), or else to the subject's."""
    found: dict[tuple[int, int], list[Mail]] = defaultdict(list)
    for mail in mails:
        alert = alert_number(mail.subject)
        for line in mail.text.splitlines():
            named = alert_number(line)
            if named is not None:
                alert = named
            elif line.startswith("row-") and alert is not None:
                found[(alert, int(line.removeprefix("row-")))].append(mail)
    return found


def _wait_for_spread(procs: list[ServiceProcess]) -> dict[str, int] | str:
    """How many data sources each instance owns once every one owns some (as /health's cluster part says), or why
    that is not known."""
    if any("cluster" not in (proc.health() or {}) for proc in procs):
        return "not reported: /health has no cluster part"

    def owned() -> dict[str, int] | None:
        counts = {proc.name: len(((proc.health() or {}).get("cluster") or {}).get("owns", [])) for proc in procs}
        return counts if all(counts.values()) else None

    if not wait_until(lambda: owned() is not None, 30, 0.2):
        return f"not spread within 30 s: {[(proc.health() or {}).get('cluster') for proc in procs]}"
    return owned() or {}


def run(ctx: ScenarioContext) -> list[Metric]:
    passes = [_measure(ctx, n) for n in INSTANCE_COUNTS]
    one = passes[0]
    metrics: list[Metric] = []
    for p in passes:
        label = f"{p.instances} instance{'s' if p.instances > 1 else ''}"
        ctx.details[label] = {**{k: v for k, v in p.__dict__.items() if k != "details"}, **p.details}
        not_drained = None if p.drained else "still busy at the drain deadline"

        def against_one(name: str, unit: str, value_of: Callable[[Pass], float | None]) -> Metric:
            if p is one:
                return Metric(f"{label}: {name}", value_of(p), unit)
            return Metric(f"{label}: {name}", value_of(p), unit, baseline=value_of(one), baseline_name="1 instance")

        metrics += [
            against_one("(row, alert) pairs reported/s", "pairs/s", lambda q: q.per_second(q.pairs)),
            against_one("evaluations/s", "evals/s", lambda q: q.per_second(q.evaluations)),
            against_one("emails delivered/s", "msgs/s", lambda q: q.per_second(q.emails)),
            # More evaluations for the same pairs is fewer commits gathered per evaluation: more work, not more done.
            against_one("evaluations per 100 (row, alert) pairs", "evals",
                        lambda q: 100 * q.evaluations / q.pairs if q.pairs else None),
            against_one("first commit to last pair emailed", "s", lambda q: q.span_seconds),
            Metric(f"{label}: writer rate achieved", p.writer_rate, "rows/s", baseline=ctx.sizes.load_rate,
                   baseline_name="planned"),
            Metric(f"{label}: (row, alert) pairs without email", p.missed, "pairs", target=("==", 0),
                   correctness=p.drained or ctx.quick, note=not_drained),
            Metric(f"{label}: (row, alert) pairs emailed twice or more", p.emailed_twice, "pairs",
                   target=("==", 0), correctness=True),
            Metric(f"{label}: emails received twice", p.resent, "msgs", target=("==", 0), correctness=True),
            Metric(f"{label}: (row, alert) pairs in two incidents", p.recorded_twice, "pairs", target=("==", 0),
                   correctness=True),
            Metric(f"{label}: failed notifications", p.failed, "msgs", target=("==", 0), correctness=True),
        ]
    return metrics
