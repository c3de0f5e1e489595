"""Coalesced delivery: the queued rows of one alert and recipient go out as one message, within the rate limits,
at the real loopback SMTP server."""

from __future__ import annotations

import time

import pytest

import database
from notification import (EMAIL_MAX_CHARS, WHATSAPP_MAX_CHARS, WHATSAPP_TRUNCATION_NOTE, Dispatcher, SendRate,
                          combine_messages)
from tests.conftest import eventually, placeholder_alert


@pytest.fixture
def pool(db_dsn):
    """A connection pool on the test database."""
    opened = database.service_pool(db_dsn, size=8)
    yield opened
    opened.close()


@pytest.fixture
def patient(settings):
    """Settings whose SMTP client waits for a held server (the tests hold messages for a few seconds)."""
    return settings.model_copy(update={"smtp_timeout_seconds": 15.0, "send_timeout_seconds": 20.0})


def incident(pool, alert_id: str) -> str:
    """An open incident of the alert."""
    with pool.transaction() as cur:
        return database.insert_incident(cur, alert_id=alert_id, alert_name="queued", title="t", description="d",
                                        priority="HIGH", incident_data={})["id"]


def queue(pool, alert_id: str, *subjects: str, recipient: str = "ops@example.com", incident_id=None,
          body: str | None = None, html: str | None = None) -> None:
    """Queue email rows in one transaction, as one evaluation does."""
    with pool.transaction() as cur:
        database.insert_notifications(cur, notifications=[
            {"alert_config_id": alert_id, "incident_id": incident_id, "kind": "incident", "channel": "email",
             "recipient": recipient, "subject": subject, "body": body or f"text of {subject}\n",
             "html": html or f"<html><body><p>html of {subject}</p></body></html>"} for subject in subjects])


def rows(pool) -> list[dict]:
    with pool.transaction() as cur:
        cur.execute("SELECT * FROM notification ORDER BY created_at, seq")
        return cur.fetchall()


def running(pool, settings, count: int = 1) -> list[Dispatcher]:
    dispatchers = [Dispatcher(pool, settings) for _ in range(count)]
    for dispatcher in dispatchers:
        dispatcher.start()
    return dispatchers


def text_of(mail) -> str:
    return mail.message.get_body(("plain",)).get_content()


def html_of(mail) -> str:
    return mail.message.get_body(("html",)).get_content()


def test_rows_queued_while_a_send_is_held_arrive_as_one_email_listing_every_row_in_order(
        pool, patient, smtp_server):
    alert = placeholder_alert(pool)
    smtp_server.hold()
    queue(pool, alert, "first")
    [dispatcher] = running(pool, patient)
    try:
        smtp_server.wait_held(1)
        for number in range(10):
            queue(pool, alert, f"update {number}")
        smtp_server.release()
        first, combined = smtp_server.wait_for(2)
        time.sleep(0.3)
        assert len(smtp_server.messages) == 2
    finally:
        dispatcher.stop()
    assert first.message["Subject"] == "first" and text_of(first) == "text of first\n"
    assert combined.message["Subject"] == "update 0 (+9 more updates)"
    text, page = text_of(combined), html_of(combined)
    positions = [text.index(f"text of update {n}\n") for n in range(10)]
    assert positions == sorted(positions)
    assert [text.index(f"--- update {n + 1} of 10: update {n} ---") for n in range(10)] == sorted(
        text.index(f"--- update {n + 1} of 10: update {n} ---") for n in range(10))
    html_positions = [page.index(f"<p>html of update {n}</p>") for n in range(10)]
    assert html_positions == sorted(html_positions) and page.count("<body>") == 1
    stored = rows(pool)
    assert {r["status"] for r in stored} == {"SUCCESS"}
    assert {r["provider_message_id"] for r in stored[1:]} == {combined.message["Message-ID"]}
    assert stored[0]["provider_message_id"] == first.message["Message-ID"]


def test_rows_for_other_recipients_or_alerts_are_not_merged(pool, patient, smtp_server):
    alert, other_alert = placeholder_alert(pool, "a"), placeholder_alert(pool, "b")
    smtp_server.hold()
    queue(pool, alert, "held", recipient="one@example.com")
    # One SMTP session: while the held send occupies it, every other group waits and gathers its rows.
    [dispatcher] = running(pool, patient.model_copy(update={"smtp_connections": 1}))
    try:
        smtp_server.wait_held(1)
        for number in range(3):
            queue(pool, alert, f"a one {number}", recipient="one@example.com")
            queue(pool, alert, f"a two {number}", recipient="two@example.com")
            queue(pool, other_alert, f"b one {number}", recipient="one@example.com")
        smtp_server.release()
        smtp_server.wait_for(4)
        time.sleep(0.5)
        mails = smtp_server.messages
    finally:
        dispatcher.stop()
    sent = sorted((m.rcpt_tos[0], m.message["Subject"]) for m in mails)
    assert sent == [("one@example.com", "a one 0 (+2 more updates)"), ("one@example.com", "b one 0 (+2 more updates)"),
                    ("one@example.com", "held"), ("two@example.com", "a two 0 (+2 more updates)")]
    for mail in mails:
        if mail.message["Subject"] != "held":
            prefix = mail.message["Subject"].removesuffix(" 0 (+2 more updates)")
            assert all(f"text of {prefix} {n}\n" in text_of(mail) for n in range(3)), prefix


def test_a_quiet_system_sends_a_row_at_once_unchanged_and_the_next_one_when_the_rate_allows(
        pool, settings, smtp_server):
    alert = placeholder_alert(pool)
    one_a_second = settings.model_copy(update={"smtp_max_per_second": 1.0})
    [dispatcher] = running(pool, one_a_second)
    try:
        time.sleep(0.3)  # the loop is idle, waiting
        html = "<html><body><p>exactly this</p></body></html>"
        queued_at = time.monotonic()
        queue(pool, alert, "[HIGH] Orders: 1 new row", body="exactly this text\n", html=html)
        dispatcher.wake()
        [first] = smtp_server.wait_for(1)
        assert first.received_at - queued_at < 0.5, "the first message went at once"
        assert first.message["Subject"] == "[HIGH] Orders: 1 new row"
        assert text_of(first) == "exactly this text\n" and html_of(first) == html
        queue(pool, alert, "second")
        dispatcher.wake()
        second = smtp_server.wait_for(2)[1]
    finally:
        dispatcher.stop()
    assert second.message["Subject"] == "second", "a row on its own is sent as stored"
    assert second.received_at - first.received_at >= 0.8, "the second waited for the rate limit's next token"


def test_at_two_emails_a_second_thirty_rows_over_several_alerts_all_arrive_once_within_the_rate(
        pool, settings, smtp_server):
    alerts = [placeholder_alert(pool, f"alert {n}") for n in range(5)]
    two_a_second = settings.model_copy(update={"smtp_max_per_second": 2.0})
    [dispatcher] = running(pool, two_a_second)
    try:
        for number in range(30):
            queue(pool, alerts[number % 5], f"row {number}", body=f"marker-{number}.\n")
            dispatcher.wake()
            time.sleep(0.02)
        eventually(lambda: {r["status"] for r in rows(pool)} == {"SUCCESS"}, timeout=30, message="all rows sent")
        time.sleep(0.3)
        mails = smtp_server.messages
    finally:
        dispatcher.stop()
    texts = [text_of(m) for m in mails]
    for number in range(30):
        assert sum(text.count(f"marker-{number}.") for text in texts) == 1, f"row {number} arrived once"
    span = mails[-1].received_at - mails[0].received_at
    # A token bucket of 2 a second with a burst of 2 allows at most 2 + 2 × span sends over the span.
    assert len(mails) <= 2 + 2 * span + 1, (len(mails), span)
    assert len(mails) < 30


def test_a_failure_marks_every_row_of_the_group_with_the_reason(pool, settings, smtp_server):
    slow_retries = settings.model_copy(update={"retry_delay_minutes": 10.0})
    alert, other_alert = placeholder_alert(pool, "a"), placeholder_alert(pool, "b")
    incidents = [incident(pool, alert), incident(pool, alert)]
    for number, incident_id in enumerate([incidents[0], incidents[0], incidents[1]]):
        queue(pool, alert, f"a {number}", incident_id=incident_id)
    smtp_server.reply_code_for_next(451, "try again later", times=1)
    [dispatcher] = running(pool, slow_retries)
    try:
        eventually(lambda: [r for r in rows(pool) if r["status"] == "RETRY"], message="rows in RETRY")
        time.sleep(0.3)
        retrying = [r for r in rows(pool) if r["status"] == "RETRY"]
        assert len(retrying) == 3 and all("451" in r["error"] and r["attempts"] == 1 for r in retrying)
        assert len({r["next_attempt_at"] for r in retrying}) == 1, "the group retries together"

        other_incident = incident(pool, other_alert)
        smtp_server.reply_code_for_next(550, "mailbox unavailable", times=1)
        queue(pool, other_alert, "b 0", "b 1", incident_id=other_incident)
        dispatcher.wake()
        eventually(lambda: [r for r in rows(pool) if r["status"] == "FAILED"], message="rows FAILED")
        time.sleep(0.3)
    finally:
        dispatcher.stop()
    failed = [r for r in rows(pool) if r["status"] == "FAILED"]
    assert len(failed) == 2 and all("550" in r["error"] and r["alert_config_id"] == other_alert for r in failed)
    assert smtp_server.data_attempts == 2 and smtp_server.messages == []
    with pool.transaction() as cur:
        cur.execute("SELECT incident_id, details FROM activity WHERE action = 'notification_failed'")
        activities = cur.fetchall()
    assert [a["incident_id"] for a in activities] == [other_incident] and "550" in activities[0]["details"]["error"]


def test_a_group_being_sent_is_not_claimed_again_by_a_second_dispatcher(pool, patient, smtp_server):
    alert = placeholder_alert(pool)
    smtp_server.hold()
    queue(pool, alert, "first")
    dispatchers = running(pool, patient, count=2)
    try:
        smtp_server.wait_held(1)
        for number in range(5):
            queue(pool, alert, f"later {number}")
            for dispatcher in dispatchers:
                dispatcher.wake()
        time.sleep(1.5)
        assert smtp_server.held == 1, "no second send of the group while the first is under way"
        smtp_server.release()
        smtp_server.wait_for(2)
        time.sleep(0.5)
        mails = smtp_server.messages
    finally:
        for dispatcher in dispatchers:
            dispatcher.stop()
    assert [m.message["Subject"] for m in mails] == ["first", "later 0 (+4 more updates)"]
    stored = rows(pool)
    assert {r["status"] for r in stored} == {"SUCCESS"} and all(r["attempts"] == 1 for r in stored)


# --- the pure parts --------------------------------------------------------------------------------------------


def email_row(subject: str, body: str = "text\n", html: str | None = None) -> dict:
    return {"channel": "email", "subject": subject, "body": body,
            "html": html if html is not None else f"<html><body><p>{subject}</p></body></html>"}


def test_one_row_is_sent_exactly_as_stored():
    row = email_row("[HIGH] Orders: 1 new row", "exact text\n", "<html><body>exact</body></html>")
    message = combine_messages([row])
    assert (message.subject, message.body, message.html) == (row["subject"], row["body"], row["html"])


def test_several_email_rows_become_one_message_listing_each_in_order():
    message = combine_messages([email_row("a", "text a\n"), email_row("b", "text b\n"), email_row("c", "text c\n")])
    assert message.subject == "a (+2 more updates)"
    assert message.body == ("--- update 1 of 3: a ---\ntext a\n\n--- update 2 of 3: b ---\ntext b\n\n"
                            "--- update 3 of 3: c ---\ntext c\n")
    assert message.html.startswith("<html><body>") and message.html.count("<html>") == 1
    assert message.html.index("<p>a</p>") < message.html.index("<p>b</p>") < message.html.index("<p>c</p>")
    assert combine_messages([email_row("a"), email_row("b")]).subject == "a (+1 more update)"


def test_a_combined_email_carries_as_many_whole_updates_as_fit_in_one_email():
    message = combine_messages([email_row(f"s{n}", "x" * 5_000 + "\n") for n in range(100)])
    assert 10 < message.carries < 100
    assert len(message.body) <= EMAIL_MAX_CHARS and len(message.html) <= 4 * EMAIL_MAX_CHARS
    assert message.body.count("x" * 5_000 + "\n") == message.carries
    assert f"--- update {message.carries} of {message.carries}: s{message.carries - 1} ---" in message.body
    assert message.subject == f"s0 (+{message.carries - 1} more updates)"


def test_combined_whatsapp_bodies_follow_each_other_as_far_as_1600_characters_go():
    short = combine_messages([{"channel": "whatsapp", "subject": None, "body": b, "html": None} for b in "ab"])
    assert (short.subject, short.body, short.html, short.carries) == (None, "a\n\nb", None, 2)
    long = combine_messages([{"channel": "whatsapp", "subject": None, "body": "y" * 900, "html": None}] * 3)
    assert (long.body, long.carries) == ("y" * 900, 1)


def test_rows_that_do_not_fit_in_one_whatsapp_message_arrive_in_the_next_ones(pool, settings, twilio_server):
    alert = placeholder_alert(pool)
    with pool.transaction() as cur:
        database.insert_notifications(cur, notifications=[
            {"alert_config_id": alert, "incident_id": None, "kind": "incident", "channel": "whatsapp",
             "recipient": "+14155550123", "subject": None, "body": f"row {n} " + "z" * 700, "html": None}
            for n in range(5)])
    [dispatcher] = running(pool, settings)
    try:
        eventually(lambda: {r["status"] for r in rows(pool)} == {"SUCCESS"}, timeout=10,
                   message="every row sent")
    finally:
        dispatcher.stop()
    bodies = [request.body for request in twilio_server.delivered]
    assert all(len(body) <= WHATSAPP_MAX_CHARS for body in bodies) and len(bodies) == 3
    assert [n for body in bodies for n in range(5) if f"row {n} " in body] == [0, 1, 2, 3, 4]
    assert not any(WHATSAPP_TRUNCATION_NOTE.strip() in body for body in bodies)


def test_the_send_rate_allows_a_second_s_worth_at_once_then_one_send_per_interval():
    rate = SendRate(2.0, now=0.0)
    assert rate.available(0.0) == 2
    rate.take(2, 0.0)
    assert rate.available(0.1) == 0 and rate.seconds_until_available(0.1) == pytest.approx(0.4)
    assert rate.available(0.5) == 1
    assert rate.available(100.0) == 2, "unused time does not pile up beyond a second's worth"
    unlimited = SendRate(0.0, now=0.0)
    unlimited.take(1000, 0.0)
    assert unlimited.available(0.0) > 1000 and unlimited.seconds_until_available(0.0) == 0.0
