"""Incremental evaluation: a new_rows alert over one table that only filters and projects is evaluated from the
rows a statement changed (logged by its change triggers) and decides exactly what its full query would."""

from __future__ import annotations

import functools
import itertools
import uuid
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

import database
import query_analysis
from evaluation import join_arrays, visible_in
from tests.conftest import create_orders_table, eventually, execute, fetch, insert_orders, timescaledb_available


def incidents_rows(service, alert_id: str) -> list[list]:
    """The rows of every incident of an alert, oldest first, each incident's rows as a list."""
    found = service.sql("SELECT incident_data FROM incident WHERE alert_config_id = %s ORDER BY created_at, id",
                        (alert_id,))
    return [[[row[column] for column in item["incident_data"]["columns"]] for row in item["incident_data"]["new_rows"]]
            for item in found]


def settle(service, alert_ids: list[str], since: datetime) -> None:
    """Wait until each alert has been evaluated since `since` (its notification may come late on a busy machine),
    then until the service is idle."""
    def evaluated() -> bool:
        found = service.sql("SELECT count(DISTINCT alert_config_id) AS n FROM evaluation WHERE alert_config_id = "
                            "ANY(%s::uuid[]) AND started_at >= %s", (alert_ids, since))
        return found[0]["n"] == len(alert_ids)
    eventually(evaluated, message="an evaluation of every alert after the commit")
    service.wait_idle()


def health_scheduler(service) -> dict:
    return service.client.get("/health").json()["scheduler"]


# --- the parts, on their own -----------------------------------------------------------------------------------


@pytest.mark.parametrize("query, reason", [
    ("SELECT count(*) FROM t", "aggregates"),
    ("SELECT a FROM t GROUP BY a", "groups"),
    ("SELECT DISTINCT a FROM t", "DISTINCT"),
    ("SELECT a FROM t LIMIT 5", "LIMIT"),
    ("SELECT a FROM t OFFSET 0", "OFFSET"),
    ("SELECT a, row_number() OVER () FROM t", "window"),
    ("SELECT a FROM t UNION SELECT a FROM u", "set operation"),
    ("SELECT a FROM t JOIN u USING (a)", "exactly one table"),
    ("SELECT a FROM t, u", "exactly one table"),
    ("SELECT a FROM t WHERE a IN (SELECT a FROM u)", "subquery"),
    ("WITH x AS (SELECT 1) SELECT a FROM t", "WITH"),
    ("SELECT a FROM ONLY t", "ONLY"),
    ("SELECT 1", "exactly one table"),
])
def test_queries_that_need_more_than_the_changed_rows_are_not_incremental(query, reason):
    assert reason in query_analysis.delta_form(query)


@pytest.mark.parametrize("query, expected", [
    ("SELECT a FROM t WHERE b > 1", "SELECT a FROM {rows} AS \"t\" WHERE b > 1"),
    ("select * from public.t x where x.a like 'a%' order by 1", "select * from {rows} x where x.a like 'a%' order by 1"),
    ("TABLE t", "SELECT * FROM {rows} AS \"t\""),
    ("SELECT é FROM \"Té s\" -- the end", "SELECT é FROM {rows} AS \"Té s\" -- the end"),
])
def test_an_eligible_query_reads_the_logged_rows_in_place_of_its_table(query, expected):
    rows = "pg_catalog.unnest(pg_catalog.current_setting('alert_service.delta')::\"s\".\"t\"[])"
    assert query_analysis.delta_form(query).query('"s"."t"') == expected.format(rows=rows)


def test_a_transaction_is_visible_in_a_snapshot_only_when_it_committed_before_it():
    assert visible_in(99, "100:105:101,103")
    assert visible_in(102, "100:105:101,103")
    assert not visible_in(101, "100:105:101,103")
    assert not visible_in(105, "100:105:101,103")
    assert not visible_in(1000, "100:100:")


def test_logged_row_arrays_join_in_order():
    assert join_arrays(['{"(1,a)","(2,b)"}', "{}", '{"(3,c)"}']) == '{"(1,a)","(2,b)","(3,c)"}'
    assert join_arrays(["{}", "{}"]) == "{}"


# --- end to end ------------------------------------------------------------------------------------------------


def test_a_committed_row_is_reported_from_the_logged_rows(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(query="SELECT order_number, priority FROM dc_order WHERE priority = 'P1'",
                                 notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    execute(db_dsn, "INSERT INTO dc_order (order_number, priority) VALUES ('ORD-1', 'P1'), ('ORD-2', 'P3')")
    mail = smtp_server.wait_for(2)[1]
    text = mail.message.get_body(("plain",)).get_content()
    assert "ORD-1" in text and "ORD-2" not in text
    service.wait_idle()
    assert health_scheduler(service)["incremental_evaluations"] >= 1
    families = {f.name: f for f in text_string_to_metric_families(service.client.get("/metrics").text)}
    counted = {s.labels["result"]: s.value for s in families["alert_service_evaluations_incremental"].samples
               if s.name.endswith("_total")}
    assert counted["incremental"] >= 1 and counted["fallback"] == 0
    assert incidents_rows(service, alert["id"])[-1] == [["ORD-1", "P1"]]
    # The result's size is kept exact without running the query: 1 row.
    assert service.sql("SELECT row_count FROM alert_state WHERE alert_config_id = %s", (alert["id"],)) == [
        {"row_count": 1}]
    # Rows with a quote, a backslash, a comma and a brace go through the array text and back unchanged.
    odd = "a'b\\c,d{e}\"f"
    execute(db_dsn, "INSERT INTO dc_order (order_number, priority) VALUES (%s, 'P1')", (odd,))
    smtp_server.wait_for(3)
    service.wait_idle()
    assert incidents_rows(service, alert["id"])[-1] == [[odd, "P1"]]
    assert fetch(db_dsn, f"SELECT count(*) FROM {database.TRIGGER_SCHEMA}.{database.CHANGE_LOG}")[0][0] >= 2


def test_an_update_that_takes_a_row_out_of_the_result_makes_the_evaluation_run_the_full_query(
        service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(query="SELECT order_number FROM dc_order WHERE priority IS NULL",
                                 notification_channels={"email": ["ops@example.com"]})
    insert_orders(db_dsn, ["ORD-1"])
    smtp_server.wait_for(2)
    service.wait_idle()
    fallbacks, since = health_scheduler(service)["incremental_fallbacks"], datetime.now(timezone.utc)
    execute(db_dsn, "UPDATE dc_order SET priority = 'P9' WHERE order_number = 'ORD-1'")
    settle(service, [alert["id"]], since)
    assert health_scheduler(service)["incremental_fallbacks"] == fallbacks + 1
    # The full query forgot ORD-1, so the row back in the result is new, as a full evaluation says.
    execute(db_dsn, "UPDATE dc_order SET priority = NULL WHERE order_number = 'ORD-1'")
    smtp_server.wait_for(3)
    service.wait_idle()
    assert incidents_rows(service, alert["id"])[-1] == [["ORD-1"]]


def test_a_delete_logs_no_rows_and_is_evaluated_in_full(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(query="SELECT order_number FROM dc_order",
                                 notification_channels={"email": ["ops@example.com"]})
    insert_orders(db_dsn, ["ORD-1", "ORD-2"])
    smtp_server.wait_for(2)
    service.wait_idle()
    before, since = health_scheduler(service)["incremental_evaluations"], datetime.now(timezone.utc)
    execute(db_dsn, "DELETE FROM dc_order WHERE order_number = 'ORD-1'")
    settle(service, [alert["id"]], since)
    assert health_scheduler(service)["incremental_evaluations"] == before
    insert_orders(db_dsn, ["ORD-1"])
    smtp_server.wait_for(3)
    service.wait_idle()
    assert incidents_rows(service, alert["id"])[-1] == [["ORD-1"]]


def test_a_statement_too_large_to_log_is_evaluated_in_full(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(query="SELECT order_number FROM dc_order",
                                 notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    before = health_scheduler(service)["incremental_evaluations"]
    numbers = [f"ORD-{i}" for i in range(database.CHANGE_LOG_MAX_ROWS + 1)]
    insert_orders(db_dsn, numbers)
    smtp_server.wait_for(2)
    service.wait_idle()
    assert health_scheduler(service)["incremental_evaluations"] == before
    assert sorted(row[0] for row in incidents_rows(service, alert["id"])[-1]) == sorted(numbers)
    logged = fetch(db_dsn, f"SELECT new_rows FROM {database.TRIGGER_SCHEMA}.{database.CHANGE_LOG} "
                           "ORDER BY id DESC LIMIT 1")
    assert logged == [(None,)]


def test_writers_cannot_read_the_logged_rows_and_listeners_get_no_rows(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    service.create_alert(query="SELECT order_number FROM dc_order",
                         notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    role = f"order_writer_{uuid.uuid4().hex[:8]}"  # roles belong to the whole server, which tests may share
    execute(db_dsn, f"CREATE ROLE {role}; GRANT INSERT, SELECT ON dc_order TO {role}")
    writer = database.connect(db_dsn)
    try:
        writer.autocommit = True
        with writer.cursor() as cur:
            cur.execute(f"LISTEN {database.NOTIFY_CHANNEL}")
            cur.execute(f"SET ROLE {role}")
            cur.execute("INSERT INTO dc_order (order_number) VALUES ('ORD-SECRET')")
            writer.poll()
            assert writer.notifies and all("ORD-SECRET" not in n.payload for n in writer.notifies)
            with pytest.raises(database.psycopg2.errors.InsufficientPrivilege):
                cur.execute(f"SELECT * FROM {database.TRIGGER_SCHEMA}.{database.CHANGE_LOG}")
    finally:
        writer.close()
        execute(db_dsn, f"REVOKE ALL ON dc_order FROM {role}; DROP ROLE {role}")
    mail = smtp_server.wait_for(2)[1]
    assert "ORD-SECRET" in mail.message.get_body(("plain",)).get_content()


# --- the differential property test ----------------------------------------------------------------------------

_tables = itertools.count()


@functools.cache
def hypertables(dsn: str) -> bool:
    """Whether the differential test's tables are hypertables: on a server with TimescaleDB, where CI's TimescaleDB
    run requires it."""
    if not timescaledb_available(dsn):
        return False
    execute(dsn, "CREATE EXTENSION IF NOT EXISTS timescaledb")
    return True


def create_table(dsn: str, table: str) -> str:
    """The differential test's table: a hypertable with one-second chunks on TimescaleDB."""
    execute(dsn, f"CREATE TABLE {table} (id int, kind text, amount int, note text, at timestamptz NOT NULL "
                 "DEFAULT now())")
    if hypertables(dsn):
        execute(dsn, "SELECT create_hypertable(%s, 'at', chunk_time_interval => interval '1 second')", (table,))
    return table
PREDICATES = ["amount > 50", "amount <= 20 OR kind = 'b'", "kind IN ('a', 'c') AND amount IS NOT NULL",
              "coalesce(note, '') LIKE 'x%'", "true", "abs(amount - 40) < 25", "kind <> 'c'"]
PROJECTIONS = ["*", "id, kind", "kind, amount * 2 AS doubled", "upper(kind) AS k, note", "kind"]
ORDERS = ["", " ORDER BY id", " ORDER BY 1 DESC"]
rows_strategy = st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["a", "b", "c"]),
                                   st.sampled_from([None, 10, 40, 60, 90]),
                                   st.sampled_from([None, "x1", "y'2", "x\\3", "z,{4}"])), min_size=0, max_size=4)
operation = st.one_of(
    st.tuples(st.just("insert"), rows_strategy),
    st.tuples(st.just("update"), st.sampled_from(PREDICATES), st.sampled_from(["amount = amount + 30",
                                                                             "kind = 'a'", "note = 'x9'"])),
    st.tuples(st.just("delete"), st.sampled_from(PREDICATES)),
)


@hypothesis_settings(max_examples=30, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(predicate=st.sampled_from(PREDICATES), projection=st.sampled_from(PROJECTIONS),
       order=st.sampled_from(ORDERS), keyed=st.booleans(), operations=st.lists(operation, min_size=2, max_size=7))
def test_incremental_and_full_evaluation_report_the_same_rows(service, db_dsn, predicate, projection, order, keyed,
                                                              operations):
    table = create_table(db_dsn, f"diff_{next(_tables)}")
    query = f"SELECT {projection} FROM {table} WHERE {predicate}{order}"
    fields = {"trigger_condition": {"type": "new_rows"}, "notification_channels": {"email": ["ops@example.com"]},
              "schedule": "interval:1d"}
    if keyed and projection in ("*", "id, kind"):
        fields["key_columns"] = ["id"]
    incremental = service.create_alert(name=f"{table} incremental", query=query, **fields)
    # OFFSET 0 changes nothing in the result but keeps the alert on the full query.
    full = service.create_alert(name=f"{table} full", query=query + " OFFSET 0", **fields)
    service.wait_idle()
    for step in operations:
        since = datetime.now(timezone.utc)
        if step[0] == "insert":
            columns = [list(values) for values in zip(*step[1])] or [[], [], [], []]  # none: a statement all the same
            execute(db_dsn, f"INSERT INTO {table} (id, kind, amount, note) SELECT * FROM unnest(%s::int[], %s::text[], "
                    "%s::int[], %s::text[])", columns)
        elif step[0] == "update":
            execute(db_dsn, f"UPDATE {table} SET {step[2]} WHERE {step[1]}")
        else:
            execute(db_dsn, f"DELETE FROM {table} WHERE {step[1]}")
        settle(service, [incremental["id"], full["id"]], since)
        got, expected = incidents_rows(service, incremental["id"]), incidents_rows(service, full["id"])
        if not order:
            got, expected = [sorted(map(repr, rows)) for rows in got], [sorted(map(repr, rows)) for rows in expected]
        assert got == expected, (query, operations)
    states = service.sql("SELECT alert_config_id::text AS id, fingerprints, row_count FROM alert_state "
                         "WHERE alert_config_id IN (%s, %s)", (incremental["id"], full["id"]))
    by_id = {row["id"]: (bytes(row["fingerprints"]) and sorted(
        bytes(row["fingerprints"])[i:i + 16] for i in range(0, len(row["fingerprints"]), 16)), row["row_count"])
        for row in states}
    assert by_id[incremental["id"]] == by_id[full["id"]]


def test_the_differential_test_exercises_the_incremental_path(service, db_dsn):
    """The property test above is only worth something if the first alert really is evaluated incrementally."""
    create_table(db_dsn, "diff_check")
    check = service.create_alert(name="check", query="SELECT * FROM diff_check WHERE amount > 50",
                         notification_channels={"email": ["ops@example.com"]})
    service.wait_idle()
    before, since = health_scheduler(service)["incremental_evaluations"], datetime.now(timezone.utc)
    execute(db_dsn, "INSERT INTO diff_check (id, kind, amount) VALUES (1, 'a', 60)")
    settle(service, [check["id"]], since)
    assert health_scheduler(service)["incremental_evaluations"] == before + 1
