"""Channels as transports in one registry: the API schema, the outbox and the dispatcher take them from it; each
channel end to end at a real loopback receiver."""

from __future__ import annotations

import psycopg2
import pytest

import notification


def test_the_api_schema_and_health_list_every_registered_channel(service):
    schema = service.client.get("/api/openapi.json").json()["components"]["schemas"]["NotificationChannels"]
    assert list(schema["properties"]) == notification.channel_names()
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
