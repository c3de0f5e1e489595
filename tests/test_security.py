"""API keys, encrypted data source passwords, and secrets kept out of responses and logs."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg2.extensions
import pytest
from cryptography.fernet import Fernet
from psycopg2 import sql

import database
from config import load_settings
from main import listen_host
from tests.conftest import (Service, admin_execute, create_orders_table, data_source_parts, dsn_with, eventually,
                            free_port)
from tests.servers import BannerServer, HangingServer

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"


@pytest.fixture
def secured(settings):
    service = Service(settings.model_copy(update={"api_key": load_settings(
        _env_file=None, api_key=f"{KEY_A}, {KEY_B}").api_key})).start()
    yield service
    service.stop()


def test_without_a_key_every_endpoint_but_health_and_docs_is_401(secured):
    client = secured.client
    for method, path in [("get", "/alert-configs/"), ("post", "/alert-configs/"), ("get", "/incidents/"),
                         ("get", "/notifications/"), ("get", "/data-sources/"), ("post", "/teams/")]:
        response = getattr(client, method)(path)
        assert response.status_code == 401, (path, response.text)
        assert "API key" in response.json()["detail"]
    health = client.get("/health")
    assert health.status_code == 200 and "scheduler" not in health.json(), "details need a key"
    assert "scheduler" in client.get("/health", headers={"X-API-Key": KEY_A}).json()
    assert client.get("/api/docs").status_code == 200
    assert client.get("/api/openapi.json").status_code == 200


def test_health_without_a_key_says_unavailable_but_not_why(secured, pg_admin_dsn, db_dsn):
    name = psycopg2.extensions.parse_dsn(db_dsn)["dbname"]
    admin_execute(pg_admin_dsn, sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
    try:
        admin_execute(pg_admin_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                      (name,))
        anonymous = eventually(lambda: (r := secured.client.get("/health")).status_code == 503 and r,
                               message="/health to say the database is unavailable")
        assert anonymous.json() == {"status": "unavailable", "database": "unavailable"}
        assert name not in anonymous.text and "accepting" not in anonymous.text
        operator = secured.client.get("/health", headers={"X-API-Key": KEY_A})
        assert operator.status_code == 503 and "not currently accepting connections" in operator.json()["database"]
    finally:
        admin_execute(pg_admin_dsn, sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
    eventually(lambda: secured.client.get("/health").status_code == 200, message="/health back to 200")


def test_either_header_and_any_configured_key_is_accepted(secured):
    client = secured.client
    assert client.get("/alert-configs/", headers={"X-API-Key": KEY_A}).status_code == 200
    assert client.get("/alert-configs/", headers={"Authorization": f"Bearer {KEY_B}"}).status_code == 200
    assert client.get("/alert-configs/", headers={"X-API-Key": "key-c-0123456789abcdef"}).status_code == 401
    assert client.get("/alert-configs/", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_an_unauthenticated_bad_request_is_401_not_422(secured):
    assert secured.client.post("/alert-configs/", json={"name": 1}).status_code == 401


def test_swagger_offers_both_ways_to_authorize(secured):
    schemes = secured.client.get("/api/openapi.json").json()["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"apiKey", "http"}


def test_without_api_key_the_api_listens_on_loopback_only(caplog):
    with caplog.at_level(logging.WARNING):
        assert listen_host(load_settings(_env_file=None, api_host="0.0.0.0")) == "127.0.0.1"
    assert "API_KEY" in caplog.text
    assert listen_host(load_settings(_env_file=None, api_host="0.0.0.0", api_key=KEY_A)) == "0.0.0.0"


def test_short_api_keys_and_bad_secret_keys_stop_start_up():
    from config import ConfigError

    with pytest.raises(ConfigError, match="API_KEY"):
        load_settings(_env_file=None, api_key="short")
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        load_settings(_env_file=None, secret_key="not-a-fernet-key")


def test_data_source_passwords_are_encrypted_at_rest_and_never_returned(settings, empty_dsn):
    key = Fernet.generate_key().decode()
    service = Service(settings.model_copy(update={"secret_key": load_settings(
        _env_file=None, secret_key=key).secret_key})).start()
    try:
        response = service.client.post("/data-sources/", json={
            "name": "warehouse", **data_source_parts(empty_dsn), "password": "pa55-word-in-clear", "allow_privileged_role": True})
        assert response.status_code == 201, response.text
        assert "pa55-word-in-clear" not in response.text
        stored = service.sql("SELECT password FROM data_source WHERE name = 'warehouse'")[0]["password"]
        assert "pa55-word-in-clear" not in stored
        assert Fernet(key.encode()).decrypt(stored.encode()) == b"pa55-word-in-clear"
        create_orders_table(empty_dsn)
        alert = service.create_alert(data_source_id=response.json()["id"])
        assert alert["events_enabled"], "the decrypted password connects"
    finally:
        service.stop()

    for wrong in (None, Fernet.generate_key().decode()):
        broken = Service(settings.model_copy(update={"secret_key": load_settings(
            _env_file=None, secret_key=wrong).secret_key}))
        with pytest.raises(database.SecretKeyError, match="SECRET_KEY"):
            broken.start()


def test_a_password_without_secret_key_is_refused_with_what_to_do(settings, empty_dsn):
    service = Service(settings.model_copy(update={"secret_key": None})).start()
    try:
        response = service.client.post("/data-sources/", json={
            "name": "warehouse", **data_source_parts(empty_dsn), "password": "pa55", "allow_privileged_role": True})
        assert response.status_code == 422 and "SECRET_KEY" in response.text
        assert len(service.client.get("/data-sources/").json()) == 1
    finally:
        service.stop()


def test_the_data_source_probe_answers_every_failure_alike_and_echoes_no_server_bytes(service, pg_admin_dsn,
                                                                                      empty_dsn, caplog):
    with HangingServer() as silent, BannerServer() as banner, caplog.at_level(logging.WARNING, logger="database"):
        attempts = {
            "closed port": {"host": "127.0.0.1", "port": free_port()},
            "silent port": {"host": "127.0.0.1", "port": silent.port},
            "HTTP server": {"host": "127.0.0.1", "port": banner.port},
            "HTTP server, no TLS": {"host": "127.0.0.1", "port": banner.port, "sslmode": "disable"},
            "unknown role": {"dsn": dsn_with(pg_admin_dsn, user="no_such_role")},
            "unknown database": {"dsn": dsn_with(pg_admin_dsn, dbname="no_such_database")},
        }

        def attempt(body: dict) -> tuple:
            started = time.monotonic()
            response = service.client.post("/data-sources/", json={"name": "probe", **body})
            return response, time.monotonic() - started

        with ThreadPoolExecutor(len(attempts)) as threads:
            results = dict(zip(attempts, threads.map(attempt, attempts.values())))

    for name, (response, _) in results.items():
        assert response.status_code == 422, (name, response.text)
        assert "banner-secret" not in response.text and "received" not in response.text, (name, response.text)
    messages = {name: response.json()["detail"][0]["msg"] for name, (response, _) in results.items()}
    assert len(set(messages.values())) == 1, messages
    assert next(iter(messages.values())).startswith("could not connect to the data source: ")
    seconds = {name: elapsed for name, (_, elapsed) in results.items()}
    assert min(seconds.values()) >= database.PROBE_SECONDS - 0.05, seconds
    assert max(seconds.values()) - min(seconds.values()) < 1.0, seconds
    assert "Connection refused" in caplog.text and "no_such_role" in caplog.text, "the operator's log says why"

    started = time.monotonic()
    assert service.client.post("/data-sources/", json={"name": "works", "dsn": empty_dsn,
                                                        "allow_privileged_role": True}).status_code == 201
    assert time.monotonic() - started < database.PROBE_SECONDS
    assert [s["name"] for s in service.client.get("/data-sources/").json() if not s["is_default"]] == ["works"]


def test_a_data_source_that_stops_answering_is_reported_without_the_servers_words(service, pg_admin_dsn, empty_dsn):
    create_orders_table(empty_dsn)
    source = service.client.post("/data-sources/", json={"name": "warehouse", "dsn": empty_dsn,
                                                           "allow_privileged_role": True})
    assert source.status_code == 201, source.text
    name = psycopg2.extensions.parse_dsn(empty_dsn)["dbname"]
    admin_execute(pg_admin_dsn, sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
    try:
        admin_execute(pg_admin_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                      (name,))
        response = service.client.post("/alert-configs/", json={
            "name": "Orders", "query": "SELECT order_number FROM dc_order", "schedule": "interval:1m",
            "data_source_id": source.json()["id"], "notification_channels": {"email": ["ops@example.com"]}})
    finally:
        admin_execute(pg_admin_dsn, sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
    assert response.status_code == 422, response.text
    assert "could not connect to the data source warehouse" in response.text
    assert "accepting" not in response.text and name not in response.text


def test_a_200_mb_chunked_body_without_a_key_is_401_before_it_is_read(db_dsn):
    import socket
    import subprocess
    import sys

    from tests.conftest import free_port, wait_for_health
    from tests.test_processes import ROOT, run_env

    port = free_port()
    process = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               env=run_env(DB_CONNECTION=db_dsn, API_HOST="127.0.0.1", API_PORT=str(port),
                                           API_KEY=KEY_A, LOG_FILE=""))
    try:
        wait_for_health(port, "main.py")
        before = _rss_mb(process.pid)
        chunk = b"x" * 1_000_000
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"POST /alert-configs/ HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            try:
                for _ in range(200):
                    conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
            except OSError:
                pass  # the server answered and closed the connection without reading the rest
            answer = conn.recv(4096)
        after = _rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert after - before < 30, f"RSS grew from {before:.0f} MB to {after:.0f} MB after {sent // 1_000_000} MB sent"


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_trigger_dsn_that_cannot_log_in_is_answered_like_the_probe(service, empty_dsn):
    with BannerServer() as banner:
        response = service.client.post("/data-sources/", json={
            "name": "warehouse", "dsn": empty_dsn, "allow_privileged_role": True,
            "trigger_dsn": f"host=127.0.0.1 port={banner.port} dbname=x user=y sslmode=disable"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["msg"] == database.PROBE_FAILED
    assert "banner-secret" not in response.text and len(service.client.get("/data-sources/").json()) == 1
