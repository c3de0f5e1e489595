"""Scheduled runs that could only find what the last evaluation stored are skipped; nothing is missed for it."""

from __future__ import annotations

import time

import database

from tests.conftest import create_orders_table, eventually, execute, fetch, insert_orders


def evaluations(service, alert_id: str, cause: str | None = None) -> list[dict]:
    rows = service.client.get(f"/alert-configs/{alert_id}/evaluations", params={"limit": 1000}).json()
    return [e for e in rows if cause is None or e["cause"] == cause]


def skipped(service) -> int:
    return service.client.get("/health").json()["scheduler"]["skipped_scheduled_runs"]


def test_scheduled_runs_on_unchanged_watched_tables_are_skipped_and_a_change_is_still_reported(
        service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(schedule="interval:1s", notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    before = skipped(service)
    time.sleep(3.2)
    assert evaluations(service, alert["id"], "schedule") == []
    assert skipped(service) >= before + 2
    insert_orders(db_dsn, ["ORD-1"])
    mail = smtp_server.wait_for(2)[1]
    assert "ORD-1" in mail.message.get_body(("plain",)).get_content()


def test_a_query_that_reads_the_clock_runs_on_every_schedule(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(
        query="SELECT order_number FROM dc_order WHERE created_at > now() - interval '1 day'",
        schedule="interval:1s", notification_channels={"email": ["ops@example.com"]})
    eventually(lambda: len(evaluations(service, alert["id"], "schedule")) >= 2, timeout=5,
               message="two scheduled runs of an alert that calls now()")


def test_a_constant_query_runs_once_and_not_again_after_a_restart(service, smtp_server):
    alert = service.create_alert(query="SELECT 1 AS one", schedule="interval:1s",
                                 notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    service.restart()
    time.sleep(2.5)
    assert [e["cause"] for e in evaluations(service, alert["id"])] == ["initial"]
    health = service.client.get("/health").json()["scheduler"]
    assert health["skipped_catch_ups"] == 1 and health["skipped_scheduled_runs"] >= 1
    assert len(smtp_server.messages) == 1


def test_a_truncate_wakes_the_alerts_on_the_table(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    insert_orders(db_dsn, ["ORD-1"])
    alert = service.create_alert(trigger_condition={"type": "not_empty"},
                                 notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    execute(db_dsn, "TRUNCATE dc_order")
    eventually(lambda: any(e["cause"] == "event" for e in evaluations(service, alert["id"])), timeout=5,
               message="an evaluation caused by the TRUNCATE")
    eventually(lambda: service.client.get(f"/alert-configs/{alert['id']}").json()["condition_state"] == "OK",
               timeout=5, message="the alert to resolve")


def test_a_trigger_from_before_truncate_was_watched_is_replaced(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    service.create_alert(notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.stop()
    execute(db_dsn, "DROP TRIGGER alert_service_notify ON dc_order; CREATE TRIGGER alert_service_notify AFTER "
                    "INSERT OR UPDATE OR DELETE ON dc_order FOR EACH STATEMENT EXECUTE FUNCTION "
                    "alert_service.notify_change()")
    service.start()
    events = fetch(db_dsn, "SELECT tgtype & 32 <> 0 AS truncate FROM pg_trigger "
                             "WHERE tgname = 'alert_service_notify' AND tgrelid = 'dc_order'::regclass")
    assert events == [(True,)]


def test_a_dropped_change_trigger_brings_the_scheduled_runs_back(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(schedule="interval:1s", notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    execute(db_dsn, "; ".join(f"DROP TRIGGER {name} ON dc_order" for name in database.CHANGE_TRIGGERS))
    service.services.scheduler._check_all_stability()  # what the minutely look at the catalog does
    insert_orders(db_dsn, ["ORD-UNHEARD"])
    mail = smtp_server.wait_for(2, timeout=5)[1]
    assert "ORD-UNHEARD" in mail.message.get_body(("plain",)).get_content()
    assert evaluations(service, alert["id"], "schedule")
