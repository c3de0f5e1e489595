"""Channels as transports in one registry: the API schema, the outbox and the dispatcher take them from it; each
channel end to end at a real loopback receiver."""

from __future__ import annotations

import json
import re

import psycopg2
import pytest
from pydantic import SecretStr

import notification
from config import ConfigError, load_settings
from notification import classify_http
from tests.conftest import TWILIO_FROM, Service, create_orders_table, eventually, insert_orders
from tests.servers import SlackReceiver, WebhookReceiver


def test_the_api_schema_and_health_list_every_registered_channel(service):
    schemas = service.client.get("/api/openapi.json").json()["components"]["schemas"]
    schema = schemas.get("NotificationChannels") or schemas["NotificationChannels-Input"]
    assert list(schema["properties"]) == [*notification.channel_names(), "users", "teams", "user_channels"]
    health = service.client.get("/health").json()
    assert set(health["channels"]) == set(notification.channel_names())


def test_the_outbox_accepts_the_registered_channels_and_refuses_any_other(service):
    queued = "INSERT INTO notification (kind, channel, recipient, body) VALUES ('incident', %s, 'r', 'b')"
    for name in notification.channel_names():
        service.sql(queued, (name,))
    with pytest.raises(psycopg2.errors.CheckViolation):
        service.sql(queued, ("pager",))


def test_a_restart_leaves_the_outbox_constraint_alone_when_the_channels_are_the_same(service):
    def constraint() -> list[dict]:
        return service.sql("SELECT oid, obj_description(oid, 'pg_constraint') AS channels FROM pg_constraint "
                           "WHERE conname = 'notification_channel_check'")
    before = constraint()
    service.restart()
    assert constraint() == before and before[0]["channels"] == ",".join(sorted(notification.channel_names()))


SECRET = "whsec-0123456789abcdef"
PUBLIC = "https://alerts.example.com"


@pytest.fixture
def receiver():
    """A webhook receiver on loopback that checks the signature with SECRET."""
    with WebhookReceiver(SECRET) as server:
        yield server


@pytest.fixture
def slack():
    """A Slack-compatible incoming webhook on loopback."""
    with SlackReceiver() as server:
        yield server


@pytest.fixture
def web_service(settings):
    """The service with webhooks signed and links pointing at PUBLIC."""
    running = Service(settings.model_copy(update={"webhook_signing_secret": SecretStr(SECRET),
                                                  "public_base_url": PUBLIC})).start()
    yield running
    running.stop()


def notifications(service, **filters) -> list[dict]:
    return service.client.get("/notifications/", params=filters).json()


def test_a_webhook_carries_the_documented_body_signed_so_its_receiver_can_verify_it(web_service, receiver, db_dsn):
    create_orders_table(db_dsn)
    insert_orders(db_dsn, ["ORD1"])
    alert = web_service.create_alert(notification_channels={"webhook": [receiver.url()]})
    initial = receiver.wait_for(1)[0]
    assert initial.json()["kind"] == "initial_report" and initial.json()["rows"] == [["ORD1"]]
    insert_orders(db_dsn, ["ORD2", "ORD3"])
    post = receiver.wait_for(2)[1]
    body = post.json()
    assert body["kind"] == "incident" and body["columns"] == ["order_number"]
    assert body["rows"] == [["ORD2"], ["ORD3"]] and body["row_count"] == 2 and body["rows_omitted"] == 0
    assert body["alert"] == {"id": alert["id"], "name": "Order Monitor", "priority": "HIGH",
                             "description": "Monitor new orders"}
    incident_id = body["incident"]["id"]
    assert body["links"]["incident"] == f"{PUBLIC}/incidents/{incident_id}"
    web_service.wait_idle()
    sent = notifications(web_service, incident_id=incident_id)[0]
    assert sent["status"] == "SUCCESS" and post.headers["X-Alert-Delivery"] == sent["id"]


def test_a_webhook_receiver_with_another_secret_refuses_it_and_the_message_fails_for_good(web_service, db_dsn):
    create_orders_table(db_dsn)
    with WebhookReceiver("not-the-service-secret") as stranger:
        web_service.create_alert(notification_channels={"webhook": [stranger.url()]})
        failed = eventually(lambda: notifications(web_service, status="FAILED"), message="webhook FAILED")[0]
        assert stranger.posts[0].answered_status == 401 and stranger.accepted == []
    assert failed["attempts"] == 1 and "HTTP 401" in failed["error"]


def test_a_webhook_answered_503_with_retry_after_is_sent_again_after_it(web_service, receiver, db_dsn):
    create_orders_table(db_dsn)
    receiver.script(503, "busy", retry_after="1")
    web_service.create_alert(notification_channels={"webhook": [receiver.url()]})
    receiver.wait_for(1, timeout=15)
    first, second = receiver.posts[:2]
    assert first.answered_status == 503 and second.answered_status == 200
    assert first.headers["X-Alert-Delivery"] == second.headers["X-Alert-Delivery"]
    web_service.wait_idle()
    assert notifications(web_service)[0]["attempts"] == 2


def test_a_slack_message_has_a_header_a_table_and_a_line_for_the_rows_over_slacks_limits(web_service, slack, db_dsn):
    create_orders_table(db_dsn)
    web_service.create_alert(notification_channels={"slack": [slack.url("/services/T0/B0/secret-token")]})
    slack.wait_for(1)  # the initial report: rows inserted before it would be in it, not in an incident
    insert_orders(db_dsn, [f"ORD{i:04d}-{'x' * 40}" for i in range(500)])
    payload = slack.wait_for(2)[1].json()
    header, _, table, more, link = payload["blocks"]
    assert header["type"] == "header" and "500 new rows" in header["text"]["text"]
    assert table["text"]["text"].startswith("```order_number") and "ORD0000" in table["text"]["text"]
    shown = table["text"]["text"].count("ORD")
    assert more["elements"][0]["text"] == f"… and {500 - shown} more rows" and 10 < shown < 500
    assert link["elements"][0]["text"].startswith(f"<{PUBLIC}/incidents/")
    web_service.wait_idle()
    activities = web_service.sql("SELECT details FROM activity WHERE action = 'notified'")
    assert activities and all("secret-token" not in str(a["details"]) for a in activities)


def test_a_slack_url_that_slack_no_longer_knows_fails_at_once(web_service, slack, db_dsn):
    create_orders_table(db_dsn)
    slack.script(404, "channel_not_found")
    web_service.create_alert(notification_channels={"slack": [slack.url()]})
    failed = eventually(lambda: notifications(web_service, status="FAILED"), message="Slack FAILED")[0]
    assert failed["attempts"] == 1 and "channel_not_found" in failed["error"]


def test_an_sms_goes_through_the_same_twilio_account_to_the_bare_number(web_service, twilio_server, db_dsn):
    create_orders_table(db_dsn)
    insert_orders(db_dsn, ["ORD1"])
    web_service.create_alert(notification_channels={"sms": ["+14155550199"]})
    sms = twilio_server.wait_for(1)[0]
    assert sms.to == "+14155550199" and sms.from_ == TWILIO_FROM
    assert sms.body.startswith("[HIGH] Order Monitor: initial report") and "ORD1" in sms.body


def test_recipients_that_are_not_urls_or_numbers_are_refused_with_why(service):
    for channels, reason in (({"webhook": ["ftp://example.com/x"]}, "http:// or https://"),
                             ({"slack": ["hooks.slack.com/services/x"]}, "http:// or https://"),
                             ({"sms": ["0044 20 1234"]}, "E.164")):
        response = service.client.post("/alert-configs/", json={
            "name": "x", "query": "SELECT 1", "schedule": "interval:1h", "notification_channels": channels})
        assert response.status_code == 422 and reason in response.text, response.text


@pytest.mark.parametrize("status, permanent", [(500, False), (503, False), (429, False), (408, False),
                                               (400, True), (404, True), (410, True), (301, True)])
def test_http_answers_are_classified_as_permanent_or_temporary(status, permanent):
    error = classify_http(status, retry_after=5.0, reason="why")
    assert error.permanent is permanent and (permanent or error.retry_after == 5.0)
    assert classify_http(204, retry_after=None, reason="") is None


TEMPLATE = {"content_sid": "HX" + "0123456789abcdef" * 2,
            "variables": {"1": "alert_name", "2": "row_count", "3": "first_rows"}}


def test_an_alert_with_a_whatsapp_template_sends_it_with_its_variables_and_email_as_before(
        service, twilio_server, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(whatsapp_template=TEMPLATE)
    assert alert["whatsapp_template"] == TEMPLATE
    twilio_server.wait_for(1)
    insert_orders(db_dsn, ["ORD1", "ORD2\nwith\ta   break"])
    sent = twilio_server.wait_for(2)[1]
    assert sent.content_sid == TEMPLATE["content_sid"] and sent.body == ""
    assert json.loads(sent.content_variables) == {
        "1": "Order Monitor", "2": "2", "3": "order_number=ORD1; order_number=ORD2 with a break"}
    assert "ORD2" in smtp_server.wait_for(2)[1].message.get_body(("plain",)).get_content()


def test_a_dry_run_shows_the_template_variables_that_would_be_sent(service, db_dsn):
    create_orders_table(db_dsn)
    insert_orders(db_dsn, ["ORD1"])
    preview = service.client.post("/alert-configs/test", json={
        "name": "Orders", "query": "SELECT order_number FROM dc_order", "schedule": "interval:1h",
        "notification_channels": {"whatsapp": ["+14155550123"]}, "whatsapp_template": TEMPLATE}).json()
    assert preview["messages"][0]["whatsapp_template"] == {
        "content_sid": TEMPLATE["content_sid"], "variables": {"1": "Orders", "2": "1", "3": "order_number=ORD1"}}


@pytest.mark.parametrize("template, reason", [
    ({"content_sid": "not-a-sid"}, "content_sid"),
    ({"content_sid": TEMPLATE["content_sid"], "variables": {"1": "password"}}, "alert_name"),
])
def test_a_whatsapp_template_that_cannot_be_sent_is_refused_with_why(service, template, reason):
    response = service.client.post("/alert-configs/", json={
        "name": "x", "query": "SELECT 1", "schedule": "interval:1h",
        "notification_channels": {"whatsapp": ["+14155550123"]}, "whatsapp_template": template})
    assert response.status_code == 422 and reason in response.text, response.text


def test_users_and_teams_are_reached_at_the_addresses_they_have_when_a_message_is_queued(
        service, smtp_server, twilio_server, db_dsn):
    create_orders_table(db_dsn)
    team = service.client.post("/teams/", json={"name": "Warehouse"}).json()
    member = service.client.post("/users/", json={"name": "Ada", "email": "ada@example.com", "phone": "+14155550101",
                                                  "team_id": team["id"]}).json()
    lone = service.client.post("/users/", json={"name": "Bo", "email": "bo@example.com"}).json()
    alert = service.create_alert(notification_channels={"teams": [team["id"]], "users": [lone["id"]],
                                                        "user_channels": ["email", "sms"]})
    assert alert["notification_channels"]["teams"] == [team["id"]]
    first = smtp_server.wait_for(2)
    assert sorted(mail.rcpt_tos[0] for mail in first) == ["ada@example.com", "bo@example.com"]
    assert [sms.to for sms in twilio_server.wait_for(1)] == ["+14155550101"]  # Bo has no phone
    service.wait_idle()

    changed = service.client.put(f"/users/{member['id']}", json={
        "name": "Ada", "email": "ada@new.example", "phone": "+14155550101", "team_id": team["id"]})
    assert changed.status_code == 200, changed.text
    insert_orders(db_dsn, ["ORD1"])
    later = smtp_server.wait_for(4)[2:]
    assert sorted(mail.rcpt_tos[0] for mail in later) == ["ada@new.example", "bo@example.com"]


def test_an_alert_naming_a_user_that_does_not_exist_is_refused_with_which(service):
    ghost = "0b9f1f6e-4d1c-4f7a-8f0e-2a3b4c5d6e7f"
    response = service.client.post("/alert-configs/", json={
        "name": "x", "query": "SELECT 1", "schedule": "interval:1h", "notification_channels": {"users": [ghost]}})
    assert response.status_code == 422 and f"user {ghost} does not exist" in response.text, response.text


@pytest.mark.parametrize("setting, value, reason", [
    ("public_base_url", "alerts.example.com", "PUBLIC_BASE_URL"),
    ("public_base_url", "https://alerts.example.com/?x=1", "without a query"),
    ("webhook_signing_secret", "short", "WEBHOOK_SIGNING_SECRET: Value error, must be at least 16 characters"),
    ("twilio_sms_from_number", "0044 20 1234", "TWILIO_SMS_FROM_NUMBER"),
])
def test_channel_settings_that_cannot_work_stop_start_up_naming_the_variable(setting, value, reason):
    with pytest.raises(ConfigError, match=re.escape(reason)):
        load_settings(_env_file=None, **{setting: value})
