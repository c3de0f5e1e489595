"""The entry points as a user runs them: init_db, insert_test.py and main.py in their own processes."""

from __future__ import annotations

import base64
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

import psycopg2

import database
from tests.conftest import eventually, free_port, wait_for_health

ROOT = Path(__file__).resolve().parent.parent


def run_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "TWILIO_", "DB_", "API_"))}
    env.update(extra)
    return env


def test_init_db_creates_the_schema_once_and_is_a_no_op_afterwards(empty_dsn):
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", "from database import init_db; init_db()"], cwd=ROOT,
                                env=run_env(DB_CONNECTION=empty_dsn), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    conn = psycopg2.connect(empty_dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM alert_service.schema_migrations")
        assert cur.fetchone()[0] == len(database.MIGRATIONS)
        cur.execute("SELECT count(*) FROM alert_service.data_source WHERE is_default")
        assert cur.fetchone()[0] == 1
        cur.execute("SELECT typname FROM pg_type WHERE typtype = 'e' ORDER BY 1")
        assert [r[0] for r in cur.fetchall()] == ["notification_status_enum", "priority_enum", "status_enum"]
    conn.close()


def test_insert_test_creates_the_demo_table_and_inserts_new_order_numbers(empty_dsn):
    env = run_env(DB_CONNECTION=empty_dsn)
    first = subprocess.run([sys.executable, "insert_test.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, "insert_test.py", "--count", "3"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert "ORD00000004" in second.stdout
    conn = psycopg2.connect(empty_dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT order_number FROM dc_order ORDER BY 1")
        assert [r[0] for r in cur.fetchall()] == [f"ORD{i:08d}" for i in range(1, 5)]
    conn.close()


def test_main_serves_the_api_and_stops_cleanly_on_sigterm(db_dsn, tmp_path):
    port = free_port()
    log_file = tmp_path / "app.log"
    process = subprocess.Popen(
        [sys.executable, "main.py"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=run_env(DB_CONNECTION=db_dsn, API_HOST="127.0.0.1", API_PORT=str(port), LOG_FILE=str(log_file)),
    )
    try:
        body = wait_for_health(port, "main.py")
        assert body["status"] == "ok" and body["scheduler"]["running"]
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status says "terminated by SIGTERM".
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert "scheduler started" in log_file.read_text()


def test_main_refuses_a_bad_setting_naming_the_variable(tmp_path):
    result = subprocess.run([sys.executable, "main.py"], cwd=ROOT,
                            env=run_env(API_PORT="eighty"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "API_PORT" in result.stderr


def test_uvicorn_api_app_runs_the_service_too(db_dsn):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api:app", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=run_env(DB_CONNECTION=db_dsn, LOG_FILE=""),
    )
    try:
        body = wait_for_health(port, "uvicorn api:app")
        assert body["status"] == "ok" and body["scheduler"]["running"]
    finally:
        process.terminate()
        process.communicate(timeout=20)


def test_make_inbox_prints_every_message_exactly_once_however_they_arrive():
    smtp_port, twilio_port = free_port(), free_port()
    inbox = subprocess.Popen([sys.executable, "-m", "tests.servers", "--smtp-port", str(smtp_port), "--twilio-port",
                              str(twilio_port)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(inbox.stdout), daemon=True)
    reader.start()
    try:
        eventually(lambda: _accepts(smtp_port) and _accepts(twilio_port), message="the inbox to listen")

        def send_emails(sender: int) -> None:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
                for n in range(25):
                    message = EmailMessage()
                    message["Subject"], message["From"], message["To"] = f"mail-{sender}-{n}", "a@example.com", "b@c.com"
                    message.set_content("body")
                    client.send_message(message)

        def send_whatsapp(sender: int) -> None:
            account = "ACtest00000000000000000000000000"  # the inbox's TwilioServer defaults
            auth = base64.b64encode(f"{account}:twilio-secret".encode()).decode()
            url = f"http://127.0.0.1:{twilio_port}/2010-04-01/Accounts/{account}/Messages.json"
            for n in range(25):
                form = urllib.parse.urlencode({"To": "whatsapp:+14155550123", "From": "whatsapp:+14155238886",
                                               "Body": f"sms-{sender}-{n}"}).encode()
                request = urllib.request.Request(url, data=form, headers={"Authorization": f"Basic {auth}"})
                urllib.request.urlopen(request, timeout=10).close()

        with ThreadPoolExecutor(8) as senders:
            jobs = [senders.submit(send, s) for send in (send_emails, send_whatsapp) for s in range(4)]
            for job in jobs:
                job.result()
        expected = [f"mail-{s}-{n}" for s in range(4) for n in range(25)] + \
                   [f"sms-{s}-{n}" for s in range(4) for n in range(25)]
        eventually(lambda: sum(line.startswith("--- ") for line in list(lines)) >= len(expected), timeout=15,
                   message="every message printed")
        time.sleep(0.3)  # anything printed twice would come now
        printed = [line.strip() for line in list(lines)]
        counts = {tag: sum(line.endswith(f": {tag}") or line == tag for line in printed) for tag in expected}
        assert set(counts.values()) == {1}, {tag: c for tag, c in counts.items() if c != 1}
        assert sum(line.startswith("--- ") for line in printed) == len(expected)
    finally:
        inbox.send_signal(signal.SIGINT)
        inbox.wait(timeout=10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
