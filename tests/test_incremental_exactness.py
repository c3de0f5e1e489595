"""Incremental evaluation where the logged rows alone could mislead: the writer's session settings, a table altered
after the rows were logged, a full evaluation handed to another worker, row-level security set up just before a
commit, and columns a transition table cannot carry. Each compares an incremental alert with its full twin."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timezone

import pytest

from tests.conftest import dsn_with, execute, fetch
from tests.test_incremental import health_scheduler, incidents_rows, settle

NEW_ROWS = {"trigger_condition": {"type": "new_rows"}, "notification_channels": {"email": ["ops@example.com"]},
            "schedule": "interval:1d"}


def twins(service, table: str, query: str, **fields) -> tuple[dict, dict]:
    """The same query twice: once eligible for incremental evaluation, once kept on the full query (OFFSET 0)."""
    incremental = service.create_alert(name=f"{table} incremental", query=query, **NEW_ROWS, **fields)
    full = service.create_alert(name=f"{table} full", query=query + " OFFSET 0", **NEW_ROWS, **fields)
    service.wait_idle()
    return incremental, full


def write_and_compare(service, db_dsn, incremental: dict, full: dict, statement: str, *,
                      incremental_path: bool = True) -> None:
    before, since = health_scheduler(service)["incremental_evaluations"], datetime.now(timezone.utc)
    execute(db_dsn, statement)
    settle(service, [incremental["id"], full["id"]], since)
    if incremental_path:
        assert health_scheduler(service)["incremental_evaluations"] > before  # the incremental path took it up
    assert incidents_rows(service, incremental["id"]) == incidents_rows(service, full["id"])


def test_a_writer_with_fewer_float_digits_does_not_round_the_logged_rows(service, db_dsn):
    # Printed in the writer's session, extra_float_digits = 0 would log 0.30000000000000004 as 0.3, which drops
    # out of `v > 0.3`: the capture function prints under settings of its own.
    execute(db_dsn, "CREATE TABLE review_float (id int, v float8)")
    incremental, full = twins(service, "review_float", "SELECT id, v FROM review_float WHERE v > 0.3")
    write_and_compare(service, db_dsn, incremental, full,
                      "SET extra_float_digits = 0; INSERT INTO review_float VALUES (1, 0.1::float8 + 0.2::float8)")
    assert incidents_rows(service, full["id"])[-1] == [[1, 0.30000000000000004]]


def test_a_writer_with_another_datestyle_does_not_move_the_logged_dates(service, db_dsn):
    # Under the writer's DateStyle 'SQL, DMY', 2026-02-01 would be logged as 01/02/2026 and read back (ISO, MDY)
    # as 2026-01-02.
    execute(db_dsn, "CREATE TABLE review_date (id int, d date)")
    incremental, full = twins(service, "review_date", "SELECT id, d::text AS d FROM review_date WHERE d >= '2026-02-01'")
    write_and_compare(service, db_dsn, incremental, full,
                      "SET DateStyle = 'SQL, DMY'; INSERT INTO review_date VALUES (1, '2026-02-01')")
    assert incidents_rows(service, full["id"])[-1] == [[1, "2026-02-01"]]


def test_a_writer_with_another_intervalstyle_does_not_change_the_logged_intervals(service, db_dsn):
    # sql_standard would log -1 day -2 hours as '-1 2:00:00', which the postgres style reads as -1 day +2 hours:
    # -22 hours, no longer below -1 day.
    execute(db_dsn, "CREATE TABLE review_interval (id int, i interval)")
    incremental, full = twins(service, "review_interval",
                              "SELECT id, i::text AS i FROM review_interval WHERE i < interval '-1 day'")
    write_and_compare(service, db_dsn, incremental, full,
                      "SET IntervalStyle = 'sql_standard'; INSERT INTO review_interval VALUES (1, '-1 day -2 hours')")
    assert incidents_rows(service, full["id"])[-1] == [[1, "-1 days -02:00:00"]]


def test_rows_logged_before_a_column_changed_type_are_not_read_as_the_new_type(service, db_dsn):
    # Cast to the table's row type as it is when the evaluation runs, the logged 500 (cents, an int) would become
    # 500 (a numeric) although the table now holds 5.00: rows logged before an ALTER TABLE take the full query.
    execute(db_dsn, "CREATE TABLE review_retype (id int, amount int)")
    incremental, full = twins(service, "review_retype", "SELECT id, amount FROM review_retype WHERE amount > 100")
    write_and_compare(service, db_dsn, incremental, full,
                      "INSERT INTO review_retype VALUES (1, 500); "
                      "ALTER TABLE review_retype ALTER COLUMN amount TYPE numeric USING amount / 100.0")
    assert incidents_rows(service, full["id"]) == []  # 5.00 is not > 100


def test_a_full_evaluation_handed_off_to_another_worker_is_not_replaced_by_an_incremental_one(service, db_dsn):
    # A DELETE asks for a full evaluation (it logs no rows). The batch that takes it is held up by another alert's
    # query, which turns slow in the same commit, so the alert is handed to another worker while a commit that
    # came meanwhile leaves its logged id in the flight. That worker must still run the full query: evaluating only
    # the later commit's rows would keep the deleted row's fingerprint, and the same row inserted again would not
    # be reported, where the full query reports it.
    execute(db_dsn, "CREATE TABLE review_handoff (id int); CREATE TABLE review_switch (slow bool); "
                    "INSERT INTO review_switch VALUES (false)")
    service.create_alert(name="turns slow", query=(
        "SELECT s.slow, pg_sleep(CASE WHEN s.slow THEN 1 ELSE 0 END)::text AS slept, "
        "(SELECT count(*) FROM review_handoff) AS n FROM review_switch s"), **NEW_ROWS)
    incremental, full = twins(service, "review_handoff", "SELECT id FROM review_handoff")
    since = datetime.now(timezone.utc)
    execute(db_dsn, "INSERT INTO review_handoff VALUES (1)")
    settle(service, [incremental["id"], full["id"]], since)
    since = datetime.now(timezone.utc)
    later = threading.Timer(0.1, execute, (db_dsn, "INSERT INTO review_handoff VALUES (2)"))
    later.start()
    execute(db_dsn, "UPDATE review_switch SET slow = true; DELETE FROM review_handoff WHERE id = 1")
    later.join()
    settle(service, [incremental["id"], full["id"]], since)
    time.sleep(1.5)
    service.wait_idle()
    since = datetime.now(timezone.utc)
    execute(db_dsn, "INSERT INTO review_handoff VALUES (1)")
    settle(service, [incremental["id"], full["id"]], since)
    assert incidents_rows(service, full["id"])[-1] == [[1]]
    assert incidents_rows(service, incremental["id"]) == incidents_rows(service, full["id"])


def test_rows_a_new_row_level_security_policy_hides_are_not_reported_from_the_logged_rows(service, db_dsn):
    # The catalog look that finds row-level security runs every few seconds: a policy created just before a commit
    # must still hide that commit's rows, which the data source's role cannot see in the table, so the rows are
    # read only after the queries' own snapshot says the table has no row-level security.
    role = f"review_reader_{uuid.uuid4().hex[:8]}"
    execute(db_dsn, f"CREATE TABLE review_rls (id int, secret bool); CREATE ROLE {role} LOGIN; "
                    f"GRANT SELECT ON review_rls TO {role}")
    try:
        source = service.client.post("/data-sources/", json={"name": "reader", "dsn": dsn_with(db_dsn, user=role)})
        assert source.status_code == 201, source.text
        incremental, full = twins(service, "review_rls", "SELECT id, secret FROM review_rls",
                                  data_source_id=source.json()["id"])
        write_and_compare(service, db_dsn, incremental, full,
                          "ALTER TABLE review_rls ENABLE ROW LEVEL SECURITY; "
                          "CREATE POLICY hide_secrets ON review_rls FOR SELECT USING (NOT secret); "
                          "INSERT INTO review_rls VALUES (1, true)")
        assert incidents_rows(service, full["id"]) == []
    finally:
        execute(db_dsn, f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_a_table_with_a_virtual_generated_column_is_not_evaluated_from_logged_rows(service, db_dsn):
    # The transition table carries NULL for a virtual generated column (PostgreSQL 18): the logged row would read
    # doubled = NULL and drop out of `doubled > 10`, so such a table keeps the full query.
    if fetch(db_dsn, "SHOW server_version_num")[0][0] < "180000":
        pytest.skip("virtual generated columns came with PostgreSQL 18")
    execute(db_dsn, "CREATE TABLE review_generated (id int, v int, doubled int GENERATED ALWAYS AS (v * 2) VIRTUAL)")
    incremental, full = twins(service, "review_generated",
                              "SELECT id, doubled FROM review_generated WHERE doubled > 10")
    write_and_compare(service, db_dsn, incremental, full, "INSERT INTO review_generated (id, v) VALUES (1, 6)",
                      incremental_path=False)
    assert incidents_rows(service, full["id"]) == [[[1, 12]]]
