"""Messages a person acts on: the email's layout and plain text, times in TIMEZONE, signed links to the incident
page, and the short texts of WhatsApp and SMS."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from decimal import Decimal

import pytest

import notification
import rules
from config import ConfigError, load_settings
from notification import (EMAIL_CELL_MAX_CHARS, PRIORITY_COLOURS, EmailChannel, Links, LinkRefused,
                          page_signing_key, render_message, sign_incident, verify_incident)
from tests.conftest import TEST_SECRET_KEY

ALERT = {"id": "5d7c3f0e-0000-4000-8000-000000000001", "name": "Orders", "priority": "HIGH",
         "description": "New orders in dc_order", "notification_channels": {"email": ["ops@example.com"]}}
INCIDENT = "0e9a0f2e-4b8e-4a57-a3a9-e2f0b5d9b0f1"
WHEN = datetime(2026, 11, 27, 16, 11, 49, 709144, tzinfo=timezone.utc)


def links(**settings) -> Links:
    configured = load_settings(**{"_env_file": None, "public_base_url": "https://alerts.example.com",
                                  "secret_key": TEST_SECRET_KEY, **settings})
    return Links.from_settings(configured, now=WHEN)


def luminance(colour: str) -> float:
    channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def test_every_priority_badge_keeps_white_text_readable_on_a_light_or_a_dark_page():
    assert set(PRIORITY_COLOURS) == {"LOW", "MEDIUM", "HIGH", "CRITICAL"}
    for priority, colour in PRIORITY_COLOURS.items():
        assert (1.05) / (luminance(colour) + 0.05) >= 4.5, priority  # WCAG AA for white text on the badge


def test_the_email_table_right_aligns_numbers_shows_times_in_the_timezone_and_cuts_long_values():
    notice = rules.Notice("incident", "1 new row", ["order_number", "qty", "price", "created_at", "note"],
                          [["ORD1", 3, Decimal("9.50"), WHEN, "y" * 500]], open_incident=True)
    message = render_message(alert=ALERT, notice=notice, tz="Europe/Berlin")
    assert "2026-11-27 17:11:49 CET" in message.text and "16:11:49.709144" not in message.text
    assert "2026-11-27 17:11:49 CET" in message.html
    assert re.search(r'<td align="right"[^>]*>3</td>', message.html)
    assert re.search(r'<td align="right"[^>]*>9.50</td>', message.html)
    assert re.search(r'<td align="left"[^>]*>ORD1</td>', message.html)
    assert "y" * (EMAIL_CELL_MAX_CHARS - 1) + "…" in message.html and "y" * EMAIL_CELL_MAX_CHARS not in message.html
    lines = message.text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("order_number"))
    heading, row = lines[header], lines[header + 2]
    assert row.index(" 9.50 ") + 5 == heading.index("price") + 5  # numbers end where their column's heading does


def test_the_email_opens_with_the_priority_the_alert_and_what_happened_in_html_and_plain_text():
    notice = rules.Notice("incident", "3 new rows", ["n"], [["a"], ["b"], ["c"]], open_incident=True)
    message = render_message(alert=ALERT, notice=notice)
    assert message.text.startswith("[HIGH] Orders\nFiring: 3 new rows\n")
    assert f"background:{PRIORITY_COLOURS['HIGH']};color:#ffffff" in message.html
    assert message.html.index(">HIGH</span>") < message.html.index(">Orders</h1>") < message.html.index(">3 new rows</p>")
    assert '<meta name="color-scheme" content="light dark">' in message.html
    assert "<style" not in message.html and "<link" not in message.html  # inline CSS only


def test_the_email_says_how_many_rows_it_leaves_out_and_links_them_to_the_incident_page():
    rows = [[f"ORD{i}"] for i in range(notification.EMAIL_TABLE_ROWS + 7)]
    rendered = render_message(alert=ALERT, notice=rules.Notice("incident", "57 new rows", ["n"], rows,
                                                               open_incident=True))
    assert "… and 7 more rows" in rendered.text
    finished = EmailChannel.finish(rendered.texts["email"], alert_id=ALERT["id"], incident_id=INCIDENT,
                                   links=links(timezone="Europe/Berlin"))
    page = links().page(INCIDENT)
    assert page.startswith(f"https://alerts.example.com/i/{INCIDENT}.")
    assert f"Open the incident (acknowledge, resolve, mute): {page}" in finished.body
    assert finished.html.count(f'href="{page}"') == 2  # "see them all" and the button
    assert "%%" not in finished.html and "until 2026-12-04 17:11 CET" in finished.html


def test_without_public_base_url_or_secret_key_the_email_has_no_link_and_no_empty_block():
    rendered = render_message(alert=ALERT, notice=rules.Notice("incident", "1 new row", ["n"], [["a"]],
                                                               open_incident=True))
    for plain in (Links(), Links(base_url="https://alerts.example.com")):
        finished = EmailChannel.finish(rendered.texts["email"], alert_id=ALERT["id"], incident_id=INCIDENT,
                                       links=plain)
        assert "Open the incident" not in finished.html and "%%" not in finished.html
        assert "http" not in finished.body


def test_an_unknown_timezone_stops_start_up_naming_the_variable():
    with pytest.raises(ConfigError, match="TIMEZONE: .*'Mars/Olympus' is not an IANA time zone"):
        load_settings(_env_file=None, timezone="Mars/Olympus")


def test_a_page_link_is_refused_when_altered_signed_with_another_key_or_expired():
    key = page_signing_key(TEST_SECRET_KEY)
    token = sign_incident(key, INCIDENT, 2_000_000_000)
    assert str(verify_incident(key, token, now=1_900_000_000)) == INCIDENT
    incident, expires, signature = token.split(".")
    altered = [f"{incident}.{int(expires) + 1}.{signature}", f"{incident[:-1]}0.{expires}.{signature}",
               f"{incident}.{expires}.{signature[:-1]}A", token + ".x", "nonsense", f"{incident}.{expires}."]
    for forged in altered:
        with pytest.raises(LinkRefused, match="not valid"):
            verify_incident(key, forged, now=1_900_000_000)
    with pytest.raises(LinkRefused, match="not valid"):
        verify_incident(page_signing_key("another key"), token, now=1_900_000_000)
    with pytest.raises(LinkRefused, match="expired") as refused:
        verify_incident(key, token, now=2_000_000_001)
    assert refused.value.expired


def test_whatsapp_and_sms_carry_the_headline_the_first_rows_and_the_incident_link():
    rows = [[f"ORD{i}", "2026-11-27 16:11:49.709144+00:00"] for i in range(12)]
    notice = rules.Notice("incident", "12 new rows", ["order_number", "created_at"], rows, open_incident=True)
    rendered = render_message(alert={**ALERT, "notification_channels": {"sms": ["+14155550123"]}}, notice=notice,
                              tz="Europe/Berlin")
    page = links().page(INCIDENT)
    for name in ("whatsapp", "sms"):
        body = notification.TRANSPORTS[name].finish(rendered.texts[name], alert_id=ALERT["id"], incident_id=INCIDENT,
                                                    links=links()).body
        assert "[HIGH] Orders: 12 new rows" in body.splitlines()[0]
        assert "• order_number=ORD0, created_at=2026-11-27 17:11:49 CET" in body
        assert "ORD4" in body and "ORD5" not in body and "… and 7 more rows" in body
        assert body.endswith(f"\nOpen: {page}") and len(body) <= 1600


def test_a_long_text_message_keeps_its_link_whole():
    notice = rules.Notice("incident", "1 new row", ["n"], [["ORD1"]], open_incident=True,
                          detail="Condition met: " + "z" * 1500)
    rendered = render_message(alert=ALERT, notice=notice)
    long_base = links(public_base_url="https://alerts.example.com/" + "p" * 300)
    body = notification.WhatsAppChannel.finish(rendered.texts["whatsapp"], alert_id=ALERT["id"],
                                               incident_id=INCIDENT, links=long_base).body
    assert len(body) <= 1600 and body.endswith(long_base.page(INCIDENT)) and "message cut" in body


def test_an_email_from_the_alerts_own_template_still_links_to_the_incident_page():
    notice = rules.Notice("incident", "1 new row", ["sku"], [["A"]], open_incident=True)
    rendered = render_message(alert={**ALERT, "message_template": "Low stock: {{ rows[0].sku }}"}, notice=notice)
    finished = EmailChannel.finish(rendered.texts["email"], alert_id=ALERT["id"], incident_id=INCIDENT,
                                   links=links())
    assert "Low stock: A" in finished.html and f'href="{links().page(INCIDENT)}"' in finished.html
    assert finished.body.startswith("Low stock: A") and links().page(INCIDENT) in finished.body
    bare = EmailChannel.finish(rendered.texts["email"], alert_id=ALERT["id"], incident_id=INCIDENT, links=Links())
    assert "Open the incident" not in bare.html and "%%" not in bare.html


def test_a_whatsapp_template_carries_the_incident_link_in_the_variable_mapped_to_it():
    alert = {**ALERT, "whatsapp_template": {"content_sid": "HX" + "0" * 32,
                                            "variables": {"1": "alert_name", "2": "incident_link"}}}
    notice = rules.Notice("incident", "1 new row", ["n"], [["a"]], open_incident=True)
    text = render_message(alert=alert, notice=notice).texts["whatsapp"]
    linked = notification.WhatsAppChannel.finish(text, alert_id=ALERT["id"], incident_id=INCIDENT, links=links())
    assert linked.template["variables"] == {"1": "Orders", "2": links().page(INCIDENT)}
    assert linked.body.endswith(links().page(INCIDENT))
    bare = notification.WhatsAppChannel.finish(text, alert_id=ALERT["id"], incident_id=None, links=links())
    assert bare.template["variables"] == {"1": "Orders", "2": "-"}
