"""The entry points as a user runs them: init_db, insert_test.py and main.py in their own processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg2

import database
from tests.conftest import free_port, wait_for_health

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
