"""Outbox delivery: retries, permanent failures and unconfigured channels, with real loopback servers."""

from __future__ import annotations

import time

import pytest

import database
from config import load_settings
from notification import Dispatcher, EmailChannel, NotificationError, WhatsAppChannel, retry_delay
from tests.conftest import Service, create_orders_table, eventually, insert_orders, queue_emails
from tests.servers import HangingServer


def notifications(service, **filters) -> list[dict]:
    return service.client.get("/notifications/", params=filters).json()


def test_smtp_down_then_up_is_delivered_on_retry(service, smtp_server, twilio_server, db_dsn):
    create_orders_table(db_dsn)
    smtp_server.stop()

    alert = service.create_alert()

    twilio_server.wait_for(1)  # WhatsApp is not held up by the missing SMTP server
    eventually(lambda: notifications(service, channel="email", status="RETRY"), message="email in RETRY")
    smtp_server.start()
    mail = smtp_server.wait_for(1, timeout=15)[0]
    assert "initial report" in mail.message["Subject"]
    service.wait_idle()
    email = notifications(service, alert_config_id=alert["id"], channel="email")[0]
    assert email["status"] == "SUCCESS" and email["attempts"] >= 2


def test_smtp_temporary_reply_is_retried_and_permanent_reply_fails_at_once(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    smtp_server.reply_code_for_next(451, "try again later", times=1)
    service.create_alert(notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    first = notifications(service, channel="email")[0]
    assert first["status"] == "SUCCESS" and first["attempts"] == 2

    smtp_server.reply_code_for_next(550, "mailbox unavailable", times=5)
    insert_orders(db_dsn, ["ORD1"])
    eventually(lambda: notifications(service, channel="email", status="FAILED"), message="email FAILED")
    failed = notifications(service, channel="email", status="FAILED")[0]
    assert failed["attempts"] == 1 and "550" in failed["error"]
    activities = service.client.get(f"/incidents/{failed['incident_id']}/activities").json()
    assert "notification_failed" in [a["action"] for a in activities]


def test_an_internationalised_domain_is_delivered_in_its_ascii_form(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    service.create_alert(notification_channels={"email": ["ops@bücher.example"]})
    mail = smtp_server.wait_for(1)[0]
    assert mail.rcpt_tos == ["ops@xn--bcher-kva.example"] and mail.message["To"] == "ops@xn--bcher-kva.example"
    service.wait_idle()
    assert notifications(service, channel="email")[0]["status"] == "SUCCESS"


def test_a_queued_mailbox_that_needs_smtputf8_fails_at_once_with_why(service, smtp_server, db_dsn):
    # As an outbox row written before addresses were checked at the API would be.
    queue_emails(db_dsn, ["before the upgrade"], recipient="josé@example.com")
    service.services.dispatcher.wake()
    eventually(lambda: notifications(service, channel="email", status="FAILED"), message="email FAILED")
    failed = notifications(service, channel="email", status="FAILED")[0]
    assert failed["attempts"] == 1 and "ASCII" in failed["error"] and "josé@example.com" in failed["error"]
    assert smtp_server.data_attempts == 0


def test_twilio_500_then_201_is_delivered(service, twilio_server, db_dsn):
    create_orders_table(db_dsn)
    twilio_server.script(500, message="internal error", times=1)

    service.create_alert(notification_channels={"whatsapp": ["+14155550123"]})

    twilio_server.wait_for(1, timeout=15)
    service.wait_idle()
    sent = notifications(service, channel="whatsapp")[0]
    assert sent["status"] == "SUCCESS" and sent["attempts"] == 2 and sent["provider_message_id"].startswith("SM")


def test_twilio_invalid_number_fails_at_once_with_its_code(service, twilio_server, db_dsn):
    create_orders_table(db_dsn)
    twilio_server.script(400, code=21211, message="The 'To' number is not a valid phone number.", times=5)

    service.create_alert(notification_channels={"whatsapp": ["+14155550123"]})

    eventually(lambda: notifications(service, status="FAILED"), message="WhatsApp FAILED")
    failed = notifications(service, status="FAILED")[0]
    assert failed["attempts"] == 1 and "21211" in failed["error"]
    time.sleep(0.5)
    assert len(twilio_server.requests) == 1, "a permanent error is not retried"


def test_retries_stop_after_max_retries_with_the_last_error(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    smtp_server.reply_code_for_next(421, "service not available", times=100)

    service.create_alert(notification_channels={"email": ["ops@example.com"]})

    eventually(lambda: notifications(service, status="FAILED"), timeout=20, message="email FAILED")
    failed = notifications(service, status="FAILED")[0]
    assert failed["attempts"] == 1 + service.settings.max_retries
    assert "421" in failed["error"] and "gave up" in failed["error"]


def test_an_unconfigured_channel_fails_with_the_setting_to_set(settings, db_dsn, twilio_server):
    create_orders_table(db_dsn)
    service = Service(settings.model_copy(update={"smtp_host": None})).start()
    try:
        service.create_alert()
        twilio_server.wait_for(1)
        eventually(lambda: notifications(service, status="FAILED"), message="email FAILED")
        failed = notifications(service, status="FAILED")[0]
        assert failed["channel"] == "email" and "SMTP_HOST" in failed["error"]
    finally:
        service.stop()


def test_a_hung_smtp_server_times_out_without_holding_up_whatsapp(settings, db_dsn, twilio_server):
    create_orders_table(db_dsn)
    hanging = HangingServer()
    hanging.start()
    # The SMTP timeout is well above what a WhatsApp send takes on a loaded machine, so the test tells waiting for
    # the hung server from being slow.
    service = Service(settings.model_copy(update={"smtp_port": hanging.port, "smtp_timeout_seconds": 4.0})).start()
    try:
        started = time.monotonic()
        service.create_alert()
        twilio_server.wait_for(1, timeout=5)
        assert time.monotonic() - started < 3.0, "WhatsApp waited for the hung SMTP server"
        eventually(lambda: notifications(service, channel="email", status="RETRY"), message="email in RETRY")
        assert "SMTP" in notifications(service, channel="email")[0]["error"]
    finally:
        service.stop()
        hanging.stop()


def test_two_dispatchers_never_send_the_same_notification_twice(settings, db_dsn, smtp_server):
    queue_emails(db_dsn, [f"n{i}" for i in range(60)], recipient=[f"ops{i}@example.com" for i in range(60)])
    pool = database.service_pool(db_dsn, size=10)
    dispatchers = [Dispatcher(pool, settings, threads_per_channel=4) for _ in range(2)]
    for d in dispatchers:
        d.start()
    try:
        smtp_server.wait_for(60, timeout=30)
        time.sleep(0.5)
        subjects = [m.message["Subject"] for m in smtp_server.messages]
        assert sorted(subjects) == sorted(f"n{i}" for i in range(60))
    finally:
        for d in dispatchers:
            d.stop()
        pool.close()


def test_backoff_doubles_and_honours_retry_after():
    assert [retry_delay(attempts=a, base_seconds=60) for a in (1, 2, 3)] == [60, 120, 240]
    assert retry_delay(attempts=1, base_seconds=1, retry_after=30) == 30
    assert retry_delay(attempts=30, base_seconds=600) == 6 * 3600


def test_twilio_429_is_temporary_and_carries_retry_after(twilio_server):
    twilio_server.script(429, code=20429, message="Too Many Requests", retry_after="7")
    channel = WhatsAppChannel(load_settings(
        _env_file=None, twilio_account_sid=twilio_server.account_sid, twilio_auth_token=twilio_server.auth_token,
        twilio_from_number="+14155238886", twilio_api_base_url=twilio_server.base_url))
    with pytest.raises(NotificationError) as error:
        channel.send(recipient="+14155550123", subject=None, body="hi", html_body=None)
    assert error.value.permanent is False and error.value.retry_after == 7.0
    assert channel.send(recipient="+14155550123", subject=None, body="hi", html_body=None).startswith("SM")


@pytest.mark.parametrize("security", ["ssl", "none"])
def test_email_works_with_implicit_tls_and_without_tls(tmp_path, security):
    from tests.servers import SmtpServer

    server = SmtpServer(tmp_path, security=security)
    server.start()
    try:
        channel = EmailChannel(load_settings(
            _env_file=None, smtp_host="127.0.0.1", smtp_port=server.port, smtp_username=server.username,
            smtp_password=server.password, smtp_security=security, smtp_ca_file=str(server.ca_file)))
        message_id = channel.send(recipient="a@example.com", subject="s", body="text", html_body="<p>x</p>")
        assert server.wait_for(1)[0].message["Message-ID"] == message_id
    finally:
        server.stop()


def test_email_refuses_a_certificate_it_cannot_verify(tmp_path, smtp_server):
    channel = EmailChannel(load_settings(
        _env_file=None, smtp_host="127.0.0.1", smtp_port=smtp_server.port, smtp_username=smtp_server.username,
        smtp_password=smtp_server.password))
    with pytest.raises(NotificationError, match="CERTIFICATE_VERIFY_FAILED|certificate"):
        channel.send(recipient="a@example.com", subject="s", body="text", html_body=None)
    assert smtp_server.messages == []


def test_a_trickling_smtp_server_cannot_hold_emails_past_the_send_deadline(settings, db_dsn):
    from tests.servers import TricklingSmtpServer

    trickling = TricklingSmtpServer()
    trickling.start()
    # Each `250-` line comes well within SMTP_TIMEOUT_SECONDS: only the total deadline can end these sends.
    quick = settings.model_copy(update={"smtp_port": trickling.port, "smtp_security": "none", "smtp_username": None,
                                        "smtp_password": None, "smtp_timeout_seconds": 5.0,
                                        "send_timeout_seconds": 2.0, "retry_delay_minutes": 1.0})
    queue_emails(db_dsn, [f"slow {i}" for i in range(4)], recipient="slow@example.com")
    queue_emails(db_dsn, ["quick"], recipient="quick@example.com")
    pool = database.service_pool(db_dsn, size=4)
    dispatcher = Dispatcher(pool, quick, threads_per_channel=4)
    started = time.monotonic()
    dispatcher.start()
    try:
        def retried():
            with pool.transaction() as cur:
                cur.execute("SELECT status, error FROM notification WHERE recipient = 'slow@example.com'")
                return [r for r in cur.fetchall() if r["status"] == "RETRY"]
        rows = eventually(lambda: len(retried()) == 4 and retried(), timeout=6, message="the slow emails in RETRY")
        assert time.monotonic() - started < 4.0
        assert all("SEND_TIMEOUT_SECONDS (2s)" in r["error"] for r in rows), rows
        eventually(lambda: trickling.delivered == ["quick@example.com"], timeout=2, message="the quick email")
        assert time.monotonic() - started < 5.0
    finally:
        dispatcher.stop()
        pool.close()
        trickling.stop()


def test_a_trickling_twilio_answer_ends_at_the_send_deadline_and_the_next_message_goes_out(twilio_server):
    channel = WhatsAppChannel(load_settings(
        _env_file=None, twilio_account_sid=twilio_server.account_sid, twilio_auth_token=twilio_server.auth_token,
        twilio_from_number="+14155238886", twilio_api_base_url=twilio_server.base_url, smtp_timeout_seconds=5,
        send_timeout_seconds=2))
    twilio_server.trickle()
    started = time.monotonic()
    with pytest.raises(NotificationError, match="SEND_TIMEOUT_SECONDS") as error:
        channel.send(recipient="+14155550123", subject=None, body="hi", html_body=None)
    assert error.value.permanent is False and time.monotonic() - started < 3.0
    assert channel.send(recipient="+14155550123", subject=None, body="hi", html_body=None).startswith("SM")
