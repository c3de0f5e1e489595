"""Pure decisions: schedules, conditions, fingerprints, the diff, query checks and message rendering."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

import rules
from config import ConfigError, is_e164, load_settings
from notification import WHATSAPP_MAX_CHARS, render_alert_message
from query_analysis import QueryRejected, TableRef, analyse_query


@pytest.mark.parametrize("text, seconds", [("interval:30s", 30), ("interval:1m", 60), ("interval:15m", 900),
                                           ("interval:2h", 7200), ("interval:1d", 86400)])
def test_intervals_are_parsed_to_seconds(text, seconds):
    assert rules.parse_schedule(text).seconds == seconds


def test_cron_schedules_give_the_next_run():
    schedule = rules.parse_schedule("cron:*/5 * * * *")
    after = datetime(2026, 1, 1, 12, 2, 30, tzinfo=timezone.utc)
    assert schedule.next_run(after) == datetime(2026, 1, 1, 12, 5, tzinfo=timezone.utc)


@pytest.mark.parametrize("text", ["interval:0s", "interval:-1m", "interval:abc", "interval:5", "interval:5w",
                                  "cron:bad", "cron:* * * *", "cron:61 * * * *", "every 5", "", "interval:400d"])
def test_bad_schedules_are_rejected_with_an_example(text):
    with pytest.raises(rules.RuleError, match="interval|cron|schedule"):
        rules.parse_schedule(text)


@pytest.mark.parametrize("text", [None, "", "New row added", "new_rows", "NEW ROWS", "New row added."])
def test_the_original_wording_means_new_rows(text):
    assert rules.parse_trigger_condition(text) == "new_rows"


def test_unknown_conditions_are_rejected():
    with pytest.raises(rules.RuleError):
        rules.parse_trigger_condition("stock below safety level")


def test_fingerprints_distinguish_types_and_null():
    assert rules.row_fingerprint([1]) != rules.row_fingerprint(["1"])
    assert rules.row_fingerprint([None]) != rules.row_fingerprint(["None"])
    assert rules.row_fingerprint(["a", "b"]) != rules.row_fingerprint(["ab", ""])
    assert rules.row_fingerprint([Decimal("1.50")]) == rules.row_fingerprint([Decimal("1.50")])


def test_key_columns_make_a_changed_row_not_new():
    keys = rules.key_indexes(["id", "qty"], ["id"])
    old = set(rules.identities([(1, 5)], keys))
    assert rules.new_row_positions(old, rules.identities([(1, 6), (2, 1)], keys)) == [1]


def test_unknown_key_columns_are_named():
    with pytest.raises(rules.RuleError, match="sku"):
        rules.key_indexes(["id"], ["sku"])


values = st.one_of(st.none(), st.integers(), st.text(max_size=8), st.booleans(), st.floats(allow_nan=False))
rows = st.lists(st.tuples(values, values), max_size=30)


@given(previous=rows, current=rows)
def test_new_rows_are_exactly_the_rows_not_seen_before(previous, current):
    old = frozenset(rules.identities(previous, None))
    positions = rules.new_row_positions(old, rules.identities(current, None))
    reported = [current[i] for i in positions]
    assert all(rules.row_fingerprint(r) not in old for r in reported)
    assert len({rules.row_fingerprint(r) for r in reported}) == len(reported)
    unseen = {rules.row_fingerprint(r) for r in current} - old
    assert {rules.row_fingerprint(r) for r in reported} == unseen


@given(st.lists(st.binary(min_size=16, max_size=16), max_size=50))
def test_fingerprints_survive_storage(fingerprints):
    assert rules.unpack_fingerprints(rules.pack_fingerprints(fingerprints)) == frozenset(fingerprints)


def test_jsonable_keeps_numbers_and_turns_the_rest_into_text():
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert rules.jsonable(Decimal("1.5")) == "1.5" and rules.jsonable(3) == 3
    assert rules.jsonable(when) == str(when) and rules.jsonable(b"\x01") == "\\x01"
    assert rules.jsonable(float("nan")) == "nan"


def test_query_analysis_finds_tables_through_joins_subqueries_and_ctes():
    tables = analyse_query(
        'WITH recent AS (SELECT * FROM "Sales"."Orders") SELECT * FROM recent r JOIN public.customers c '
        "ON true WHERE c.id IN (SELECT customer_id FROM refunds)"
    )
    assert tables == [TableRef(None, "refunds"), TableRef("Sales", "Orders"), TableRef("public", "customers")]


@pytest.mark.parametrize("query", ["VALUES (1)", "TABLE dc_order", "SELECT 1 UNION SELECT 2", "select 1;"])
def test_read_only_forms_are_accepted(query):
    analyse_query(query)


@pytest.mark.parametrize("query, reason", [
    ("UPDATE t SET a = 1", "not UPDATE"),
    ("WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x", "INSERT"),
    ("SELECT 1; SELECT 2", "exactly one"),
    ("SELECT * INTO t2 FROM t", "SELECT INTO"),
    ("SELECT * FROM t FOR SHARE", "locking"),
    ("COPY t TO STDOUT", "not COPY"),
    ("   ", "empty"),
])
def test_writing_and_multi_statement_queries_are_rejected(query, reason):
    with pytest.raises(QueryRejected, match=reason):
        analyse_query(query)


def test_messages_carry_the_rows_and_a_subject_with_priority_and_count():
    message = render_alert_message(alert_name="Order Monitor", priority="HIGH", kind="incident",
                                   columns=["order_number"], rows=[("ORD1",), ("ORD2",), ("ORD3",)], total_rows=3)
    assert message.subject == "[HIGH] Order Monitor: 3 new rows"
    assert "ORD3" in message.text and "<td>ORD1</td>" in message.html and "ORD2" in message.whatsapp


def test_html_is_escaped():
    message = render_alert_message(alert_name="<b>x</b>", priority="LOW", kind="incident", columns=["v"],
                                   rows=[("<script>",)], total_rows=1)
    assert "<script>" not in message.html and "&lt;script&gt;" in message.html


def test_long_messages_are_capped_and_say_so():
    many = [(f"ORD{i:06d}", "x" * 30) for i in range(500)]
    message = render_alert_message(alert_name="A", priority="LOW", kind="incident", columns=["n", "pad"],
                                   rows=many, total_rows=500)
    assert len(message.whatsapp) <= WHATSAPP_MAX_CHARS and "cut" in message.whatsapp
    assert "400 more rows not shown" in message.text


def test_settings_errors_name_the_variable():
    with pytest.raises(ConfigError, match="SMTP_PORT"):
        load_settings(_env_file=None, smtp_port="abc")
    with pytest.raises(ConfigError, match="SMTP_SECURITY"):
        load_settings(_env_file=None, smtp_security="tls")
    with pytest.raises(ConfigError, match="TWILIO_FROM_NUMBER"):
        load_settings(_env_file=None, twilio_from_number="12345")
    with pytest.raises(ConfigError, match="WORKERS"):
        load_settings(_env_file=None, workers=0)


def test_settings_defaults_and_fractional_retry_delay():
    settings = load_settings(_env_file=None, retry_delay_minutes="0.5", smtp_username="me@example.com")
    assert settings.retry_delay_seconds == 30 and settings.email_sender == "me@example.com"
    assert settings.api_port == 8000 and settings.max_result_rows == 10_000 and settings.smtp_security == "starttls"
    assert "hunter2" not in repr(load_settings(_env_file=None, smtp_password="hunter2"))


@pytest.mark.parametrize("number, ok", [("+14155550123", True), ("+4915112345678", True), ("14155550123", False),
                                        ("+1234567", False), ("+1234567890123456", False), ("+0123456789", False)])
def test_e164(number, ok):
    assert is_e164(number) is ok
