"""The email of every notice kind and the incident page, rendered by headless Chromium: screenshots are kept in
test-artifacts/ and checked for the priority, the headline, the rows and the link; the page acknowledges and mutes
through a real browser session, and refuses a forged link."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
import uvicorn

import api
import notification
import rules
from config import load_settings
from notification import PRIORITY_COLOURS, EmailChannel, Links, render_message
from tests.browser import CHROMIUM, HeadlessChromium
from tests.conftest import TEST_SECRET_KEY, create_orders_table, execute, free_port, wait_for_health
from tests.test_docs_offline import ARTIFACTS, sent_elsewhere

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary on PATH (Debian: apt-get install chromium)")
INCIDENT = "7b0c5d1e-2f3a-4b5c-8d9e-0f1a2b3c4d5e"
NOW = datetime(2026, 11, 27, 16, 15, tzinfo=timezone.utc)
ORDERS = ["order_number", "business_unit", "qty", "amount", "created_at"]


def order(i: int) -> list:
    """An order as a notice carries it (JSON values: the timestamp and the numeric as text)."""
    return [f"ORD{1040 + i}", "Warehouse North" if i % 2 else "Cross-dock Rotterdam (night shift, gate 14)",
            3 + i * 7, f"{129.5 + i * 41.25:.2f}", f"2026-11-27 16:1{i}:49.709144+00:00"]


# Every notice kind, as the rules make them: (kind, priority, notice, the rows the email shows).
NOTICES = {
    "new-rows": ("HIGH", rules.Notice("incident", "3 new rows", ORDERS, [order(i) for i in range(3)],
                                      open_incident=True), 3),
    "threshold-firing": ("CRITICAL", rules.Notice(
        "incident", "qty >= 20 in any row (2 rows)", ORDERS, [order(3), order(4)], open_incident=True,
        detail="Condition met: qty >= 20 in any row."), 2),
    "resolved": ("HIGH", rules.Notice("resolved", "resolved: qty >= 20 in any row no longer holds", ORDERS, [],
                                      detail="The condition no longer holds."), 0),
    "failing": ("MEDIUM", rules.Notice("failing", "alert is failing (3 errors in a row)", [], [],
                                       detail='relation "dc_order" does not exist'), 0),
    "recovered": ("LOW", rules.Notice("recovered", "recovered, the query works again", [], []), 0),
    "digest": ("MEDIUM", rules.Notice("digest", "57 new rows during the cooldown", ORDERS,
                                      [order(i % 10) for i in range(57)], open_incident=True),
                notification.EMAIL_TABLE_ROWS),
}


def page_links() -> Links:
    settings = load_settings(_env_file=None, public_base_url="https://alerts.example.com",
                             secret_key=TEST_SECRET_KEY, timezone="Europe/Berlin")
    return Links.from_settings(settings, now=NOW)


def capture(browser: HeadlessChromium, path: Path, width: int) -> None:
    """A screenshot of the whole page at `width` CSS pixels (a phone is about 390, a mail pane about 700)."""
    browser.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": 100, "deviceScaleFactor": 1,
                                                        "mobile": False})
    height = browser.evaluate("document.documentElement.scrollHeight")
    browser.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                        "mobile": False})
    browser.screenshot(path)


@pytest.fixture
def browser(tmp_path) -> Iterator[HeadlessChromium]:
    """Headless Chromium that can reach loopback only."""
    with HeadlessChromium(tmp_path / "profile", dead_port=free_port(), height=1600) as chromium:
        yield chromium


@needs_chromium
@pytest.mark.parametrize("name", list(NOTICES))
def test_each_notice_kind_renders_as_an_email_with_its_priority_headline_rows_and_link(name, browser):
    priority, notice, rows_shown = NOTICES[name]
    alert = {"id": "3f1c2a4e-8a43-4f7e-9a55-1c2d3e4f5a6b", "name": "Orders at the warehouse", "priority": priority,
             "description": "New orders in dc_order, checked every minute and on every insert.",
             "notification_channels": {"email": ["ops@example.com"]}}
    rendered = render_message(alert=alert, notice=notice, tz="Europe/Berlin")
    links = page_links()
    incident = INCIDENT if notice.open_incident or notice.kind in ("repeat", "resolved") else None
    email = EmailChannel.finish(rendered.texts["email"], alert_id=alert["id"], incident_id=incident, links=links)
    ARTIFACTS.mkdir(exist_ok=True)
    document = ARTIFACTS / f"email-{name}.html"
    document.write_text(email.html)
    (ARTIFACTS / f"email-{name}.txt").write_text(email.body)
    browser.open(document.as_uri())
    browser.wait_for("document.readyState === 'complete' && !!document.querySelector('h1')")
    seen = browser.evaluate("""(() => {
        const badge = document.querySelector('span');
        return {badge: badge.textContent, colour: getComputedStyle(badge).backgroundColor,
                textColour: getComputedStyle(badge).color, name: document.querySelector('h1').textContent,
                headline: document.querySelector('h1').nextElementSibling.textContent,
                rows: document.querySelectorAll('table[role=table] tbody tr').length,
                links: [...document.querySelectorAll('a')].map(a => a.href),
                text: document.body.innerText};
    })()""")
    red, green, blue = (int(PRIORITY_COLOURS[priority][i:i + 2], 16) for i in (1, 3, 5))
    assert seen["badge"] == priority and seen["colour"] == f"rgb({red}, {green}, {blue})"
    assert seen["textColour"] == "rgb(255, 255, 255)"
    assert seen["name"] == alert["name"] and seen["headline"] == notice.headline
    assert seen["rows"] == rows_shown
    if rows_shown:
        assert "2026-11-27 17:10:49 CET" in seen["text"] or "2026-11-27 17:13:49 CET" in seen["text"]
    if incident:
        assert seen["links"] and set(seen["links"]) == {links.page(incident)}
        assert "Open the incident" in seen["text"]
    else:
        assert seen["links"] == [] and "Open the incident" not in seen["text"]
    if name == "digest":
        assert f"… and {57 - rows_shown} more rows" in seen["text"] and len(seen["links"]) == 2
    capture(browser, ARTIFACTS / f"email-{name}.png", 700)
    # On a phone the card narrows and only the rows' table scrolls sideways: the message itself never does.
    browser.call("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 800, "deviceScaleFactor": 1,
                                                        "mobile": True})
    assert browser.evaluate("document.documentElement.scrollWidth") <= 390
    capture(browser, ARTIFACTS / f"email-{name}-phone.png", 390)
    assert (ARTIFACTS / f"email-{name}.png").stat().st_size > 10_000, "the screenshot is blank"
    assert f"[{priority}] {alert['name']}" in email.body and notice.headline in email.body


@pytest.fixture
def live_service(settings, tmp_path) -> Iterator[str]:
    """The whole service behind uvicorn on a loopback port, its links pointing at itself."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    configured = settings.model_copy(update={"public_base_url": url, "timezone": "Europe/Berlin"})
    server = uvicorn.Server(uvicorn.Config(api.create_app(configured, dsn=configured.db_connection.get_secret_value()),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_health(port, "uvicorn")
    yield url
    server.should_exit = True
    thread.join(20)


def call(url: str, method: str = "GET", body: dict | None = None):
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@needs_chromium
def test_the_incident_page_acknowledges_and_mutes_through_a_real_browser_session(
        live_service, browser, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = call(f"{live_service}/alert-configs/", "POST", {
        "name": "Orders at the warehouse", "description": "New orders in dc_order.", "priority": "HIGH",
        "query": "SELECT order_number, business_unit, priority, created_at FROM dc_order ORDER BY order_number",
        "schedule": "interval:1h", "notification_channels": {"email": ["ops@example.com"]}})
    smtp_server.wait_for(1)  # the initial report
    execute(db_dsn, "INSERT INTO dc_order (order_number, business_unit, priority) VALUES ('ORD1041', "
                    "'Warehouse North', 'express'), ('ORD1042', 'Cross-dock Rotterdam', 'standard'), "
                    "('ORD1043', 'Warehouse North', 'express')")
    mail = smtp_server.wait_for(2)[-1].message
    link = re.search(rf"{re.escape(live_service)}/i/\S+", mail.get_body(("plain",)).get_content()).group(0)

    browser.open(link)
    browser.wait_for("!!document.querySelector('#priority')")
    assert browser.evaluate("document.querySelector('#priority').textContent") == "HIGH"
    assert browser.evaluate("document.querySelector('#headline').textContent") == "3 new rows"
    assert browser.evaluate("[...document.querySelectorAll('#rows tbody tr')].map(r => r.cells[0].textContent)") \
        == ["ORD1041", "ORD1042", "ORD1043"]
    assert "CET" in browser.evaluate("document.querySelector('#rows tbody tr').cells[3].textContent")
    ARTIFACTS.mkdir(exist_ok=True)
    capture(browser, ARTIFACTS / "incident-page.png", 900)

    browser.call("Emulation.clearDeviceMetricsOverride")
    browser.evaluate("document.querySelector('#name').value = 'Ana'; "
                     "document.querySelector('#comment').value = 'Looking at gate 14'; "
                     "document.querySelector('#acknowledge').click()")
    browser.wait_for("!!document.querySelector('#done') && location.search === '?done=acknowledged'")
    assert browser.evaluate("document.querySelector('#status').textContent") == "ACKNOWLEDGED by Ana"
    timeline = browser.evaluate("document.querySelector('#timeline').innerText")
    assert "acknowledged by Ana via link" in timeline and "Looking at gate 14" in timeline

    browser.evaluate("document.querySelector('#mute-8').click()")
    browser.wait_for("location.search === '?done=muted' && !!document.querySelector('#muted')")
    muted_until = datetime.fromisoformat(call(f"{live_service}/alert-configs/{alert['id']}")["muted_until"])
    assert timedelta(hours=7, minutes=59) < muted_until - datetime.now(timezone.utc) <= timedelta(hours=8)
    assert "alert muted via link" in browser.evaluate("document.querySelector('#timeline').innerText")
    capture(browser, ARTIFACTS / "incident-page-acknowledged.png", 900)
    [incident] = call(f"{live_service}/incidents/")
    assert incident["status"] == "ACKNOWLEDGED" and incident["acknowledged_by"] == "Ana"
    outside = sent_elsewhere(browser.requests(), live_service)
    assert outside == [], f"the page asked other hosts: {outside}"
    assert len({url for url, _ in browser.requests() if not url.startswith(link)}) == 0  # nothing but the page

    token = link.rsplit("/", 1)[1]
    incident_id, expires, signature = token.split(".")
    browser.open(f"{live_service}/i/{incident_id}.{int(expires) + 86400}.{signature}")
    browser.wait_for("document.title === 'Link refused'")
    assert "not valid" in browser.evaluate("document.body.innerText")
    assert browser.evaluate("document.querySelector('form')") is None
