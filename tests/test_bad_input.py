"""Bad requests get a 4xx with a message a person can act on, and change nothing."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import create_orders_table

GOOD = {
    "name": "Order Monitor",
    "query": "SELECT order_number FROM dc_order",
    "schedule": "interval:1m",
    "notification_channels": {"email": ["ops@example.com"], "whatsapp": ["+14155550123"]},
}


def changed(**fields):
    body = {**GOOD, **fields}
    return {k: v for k, v in body.items() if v is not ...}


BAD_ALERTS = [
    ("schedule", changed(schedule="every 5"), "schedule"),
    ("interval zero", changed(schedule="interval:0s"), "at least 1 second"),
    ("negative interval", changed(schedule="interval:-1m"), "interval"),
    ("interval not a number", changed(schedule="interval:abc"), "interval"),
    ("bad cron", changed(schedule="cron:bad"), "cron"),
    ("cron with six fields", changed(schedule="cron:0 * * * * *"), "five fields"),
    ("two statements", changed(query="SELECT 1; SELECT 2"), "exactly one statement"),
    ("injection", changed(query="SELECT order_number FROM dc_order; DROP TABLE dc_order"), "exactly one statement"),
    ("delete", changed(query="DELETE FROM dc_order"), "not DELETE"),
    ("insert", changed(query="INSERT INTO dc_order (order_number) VALUES ('x')"), "not INSERT"),
    ("ddl", changed(query="CREATE TABLE t (id int)"), "not CREATE"),
    ("select into", changed(query="SELECT * INTO copy FROM dc_order"), "SELECT INTO"),
    ("writing cte", changed(query="WITH d AS (DELETE FROM dc_order RETURNING *) SELECT * FROM d"), "DELETE"),
    ("for update", changed(query="SELECT * FROM dc_order FOR UPDATE"), "locking"),
    ("syntax error", changed(query="SELEC order_number FROM dc_order"), "syntax error"),
    ("unknown table", changed(query="SELECT * FROM no_such_table"), 'relation "no_such_table" does not exist'),
    ("unknown column", changed(query="SELECT nope FROM dc_order"), 'column "nope" does not exist'),
    ("quoted identifier injection", changed(query='SELECT * FROM "dc_order; DROP TABLE dc_order"'), "does not exist"),
    ("empty query", changed(query=""), "query"),
    ("bad email", changed(notification_channels={"email": ["not-an-email"]}), "email"),
    ("not e164", changed(notification_channels={"whatsapp": ["0044 20 1234"]}), "E.164"),
    ("too short number", changed(notification_channels={"whatsapp": ["+1234"]}), "E.164"),
    ("unknown channel", changed(notification_channels={"pager": ["+14155550123"]}), "pager"),
    ("no recipients", changed(notification_channels={"email": [], "whatsapp": []}), "at least one recipient"),
    ("channels missing", changed(notification_channels=...), "notification_channels"),
    ("name too long", changed(name="x" * 256), "255"),
    ("blank name", changed(name="   "), "blank"),
    ("name missing", changed(name=...), "name"),
    ("wrong type", changed(name=42), "name"),
    ("unknown priority", changed(priority="URGENT"), "priority"),
    ("unknown condition", changed(trigger_condition="when it rains"), "trigger condition"),
    ("bad data source id", changed(data_source_id="not-a-uuid"), "data_source_id"),
    ("unknown data source", changed(data_source_id=str(uuid.uuid4())), "does not exist"),
    ("unknown user", changed(created_by=str(uuid.uuid4())), "does not exist"),
    ("unknown field", changed(colour="red"), "colour"),
    ("key column not returned", changed(key_columns=["id"]), "not in the query"),
    ("cron that never matches", changed(schedule="cron:0 0 31 2 *"), "never matches"),
    ("name with a newline", changed(name="Orders\nEU"), "one line"),
    ("NUL in a description", changed(description="a\x00b"), "NUL"),
    ("huge duration", changed(trigger_condition={"type": "empty", "for": "999999999d"}), "366 days"),
    ("huge threshold value", changed(trigger_condition={"type": "row_count", "operator": ">", "value": 10**400}),
     "finite"),
    ("operator not a string", changed(trigger_condition={"type": "row_count", "operator": [], "value": 1}),
     "operator"),
    ("interval with full-width digits", changed(schedule="interval:３０s"), "ASCII"),
    ("cron with full-width digits", changed(schedule="cron:*/５ * * * *"), "ASCII"),
    ("'for' with Arabic-Indic digits", changed(trigger_condition={"type": "empty", "for": "٣m"}), "ASCII"),
    ("cooldown with full-width digits", changed(trigger_condition={"type": "new_rows", "cooldown": "５m"}), "ASCII"),
    ("template that loops too much",
     changed(message_template="{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"),
     "range over"),
]


@pytest.mark.parametrize("body, expected", [(b, e) for _, b, e in BAD_ALERTS], ids=[n for n, _, _ in BAD_ALERTS])
def test_a_bad_alert_is_rejected_with_a_clear_message_and_nothing_stored(service, db_dsn, body, expected):
    create_orders_table(db_dsn)
    response = service.client.post("/alert-configs/", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert expected.lower() in str(response.json()).lower(), response.text
    assert service.sql("SELECT count(*) AS n FROM alert_config")[0]["n"] == 0
    assert service.sql("SELECT count(*) AS n FROM notification")[0]["n"] == 0
    assert service.sql("SELECT count(*) AS n FROM dc_order")[0]["n"] == 0
    assert service.sql("SELECT to_regclass('dc_order') IS NOT NULL AS ok")[0]["ok"]


RAW_BODIES = [
    ("malformed json", b'{"name": "x",', "json"),
    ("not an object", b'["a"]', "object"),
    ("empty body", b"", "required"),
]


@pytest.mark.parametrize("raw, expected", [(r, e) for _, r, e in RAW_BODIES], ids=[n for n, _, _ in RAW_BODIES])
def test_malformed_bodies_are_422(service, raw, expected):
    response = service.client.post("/alert-configs/", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert expected in response.text.lower()


def test_an_oversize_body_is_413(service):
    response = service.client.post("/alert-configs/", content=b"x" * 1_100_000,
                                   headers={"Content-Type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize("path", ["/alert-configs/{}", "/incidents/{}", "/incidents/{}/activities",
                                  "/data-sources/{}", "/users/{}", "/teams/{}", "/alert-configs/{}/evaluations"])
def test_unknown_ids_are_404_and_invalid_ids_are_422(service, path):
    assert service.client.get(path.format(uuid.uuid4())).status_code == 404
    assert service.client.get(path.format("not-a-uuid")).status_code == 422


def test_changing_an_unknown_alert_is_404(service):
    missing = uuid.uuid4()
    assert service.client.put(f"/alert-configs/{missing}", json=GOOD).status_code == 404
    assert service.client.put(f"/alert-configs/{missing}/status", params={"status": "ACTIVE"}).status_code == 404
    assert service.client.delete(f"/alert-configs/{missing}").status_code == 404
    assert service.client.post(f"/incidents/{missing}/resolve").status_code == 404


def test_a_bad_status_value_is_422(service, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert()
    response = service.client.put(f"/alert-configs/{alert['id']}/status", params={"status": "RESOLVED"})
    assert response.status_code == 422
    assert service.client.get(f"/alert-configs/{alert['id']}").json()["status"] == "ACTIVE"


def test_a_rejected_update_leaves_the_alert_as_it_was(service, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert()
    response = service.client.put(f"/alert-configs/{alert['id']}", json=changed(query="DROP TABLE dc_order"))
    assert response.status_code == 422
    assert service.client.get(f"/alert-configs/{alert['id']}").json()["query"] == alert["query"]


def test_bad_data_sources_users_and_teams_are_rejected(service):
    assert service.client.post("/data-sources/", json={"name": "x"}).status_code == 422
    refused = service.client.post("/data-sources/", json={"name": "x", "host": "127.0.0.1", "port": 1})
    assert refused.status_code == 422 and "could not connect to the data source" in refused.text
    assert service.client.post("/users/", json={"name": "a", "email": "nope"}).status_code == 422
    assert service.client.post("/users/", json={"name": "a", "email": "a@example.com",
                                                "team_id": str(uuid.uuid4())}).status_code == 422
    assert service.client.post("/teams/", json={"name": ""}).status_code == 422
    assert service.client.post("/teams/", json={"name": "ops"}).status_code == 201
    assert service.client.post("/teams/", json={"name": "ops"}).status_code == 409
    assert len(service.client.get("/data-sources/").json()) == 1


def test_a_mailbox_that_needs_smtputf8_is_refused_wherever_an_address_is_taken(service, db_dsn):
    create_orders_table(db_dsn)
    for address in ("josé@example.com", "ｏｐｓ@example.com", "отдел@example.com"):
        alert = service.client.post("/alert-configs/", json=changed(notification_channels={"email": [address]}))
        assert alert.status_code == 422, alert.text
        assert address in alert.text and "ASCII" in alert.text and "SMTPUTF8" in alert.text
        user = service.client.post("/users/", json={"name": "José", "email": address})
        assert user.status_code == 422 and address in user.text, user.text
    assert service.sql("SELECT count(*) AS n FROM alert_config")[0]["n"] == 0
    assert service.client.get("/users/").json() == []


def test_an_internationalised_domain_is_stored_as_it_is_sent(service, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(notification_channels={"email": ["ops@bücher.example", "OPS@BÜCHER.example"]})
    assert alert["notification_channels"]["email"] == ["ops@xn--bcher-kva.example", "OPS@xn--bcher-kva.example"]
    user = service.client.post("/users/", json={"name": "Ada", "email": "ada@bücher.example"})
    assert user.status_code == 201 and user.json()["email"] == "ada@xn--bcher-kva.example"


def test_validation_errors_do_not_echo_a_password(service):
    response = service.client.post("/data-sources/", json={"name": "x", "password": "hunter2-secret"})
    assert response.status_code == 422 and "hunter2-secret" not in response.text


def test_users_and_teams_round_trip(service):
    team = service.client.post("/teams/", json={"name": "ops"}).json()
    user = service.client.post("/users/", json={"name": "Ada", "email": "ada@example.com", "team_id": team["id"]})
    assert user.status_code == 201
    assert service.client.get(f"/users/{user.json()['id']}").json()["team_id"] == team["id"]
    assert [u["email"] for u in service.client.get("/users/").json()] == ["ada@example.com"]


def test_bad_mutes_are_422(service, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert()
    for body in ({"duration": "4000000d"}, {"until": "9999-12-31T23:59:59-14:00"}, {"duration": "5x"},
                 {"until": "2030-01-01T00:00:00Z", "duration": "1h"}, {"duration": "２h"}):
        response = service.client.put(f"/alert-configs/{alert['id']}/mute", json=body)
        assert response.status_code == 422, (body, response.text)
    assert service.client.get(f"/alert-configs/{alert['id']}").json()["muted_until"] is None


def test_data_source_secrets_other_than_the_password_are_refused(service, empty_dsn):
    response = service.client.post("/data-sources/", json={"name": "x", "dsn": empty_dsn + " sslpassword=s3cr3t"})
    assert response.status_code == 422 and "sslpassword" in response.text and "s3cr3t" not in response.text
    assert service.client.post("/teams/", json={"name": "a\x00b"}).status_code == 422


def test_a_chunked_body_over_the_limit_is_413_and_changes_nothing(service, db_dsn):
    create_orders_table(db_dsn)

    def chunks():  # no Content-Length: the body arrives chunked, as a streaming client sends it
        yield b'{"name": "x", "description": "'
        for _ in range(20):
            yield b"x" * 100_000
        yield b'", "query": "SELECT 1", "schedule": "interval:1m", "notification_channels": {"email": ["a@b.co"]}}'

    response = service.client.post("/alert-configs/", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "1000000 bytes" in response.json()["detail"], response.text
    assert service.sql("SELECT count(*) AS n FROM alert_config")[0]["n"] == 0


def test_a_content_length_of_non_ascii_digits_is_413_not_500(service):
    """Servers other than uvicorn may pass such a header through; isdigit() alone would let int() fail."""
    import asyncio

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/alert-configs/", "raw_path": b"/alert-configs/", "query_string": b"", "root_path": "",
             "headers": [(b"content-length", "²".encode("latin-1")), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(service.client.app(scope, receive, send))
    assert sent[0]["status"] == 413, sent[:1]
