"""GET /metrics: read with Prometheus' own text parser, the figures move as alerts fire, deliveries fail and queries
break; behind the API key when one is set."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from config import load_settings
from tests.conftest import Service, create_orders_table, eventually, execute, insert_orders

KEY = "metrics-key-0123456789"


def scrape(client, **headers: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of GET /metrics, by name and labels, as Prometheus would parse it."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict, metric: str, /, **labels: str) -> float:
    """One sample's value; a missing series fails the test with the names that exist."""
    key = (metric, frozenset(labels.items()))
    assert key in samples, f"{metric}{labels} not in {sorted({n for n, _ in samples})}"
    return samples[key]


def total(samples: dict, metric: str, /, **labels: str) -> float:
    """The sum of a metric's samples whose labels include these."""
    wanted = set(labels.items())
    return sum(v for (n, l), v in samples.items() if n == metric and wanted <= l)


def test_figures_move_as_an_alert_fires_and_resolves(service, db_dsn):
    create_orders_table(db_dsn)
    before = scrape(service.client)
    assert value(before, "alert_service_evaluations_total", cause="initial", outcome="no_change") == 0
    assert value(before, "alert_service_database_up") == 1

    service.create_alert(name="Any order", query="SELECT order_number FROM dc_order", trigger_condition="not_empty",
                         priority="CRITICAL")
    service.wait_idle()
    created = scrape(service.client)
    assert value(created, "alert_service_evaluations_total", cause="initial", outcome="no_change") == 1
    assert value(created, "alert_service_alerts", state="ok") == 1
    assert value(created, "alert_service_alerts", state="firing") == 0
    # The initial report: one email and one WhatsApp message.
    assert value(created, "alert_service_notifications_total", channel="email", status="success") == 1
    assert value(created, "alert_service_notifications_total", channel="whatsapp", status="success") == 1
    assert value(created, "alert_service_send_duration_seconds_count", channel="email") == 1
    default_source = str(service.sql("SELECT id FROM data_source WHERE is_default")[0]["id"])
    assert value(created, "alert_service_listener_connected", data_source_id=default_source) == 1
    assert value(created, "alert_service_data_source_info", data_source_id=default_source, name="default") == 1

    insert_orders(db_dsn, ["ORD1"])
    eventually(lambda: value(scrape(service.client), "alert_service_alerts", state="firing") == 1,
               message="the alert to be counted as firing")
    service.wait_idle()
    fired = scrape(service.client)
    assert value(fired, "alert_service_evaluations_total", cause="event", outcome="triggered") == 1
    assert value(fired, "alert_service_alerts", state="ok") == 0
    assert value(fired, "alert_service_incidents_open", priority="CRITICAL", status="active") == 1
    assert value(fired, "alert_service_notifications_total", channel="email", status="success") == 2
    assert value(fired, "alert_service_notifications_total", channel="whatsapp", status="success") == 2
    assert value(fired, "alert_service_evaluation_duration_seconds_count") == 2
    # The event's evaluation answered a commit: its lag is measured, and well under a minute.
    assert value(fired, "alert_service_commit_to_evaluation_seconds_count") == 1
    assert value(fired, "alert_service_commit_to_evaluation_seconds_bucket", le="60.0") == 1
    assert value(fired, "alert_service_outbox_messages", channel="email", status="pending") == 0

    execute(db_dsn, "DELETE FROM dc_order")
    eventually(lambda: value(scrape(service.client), "alert_service_alerts", state="ok") == 1,
               message="the alert to be counted as ok again")
    resolved = scrape(service.client)
    assert value(resolved, "alert_service_evaluations_total", cause="event", outcome="resolved") == 1
    assert value(resolved, "alert_service_alerts", state="firing") == 0

    # Prometheus asks for OpenMetrics first.
    openmetrics = service.client.get("/metrics", headers={
        "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n") and "alert_service_evaluations_total" in openmetrics.text


def test_failed_sends_a_waiting_outbox_and_a_failing_query_are_reported(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    smtp_server.stop()
    service.create_alert(name="Orders", notification_channels={"email": ["ops@example.com"]})
    eventually(lambda: value(scrape(service.client), "alert_service_notifications_total",
                             channel="email", status="retry") >= 1, message="a failed email counted as retry")
    waiting = scrape(service.client)
    assert total(waiting, "alert_service_outbox_messages", channel="email") == 1
    assert value(waiting, "alert_service_outbox_oldest_message_age_seconds", channel="email") > 0
    assert value(waiting, "alert_service_outbox_oldest_message_age_seconds", channel="whatsapp") == 0
    assert value(waiting, "alert_service_send_duration_seconds_count", channel="email") >= 1

    # Compiles, and fails each time it runs.
    service.create_alert(name="Broken", query="SELECT 1 / (count(*) - count(*)) AS ratio FROM dc_order",
                         notification_channels={"whatsapp": ["+14155550123"]})
    eventually(lambda: value(scrape(service.client), "alert_service_alerts", state="error") == 1,
               message="the failing alert to be counted in state error")
    broken = scrape(service.client)
    assert value(broken, "alert_service_evaluations_total", cause="initial", outcome="error") == 1

    smtp_server.start()
    eventually(lambda: value(scrape(service.client), "alert_service_notifications_total",
                             channel="email", status="success") == 1, message="the email sent once SMTP is back")
    assert total(scrape(service.client), "alert_service_outbox_messages", channel="email") == 0


@pytest.fixture
def secured(settings):
    running = Service(settings.model_copy(update={"api_key": load_settings(_env_file=None, api_key=KEY).api_key}))
    running.start()
    yield running
    running.stop()


def test_metrics_need_the_api_key_which_prometheus_sends_as_a_bearer_token(secured):
    client = secured.client
    refused = client.get("/metrics")
    assert refused.status_code == 401 and "API key" in refused.json()["detail"]
    assert "alert_service" not in refused.text
    assert client.get("/metrics", headers={"Authorization": "Bearer not-the-key-at-all"}).status_code == 401
    assert value(scrape(client, Authorization=f"Bearer {KEY}"), "alert_service_database_up") == 1
    assert value(scrape(client, **{"X-API-Key": KEY}), "alert_service_database_up") == 1
