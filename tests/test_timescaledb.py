"""TimescaleDB end to end, commit to email, on real hypertables: chunks, compression, space dimensions, continuous
aggregates, the evaluation history, and the extension changing under a running service.

Skipped unless the server in TEST_DATABASE_URL has TimescaleDB; with REQUIRE_TIMESCALEDB=1 (as CI sets on its
TimescaleDB run) a missing extension fails instead of skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

from tests.conftest import admin_execute, eventually, execute, fetch

ROOT = Path(__file__).resolve().parent.parent
EMAIL_ONLY = {"email": ["ops@example.com"]}


@pytest.fixture
def tsdb_dsn(db_dsn):
    """The test database with the timescaledb extension, or a skip saying why it is absent."""
    try:
        execute(db_dsn, "CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg2.Error as exc:
        reason = (f"TimescaleDB is not available on this server ({str(exc).strip().splitlines()[0]}); "
                  "set TEST_DATABASE_URL to a TimescaleDB 2.x server to run these tests")
        if os.environ.get("REQUIRE_TIMESCALEDB"):
            pytest.fail(reason)
        pytest.skip(reason)
    return db_dsn


def make_hypertable(dsn: str) -> None:
    """dc_order as insert_test.py makes it: a hypertable on created_at, with two orders."""
    result = subprocess.run([sys.executable, "insert_test.py", "--count", "2"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "DB_CONNECTION": dsn})
    assert result.returncode == 0, result.stderr


def chunks(dsn: str, table: str = "dc_order") -> list[tuple[str, bool]]:
    """(chunk name, compressed) for each chunk of a hypertable."""
    return fetch(dsn, "SELECT chunk_name, is_compressed FROM timescaledb_information.chunks "
                      "WHERE hypertable_name = %s ORDER BY range_start", (table,))


def text(mail) -> str:
    return mail.message.get_body(("plain",)).get_content()


def start_watching(service, smtp_server, **alert_fields) -> dict:
    """Create an alert (email only) and wait for its initial report and for the service to settle."""
    alert = service.create_alert(notification_channels=EMAIL_ONLY, **alert_fields)
    smtp_server.wait_for(1)
    service.wait_idle()
    return alert


def test_insert_test_creates_dc_order_as_a_hypertable(tsdb_dsn):
    make_hypertable(tsdb_dsn)
    assert fetch(tsdb_dsn, "SELECT count(*) FROM timescaledb_information.hypertables "
                           "WHERE hypertable_name = 'dc_order'") == [(1,)]


def test_an_insert_that_creates_a_new_chunk_alerts_once_under_the_hypertable_name(service, smtp_server, tsdb_dsn):
    make_hypertable(tsdb_dsn)
    alert = start_watching(service, smtp_server)
    assert alert["watched_tables"] == ["public.dc_order"] and alert["events_enabled"], alert
    assert len(chunks(tsdb_dsn)) == 1

    # A row 90 days back needs a chunk of its own; one statement across two chunks is still one alert.
    execute(tsdb_dsn, "INSERT INTO dc_order (order_number, created_at) VALUES "
                      "('ORD-OLD', now() - interval '90 days'), ('ORD-NEW', now())")

    mail = smtp_server.wait_for(2)[1]
    assert mail.message["Subject"] == "[HIGH] Order Monitor: 2 new rows"
    assert "ORD-OLD" in text(mail) and "ORD-NEW" in text(mail)
    assert len(chunks(tsdb_dsn)) == 2
    service.wait_idle()
    assert len(smtp_server.messages) == 2
    triggers_on_chunks = fetch(tsdb_dsn, "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                                         "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = "
                                         "'alert_service_notify' AND n.nspname LIKE '\\_timescaledb%%'")
    assert triggers_on_chunks == [(0,)], "a statement-level trigger is not copied to chunks"


def test_compression_enabled_after_the_alert_exists_and_an_insert_into_a_compressed_chunk_alerts(
        service, smtp_server, tsdb_dsn):
    make_hypertable(tsdb_dsn)
    start_watching(service, smtp_server)

    execute(tsdb_dsn, "ALTER TABLE dc_order SET (timescaledb.compress, timescaledb.compress_orderby = 'created_at')")
    execute(tsdb_dsn, "SELECT compress_chunk(c) FROM show_chunks('dc_order') c")
    assert [compressed for _, compressed in chunks(tsdb_dsn)] == [True]
    execute(tsdb_dsn, "INSERT INTO dc_order (order_number, created_at) VALUES ('ORD-COMPRESSED', now())")

    mail = smtp_server.wait_for(2)[1]
    assert mail.message["Subject"] == "[HIGH] Order Monitor: 1 new row"
    assert "ORD-COMPRESSED" in text(mail)


def test_an_alert_created_on_an_already_compressed_hypertable_alerts_on_inserts(service, smtp_server, tsdb_dsn):
    make_hypertable(tsdb_dsn)
    execute(tsdb_dsn, "ALTER TABLE dc_order SET (timescaledb.compress, timescaledb.compress_orderby = 'created_at')")
    execute(tsdb_dsn, "SELECT compress_chunk(c) FROM show_chunks('dc_order') c")

    alert = start_watching(service, smtp_server)
    assert alert["events_enabled"], alert
    assert "2 rows" in smtp_server.messages[0].message["Subject"], "the initial report reads compressed rows"
    execute(tsdb_dsn, "INSERT INTO dc_order (order_number, created_at) VALUES ('ORD-AFTER', now())")

    assert "ORD-AFTER" in text(smtp_server.wait_for(2)[1])


def test_updates_and_deletes_on_a_hypertable_alert_through_its_statement_trigger(service, smtp_server, tsdb_dsn):
    make_hypertable(tsdb_dsn)
    execute(tsdb_dsn, "INSERT INTO dc_order (order_number, priority, created_at) VALUES "
                      "('ORD-A', 'LOW', now() - interval '60 days'), ('ORD-B', 'LOW', now())")
    start_watching(service, smtp_server, query="SELECT order_number, priority FROM dc_order ORDER BY 1",
                   trigger_condition="any_change", key_columns=["order_number"])

    execute(tsdb_dsn, "UPDATE dc_order SET priority = 'HIGH' WHERE order_number = 'ORD-A'")
    changed = smtp_server.wait_for(2)[1]
    assert changed.message["Subject"] == "[HIGH] Order Monitor: 1 change"
    assert "changed  ORD-A" in text(changed)

    execute(tsdb_dsn, "DELETE FROM dc_order WHERE order_number = 'ORD-B'")
    removed = smtp_server.wait_for(3)[2]
    assert removed.message["Subject"] == "[HIGH] Order Monitor: 1 change"
    assert "removed  ORD-B" in text(removed)


def test_a_real_time_continuous_aggregate_alerts_on_an_insert_into_its_hypertable(service, smtp_server, tsdb_dsn):
    make_hypertable(tsdb_dsn)
    execute(tsdb_dsn, "CREATE MATERIALIZED VIEW orders_daily WITH (timescaledb.continuous, "
                      "timescaledb.materialized_only = false) AS SELECT time_bucket('1 day', created_at) AS day, "
                      "count(*) AS orders FROM dc_order GROUP BY 1 WITH NO DATA")
    alert = start_watching(service, smtp_server, query="SELECT day, orders FROM orders_daily")
    assert "public.dc_order" in alert["watched_tables"] and alert["events_enabled"], alert

    execute(tsdb_dsn, "INSERT INTO dc_order (order_number, created_at) VALUES ('ORD-X', now() + interval '3 days')")

    assert smtp_server.wait_for(2)[1].message["Subject"] == "[HIGH] Order Monitor: 1 new row"


def test_a_materialized_only_continuous_aggregate_alerts_when_a_refresh_or_its_policy_materializes_buckets(
        service, smtp_server, tsdb_dsn):
    make_hypertable(tsdb_dsn)
    execute(tsdb_dsn, "CREATE MATERIALIZED VIEW orders_daily WITH (timescaledb.continuous, "
                      "timescaledb.materialized_only = true) AS SELECT time_bucket('1 day', created_at) AS day, "
                      "count(*) AS orders FROM dc_order GROUP BY 1 WITH NO DATA")
    admin_execute(tsdb_dsn, "CALL refresh_continuous_aggregate('orders_daily', NULL, NULL)")
    alert = start_watching(service, smtp_server, query="SELECT day, orders FROM orders_daily")
    [(materialization,)] = fetch(tsdb_dsn, "SELECT format('%I.%I', materialization_hypertable_schema, "
                                           "materialization_hypertable_name) FROM "
                                           "timescaledb_information.continuous_aggregates")
    assert materialization in alert["watched_tables"] and alert["events_enabled"], alert

    execute(tsdb_dsn, "INSERT INTO dc_order (order_number, created_at) VALUES ('ORD-X', now() + interval '3 days')")
    service.wait_idle()
    assert len(smtp_server.messages) == 1, "a materialized-only aggregate shows nothing new until a refresh"

    admin_execute(tsdb_dsn, "CALL refresh_continuous_aggregate('orders_daily', NULL, NULL)")
    assert smtp_server.wait_for(2)[1].message["Subject"] == "[HIGH] Order Monitor: 1 new row"

    admin_execute(tsdb_dsn, "SELECT add_continuous_aggregate_policy('orders_daily', start_offset => NULL, "
                            "end_offset => NULL, schedule_interval => interval '1 hour')")
    execute(tsdb_dsn, "INSERT INTO dc_order (order_number, created_at) VALUES ('ORD-Y', now() + interval '5 days')")
    [(job,)] = fetch(tsdb_dsn, "SELECT job_id FROM timescaledb_information.jobs "
                               "WHERE proc_name = 'policy_refresh_continuous_aggregate'")
    # run_job runs the policy's own procedure, as TimescaleDB's scheduler does when the job falls due.
    admin_execute(tsdb_dsn, "CALL run_job(%s)", (job,))
    assert smtp_server.wait_for(3)[2].message["Subject"] == "[HIGH] Order Monitor: 1 new row"


def test_a_hypertable_with_a_space_dimension_alerts_once_for_a_statement_across_partitions(
        service, smtp_server, tsdb_dsn):
    execute(tsdb_dsn, "CREATE TABLE readings (ts timestamptz NOT NULL, device text NOT NULL, value float8)")
    execute(tsdb_dsn, "SELECT create_hypertable('readings', by_range('ts'))")
    execute(tsdb_dsn, "SELECT add_dimension('readings', by_hash('device', 4))")
    execute(tsdb_dsn, "INSERT INTO readings VALUES (now(), 'd0', 1)")
    alert = start_watching(service, smtp_server, query="SELECT device, value FROM readings ORDER BY device")
    assert alert["watched_tables"] == ["public.readings"], alert

    execute(tsdb_dsn, "INSERT INTO readings SELECT now(), 'd' || i, i FROM generate_series(1, 8) i")

    mail = smtp_server.wait_for(2)[1]
    assert mail.message["Subject"] == "[HIGH] Order Monitor: 8 new rows"
    assert len(chunks(tsdb_dsn, "readings")) > 1, "the rows were spread over hash partitions"
    service.wait_idle()
    assert len(smtp_server.messages) == 2


def test_a_hypertable_in_a_non_public_schema_with_a_quoted_mixed_case_name_alerts(service, smtp_server, tsdb_dsn):
    execute(tsdb_dsn, 'CREATE SCHEMA "Sales Ops"')
    execute(tsdb_dsn, 'CREATE TABLE "Sales Ops"."Orders" ("Order No" text NOT NULL, at timestamptz NOT NULL)')
    execute(tsdb_dsn, """SELECT create_hypertable('"Sales Ops"."Orders"', by_range('at'))""")
    alert = start_watching(service, smtp_server, query='SELECT "Order No" FROM "Sales Ops"."Orders"')
    assert alert["watched_tables"] == ['"Sales Ops"."Orders"'] and alert["events_enabled"], alert

    execute(tsdb_dsn, """INSERT INTO "Sales Ops"."Orders" VALUES ('ORD-MIXED', now())""")

    assert "ORD-MIXED" in text(smtp_server.wait_for(2)[1])


def test_an_alert_on_timescaledbs_own_catalog_says_why_events_are_limited_and_runs_on_its_schedule(
        service, smtp_server, tsdb_dsn):
    make_hypertable(tsdb_dsn)
    alert = start_watching(service, smtp_server, schedule="interval:1s",
                           query="SELECT chunk_name FROM timescaledb_information.chunks "
                                 "WHERE hypertable_name = 'dc_order' ORDER BY 1")

    shown = service.client.get(f"/alert-configs/{alert['id']}").json()
    assert not shown["events_enabled"], shown
    assert "_timescaledb_catalog.chunk: TimescaleDB's own catalog" in shown["events_error"], shown
    assert "the schedule still runs the alert" in shown["events_error"], shown

    execute(tsdb_dsn, "INSERT INTO dc_order (order_number, created_at) VALUES ('ORD-OLD', now() - interval '90 days')")

    mail = smtp_server.wait_for(2, timeout=15)[1]
    assert mail.message["Subject"] == "[HIGH] Order Monitor: 1 new row"


def test_the_evaluation_history_is_a_hypertable_with_one_day_chunks_and_a_retention_policy(settings, tsdb_dsn):
    from tests.conftest import Service

    service = Service(settings.model_copy(update={"evaluation_retention_days": 7})).start()
    try:
        rows = service.sql("SELECT d.time_interval FROM timescaledb_information.dimensions d "
                           "WHERE d.hypertable_name = 'evaluation'")
        assert [str(r["time_interval"]) for r in rows] == ["1 day, 0:00:00"]
        jobs = service.sql("SELECT (config->>'drop_after')::interval = interval '7 days' AS ok "
                           "FROM timescaledb_information.jobs WHERE hypertable_name = 'evaluation' "
                           "AND proc_name = 'policy_retention'")
        assert [j["ok"] for j in jobs] == [True]
        alert = service.create_alert(query="SELECT 1 AS one")
        service.wait_idle()
        assert service.client.get(f"/alert-configs/{alert['id']}/evaluations").json()
    finally:
        service.stop()


def test_an_extension_update_and_drop_under_the_running_service_lose_no_alert_and_fail_clearly(
        service, smtp_server, tsdb_dsn):
    make_hypertable(tsdb_dsn)
    execute(tsdb_dsn, "CREATE MATERIALIZED VIEW orders_daily WITH (timescaledb.continuous, "
                      "timescaledb.materialized_only = false) AS SELECT time_bucket('1 day', created_at) AS day, "
                      "count(*) AS orders FROM dc_order GROUP BY 1 WITH NO DATA")
    orders = start_watching(service, smtp_server)
    daily = service.create_alert(name="Daily orders", query="SELECT day, orders FROM orders_daily",
                                 notification_channels=EMAIL_ONLY)
    smtp_server.wait_for(2)
    service.wait_idle()

    def mentioning(number: str) -> list:
        return [m for m in smtp_server.messages
                if m.message["Subject"].startswith("[HIGH] Order Monitor:") and number in text(m)]

    # TimescaleDB's upgrade recipe: ALTER EXTENSION ... UPDATE, with every other session closed first. The
    # server has one version installed, so the UPDATE itself changes nothing; the closed sessions are the test.
    admin_execute(tsdb_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                            "AND backend_type = 'client backend'")
    admin_execute(tsdb_dsn, "ALTER EXTENSION timescaledb UPDATE")
    execute(tsdb_dsn, "INSERT INTO dc_order (order_number, created_at) VALUES ('ORD-UPGRADED', now())")
    eventually(lambda: mentioning("ORD-UPGRADED"), timeout=20, message="the row inserted after the upgrade")
    service.wait_idle()

    # Dropping the extension drops the chunks and the continuous aggregate; dc_order stays as a plain table.
    admin_execute(tsdb_dsn, "DROP EXTENSION timescaledb CASCADE")
    after = ["ORD-AFTER-1", "ORD-AFTER-2", "ORD-AFTER-3"]
    for number in after:
        execute(tsdb_dsn, "INSERT INTO dc_order (order_number) VALUES (%s)", (number,))
        service.wait_idle()

    for number in after:
        assert len(eventually(lambda: mentioning(number), message=number)) == 1, "every row alerted, once"
    failing = eventually(lambda: [m for m in smtp_server.messages
                                  if "Daily orders: alert is failing" in m.message["Subject"]], message="failing")
    assert len(failing) == 1 and 'relation "orders_daily" does not exist' in text(failing[0])
    errors = [e["error"] for e in service.client.get(f"/alert-configs/{daily['id']}/evaluations").json()
              if e["outcome"] == "error"]
    assert errors and all('relation "orders_daily" does not exist' in e for e in errors), errors
    assert service.client.get(f"/alert-configs/{orders['id']}").json()["events_enabled"]
    assert service.client.get("/health").status_code == 200


def test_alert_queries_cannot_read_the_chunks_of_the_evaluation_history(service, tsdb_dsn):
    """The history is a hypertable in the service's schema; its chunks live in TimescaleDB's own schema."""
    service.create_alert(query="SELECT 1 AS one")
    service.wait_idle()
    history_chunks = service.sql("SELECT format('%I.%I', chunk_schema, chunk_name) AS chunk "
                                 "FROM timescaledb_information.chunks WHERE hypertable_schema = 'alert_service' "
                                 "AND hypertable_name = 'evaluation'")
    assert history_chunks, "the evaluation of the initial report made a chunk"
    response = service.client.post("/alert-configs/test", json={
        "name": "peek", "query": f"SELECT alert_config_id FROM {history_chunks[0]['chunk']}", "schedule": "interval:1h",
        "notification_channels": {"email": ["ops@example.com"]}})
    assert response.status_code == 422 and "permission denied" in response.text, response.text


def test_an_alert_on_a_compressed_hypertable_is_evaluated_from_the_logged_rows(service, smtp_server, tsdb_dsn):
    make_hypertable(tsdb_dsn)
    start_watching(service, smtp_server, query="SELECT order_number FROM dc_order WHERE priority IS DISTINCT FROM 'LOW'")
    # Compression can still be switched on: the triggers that log rows use no DELETE transition table.
    execute(tsdb_dsn, "ALTER TABLE dc_order SET (timescaledb.compress, timescaledb.compress_orderby = 'created_at')")
    execute(tsdb_dsn, "SELECT compress_chunk(c) FROM show_chunks('dc_order') c")
    before = service.client.get("/health").json()["scheduler"]["incremental_evaluations"]
    execute(tsdb_dsn, "INSERT INTO dc_order (order_number, priority, created_at) "
                      "VALUES ('ORD-HYPER', 'HIGH', now()), ('ORD-QUIET', 'LOW', now())")
    mail = smtp_server.wait_for(2)[1]
    assert "ORD-HYPER" in text(mail) and "ORD-QUIET" not in text(mail)
    assert service.client.get("/health").json()["scheduler"]["incremental_evaluations"] == before + 1
