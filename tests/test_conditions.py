"""Trigger conditions end to end: they fire, stay quiet, resolve, and say so by email and WhatsApp."""

from __future__ import annotations

import time

from datetime import datetime, timedelta, timezone

from tests.conftest import create_orders_table, eventually, execute, insert_one_by_one, insert_orders

STOCK = "SELECT sku, qty FROM stock ORDER BY sku"
SAFETY = {"type": "threshold", "column": "qty", "operator": "<=", "value": 5}


def make_stock(dsn: str, rows: list[tuple[str, int]]) -> None:
    execute(dsn, "CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL)")
    for sku, qty in rows:
        execute(dsn, "INSERT INTO stock VALUES (%s, %s)", (sku, qty))


def subjects(smtp_server) -> list[str]:
    return [m.message["Subject"] for m in smtp_server.messages]


def text(mail) -> str:
    return mail.message.get_body(("plain",)).get_content()


def test_stock_at_or_below_safety_level_fires_then_resolves_when_replenished(service, smtp_server, twilio_server,
                                                                               db_dsn):
    make_stock(db_dsn, [("A", 50), ("B", 20)])
    alert = service.create_alert(name="Low stock", query=STOCK, trigger_condition=SAFETY)
    assert alert["condition"] == {**SAFETY, "value": 5.0, "match": "any"}
    first = smtp_server.wait_for(1)[0]
    assert "initial report" in first.message["Subject"] and "not met" in first.message["Subject"]
    service.wait_idle()

    execute(db_dsn, "UPDATE stock SET qty = 4 WHERE sku = 'B'")

    fired = smtp_server.wait_for(2)[1]
    assert fired.message["Subject"] == "[HIGH] Low stock: qty <= 5 in any row (1 row)"
    assert "B" in text(fired) and "A  " not in text(fired)
    assert "qty <= 5" in twilio_server.wait_for(2)[1].body
    service.wait_idle()
    incident = service.client.get("/incidents/", params={"alert_config_id": alert["id"]}).json()[0]
    assert incident["status"] == "ACTIVE" and incident["incident_data"]["rows"] == [["B", 4]]
    assert service.client.get(f"/alert-configs/{alert['id']}").json()["condition_state"] == "FIRING"

    execute(db_dsn, "UPDATE stock SET qty = 3 WHERE sku = 'B'")  # still low: no new message
    service.wait_idle()
    assert len(smtp_server.messages) == 2

    execute(db_dsn, "UPDATE stock SET qty = 100 WHERE sku = 'B'")

    resolved = smtp_server.wait_for(3)[2]
    assert resolved.message["Subject"] == "[HIGH] Low stock: resolved: qty <= 5 in any row no longer holds"
    assert "resolved" in twilio_server.wait_for(3)[2].body
    service.wait_idle()
    incident = service.client.get(f"/incidents/{incident['id']}").json()
    assert incident["status"] == "RESOLVED"
    actions = [a["action"] for a in service.client.get(f"/incidents/{incident['id']}/activities").json()]
    assert "created" in actions and "auto_resolved" in actions
    assert service.client.get(f"/alert-configs/{alert['id']}").json()["condition_state"] == "OK"


def test_row_count_fires_above_the_limit_only(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(query="SELECT order_number FROM dc_order",
                                 trigger_condition={"type": "row_count", "operator": ">", "value": 2},
                                 notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    insert_orders(db_dsn, ["ORD1", "ORD2"])
    service.wait_idle()
    assert len(smtp_server.messages) == 1, "2 rows is not more than 2"
    insert_orders(db_dsn, ["ORD3"])
    assert "row count > 2" in smtp_server.wait_for(2)[1].message["Subject"]
    execute(db_dsn, "DELETE FROM dc_order WHERE order_number = 'ORD1'")
    assert "resolved" in smtp_server.wait_for(3)[2].message["Subject"]
    evaluations = service.client.get(f"/alert-configs/{alert['id']}/evaluations").json()
    assert {"triggered", "resolved", "no_change"} <= {e["outcome"] for e in evaluations}


def test_empty_fires_when_nothing_arrived(service, smtp_server, db_dsn):
    """'No orders in the last 15 minutes'."""
    create_orders_table(db_dsn)
    insert_orders(db_dsn, ["ORD1"])
    service.create_alert(query="SELECT order_number FROM dc_order WHERE created_at > now() - interval '15 minutes'",
                         trigger_condition="empty", notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    execute(db_dsn, "UPDATE dc_order SET created_at = now() - interval '1 hour'")
    assert "the result is empty" in smtp_server.wait_for(2)[1].message["Subject"]
    insert_orders(db_dsn, ["ORD2"])
    assert "resolved" in smtp_server.wait_for(3)[2].message["Subject"]


def test_not_empty_fires_on_the_first_late_shipment(service, smtp_server, db_dsn):
    execute(db_dsn, "CREATE TABLE shipment (id int, due date, shipped boolean)")
    service.create_alert(query="SELECT id FROM shipment WHERE NOT shipped AND due < current_date",
                         trigger_condition="not_empty", notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    execute(db_dsn, "INSERT INTO shipment VALUES (1, current_date + 3, false)")
    service.wait_idle()
    assert len(smtp_server.messages) == 1
    execute(db_dsn, "INSERT INTO shipment VALUES (2, current_date - 1, false)")
    assert "the result is not empty" in smtp_server.wait_for(2)[1].message["Subject"]


def test_removed_rows_reports_the_rows_that_disappeared(service, smtp_server, db_dsn):
    make_stock(db_dsn, [("A", 1), ("B", 2)])
    service.create_alert(query=STOCK, trigger_condition="removed_rows", key_columns=["sku"],
                         notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    execute(db_dsn, "INSERT INTO stock VALUES ('C', 3)")
    service.wait_idle()
    assert len(smtp_server.messages) == 1, "an added row is not a removed row"
    execute(db_dsn, "DELETE FROM stock WHERE sku = 'A'")
    mail = smtp_server.wait_for(2)[1]
    assert mail.message["Subject"] == "[HIGH] Order Monitor: 1 removed row" and "A" in text(mail)


def test_any_change_reports_added_removed_and_changed_rows(service, smtp_server, db_dsn):
    make_stock(db_dsn, [("A", 1), ("B", 2)])
    service.create_alert(query=STOCK, trigger_condition="any_change", key_columns=["sku"],
                         notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    execute(db_dsn, "BEGIN; UPDATE stock SET qty = 9 WHERE sku = 'A'; DELETE FROM stock WHERE sku = 'B'; "
                    "INSERT INTO stock VALUES ('C', 3); COMMIT")
    mail = smtp_server.wait_for(2)[1]
    body = text(mail)
    assert mail.message["Subject"] == "[HIGH] Order Monitor: 3 changes"
    assert "changed  A" in body and "removed  B" in body and "added    C" in body


def test_for_holds_a_condition_before_firing(service, smtp_server, db_dsn):
    make_stock(db_dsn, [("A", 50)])
    alert = service.create_alert(query=STOCK, trigger_condition={**SAFETY, "for": "2s"},
                                 notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    changed = time.monotonic()
    execute(db_dsn, "UPDATE stock SET qty = 1")
    eventually(lambda: service.client.get(f"/alert-configs/{alert['id']}").json()["condition_state"] == "PENDING",
               message="PENDING")
    fired = smtp_server.wait_for(2, timeout=10)[1]
    assert time.monotonic() - changed >= 1.9 and "qty <= 5" in fired.message["Subject"]


def test_a_condition_that_clears_within_for_never_fires(service, smtp_server, db_dsn):
    make_stock(db_dsn, [("A", 50)])
    service.create_alert(query=STOCK, trigger_condition={**SAFETY, "for": "2s"},
                         notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    execute(db_dsn, "UPDATE stock SET qty = 1")
    time.sleep(0.5)
    execute(db_dsn, "UPDATE stock SET qty = 50")
    time.sleep(2.5)
    service.wait_idle()
    assert len(smtp_server.messages) == 1


def test_repeat_every_re_notifies_while_still_firing(service, smtp_server, db_dsn):
    make_stock(db_dsn, [("A", 1)])
    service.create_alert(query=STOCK, trigger_condition={**SAFETY, "repeat_every": "1s"},
                         notification_channels={"email": ["ops@example.com"]})
    first = smtp_server.wait_for(1)[0]
    assert "qty <= 5" in first.message["Subject"], "already low at creation: the first message is the incident"
    repeat = smtp_server.wait_for(2, timeout=10)[1]
    assert "still firing" in repeat.message["Subject"]


def test_cooldown_gathers_a_burst_into_one_digest_with_every_row(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    service.create_alert(trigger_condition={"type": "new_rows", "cooldown": "4s"},
                         notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()

    insert_orders(db_dsn, ["ORD-FIRST"])
    assert "1 new row" in smtp_server.wait_for(2)[1].message["Subject"]
    insert_one_by_one(db_dsn, [f"ORD-BURST-{i:02d}" for i in range(30)])
    time.sleep(0.5)
    service.wait_idle()
    assert len(smtp_server.messages) == 2, [m.message["Subject"] for m in smtp_server.messages]

    digest = smtp_server.wait_for(3, timeout=10)[2]
    assert "30 new rows" in digest.message["Subject"]
    body = text(digest)
    assert all(f"ORD-BURST-{i:02d}" in body for i in range(30))


def test_acknowledge_and_resolve_are_recorded(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    insert_orders(db_dsn, ["ORD1"])
    smtp_server.wait_for(2)
    incident = eventually(lambda: service.client.get("/incidents/", params={"alert_config_id": alert["id"]}).json())[0]

    acked = service.client.post(f"/incidents/{incident['id']}/acknowledge",
                                json={"acknowledged_by": "ada", "comment": "on it"})
    assert acked.status_code == 200 and acked.json()["status"] == "ACKNOWLEDGED"
    assert acked.json()["acknowledged_by"] == "ada"
    resolved = service.client.post(f"/incidents/{incident['id']}/resolve", json={"resolved_by": "ada"})
    assert resolved.json()["status"] == "RESOLVED" and resolved.json()["resolved_by"] == "ada"
    assert service.client.post(f"/incidents/{incident['id']}/acknowledge").json()["status"] == "RESOLVED"
    service.wait_idle()
    activities = service.client.get(f"/incidents/{incident['id']}/activities").json()
    actions = [a["action"] for a in activities]
    assert actions[0] == "created" and "notified" in actions
    assert actions.index("acknowledged") < actions.index("resolved")
    assert [a["details"] for a in activities if a["action"] == "acknowledged"][0] == {"comment": "on it"}


def test_a_failing_query_notifies_once_and_recovery_once(service, smtp_server, db_dsn):
    make_stock(db_dsn, [("A", 50)])
    alert = service.create_alert(query=STOCK, trigger_condition=SAFETY, schedule="interval:1s",
                                 notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    execute(db_dsn, "ALTER TABLE stock RENAME COLUMN qty TO quantity")

    failing = smtp_server.wait_for(2, timeout=15)[1]
    assert "alert is failing (3 errors in a row)" in failing.message["Subject"]
    assert 'column "qty" does not exist' in text(failing)
    time.sleep(1.5)
    assert len(smtp_server.messages) == 2, "one failing message, not one per error"
    assert service.client.get(f"/alert-configs/{alert['id']}").json()["consecutive_errors"] >= 3

    execute(db_dsn, "ALTER TABLE stock RENAME COLUMN quantity TO qty")
    assert "recovered" in smtp_server.wait_for(3, timeout=15)[2].message["Subject"]
    errors = [e for e in service.client.get(f"/alert-configs/{alert['id']}/evaluations",
                                            params={"limit": 1000}).json() if e["outcome"] == "error"]
    assert len(errors) >= 3 and 'column "qty" does not exist' in errors[0]["error"]


def test_a_muted_alert_records_incidents_but_sends_nothing(service, smtp_server, twilio_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert()
    smtp_server.wait_for(1)
    twilio_server.wait_for(1)
    service.wait_idle()

    muted = service.client.put(f"/alert-configs/{alert['id']}/mute", json={"duration": "1h"})
    assert muted.status_code == 200
    until = datetime.fromisoformat(muted.json()["muted_until"])
    assert timedelta(minutes=59) < until - datetime.now(timezone.utc) <= timedelta(hours=1)
    insert_orders(db_dsn, ["ORD-MUTED"])
    eventually(lambda: service.client.get("/incidents/", params={"alert_config_id": alert["id"]}).json(),
               message="incident recorded while muted")
    service.wait_idle()
    assert len(smtp_server.messages) == 1 and len(twilio_server.requests) == 1

    assert service.client.put(f"/alert-configs/{alert['id']}/mute", json={}).json()["muted_until"] is None
    insert_orders(db_dsn, ["ORD-UNMUTED"])
    assert "ORD-UNMUTED" in text(smtp_server.wait_for(2)[1])
    assert service.client.put(f"/alert-configs/{alert['id']}/mute",
                              json={"until": "2030-01-01T00:00:00"}).status_code == 422


def test_dry_runs_show_rows_diff_and_messages_and_send_nothing(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    insert_orders(db_dsn, ["ORD1"])
    body = {"name": "Order Monitor", "query": "SELECT order_number FROM dc_order", "schedule": "interval:1m",
            "notification_channels": {"email": ["ops@example.com"], "whatsapp": ["+14155550123"]}}

    unsaved = service.client.post("/alert-configs/test", json=body)
    assert unsaved.status_code == 200, unsaved.text
    assert unsaved.json()["rows"] == [["ORD1"]] and unsaved.json()["would_notify"] is True
    assert unsaved.json()["messages"][0]["email_subject"] == "[MEDIUM] Order Monitor: initial report, 1 row"
    assert service.sql("SELECT count(*) AS n FROM alert_config")[0]["n"] == 0

    alert = service.create_alert(**body)
    smtp_server.wait_for(1)
    service.wait_idle()
    insert_orders(db_dsn, ["ORD2"])
    service.wait_idle()
    smtp_server.wait_for(2)
    insert_orders(db_dsn, ["ORD3"])
    service.wait_idle()
    sent_before = len(smtp_server.messages)
    evaluations_before = len(service.client.get(f"/alert-configs/{alert['id']}/evaluations").json())

    preview = service.client.post(f"/alert-configs/{alert['id']}/test").json()
    assert preview["row_count"] == 3 and preview["summary"]["added"] == 0 and preview["would_notify"] is False

    execute(db_dsn, "ALTER TABLE dc_order DISABLE TRIGGER USER")  # the change triggers: ORD4 wakes nothing
    insert_orders(db_dsn, ["ORD4"])
    preview = service.client.post(f"/alert-configs/{alert['id']}/test").json()
    assert preview["summary"]["added"] == 1 and preview["outcome"] == "triggered"
    assert preview["messages"][0]["email_subject"] == "[HIGH] Order Monitor: 1 new row"
    assert "ORD4" in preview["messages"][0]["whatsapp_text"]
    time.sleep(0.3)
    assert len(smtp_server.messages) == sent_before
    assert len(service.client.get(f"/alert-configs/{alert['id']}/evaluations").json()) == evaluations_before

    ran = service.client.post(f"/alert-configs/{alert['id']}/run").json()
    assert ran["last_evaluation"]["cause"] == "manual" and ran["last_evaluation"]["outcome"] == "triggered"
    assert "ORD4" in text(smtp_server.wait_for(sent_before + 1)[-1])


def test_message_templates_shape_the_text_and_bad_ones_are_422(service, smtp_server, twilio_server, db_dsn):
    create_orders_table(db_dsn)
    template = "{{ counts.rows }} order(s) for {{ alert.name }}:{% for r in rows %} {{ r.order_number }}{% endfor %}"
    service.create_alert(message_template=template)
    smtp_server.wait_for(1)
    insert_orders(db_dsn, ["ORD7"])
    assert text(smtp_server.wait_for(2)[1]).startswith("1 order(s) for Order Monitor: ORD7")
    assert "1 order(s) for Order Monitor: ORD7" in twilio_server.wait_for(2)[1].body

    for bad in ("{% for %}", "{{ ''.__class__.__mro__[1].__subclasses__() }}"):
        response = service.client.post("/alert-configs/", json={
            "name": "x", "query": "SELECT 1 AS one", "schedule": "interval:1m", "message_template": bad,
            "notification_channels": {"email": ["ops@example.com"]}})
        assert response.status_code == 422 and "message_template" in response.text


def test_a_threshold_on_a_column_the_query_does_not_return_is_422(service, db_dsn):
    make_stock(db_dsn, [])
    response = service.client.post("/alert-configs/", json={
        "name": "x", "query": "SELECT sku FROM stock", "schedule": "interval:1m", "trigger_condition": SAFETY,
        "notification_channels": {"email": ["ops@example.com"]}})
    assert response.status_code == 422 and "qty" in response.text and "trigger_condition" in response.text
    assert service.sql("SELECT count(*) AS n FROM alert_config")[0]["n"] == 0


def test_old_evaluations_are_pruned_after_the_retention(settings, db_dsn):
    from tests.conftest import Service

    service = Service(settings.model_copy(update={"evaluation_retention_days": 1})).start()
    try:
        alert = service.create_alert(query="SELECT 1 AS one")
        service.wait_idle()
        # A month back: on TimescaleDB in a one-day chunk of its own, which the retention policy drops whole.
        service.sql("INSERT INTO evaluation (alert_config_id, cause, started_at, duration_ms, outcome) "
                    "VALUES (%s, 'schedule', now() - interval '30 days', 1, 'no_change')", (alert["id"],))
        service.restart()
        if service.sql("SELECT to_regclass('timescaledb_information.jobs') IS NOT NULL AS tsdb")[0]["tsdb"]:
            # On TimescaleDB the history is a hypertable whose retention policy drops old chunks: run its job now.
            jobs = service.sql("SELECT job_id FROM timescaledb_information.jobs WHERE hypertable_name = 'evaluation' "
                               "AND proc_name = 'policy_retention'")
            assert len(jobs) == 1, jobs
            execute(db_dsn, "CALL run_job(%s)", (jobs[0]["job_id"],))
        causes = [e["cause"] for e in service.client.get(f"/alert-configs/{alert['id']}/evaluations").json()]
        assert "schedule" not in causes and causes, causes
    finally:
        service.stop()


def test_changing_the_condition_of_a_firing_alert_resolves_its_incident(service, smtp_server, db_dsn):
    make_stock(db_dsn, [("A", 1)])
    alert = service.create_alert(query=STOCK, trigger_condition=SAFETY,
                                 notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    incident = service.client.get("/incidents/", params={"alert_config_id": alert["id"]}).json()[0]
    assert incident["status"] == "ACTIVE"

    body = {k: alert[k] for k in ("name", "query", "schedule", "notification_channels", "priority")}
    body["trigger_condition"] = {**SAFETY, "value": 0}
    assert service.client.put(f"/alert-configs/{alert['id']}", json=body).status_code == 200
    service.wait_idle()
    assert service.client.get(f"/incidents/{incident['id']}").json()["status"] == "RESOLVED"

    body["trigger_condition"] = {**SAFETY, "value": 0, "repeat_every": "1h"}
    assert service.client.put(f"/alert-configs/{alert['id']}", json=body).status_code == 200
    service.wait_idle()
    assert len(service.client.get("/incidents/", params={"alert_config_id": alert["id"]}).json()) == 1, \
        "a timing option keeps the state: no new incident"


def test_a_count_on_a_cut_result_is_an_error_not_a_guess(settings, smtp_server, db_dsn):
    from tests.conftest import Service

    create_orders_table(db_dsn)
    insert_orders(db_dsn, [f"ORD{i}" for i in range(5)])
    service = Service(settings.model_copy(update={"max_result_rows": 3})).start()
    try:
        alert = service.create_alert(query="SELECT order_number FROM dc_order",
                                     trigger_condition={"type": "row_count", "operator": ">", "value": 4})
        service.wait_idle()
        last = service.client.get(f"/alert-configs/{alert['id']}").json()["last_evaluation"]
        assert last["outcome"] == "error" and "MAX_RESULT_ROWS" in last["error"]
    finally:
        service.stop()
