"""The main path through the HTTP API, against a real PostgreSQL, SMTP server and Twilio-compatible server."""

from __future__ import annotations

import psycopg2
import pytest

from tests.conftest import (TWILIO_FROM, create_orders_table, data_source_parts, eventually, execute,
                            insert_one_by_one, insert_orders)


def incidents(service, alert_id: str) -> list[dict]:
    response = service.client.get("/incidents/", params={"alert_config_id": alert_id})
    assert response.status_code == 200
    return response.json()


def evaluations(service, alert_id: str) -> list[dict]:
    return service.client.get(f"/alert-configs/{alert_id}/evaluations", params={"limit": 1000}).json()


def test_create_alert_sends_the_current_result_once_as_initial_report(service, smtp_server, twilio_server, db_dsn):
    create_orders_table(db_dsn)
    insert_orders(db_dsn, ["ORD1", "ORD2"])

    alert = service.create_alert()

    mail = smtp_server.wait_for(1)[0]
    assert mail.message["Subject"] == "[HIGH] Order Monitor: initial report, 2 rows"
    assert mail.rcpt_tos == ["ops@example.com"]
    assert mail.message["From"] == "alerts@example.com"
    assert mail.auth_user == "alerts"
    text = mail.message.get_body(("plain",)).get_content()
    html = mail.message.get_body(("html",)).get_content()
    assert "ORD1" in text and "ORD2" in text and ">ORD2</td>" in html
    sms = twilio_server.wait_for(1)[0]
    assert sms.to == "whatsapp:+14155550123" and sms.from_ == f"whatsapp:{TWILIO_FROM}"
    assert "ORD1" in sms.body and "ORD2" in sms.body
    service.wait_idle()
    assert incidents(service, alert["id"]) == []  # a report, not an incident
    sent = service.client.get("/notifications/", params={"alert_config_id": alert["id"]}).json()
    assert {(n["channel"], n["status"], n["kind"]) for n in sent} == {
        ("email", "SUCCESS", "initial_report"), ("whatsapp", "SUCCESS", "initial_report")}
    assert all(n["provider_message_id"] for n in sent)
    assert alert["watched_tables"] == ["public.dc_order"] and alert["events_enabled"] is True


def test_one_insert_gives_one_incident_one_email_and_one_whatsapp_with_the_new_row(
    service, smtp_server, twilio_server, db_dsn
):
    create_orders_table(db_dsn)
    insert_orders(db_dsn, ["ORD1"])
    alert = service.create_alert()
    smtp_server.wait_for(1)
    twilio_server.wait_for(1)
    service.wait_idle()

    insert_orders(db_dsn, ["ORD2"])

    mail = smtp_server.wait_for(2)[1]
    assert mail.message["Subject"] == "[HIGH] Order Monitor: 1 new row"
    assert "ORD2" in mail.message.get_body(("plain",)).get_content()
    assert "ORD1" not in mail.message.get_body(("plain",)).get_content()
    sms = twilio_server.wait_for(2)[1]
    assert "ORD2" in sms.body and "ORD1" not in sms.body
    service.wait_idle()
    assert len(smtp_server.messages) == 2 and len(twilio_server.delivered) == 2
    found = incidents(service, alert["id"])
    assert len(found) == 1
    assert found[0]["incident_data"]["new_rows"] == [{"order_number": "ORD2"}]
    assert found[0]["priority"] == "HIGH" and found[0]["status"] == "ACTIVE"
    actions = [a["action"] for a in service.client.get(f"/incidents/{found[0]['id']}/activities").json()]
    assert actions.count("created") == 1 and actions.count("notified") == 2


def test_columns_with_the_same_name_keep_every_value_in_incidents_templates_and_dry_runs(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    query = "SELECT o.order_number AS id, o.business_unit AS id, 'x' AS id_2 FROM dc_order o"
    alert = service.create_alert(query=query, key_columns=["id_3"],
                                 message_template="{% for r in rows %}{{ r.id }}/{{ r.id_3 }}/{{ r.id_2 }}{% endfor %}")
    smtp_server.wait_for(1)
    service.wait_idle()

    execute(db_dsn, "INSERT INTO dc_order (order_number, business_unit) VALUES ('ORD1', 'EU')")

    assert "ORD1/EU/x" in smtp_server.wait_for(2)[1].message.get_body(("plain",)).get_content()
    service.wait_idle()
    data = incidents(service, alert["id"])[0]["incident_data"]
    assert data["columns"] == ["id", "id_3", "id_2"]
    assert data["new_rows"] == [{"id": "ORD1", "id_3": "EU", "id_2": "x"}]
    dry_run = service.client.post(f"/alert-configs/{alert['id']}/test").json()
    assert dry_run["columns"] == ["id", "id_3", "id_2"] and dry_run["rows"] == [["ORD1", "EU", "x"]]


def test_one_100_row_insert_gives_one_incident(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert()
    smtp_server.wait_for(1)
    service.wait_idle()

    insert_orders(db_dsn, [f"ORD{i:04d}" for i in range(100)])

    mail = smtp_server.wait_for(2)[1]
    assert mail.message["Subject"] == "[HIGH] Order Monitor: 100 new rows"
    service.wait_idle()
    found = incidents(service, alert["id"])
    assert len(found) == 1 and found[0]["incident_data"]["new_row_count"] == 100
    assert len(smtp_server.messages) == 2


def test_a_burst_of_500_single_row_inserts_reports_every_row_with_far_fewer_evaluations(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    before = len(evaluations(service, alert["id"]))

    insert_one_by_one(db_dsn, [f"ORD{i:04d}" for i in range(500)])

    def reported() -> set[str]:
        rows = set()
        for incident in incidents(service, alert["id"]):
            rows |= {r["order_number"] for r in incident["incident_data"]["new_rows"]}
        return rows

    eventually(lambda: len(reported()) == 500, timeout=30, message="all 500 rows reported")
    service.wait_idle()
    assert reported() == {f"ORD{i:04d}" for i in range(500)}
    runs = len(evaluations(service, alert["id"])) - before
    assert runs < 250, f"{runs} evaluations for 500 inserts"
    total = sum(i["incident_data"]["new_row_count"] for i in incidents(service, alert["id"]))
    assert total == 500  # no row reported twice


def test_restart_sends_nothing_again(service, smtp_server, twilio_server, db_dsn):
    create_orders_table(db_dsn)
    insert_orders(db_dsn, ["ORD1"])
    service.create_alert(schedule="interval:1s")
    smtp_server.wait_for(1)
    twilio_server.wait_for(1)
    service.wait_idle()

    service.restart()
    service.wait_idle()
    service.restart()
    service.wait_idle()

    assert len(smtp_server.messages) == 1 and len(twilio_server.requests) == 1


def test_a_row_inserted_while_the_service_was_down_is_alerted_after_start(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    service.create_alert(notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    service.stop()

    insert_orders(db_dsn, ["ORD-WHILE-DOWN"])
    service.start()

    mail = smtp_server.wait_for(2)[1]
    assert "ORD-WHILE-DOWN" in mail.message.get_body(("plain",)).get_content()
    service.wait_idle()
    assert len(smtp_server.messages) == 2


@pytest.mark.parametrize(
    "ddl, query, insert, key",
    [
        ('CREATE SCHEMA sales; CREATE TABLE sales.orders (id int)', "SELECT id FROM sales.orders",
         "INSERT INTO sales.orders VALUES (7)", "sales.orders"),
        ('CREATE SCHEMA "Sales Team"; CREATE TABLE "Sales Team"."Big Orders" ("Id" int)',
         'SELECT "Id" FROM "Sales Team"."Big Orders"', 'INSERT INTO "Sales Team"."Big Orders" VALUES (7)',
         '"Sales Team"."Big Orders"'),
        ('CREATE TABLE "MixedCase" (id int)', 'SELECT id FROM "MixedCase"', 'INSERT INTO "MixedCase" VALUES (7)',
         'public."MixedCase"'),
        ("CREATE TABLE a (id int); CREATE TABLE b (id int, a_id int)",
         "WITH recent AS (SELECT id FROM b) SELECT b.id FROM a JOIN b ON b.a_id = a.id "
         "WHERE b.id IN (SELECT id FROM recent)",
         "INSERT INTO a VALUES (1); INSERT INTO b VALUES (7, 1)", "public.a"),
        ("CREATE TABLE base (id int, visible bool); CREATE VIEW shown AS SELECT id FROM base WHERE visible",
         "SELECT id FROM shown", "INSERT INTO base VALUES (7, true)", "public.base"),
    ],
    ids=["schema-qualified", "quoted-with-spaces", "mixed-case", "join-cte-subquery", "view"],
)
def test_changes_to_unusual_table_names_fire_the_alert(service, smtp_server, db_dsn, ddl, query, insert, key):
    execute(db_dsn, ddl)
    alert = service.create_alert(query=query, notification_channels={"email": ["ops@example.com"]})
    assert key in alert["watched_tables"] and alert["events_enabled"], alert
    smtp_server.wait_for(1)
    service.wait_idle()

    execute(db_dsn, insert)

    mail = smtp_server.wait_for(2)[1]
    assert mail.message["Subject"] == "[HIGH] Order Monitor: 1 new row"
    assert "7" in mail.message.get_body(("plain",)).get_content()


def test_a_watched_table_without_order_number_keeps_accepting_writes(service, smtp_server, db_dsn):
    execute(db_dsn, "CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL)")
    alert = service.create_alert(query="SELECT sku FROM stock WHERE qty < 5",
                         notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)

    execute(db_dsn, "INSERT INTO stock VALUES ('A', 10), ('B', 2)")
    execute(db_dsn, "UPDATE stock SET qty = 1 WHERE sku = 'A'")
    execute(db_dsn, "DELETE FROM stock WHERE sku = 'B'")

    def reported() -> set[str]:
        return {row["sku"] for i in incidents(service, alert["id"]) for row in i["incident_data"]["new_rows"]}

    eventually(lambda: reported() == {"A", "B"}, message="both low-stock rows reported")
    service.wait_idle()
    conn = psycopg2.connect(db_dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT sku, qty FROM stock")
        assert cur.fetchall() == [("A", 1)]
    conn.close()


def test_alerts_paused_resumed_and_deleted_while_running_take_effect_at_once(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()

    paused = service.client.put(f"/alert-configs/{alert['id']}/status", params={"status": "INACTIVE"})
    assert paused.status_code == 200 and paused.json()["status"] == "INACTIVE"
    insert_orders(db_dsn, ["ORD-PAUSED"])
    service.wait_idle()
    assert len(smtp_server.messages) == 1

    resumed = service.client.put(f"/alert-configs/{alert['id']}/status", params={"status": "ACTIVE"})
    assert resumed.status_code == 200
    # The row inserted while paused is new compared with the last result, so resuming reports it.
    assert "ORD-PAUSED" in smtp_server.wait_for(2)[1].message.get_body(("plain",)).get_content()
    insert_orders(db_dsn, ["ORD-RESUMED"])
    assert "ORD-RESUMED" in smtp_server.wait_for(3)[2].message.get_body(("plain",)).get_content()
    service.wait_idle()

    assert service.client.delete(f"/alert-configs/{alert['id']}").status_code == 204
    assert service.client.get(f"/alert-configs/{alert['id']}").status_code == 404
    insert_orders(db_dsn, ["ORD-DELETED"])
    service.wait_idle()
    assert len(smtp_server.messages) == 3
    conn = psycopg2.connect(db_dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'alert_service_notify'")
        assert cur.fetchone()[0] == 0, "the trigger is dropped when no alert needs the table"
    conn.close()


def test_an_updated_query_takes_effect_at_once(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    execute(db_dsn, "CREATE TABLE returns (order_number text)")
    alert = service.create_alert(notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()

    body = {k: alert[k] for k in ("name", "description", "trigger_condition", "schedule",
                                  "notification_channels", "priority")}
    body["query"] = "SELECT order_number FROM returns"
    response = service.client.put(f"/alert-configs/{alert['id']}", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["watched_tables"] == ["public.returns"]
    smtp_server.wait_for(2)  # a new query starts with a fresh initial report
    service.wait_idle()

    insert_orders(db_dsn, ["ORD-ORDER"])
    execute(db_dsn, "INSERT INTO returns VALUES ('RET-1')")
    mail = smtp_server.wait_for(3)[2]
    assert "RET-1" in mail.message.get_body(("plain",)).get_content()
    service.wait_idle()
    assert len(smtp_server.messages) == 3


def test_interval_schedules_honour_seconds(service, smtp_server):
    # random() makes the result one the service cannot know unchanged, so every scheduled run executes.
    alert = service.create_alert(query="SELECT 1 AS one WHERE random() >= 0", schedule="interval:1s",
                                 notification_channels={"email": ["ops@example.com"]})
    assert alert["events_enabled"] is False and "schedule" in alert["events_error"]
    eventually(lambda: len([e for e in evaluations(service, alert["id"]) if e["cause"] == "schedule"]) >= 2,
               timeout=5, message="two scheduled runs within 5 s")


def test_the_schedule_catches_changes_when_events_are_off(service, smtp_server, empty_dsn, pg_admin_dsn):
    """A data source whose role may not create triggers still alerts, on its schedule, and says why."""
    create_orders_table(empty_dsn)
    execute(empty_dsn, "DO $$ BEGIN CREATE ROLE alert_reader LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    execute(empty_dsn, "GRANT SELECT ON dc_order TO alert_reader")
    from tests.conftest import dsn_with

    # Another database than the service's: there the service installs triggers itself, with its own role.
    reader_dsn = dsn_with(empty_dsn, user="alert_reader")
    source = service.client.post("/data-sources/", json={"name": "read-only", "dsn": reader_dsn})
    assert source.status_code == 201, source.text
    alert = service.create_alert(data_source_id=source.json()["id"], schedule="interval:1s",
                                 notification_channels={"email": ["ops@example.com"]})
    assert alert["events_enabled"] is False
    assert "permission denied" in alert["events_error"] or "must be owner" in alert["events_error"], alert
    smtp_server.wait_for(1)

    insert_orders(empty_dsn, ["ORD-SCHEDULED"])
    mail = smtp_server.wait_for(2, timeout=10)[1]
    assert "ORD-SCHEDULED" in mail.message.get_body(("plain",)).get_content()


def test_a_second_data_source_has_its_own_listener(service, smtp_server, empty_dsn):
    create_orders_table(empty_dsn)
    source = service.client.post("/data-sources/", json={
        "name": "warehouse", **data_source_parts(empty_dsn), "password": "s3cret-value", "allow_privileged_role": True})
    assert source.status_code == 201, source.text
    assert "s3cret-value" not in source.text and source.json()["has_password"] is True
    assert "s3cret-value" not in service.client.get("/data-sources/").text
    alert = service.create_alert(data_source_id=source.json()["id"],
                                 notification_channels={"email": ["ops@example.com"]})
    assert alert["data_source_id"] == source.json()["id"] and alert["events_enabled"]
    smtp_server.wait_for(1)
    service.wait_idle()

    insert_orders(empty_dsn, ["ORD-ELSEWHERE"])

    assert "ORD-ELSEWHERE" in smtp_server.wait_for(2)[1].message.get_body(("plain",)).get_content()
    listeners = service.client.get("/health").json()["scheduler"]["listeners"]
    assert listeners[source.json()["id"]]["connected"] is True


def test_health_reports_database_scheduler_and_listeners(service):
    body = service.client.get("/health").json()
    assert body["status"] == "ok" and body["database"] == "ok"
    assert body["scheduler"]["running"] is True and body["dispatcher"]["running"] is True


def test_swagger_ui_and_schema_are_served(service):
    assert service.client.get("/api/docs").status_code == 200
    schema = service.client.get("/api/openapi.json").json()
    assert "/alert-configs/" in schema["paths"]
    assert "example" in schema["components"]["schemas"]["AlertConfigIn"]


def test_alerts_created_at_once_on_several_tables_all_get_their_triggers(service, smtp_server, db_dsn):
    import threading

    for i in range(4):
        execute(db_dsn, f"CREATE TABLE t{i} (id int)")
    results: list = [None] * 4

    def create(i: int) -> None:
        results[i] = service.client.post("/alert-configs/", json={
            "name": f"A{i}", "query": f"SELECT id FROM t{i}", "schedule": "interval:1h",
            "notification_channels": {"email": ["ops@example.com"]}})

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [201] * 4
    for r in results:
        alert = service.client.get(f"/alert-configs/{r.json()['id']}").json()
        assert alert["events_enabled"], alert["events_error"]
    smtp_server.wait_for(4)
    service.wait_idle()
    execute(db_dsn, "INSERT INTO t3 VALUES (1)")
    assert "A3: 1 new row" in smtp_server.wait_for(5)[4].message["Subject"]


def test_a_query_cannot_leave_state_on_pooled_connections(service, smtp_server, db_dsn):
    """An advisory lock or a setting taken by one alert's query is gone before the next query runs."""
    alert = service.create_alert(query="SELECT pg_advisory_lock(4242) IS NOT NULL AS locked, "
                                       "set_config('search_path', 'nowhere', false) AS path",
                                 notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    assert service.client.get(f"/alert-configs/{alert['id']}").json()["last_evaluation"]["outcome"] == "triggered"
    held = service.sql("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242")
    assert held[0]["n"] == 0
    create_orders_table(db_dsn)
    service.create_alert(name="Second", notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(2)
    service.wait_idle()
    insert_orders(db_dsn, ["ORD1"])
    assert "Second: 1 new row" in smtp_server.wait_for(3)[2].message["Subject"]


def test_rows_with_bytea_or_json_values_are_not_reported_again(service, smtp_server, db_dsn):
    execute(db_dsn, "CREATE TABLE blobs (id int, data bytea, meta jsonb, at timestamptz DEFAULT now(), "
                    "amount numeric)")
    execute(db_dsn, "INSERT INTO blobs (id, data, meta, amount) VALUES (1, '\\x0102', '{\"b\": 1, \"a\": [2]}', 1.50)")
    # random() keeps the scheduled runs from being skipped: they must run, and find the same rows.
    alert = service.create_alert(query="SELECT * FROM blobs WHERE random() >= 0", schedule="interval:1s",
                                 notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    eventually(lambda: len([e for e in service.client.get(f"/alert-configs/{alert['id']}/evaluations").json()
                            if e["cause"] == "schedule"]) >= 2, timeout=5, message="two scheduled runs")
    service.wait_idle()
    assert len(smtp_server.messages) == 1, "an unchanged row is not new"
    execute(db_dsn, "INSERT INTO blobs (id, data) VALUES (2, '\\x03')")
    assert "\\x03" in smtp_server.wait_for(2)[1].message.get_body(("plain",)).get_content()
