"""What Twilio reports after accepting a message: signed status callbacks, or asking Twilio without a public URL;
the status, the error code and a hint in GET /notifications/ and the incident's activities."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr

from notification import delivery_moves_on
from tests.conftest import Service, create_orders_table, eventually, insert_orders

PUBLIC = "https://alerts.example.com"


@pytest.fixture
def public_service(settings):
    """The service reachable at PUBLIC, so Twilio is given a status callback URL."""
    running = Service(settings.model_copy(update={"public_base_url": PUBLIC})).start()
    yield running
    running.stop()


def notifications(service, **filters) -> list[dict]:
    return service.client.get("/notifications/", params=filters).json()


def call_back(service, callback, **changed):
    """Make Twilio's status callback to the service (its form changed by `changed` after it was signed)."""
    return service.client.post(urlsplit(callback.url).path, data={**callback.form, **changed},
                               headers=callback.headers)


def incident_message(service, twilio_server, db_dsn) -> dict:
    """The outbox row of an incident's WhatsApp message that Twilio accepted."""
    create_orders_table(db_dsn)
    service.create_alert(notification_channels={"whatsapp": ["+14155550123"]})
    twilio_server.wait_for(1)
    insert_orders(db_dsn, ["ORD1"])
    twilio_server.wait_for(2)
    service.wait_idle()
    return next(n for n in notifications(service) if n["incident_id"])


def test_whatsapp_undelivered_with_63016_shows_status_code_and_hint_in_notifications_and_activities(
        public_service, twilio_server, db_dsn):
    sent = incident_message(public_service, twilio_server, db_dsn)
    sid = sent["provider_message_id"]
    assert twilio_server.callback_url(sid) == f"{PUBLIC}/twilio/status" and sent["delivery_status"] is None
    assert call_back(public_service, twilio_server.report(sid, "sent")).status_code == 204
    assert call_back(public_service, twilio_server.report(sid, "undelivered", 63016)).status_code == 204

    row = next(n for n in notifications(public_service) if n["id"] == sent["id"])
    assert row["status"] == "SUCCESS" and row["delivery_status"] == "undelivered"
    assert row["delivery_error_code"] == 63016 and "24-hour window" in row["delivery_hint"]
    activities = public_service.client.get(f"/incidents/{row['incident_id']}/activities").json()
    [undelivered] = [a for a in activities if a["action"] == "notification_undelivered"]
    assert undelivered["details"]["error_code"] == 63016 and "24-hour window" in undelivered["details"]["hint"]
    assert undelivered["details"]["status"] == "undelivered"


def test_a_forged_or_unsigned_status_callback_is_refused_with_403_and_changes_nothing(
        public_service, twilio_server, db_dsn):
    sent = incident_message(public_service, twilio_server, db_dsn)
    callback = twilio_server.report(sent["provider_message_id"], "failed", 21211)
    forged = call_back(public_service, callback, MessageStatus="delivered")
    assert forged.status_code == 403 and "X-Twilio-Signature" in forged.json()["detail"]
    unsigned = public_service.client.post("/twilio/status", data=callback.form)
    assert unsigned.status_code == 403
    row = next(n for n in notifications(public_service) if n["id"] == sent["id"])
    assert row["delivery_status"] is None
    activities = public_service.client.get(f"/incidents/{row['incident_id']}/activities").json()
    assert "notification_undelivered" not in [a["action"] for a in activities]


def test_without_a_public_url_the_status_is_asked_of_twilio_until_it_is_final(settings, twilio_server, db_dsn):
    service = Service(settings.model_copy(update={"twilio_status_poll_seconds": 0.2})).start()
    try:
        sent = incident_message(service, twilio_server, db_dsn)
        sid = sent["provider_message_id"]
        assert twilio_server.callback_url(sid) is None
        assert twilio_server.report(sid, "failed", 21610) is None
        row = eventually(lambda: next((n for n in notifications(service)
                                       if n["id"] == sent["id"] and n["delivery_status"] == "failed"), None),
                         message="the failed status asked of Twilio")
        assert row["delivery_error_code"] == 21610 and "STOP" in row["delivery_hint"]
        asked = twilio_server.fetches[sid]
        time.sleep(1.5)
        assert twilio_server.fetches[sid] == asked, "a final status is not asked for again"
        initial = next(n for n in notifications(service) if not n["incident_id"])
        assert initial["delivery_status"] == "queued", "a message in flight is asked about, and says so"
    finally:
        service.stop()


def test_a_late_callback_never_moves_a_status_back():
    assert delivery_moves_on(None, "queued") and delivery_moves_on("sent", "delivered")
    assert delivery_moves_on("delivered", "read") and delivery_moves_on("sent", "undelivered")
    assert not delivery_moves_on("delivered", "sent") and not delivery_moves_on("read", "delivered")
    assert not delivery_moves_on("sent", "no-such-status")
