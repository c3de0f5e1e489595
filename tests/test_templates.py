"""Message templates run in separate processes with time, memory and output limits that hold whatever they do."""

from __future__ import annotations

import resource
import time

import pytest

from tests.conftest import Service, create_orders_table, eventually, execute

# Each is refused by a limit outside Jinja2's own checks, or by one that counts what it would build.
RUNAWAY = [
    ("nested loops over range(1000)",
     "{% for i in range(1000) %}{% for j in range(1000) %}{% for k in range(1000) %}{% endfor %}{% endfor %}"
     "{% endfor %}", "TEMPLATE_TIMEOUT_SECONDS"),
    ("a 1 GB string", "{{ ('x' * 50000) * 20000 }}", "would make 1,000,000,000"),
    ("a memory bomb", "{{ 'x'.zfill(1000000000) }}", "TEMPLATE_MEMORY_MB"),
]
# The sample values at save have the alert name 'Sample': these pass the check and run away when sent.
SLEEPER = "{% if alert.name != 'Sample' %}RUNAWAY{% endif %}ok"


@pytest.fixture
def limited(settings):
    service = Service(settings.model_copy(update={"template_timeout_seconds": 1.0})).start()
    yield service
    service.stop()


def body(name: str, template: str, query: str = "SELECT order_number FROM dc_order") -> dict:
    return {"name": name, "query": query, "schedule": "interval:1h", "message_template": template,
            "notification_channels": {"email": ["ops@example.com"]}}


@pytest.mark.parametrize("template, limit", [(t, limit) for _, t, limit in RUNAWAY], ids=[n for n, _, _ in RUNAWAY])
def test_a_runaway_template_is_a_422_at_save_within_its_limit(limited, db_dsn, template, limit):
    create_orders_table(db_dsn)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    response = limited.client.post("/alert-configs/", json=body("Runaway", template))
    assert response.status_code == 422 and limit in response.text, response.text
    assert time.monotonic() - started < 3.0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 200, f"the service's peak RSS grew by {grown_mb:.0f} MB"
    assert limited.sql("SELECT count(*) AS n FROM alert_config")[0]["n"] == 0


def test_runaway_templates_at_send_go_out_as_the_default_message_and_other_email_is_not_delayed(
        limited, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    execute(db_dsn, "CREATE TABLE stock (sku text, qty int)")
    limited.create_alert(name="Plain", query="SELECT sku FROM stock", notification_channels={"email": ["p@x.co"]})
    smtp_server.wait_for(1)
    for name, template, _ in RUNAWAY:
        response = limited.client.post("/alert-configs/", json=body(name, SLEEPER.replace("RUNAWAY", template)))
        assert response.status_code == 201, response.text

    # While three initial reports render runaway templates, another alert's email still goes out at once.
    committed = time.monotonic()
    execute(db_dsn, "INSERT INTO stock VALUES ('A', 1)")
    plain = eventually(lambda: [m for m in smtp_server.messages if m.rcpt_tos == ["p@x.co"]][1:], timeout=5)[0]
    assert "1 new row" in plain.message["Subject"]
    assert plain.received_at - committed < 1.0, f"took {plain.received_at - committed:.2f}s"

    mails = smtp_server.wait_for(5, timeout=10)
    for name, _, limit in RUNAWAY:
        [mail] = [m for m in mails if name in m.message["Subject"]]
        text = mail.message.get_body(("plain",)).get_content()
        assert "template failed, so this is the default message" in text and limit in text, text


def test_stopping_the_service_kills_a_template_render_in_progress(settings, db_dsn, smtp_server):
    create_orders_table(db_dsn)
    service = Service(settings.model_copy(update={"template_timeout_seconds": 60.0})).start()
    try:
        service.client.post("/alert-configs/", json=body("Loops", SLEEPER.replace("RUNAWAY", RUNAWAY[0][1])))
        time.sleep(1.0)  # its initial report is rendering now
        assert not service.services.scheduler.idle()
    finally:
        started = time.monotonic()
        service.stop()
    assert time.monotonic() - started < 5.0
