"""Pure decisions: schedules, conditions, fingerprints, the diff, query checks and message rendering."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

import rules
from config import ConfigError, is_e164, load_settings
from notification import EMAIL_TABLE_ROWS, WHATSAPP_MAX_CHARS, TemplateFailed, check_template, render_message
from query_analysis import QueryRejected, TableRef, analyse_query


@pytest.mark.parametrize("text, seconds", [("interval:30s", 30), ("interval:1m", 60), ("interval:15m", 900),
                                           ("interval:2h", 7200), ("interval:1d", 86400)])
def test_intervals_are_parsed_to_seconds(text, seconds):
    assert rules.parse_schedule(text).seconds == seconds


@pytest.mark.parametrize("columns, unique", [
    (["id", "name"], ["id", "name"]),
    (["id", "id"], ["id", "id_2"]),
    (["id", "id", "id"], ["id", "id_2", "id_3"]),
    (["id", "id", "id_2"], ["id", "id_3", "id_2"]),
    (["?column?", "?column?"], ["?column?", "?column?_2"]),
])
def test_result_columns_with_the_same_name_get_distinct_names(columns, unique):
    assert rules.unique_columns(columns) == unique


@given(st.lists(st.sampled_from(["id", "id_2", "id_3", "a", "a_2_2", "a_2"]), max_size=12))
def test_unique_columns_are_distinct_and_keep_every_first_name(columns):
    unique = rules.unique_columns(columns)
    assert len(unique) == len(columns) == len(set(unique))
    assert [u for c, u in zip(columns, unique) if c == u] == list(dict.fromkeys(columns))


def test_cron_schedules_give_the_next_run():
    schedule = rules.parse_schedule("cron:*/5 * * * *")
    after = datetime(2026, 1, 1, 12, 2, 30, tzinfo=timezone.utc)
    assert schedule.next_run(after) == datetime(2026, 1, 1, 12, 5, tzinfo=timezone.utc)


@pytest.mark.parametrize("text", ["interval:0s", "interval:-1m", "interval:abc", "interval:5", "interval:5w",
                                  "cron:bad", "cron:* * * *", "cron:61 * * * *", "every 5", "", "interval:400d"])
def test_bad_schedules_are_rejected_with_an_example(text):
    with pytest.raises(rules.RuleError, match="interval|cron|schedule"):
        rules.parse_schedule(text)


# Every decimal digit outside ASCII: Python's \d and int() accept them all.
_OTHER_DIGITS = [chr(c) for c in range(0x80, 0x110000) if chr(c).isdecimal()]


def test_schedules_and_durations_take_only_ascii_digits():
    assert len(_OTHER_DIGITS) > 600
    for digit in _OTHER_DIGITS:
        for text in (f"interval:{digit}s", f"interval:3{digit}s", f"cron:*/{digit} * * * *"):
            with pytest.raises(rules.RuleError, match="ASCII"):
                rules.parse_schedule(text)
        for name in ("for", "repeat_every", "cooldown", "duration"):
            with pytest.raises(rules.RuleError, match="ASCII"):
                rules.parse_duration(f"{digit}m", name=name)
    assert rules.parse_schedule(" interval:30s ").text == "interval:30s"


@pytest.mark.parametrize("text", [None, "", "New row added", "new_rows", "NEW ROWS", "New row added."])
def test_the_original_wording_means_new_rows(text):
    assert rules.parse_condition(text) == rules.Condition(type="new_rows")


@pytest.mark.parametrize("raw, message", [
    ("stock below safety level", "unknown trigger condition"),
    ({"type": "threshold", "operator": "<=", "value": 5}, "column"),
    ({"type": "threshold", "column": "qty", "operator": "=<", "value": 5}, "operator"),
    ({"type": "row_count", "operator": ">", "value": "ten"}, "numeric"),
    ({"type": "row_count", "operator": ">", "value": True}, "numeric"),
    ({"type": "new_rows", "for": "5m"}, "state conditions"),
    ({"type": "empty", "cooldown": "5m"}, "change conditions"),
    ({"type": "empty", "for": "five"}, "invalid for"),
    ({"type": "not_empty", "colour": "red"}, "colour"),
    ({"type": "sometimes"}, "unknown condition type"),
])
def test_bad_conditions_are_rejected_with_what_to_fix(raw, message):
    with pytest.raises(rules.RuleError, match=message):
        rules.parse_condition(raw)


def test_structured_conditions_normalise():
    condition = rules.parse_condition({"type": "threshold", "column": "qty", "operator": "<=", "value": 5,
                                       "for": "60s", "repeat_every": "2h"})
    assert condition.as_dict() == {"type": "threshold", "operator": "<=", "value": 5.0, "column": "qty",
                                   "match": "any", "for": "1m", "repeat_every": "2h"}
    assert condition.describe() == "qty <= 5 in any row"


NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def run(condition, prior, rows, columns=("sku", "qty"), at=NOW, keys=None):
    return rules.decide(condition=condition, prior=prior, columns=list(columns), rows=rows, keys=keys, now=at)


def test_threshold_fires_once_stays_quiet_and_resolves():
    low = rules.parse_condition({"type": "threshold", "column": "qty", "operator": "<=", "value": 5})
    first = run(low, rules.AlertState(initialized=True), [("A", 10), ("B", 3)])
    assert first.outcome == "triggered" and first.state.condition_state == "FIRING"
    assert first.notices[0].rows == [["B", 3]] and first.notices[0].open_incident
    again = run(low, first.state, [("A", 10), ("B", 2)], at=NOW + timedelta(minutes=1))
    assert again.outcome == "no_change" and again.notices == []
    cleared = run(low, again.state, [("A", 10), ("B", 30)], at=NOW + timedelta(minutes=2))
    assert cleared.outcome == "resolved" and cleared.resolve_incident and cleared.notices[0].kind == "resolved"
    assert cleared.state.condition_state == "OK"


def test_for_waits_in_pending_and_asks_to_be_woken():
    condition = rules.parse_condition({"type": "row_count", "operator": ">", "value": 1, "for": "2m"})
    pending = run(condition, rules.AlertState(initialized=True), [("A", 1), ("B", 2)])
    assert pending.state.condition_state == "PENDING" and pending.notices == []
    assert pending.wake_at == NOW + timedelta(minutes=2)
    fired = run(condition, pending.state, [("A", 1), ("B", 2)], at=NOW + timedelta(minutes=2))
    assert fired.state.condition_state == "FIRING" and fired.notices[0].kind == "incident"
    short = run(condition, pending.state, [("A", 1)], at=NOW + timedelta(minutes=1))
    assert short.state.condition_state == "OK" and short.notices == []


def test_repeat_every_re_notifies_while_firing():
    condition = rules.parse_condition({"type": "not_empty", "repeat_every": "10m"})
    fired = run(condition, rules.AlertState(initialized=True), [("A", 1)])
    assert fired.wake_at == NOW + timedelta(minutes=10)
    early = run(condition, fired.state, [("A", 1)], at=NOW + timedelta(minutes=5))
    assert early.notices == []
    due = run(condition, fired.state, [("A", 1)], at=NOW + timedelta(minutes=10))
    assert [n.kind for n in due.notices] == ["repeat"]


def test_empty_and_all_rows_threshold():
    assert rules.state_condition_met(rules.Condition(type="empty"), ["a"], [])[0] is True
    every = rules.parse_condition({"type": "threshold", "column": "qty", "operator": ">", "value": 0, "match": "all"})
    assert rules.state_condition_met(every, ["sku", "qty"], [("A", 1), ("B", 0)])[0] is False
    assert rules.state_condition_met(every, ["sku", "qty"], [("A", 1), ("B", 2)])[0] is True
    assert rules.state_condition_met(every, ["sku", "qty"], [])[0] is False


def test_threshold_ignores_null_and_non_numeric_values():
    low = rules.parse_condition({"type": "threshold", "column": "qty", "operator": "<", "value": 5})
    assert rules.state_condition_met(low, ["qty"], [(None,), ("n/a",), (Decimal("4.5"),)]) == (True, [2])


def test_removed_rows_and_any_change_use_the_previous_rows():
    removed = rules.parse_condition("removed_rows")
    first = run(removed, None, [("A", 1), ("B", 2)], keys=[0])
    assert first.notices[0].kind == "initial_report"
    second = run(removed, first.state, [("A", 1)], keys=[0])
    assert second.notices[0].rows == [["B", 2]] and second.notices[0].headline == "1 removed row"
    anything = rules.parse_condition("any_change")
    base = run(anything, None, [("A", 1), ("B", 2)], keys=[0])
    changed = run(anything, base.state, [("A", 5), ("C", 3)], keys=[0])
    assert sorted(changed.notices[0].rows) == [["added", "C", 3], ["changed", "A", 5], ["removed", "B", 2]]


def test_cooldown_gathers_changes_into_one_digest_without_dropping_rows():
    condition = rules.parse_condition({"type": "new_rows", "cooldown": "5m"})
    state = run(condition, None, []).state
    first = run(condition, state, [("A", 1)])
    assert first.notices[0].kind == "incident" and first.state.cooldown_until == NOW + timedelta(minutes=5)
    held = run(condition, first.state, [("A", 1), ("B", 2)], at=NOW + timedelta(minutes=1))
    assert held.notices == [] and held.wake_at == NOW + timedelta(minutes=5)
    quiet = run(condition, held.state, [("A", 1), ("B", 2)], at=NOW + timedelta(minutes=1, seconds=30))
    assert quiet.notices == [] and quiet.state.digest == [["B", 2]], "nothing new inside the cooldown holds"
    held2 = run(condition, quiet.state, [("A", 1), ("B", 2), ("C", 3)], at=NOW + timedelta(minutes=2))
    digest = run(condition, held2.state, [("A", 1), ("B", 2), ("C", 3)], at=NOW + timedelta(minutes=5))
    assert digest.notices[0].kind == "digest" and digest.notices[0].rows == [["B", 2], ["C", 3]]
    assert digest.state.digest is None


def test_errors_notify_once_after_the_threshold_and_recovery_once():
    state = None
    kinds = []
    for _ in range(5):
        decision = rules.decide_error(prior=state, error="boom", error_notify_after=3)
        kinds += [n.kind for n in decision.notices]
        state = decision.state
    assert kinds == ["failing"] and state.consecutive_errors == 5
    recovered = run(rules.Condition(), state, [])
    assert [n.kind for n in recovered.notices][:1] == ["recovered"] and recovered.state.consecutive_errors == 0


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


ALERT = {"name": "Order Monitor", "priority": "HIGH", "description": None}


def test_messages_carry_the_rows_and_a_subject_with_priority_and_count():
    notice = rules.Notice("incident", "3 new rows", ["order_number"], [["ORD1"], ["ORD2"], ["ORD3"]])
    message = render_message(alert=ALERT, notice=notice)
    assert message.subject == "[HIGH] Order Monitor: 3 new rows"
    assert "ORD3" in message.text and ">ORD1</td>" in message.html and "ORD2" in message.whatsapp


def test_html_is_escaped():
    notice = rules.Notice("incident", "1 new row", ["v"], [["<script>"]])
    message = render_message(alert={**ALERT, "name": "<b>x</b>"}, notice=notice)
    assert "<script>" not in message.html and "&lt;script&gt;" in message.html


def test_long_messages_are_capped_and_say_so():
    many = [[f"ORD{i:06d}", "x" * 30] for i in range(500)]
    message = render_message(alert=ALERT, notice=rules.Notice("incident", "500 new rows", ["n", "pad"], many))
    assert len(message.whatsapp) <= WHATSAPP_MAX_CHARS and "… and 495 more rows" in message.whatsapp
    assert f"… and {500 - EMAIL_TABLE_ROWS} more rows" in message.text


def test_templates_render_in_a_sandbox_and_fall_back_with_a_note():
    notice = rules.Notice("incident", "1 new row", ["sku", "qty"], [["A", 2]])
    custom = render_message(alert={**ALERT, "message_template": "Low: {% for r in rows %}{{ r.sku }}={{ r.qty }}{% endfor %}"},
                            notice=notice)
    assert custom.text.startswith("Low: A=2") and "Low: A=2" in custom.whatsapp
    broken = render_message(alert={**ALERT, "message_template": "{{ rows[0].qty / 0 }}"}, notice=notice)
    assert "template failed" in broken.text and "A" in broken.text
    with pytest.raises(TemplateFailed):
        check_template("{{ alert.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}")
    with pytest.raises(TemplateFailed):
        check_template("{% for %}")


def test_settings_errors_name_the_variable():
    with pytest.raises(ConfigError, match="SMTP_PORT"):
        load_settings(_env_file=None, smtp_port="abc")
    with pytest.raises(ConfigError, match="SMTP_SECURITY"):
        load_settings(_env_file=None, smtp_security="tls")
    with pytest.raises(ConfigError, match="TWILIO_FROM_NUMBER"):
        load_settings(_env_file=None, twilio_from_number="12345")
    with pytest.raises(ConfigError, match="WORKERS"):
        load_settings(_env_file=None, workers=0)


def test_an_smtp_login_that_smtplib_cannot_send_stops_start_up():
    with pytest.raises(ConfigError, match="SMTP_PASSWORD: .*ASCII"):
        load_settings(_env_file=None, smtp_password="pässwort")
    with pytest.raises(ConfigError, match="SMTP_USERNAME: .*ASCII"):
        load_settings(_env_file=None, smtp_username="jürgen")
    assert "pässwort" not in str(_config_error(smtp_password="pässwort"))


def _config_error(**settings) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, **settings)
    return caught.value


def test_smtp_from_must_be_an_address_every_server_takes():
    with pytest.raises(ConfigError, match="SMTP_FROM.*josé@example.com.*ASCII"):
        load_settings(_env_file=None, smtp_from="josé@example.com")
    with pytest.raises(ConfigError, match="SMTP_FROM"):
        load_settings(_env_file=None, smtp_from="alerts at example.com")
    assert load_settings(_env_file=None, smtp_from="alerts@bücher.example").email_sender == \
        "alerts@xn--bcher-kva.example"
    assert load_settings(_env_file=None, smtp_from="Alert Service <alerts@bücher.example>").email_sender == \
        "Alert Service <alerts@xn--bcher-kva.example>"


def test_settings_defaults_and_fractional_retry_delay():
    settings = load_settings(_env_file=None, retry_delay_minutes="0.5", smtp_username="me@example.com")
    assert settings.retry_delay_seconds == 30 and settings.email_sender == "me@example.com"
    assert settings.api_port == 8000 and settings.max_result_rows == 10_000 and settings.smtp_security == "starttls"
    assert "hunter2" not in repr(load_settings(_env_file=None, smtp_password="hunter2"))


@pytest.mark.parametrize("number, ok", [("+14155550123", True), ("+4915112345678", True), ("14155550123", False),
                                        ("+1234567", False), ("+1234567890123456", False), ("+0123456789", False)])
def test_e164(number, ok):
    assert is_e164(number) is ok
