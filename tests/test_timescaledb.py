"""TimescaleDB: hypertables, compression and continuous aggregates. Skipped unless TEST_DATABASE_URL has it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

from tests.conftest import execute

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tsdb_dsn(db_dsn):
    """The test database with the timescaledb extension, or a skip saying why it is absent."""
    try:
        execute(db_dsn, "CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg2.Error as exc:
        pytest.skip(f"TimescaleDB is not available on this server ({str(exc).strip().splitlines()[0]}); "
                    "set TEST_DATABASE_URL to a TimescaleDB 2.x server to run these tests")
    return db_dsn


def fetch_one(dsn: str, query: str):
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchone()[0]
    finally:
        conn.close()


def make_hypertable(dsn: str) -> None:
    result = subprocess.run([sys.executable, "insert_test.py", "--count", "2"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "DB_CONNECTION": dsn})
    assert result.returncode == 0, result.stderr


def test_insert_test_creates_dc_order_as_a_hypertable(tsdb_dsn):
    make_hypertable(tsdb_dsn)
    conn = psycopg2.connect(tsdb_dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_name = 'dc_order'")
        assert cur.fetchone()[0] == 1
    conn.close()


def test_a_hypertable_insert_alerts_once_under_the_hypertable_name(service, smtp_server, tsdb_dsn):
    make_hypertable(tsdb_dsn)
    alert = service.create_alert(notification_channels={"email": ["ops@example.com"]})
    assert alert["watched_tables"] == ["public.dc_order"] and alert["events_enabled"], alert
    smtp_server.wait_for(1)
    service.wait_idle()

    # Rows far apart in time land in different chunks; one statement is still one alert.
    execute(tsdb_dsn, "INSERT INTO dc_order (order_number, created_at) VALUES "
                      "('ORD-OLD', now() - interval '90 days'), ('ORD-NEW', now())")

    mail = smtp_server.wait_for(2)[1]
    assert mail.message["Subject"] == "[HIGH] Order Monitor: 2 new rows"
    service.wait_idle()
    assert len(smtp_server.messages) == 2
    conn = psycopg2.connect(tsdb_dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = 'alert_service_notify' "
                    "AND n.nspname LIKE '\\_timescaledb%%'")
        assert cur.fetchone()[0] == 0, "a statement-level trigger is not copied to chunks"
    conn.close()


def test_compression_can_be_enabled_on_a_watched_hypertable_and_inserts_still_alert(service, smtp_server, tsdb_dsn):
    make_hypertable(tsdb_dsn)
    service.create_alert(notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()

    execute(tsdb_dsn, "ALTER TABLE dc_order SET (timescaledb.compress, timescaledb.compress_orderby = 'created_at')")
    execute(tsdb_dsn, "SELECT compress_chunk(c) FROM show_chunks('dc_order') c")
    execute(tsdb_dsn, "INSERT INTO dc_order (order_number, created_at) VALUES ('ORD-COMPRESSED', now())")

    mail = smtp_server.wait_for(2)[1]
    assert "ORD-COMPRESSED" in mail.message.get_body(("plain",)).get_content()


def test_an_alert_on_a_continuous_aggregate_watches_its_hypertable(service, smtp_server, tsdb_dsn):
    make_hypertable(tsdb_dsn)
    execute(tsdb_dsn, "CREATE MATERIALIZED VIEW orders_daily WITH (timescaledb.continuous, "
                      "timescaledb.materialized_only = false) AS SELECT time_bucket('1 day', created_at) AS day, "
                      "count(*) AS orders FROM dc_order GROUP BY 1 WITH NO DATA")
    alert = service.create_alert(query="SELECT day, orders FROM orders_daily",
                                 notification_channels={"email": ["ops@example.com"]})
    assert "public.dc_order" in alert["watched_tables"] and alert["events_enabled"], alert
    smtp_server.wait_for(1)
    service.wait_idle()

    execute(tsdb_dsn, "INSERT INTO dc_order (order_number, created_at) VALUES ('ORD-X', now() + interval '3 days')")

    assert "new row" in smtp_server.wait_for(2)[1].message["Subject"]


def test_the_continuous_aggregate_mapping_query_runs_on_a_stand_in_catalog(db_dsn):
    """Plain PostgreSQL with a stand-in for TimescaleDB's catalog view, so CI checks the mapping SQL itself."""
    import database

    if fetch_one(db_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'timescaledb_information'"):
        pytest.skip("TimescaleDB's own catalog is installed; the tests above use it")
    execute(db_dsn, "CREATE TABLE raw (x int); CREATE TABLE mat (x int); CREATE VIEW agg AS SELECT x FROM mat; "
                    "CREATE SCHEMA timescaledb_information; "
                    "CREATE VIEW timescaledb_information.continuous_aggregates AS SELECT 'public'::name AS view_schema, "
                    "'agg'::name AS view_name, 'public'::name AS hypertable_schema, 'raw'::name AS hypertable_name")
    pool = database.service_pool(db_dsn, size=1)
    try:
        assert database.resolve_tables(pool, refs=[(None, "agg")]) == ["public.mat", "public.raw"]
        assert database.resolve_tables(pool, refs=[("public", "raw")]) == ["public.raw"]
    finally:
        pool.close()


def test_the_evaluation_history_becomes_a_hypertable_with_a_retention_policy(settings, tsdb_dsn):
    from tests.conftest import Service

    service = Service(settings.model_copy(update={"evaluation_retention_days": 7})).start()
    try:
        rows = service.sql("SELECT count(*) AS n FROM timescaledb_information.hypertables "
                           "WHERE hypertable_name = 'evaluation'")
        assert rows[0]["n"] == 1
        jobs = service.sql("SELECT (config->>'drop_after')::interval = interval '7 days' AS ok "
                           "FROM timescaledb_information.jobs WHERE hypertable_name = 'evaluation' "
                           "AND proc_name = 'policy_retention'")
        assert [j["ok"] for j in jobs] == [True]
        alert = service.create_alert(query="SELECT 1 AS one")
        service.wait_idle()
        assert service.client.get(f"/alert-configs/{alert['id']}/evaluations").json()
    finally:
        service.stop()


def test_alert_queries_cannot_read_the_chunks_of_the_evaluation_history(service, tsdb_dsn):
    """The history is a hypertable in the service's schema; its chunks live in TimescaleDB's own schema."""
    service.create_alert(query="SELECT 1 AS one")
    service.wait_idle()
    chunks = service.sql("SELECT format('%I.%I', chunk_schema, chunk_name) AS chunk "
                         "FROM timescaledb_information.chunks WHERE hypertable_schema = 'alert_service' "
                         "AND hypertable_name = 'evaluation'")
    assert chunks, "the evaluation of the initial report made a chunk"
    response = service.client.post("/alert-configs/test", json={
        "name": "peek", "query": f"SELECT alert_config_id FROM {chunks[0]['chunk']}", "schedule": "interval:1h",
        "notification_channels": {"email": ["ops@example.com"]}})
    assert response.status_code == 422 and "permission denied" in response.text, response.text
