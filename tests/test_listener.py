"""The LISTEN connection: losing it loses no alert."""

from __future__ import annotations

import psycopg2

from tests.conftest import create_orders_table, eventually, insert_orders




def test_rows_committed_while_the_listener_reconnects_are_alerted(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    service.create_alert(notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    source_id = next(iter(service.services.scheduler.listener_states))

    conn = psycopg2.connect(db_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        # Kill the listener, and commit a row before it can be back: its NOTIFY reaches no one.
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'alert-service-listener'")
        assert cur.rowcount == 1
        cur.execute("INSERT INTO dc_order (order_number) VALUES ('ORD-DURING-RECONNECT')")
    conn.close()

    mail = smtp_server.wait_for(2, timeout=15)[1]
    assert "ORD-DURING-RECONNECT" in mail.message.get_body(("plain",)).get_content()
    state = service.services.scheduler.listener_states[source_id]
    eventually(lambda: state.connected and state.reconnects >= 1, message="listener reconnected")
    insert_orders(db_dsn, ["ORD-AFTER"])
    assert "ORD-AFTER" in smtp_server.wait_for(3)[2].message.get_body(("plain",)).get_content()
    service.wait_idle()
    assert len(smtp_server.messages) == 3
