"""Bulkheads and deadlines: a data source that stops answering, slow dry runs, and shutdown whatever hangs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import psycopg2.extensions
import pytest

import database
from config import ConfigError, load_settings
from tests.conftest import (Service, create_orders_table, eventually, free_port, insert_orders, wait_for_health)
from tests.servers import HangingServer, TcpProxy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def proxy(empty_dsn: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the test server, which the test can turn into a black hole."""
    params = psycopg2.extensions.parse_dsn(empty_dsn)
    server = TcpProxy(params.get("host") or "127.0.0.1", int(params.get("port") or 5432))
    server.start()
    yield server
    server.stop()


def proxied_dsn(dsn: str, proxy: TcpProxy) -> str:
    """The DSN of the same database, through the proxy."""
    params = psycopg2.extensions.parse_dsn(dsn)
    params.update(host="127.0.0.1", port=str(proxy.port))
    return psycopg2.extensions.make_dsn(**params)


def add_data_source(service: Service, dsn: str, name: str = "warehouse") -> str:
    response = service.client.post("/data-sources/", json={"name": name, "dsn": dsn, "allow_privileged_role": True})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_workers_per_data_source_may_not_exceed_workers():
    with pytest.raises(ConfigError, match="WORKERS_PER_DATA_SOURCE"):
        load_settings(_env_file=None, workers=2, workers_per_data_source=3)
    assert load_settings(_env_file=None, workers=4).workers_per_data_source == 3
    assert load_settings(_env_file=None, workers=1).workers_per_data_source == 1


def test_a_query_on_a_server_that_stops_answering_ends_at_its_deadline(empty_dsn, proxy):
    pool = database.Pool(proxied_dsn(empty_dsn, proxy), size=2, name="data source warehouse")
    try:
        assert database.run_query(pool, query="SELECT 1", timeout_seconds=1, max_rows=10)[1] == [(1,)]
        proxy.black_hole = True
        started = time.monotonic()
        with pytest.raises(database.DeadlineExceeded) as failure:
            database.run_query(pool, query="SELECT 1", timeout_seconds=1, max_rows=10)
        elapsed = time.monotonic() - started
        # QUERY_TIMEOUT_SECONDS + the grace, then the cancel request's grace before the socket is shut down.
        assert 2.5 < elapsed < 3 + database.CANCEL_GRACE_SECONDS + 1.0, elapsed
        assert str(failure.value).startswith("data source warehouse did not answer within 3 s")
        proxy.black_hole = False
        # The dropped connection is not lent again: the next query gets a fresh one.
        assert database.run_query(pool, query="SELECT 2", timeout_seconds=1, max_rows=10)[1] == [(2,)]
    finally:
        pool.close()


def test_a_hung_data_source_does_not_delay_alerts_on_another(settings, smtp_server, db_dsn, empty_dsn, proxy):
    create_orders_table(db_dsn)
    create_orders_table(empty_dsn)
    service = Service(settings.model_copy(update={
        "workers": 2, "workers_per_data_source": 1, "query_timeout_seconds": 2.0})).start()
    try:
        source_id = add_data_source(service, proxied_dsn(empty_dsn, proxy))
        # random(): these run every second whatever changes, as a polling alert does, so one is in flight when
        # the source stops answering.
        hung = [service.create_alert(name=f"Warehouse {i}", data_source_id=source_id, schedule="interval:1s",
                                     query="SELECT order_number FROM dc_order WHERE random() >= 0",
                                     notification_channels={"email": ["warehouse@example.com"]}) for i in range(3)]
        service.create_alert(name="Orders", notification_channels={"email": ["ops@example.com"]})
        smtp_server.wait_for(4)
        service.wait_idle()
        smtp_server.clear()

        proxy.black_hole = True
        time.sleep(1.5)  # the hung source's evaluations are stuck by now, each waiting its turn on its one worker
        started = time.monotonic()
        insert_orders(db_dsn, ["ORD-DEFAULT"])
        mail = smtp_server.wait_for(1, timeout=5)[0]
        assert mail.rcpt_tos == ["ops@example.com"] and time.monotonic() - started < 1.0

        def source_shown_hung() -> dict | None:
            asked = time.monotonic()
            response = service.client.get("/health")
            assert time.monotonic() - asked < 1.0 and response.status_code == 200
            shown = response.json()["scheduler"]["data_sources"][source_id]
            return shown if shown["status"] == "not answering" else None

        shown = eventually(source_shown_hung, timeout=15, interval=0.2, message="/health to show the hung source")
        assert shown["not_answering_since"] and "did not answer within 4 s" in shown["last_error"]
        assert service.client.get("/health").json()["status"] == "ok"

        def deadline_errors() -> list[dict]:
            return [e for alert in hung for e in service.client.get(f"/alert-configs/{alert['id']}/evaluations")
                    .json() if (e["error"] or "").startswith(f"data source {source_id} did not answer within 4 s")]

        errors = eventually(deadline_errors, timeout=15, message="the hung source's evaluations to end in an error")
        # QUERY_TIMEOUT_SECONDS + 2 s, and a second for the cancel request before the connection is dropped.
        assert all(e["outcome"] == "error" and e["duration_ms"] < 6500 for e in errors), errors

        def every_hung_alert_failed() -> bool:
            return all(any(e["outcome"] == "error" for e in service.client.get(
                f"/alert-configs/{alert['id']}/evaluations").json()) for alert in hung)

        # Each waited its turn in the source's one-worker share, and none was dropped or starved by the others.
        eventually(every_hung_alert_failed, timeout=30, interval=0.5, message="every hung alert to be evaluated")
    finally:
        started = time.monotonic()
        service.stop()
        stop_seconds = time.monotonic() - started
    assert stop_seconds < 6, f"stopping took {stop_seconds:.1f} s"



def test_while_a_source_hangs_and_a_runaway_template_renders_the_default_source_still_alerts_within_1_s(
        settings, smtp_server, db_dsn, empty_dsn, proxy):
    from tests.conftest import execute
    from tests.test_templates import RUNAWAY, SLEEPER

    create_orders_table(db_dsn)
    create_orders_table(empty_dsn)
    execute(db_dsn, "CREATE TABLE stock (sku text, qty int)")
    service = Service(settings.model_copy(update={
        "workers": 4, "workers_per_data_source": 2, "query_timeout_seconds": 2.0,
        "template_timeout_seconds": 1.0})).start()
    try:
        source_id = add_data_source(service, proxied_dsn(empty_dsn, proxy))
        for i in range(2):
            service.create_alert(name=f"Warehouse {i}", data_source_id=source_id, schedule="interval:1s",
                                 notification_channels={"email": ["warehouse@example.com"]})
        service.create_alert(name="Loops", query="SELECT sku FROM stock",
                             message_template=SLEEPER.replace("RUNAWAY", RUNAWAY[0][1]),
                             notification_channels={"email": ["loops@example.com"]})
        service.create_alert(name="Orders", notification_channels={"email": ["ops@example.com"]})
        smtp_server.wait_for(4)
        service.wait_idle()
        smtp_server.clear()

        proxy.black_hole = True
        time.sleep(1.5)  # the hung source's evaluations are stuck by now
        execute(db_dsn, "INSERT INTO stock VALUES ('A', 1)")  # its message template runs away as it renders
        time.sleep(0.2)
        started = time.monotonic()
        insert_orders(db_dsn, ["ORD-DEFAULT"])
        mail = eventually(lambda: [m for m in smtp_server.messages if m.rcpt_tos == ["ops@example.com"]],
                          timeout=5, interval=0.01, message="the default source's email")[0]
        delay = time.monotonic() - started
        assert "ORD-DEFAULT" in mail.message.get_body(("plain",)).get_content() and delay < 1.0, f"{delay:.2f} s"
        asked = time.monotonic()
        assert service.client.get("/health").status_code == 200 and time.monotonic() - asked < 1.0
        loops = eventually(lambda: [m for m in smtp_server.messages if m.rcpt_tos == ["loops@example.com"]],
                           timeout=10, message="the runaway template's alert, as the default message")[0]
        assert "template" in loops.message.get_body(("plain",)).get_content()
    finally:
        started = time.monotonic()
        service.stop()
        stop_seconds = time.monotonic() - started
    assert stop_seconds < 6, f"stopping took {stop_seconds:.1f} s"

def test_slow_dry_runs_do_not_delay_a_real_alert(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    insert_orders(db_dsn, ["ORD0"])  # pg_sleep runs once per row
    service.create_alert(name="Orders", notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    smtp_server.clear()
    slow = {"name": "Slow", "query": "SELECT order_number FROM dc_order WHERE pg_sleep(2) IS NOT NULL",
            "schedule": "interval:1h", "notification_channels": {"email": ["slow@example.com"]}}
    statuses: list[int] = []

    def dry_run() -> None:
        statuses.append(service.client.post("/alert-configs/test", json=slow).status_code)

    threads = [threading.Thread(target=dry_run) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # every dry run has started (or is waiting for its turn)
    started = time.monotonic()
    insert_orders(db_dsn, ["ORD1"])
    mail = smtp_server.wait_for(1, timeout=5)[0]
    delay = time.monotonic() - started
    for thread in threads:
        thread.join(30)
    assert mail.rcpt_tos == ["ops@example.com"] and delay < 1.0, f"the email took {delay:.2f} s"
    # DRY_RUN_WORKERS (2) run at once; one that waits longer than a few seconds for its turn is a 429.
    assert statuses.count(200) >= 2 and set(statuses) <= {200, 429}, statuses


def test_sigterm_stops_the_service_and_its_embedded_postgres_within_15_s_while_a_source_and_smtp_hang(
        tmp_path, empty_dsn, proxy):
    create_orders_table(empty_dsn)
    port = free_port()
    data_dir = tmp_path / "data"
    smtp = HangingServer()
    smtp.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "TWILIO_", "DB_", "API_"))}
    env.update(API_HOST="127.0.0.1", API_PORT=str(port), DATA_DIR=str(data_dir), LOG_FILE="",
               QUERY_TIMEOUT_SECONDS="30", SMTP_HOST="127.0.0.1", SMTP_PORT=str(smtp.port), SMTP_SECURITY="none",
               SMTP_FROM="alerts@example.com", SMTP_TIMEOUT_SECONDS="600", ALLOW_PRIVILEGED_DATA_SOURCES="true")
    process = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    try:
        try:
            wait_for_health(port, "main.py on the embedded database", timeout=90)
        except AssertionError:
            process.kill()
            raise AssertionError(process.communicate()[0]) from None
        postmaster_pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        assert running(postmaster_pid)
        source = post(port, "/data-sources/", {"name": "warehouse", "dsn": proxied_dsn(empty_dsn, proxy),
                                                "allow_privileged_role": True})
        post(port, "/alert-configs/", {"name": "Warehouse", "query": "SELECT order_number FROM dc_order",
                                 "data_source_id": source["id"], "schedule": "interval:1s",
                                 "notification_channels": {"email": ["ops@example.com"]}})
        eventually(lambda: get(port, "/notifications/?channel=email"), message="the initial report to be queued")
        proxy.black_hole = True
        # Evaluations on the hung source are waiting on it (a 32 s deadline), and the initial report's email is
        # stuck on the SMTP server that never says hello (a 600 s timeout).
        time.sleep(2)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
        elapsed = time.monotonic() - started
    finally:
        smtp.stop()
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert elapsed < 15, f"SIGTERM took {elapsed:.1f} s\n{output}"
    assert process.returncode == -signal.SIGTERM, output
    assert not (data_dir / "postgres" / "postmaster.pid").exists(), output
    assert not running(postmaster_pid), output


def post(port: int, path: str, body: dict) -> dict:
    """POST JSON to a service started in another process."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST",
                                     headers={"Content-Type": "application/json"}, data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def get(port: int, path: str) -> Any:
    """GET JSON from a service started in another process."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.load(response)


def running(pid: int) -> bool:
    """Whether a process runs (a zombie that no one has reaped yet does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
