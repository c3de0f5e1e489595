"""API keys, encrypted data source passwords, and secrets kept out of responses and logs."""

from __future__ import annotations

import logging

import pytest
from cryptography.fernet import Fernet

import database
from config import load_settings
from main import listen_host
from tests.conftest import Service, create_orders_table

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
    import psycopg2.extensions

    key = Fernet.generate_key().decode()
    service = Service(settings.model_copy(update={"secret_key": load_settings(
        _env_file=None, secret_key=key).secret_key})).start()
    try:
        params = psycopg2.extensions.parse_dsn(empty_dsn)
        response = service.client.post("/data-sources/", json={
            "name": "warehouse", "host": params["host"], "port": params.get("port"), "dbname": params["dbname"],
            "user": params["user"], "password": "pa55-word-in-clear", "allow_privileged_role": True})
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
    import psycopg2.extensions

    service = Service(settings.model_copy(update={"secret_key": None})).start()
    try:
        params = psycopg2.extensions.parse_dsn(empty_dsn)
        response = service.client.post("/data-sources/", json={
            "name": "warehouse", "host": params["host"], "port": params.get("port"), "dbname": params["dbname"],
            "user": params["user"], "password": "pa55", "allow_privileged_role": True})
        assert response.status_code == 422 and "SECRET_KEY" in response.text
        assert len(service.client.get("/data-sources/").json()) == 1
    finally:
        service.stop()
