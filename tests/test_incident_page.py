"""The incident page a message links to: reached without an API key through a signed link that expires; reading it
changes nothing; acknowledge, resolve and mute are POSTs from its forms, recorded in the timeline "via link"."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import SecretStr

import notification
from tests.conftest import TEST_SECRET_KEY, Service, create_orders_table, insert_orders

BASE = "http://testserver"
API_KEY = "page-test-key-0123456789"


@pytest.fixture
def linked(settings):
    """The service with an API key, incident links to BASE, and times in Europe/Berlin."""
    running = Service(settings.model_copy(update={
        "public_base_url": BASE, "timezone": "Europe/Berlin", "api_key": SecretStr(API_KEY)})).start()
    running.client.headers["X-API-Key"] = API_KEY
    yield running
    running.stop()


def incident_link(service, smtp_server, db_dsn) -> tuple[str, dict]:
    """Fire an alert with two new orders; the page link its email carries (a path), and the incident."""
    create_orders_table(db_dsn)
    service.create_alert(notification_channels={"email": ["ops@example.com"]})
    service.wait_idle()  # the initial report first: the orders below are new rows
    insert_orders(db_dsn, ["ORD1", "ORD2"])
    mail = smtp_server.wait_for(2)[-1].message
    text = mail.get_body(("plain",)).get_content()
    link = re.search(rf"{BASE}(/i/\S+)", text).group(1)
    service.wait_idle()
    [incident] = service.client.get("/incidents/").json()
    assert link.startswith(f"/i/{incident['id']}.")
    assert f'href="{BASE}{link}"' in mail.get_body(("html",)).get_content()
    return link, incident


def actions(service, incident_id) -> list[tuple]:
    """The incident's activities other than its deliveries: action, actor and how it was done."""
    return [(a["action"], a["actor"], a["details"].get("via"))
            for a in service.client.get(f"/incidents/{incident_id}/activities").json() if a["action"] != "notified"]


def anonymous(service):
    """A client of the same app without the API key."""
    client = service.client
    return lambda method, path, headers=None, **kw: client.request(method, path, headers={"X-API-Key": "",
                                                                                          **(headers or {})}, **kw)


def test_the_page_shows_the_incident_without_an_api_key_and_reading_it_changes_nothing(linked, smtp_server, db_dsn):
    link, incident = incident_link(linked, smtp_server, db_dsn)
    call = anonymous(linked)
    assert call("GET", "/incidents/").status_code == 401  # the API itself still needs the key
    page = call("GET", link)
    assert page.status_code == 200 and page.headers["referrer-policy"] == "same-origin"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    text = page.text
    assert ">HIGH</span>" in text and ">Order Monitor</h1>" in text and ">2 new rows</p>" in text
    assert ">ORD1</td>" in text and ">ORD2</td>" in text
    assert 'id="evaluation"' in text and ">triggered</td>" in text  # the evaluation that opened it
    assert "<script" not in text and 'method="post"' in text
    for _ in range(3):
        call("GET", link)
    after = linked.client.get(f"/incidents/{incident['id']}").json()
    assert after["status"] == "ACTIVE"
    assert actions(linked, incident["id"]) == [("created", None, None)]


def test_acknowledge_resolve_and_mute_are_posts_recorded_via_link(linked, smtp_server, db_dsn):
    link, incident = incident_link(linked, smtp_server, db_dsn)
    call = anonymous(linked)
    acknowledged = call("POST", link, data={"action": "acknowledge", "name": "Ana", "comment": "on it"},
                        follow_redirects=False)
    assert acknowledged.status_code == 303 and acknowledged.headers["location"] == f"{link}?done=acknowledged"
    shown = call("GET", acknowledged.headers["location"]).text
    assert "Acknowledged." in shown and "ACKNOWLEDGED by Ana" in shown and "by Ana via link" in shown
    assert "“on it”" in shown
    before = datetime.now(timezone.utc)
    assert call("POST", link, data={"action": "mute", "hours": "8"}, follow_redirects=False).status_code == 303
    alert = linked.client.get(f"/alert-configs/{incident['alert_config_id']}").json()
    until = datetime.fromisoformat(alert["muted_until"])
    assert before + timedelta(hours=8) <= until <= datetime.now(timezone.utc) + timedelta(hours=8)
    assert call("POST", link, data={"action": "resolve"}, follow_redirects=False).status_code == 303
    assert linked.client.get(f"/incidents/{incident['id']}").json()["status"] == "RESOLVED"
    assert actions(linked, incident["id"]) == [
        ("created", None, None), ("acknowledged", "Ana", "link"), ("alert_muted", None, "link"),
        ("resolved", None, "link")]
    details = {a["action"]: a["details"] for a in linked.client.get(f"/incidents/{incident['id']}/activities").json()}
    assert details["acknowledged"]["comment"] == "on it" and details["alert_muted"]["hours"] == 8


@pytest.mark.parametrize("form, message", [
    ({"action": "mute", "hours": "3"}, "Mute for 1, 8 or 24 hours"),
    ({"action": "delete"}, "Unknown action"),
    ({"action": "acknowledge", "name": "x" * 201}, "The name is longer than 200 characters"),
    ({"action": "acknowledge", "comment": "x" * 2001}, "The comment is longer than 2,000 characters"),
])
def test_a_form_the_page_did_not_send_is_refused_with_a_message_and_changes_nothing(
        linked, smtp_server, db_dsn, form, message):
    link, incident = incident_link(linked, smtp_server, db_dsn)
    refused = anonymous(linked)("POST", link, data=form, follow_redirects=False)
    assert refused.status_code == 422 and message in refused.text, refused.text
    assert linked.client.get(f"/incidents/{incident['id']}").json()["status"] == "ACTIVE"
    assert actions(linked, incident["id"]) == [("created", None, None)]


def test_a_forged_altered_or_expired_link_gets_a_plain_403_page_and_changes_nothing(linked, smtp_server, db_dsn):
    link, incident = incident_link(linked, smtp_server, db_dsn)
    call = anonymous(linked)
    token = link.removeprefix("/i/")
    incident_id, expires, signature = token.split(".")
    other_id = "0e9a0f2e-4b8e-4a57-a3a9-e2f0b5d9b0f1"
    forged = [f"{incident_id}.{int(expires) + 3600}.{signature}", f"{other_id}.{expires}.{signature}",
              f"{incident_id}.{expires}.{'A' * len(signature)}", incident_id,
              notification.sign_incident(notification.page_signing_key("not our key"), incident_id, int(expires))]
    key = notification.page_signing_key(TEST_SECRET_KEY)
    expired = notification.sign_incident(key, incident_id, int(datetime.now(timezone.utc).timestamp()) - 1)
    for bad in forged + [expired]:
        for method, form in (("GET", None), ("POST", {"action": "resolve"})):
            refused = call(method, f"/i/{bad}", data=form, follow_redirects=False)
            assert refused.status_code == 403, (bad, refused.text)
            assert ("has expired" if bad == expired else "is not valid") in refused.text
            assert "<script" not in refused.text and incident["alert_name"] not in refused.text
    assert linked.client.get(f"/incidents/{incident['id']}").json()["status"] == "ACTIVE"


def test_a_form_posted_from_another_site_is_refused(linked, smtp_server, db_dsn):
    link, incident = incident_link(linked, smtp_server, db_dsn)
    call = anonymous(linked)
    for origin in ("https://evil.example", "null"):
        refused = call("POST", link, data={"action": "resolve"}, headers={"Origin": origin})
        assert refused.status_code == 403 and "another site" in refused.text
    same = call("POST", link, data={"action": "resolve"}, headers={"Origin": BASE},
                follow_redirects=False)
    assert same.status_code == 303
    assert linked.client.get(f"/incidents/{incident['id']}").json()["status"] == "RESOLVED"


def test_without_secret_key_messages_carry_no_page_link_and_the_page_refuses(settings, smtp_server, db_dsn):
    service = Service(settings.model_copy(update={"public_base_url": BASE, "secret_key": None})).start()
    try:
        create_orders_table(db_dsn)
        service.create_alert(notification_channels={"email": ["ops@example.com"]})
        service.wait_idle()
        insert_orders(db_dsn, ["ORD1"])
        mail = smtp_server.wait_for(2)[-1].message
        assert "/i/" not in mail.get_body(("plain",)).get_content()
        assert "Open the incident" not in mail.get_body(("html",)).get_content()
        refused = service.client.get("/i/0e9a0f2e-4b8e-4a57-a3a9-e2f0b5d9b0f1.9999999999.AAAA")
        assert refused.status_code == 403 and "not enabled" in refused.text
    finally:
        service.stop()


def test_a_dry_run_returns_the_exact_html_and_the_link_that_would_be_sent(linked, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = linked.create_alert(notification_channels={"email": ["ops@example.com"], "sms": ["+14155550123"]})
    linked.wait_idle()
    assert linked.client.put(f"/alert-configs/{alert['id']}/status", params={"status": "INACTIVE"}).status_code == 200
    insert_orders(db_dsn, ["ORD7"])
    [message] = linked.client.post(f"/alert-configs/{alert['id']}/test").json()["messages"]
    assert message["kind"] == "incident" and message["link"].startswith(f"{BASE}/i/")
    assert f'href="{message["link"]}"' in message["email_html"] and ">ORD7</td>" in message["email_html"]
    assert message["email_text"].endswith(f"{message['link']}\nThe link works until "
                                          f"{message['email_text'].rsplit('until ', 1)[1]}")
    assert message["texts"]["sms"].endswith(f"Open: {message['link']}")
    assert message["whatsapp_text"].endswith(f"Open: {message['link']}")
    assert linked.client.get("/incidents/").json() == []  # nothing stored
