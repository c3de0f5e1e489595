"""What comes out of an alert query is bounded: result bytes, message sizes and stored incident data."""

from __future__ import annotations

import resource

from notification import CHAT_MAX_VALUE_CHARS, EMAIL_CELL_MAX_CHARS, EMAIL_MAX_CHARS
from evaluation import INCIDENT_MAX_VALUE_CHARS
from tests.conftest import Service, eventually, execute


def test_a_dry_run_of_a_100_mb_value_is_cut_at_max_result_bytes(service):
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    response = service.client.post("/alert-configs/test", json={
        "name": "Huge", "query": "SELECT repeat('x', 100000000) AS big", "schedule": "interval:1h",
        "notification_channels": {"email": ["ops@example.com"]}})
    assert response.status_code == 200, response.text[:500]
    result = response.json()
    assert result["truncated"] is True and result["row_count"] == 0 and len(response.content) < 100_000
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 400, f"peak RSS grew by {grown_mb:.0f} MB"


def test_a_result_over_max_result_bytes_is_cut_and_the_evaluation_records_it(settings, db_dsn, smtp_server):
    execute(db_dsn, "CREATE TABLE blob (id int, v text)")
    execute(db_dsn, "INSERT INTO blob SELECT i, repeat('x', 1000000) FROM generate_series(1, 5) AS i")
    service = Service(settings.model_copy(update={"max_result_bytes": 2_500_000})).start()
    try:
        alert = service.create_alert(query="SELECT id, v FROM blob ORDER BY id")
        service.wait_idle()
        evaluation = service.client.get(f"/alert-configs/{alert['id']}").json()["last_evaluation"]
        assert evaluation["truncated"] is True and evaluation["row_count"] == 2, evaluation
    finally:
        service.stop()


def test_a_5_mb_value_is_stored_and_sent_cut_to_the_documented_limits(service, smtp_server, twilio_server, db_dsn):
    execute(db_dsn, "CREATE TABLE blob (id int, v text)")
    service.create_alert(query="SELECT id, v FROM blob")
    service.wait_idle()
    execute(db_dsn, "INSERT INTO blob VALUES (1, repeat('x', 5000000))")
    eventually(lambda: service.sql("SELECT count(*) AS n FROM incident WHERE incident_data->>'kind' = 'incident'")
               [0]["n"] == 1, message="the incident")
    service.wait_idle()

    [incident] = service.sql("SELECT incident_data, octet_length(description) + octet_length(incident_data::text) "
                             "AS bytes FROM incident WHERE incident_data->>'kind' = 'incident'")
    value = incident["incident_data"]["new_rows"][0]["v"]
    assert value.startswith("x" * INCIDENT_MAX_VALUE_CHARS) and value.endswith("(cut, 5,000,000 characters in all)")
    assert "rows kept" in incident["incident_data"]["cut"] and incident["bytes"] < 20_000
    for row in service.sql("SELECT channel, octet_length(body) + coalesce(octet_length(html), 0) AS bytes "
                           "FROM notification WHERE kind = 'incident'"):
        assert row["bytes"] < 3 * EMAIL_MAX_CHARS, row
    mail = smtp_server.wait_for(2)[-1].message.get_body(("plain",)).get_content()
    # The email's table cuts a long value with an ellipsis (the incident page shows what the incident kept).
    assert "x" * (EMAIL_CELL_MAX_CHARS - 1) + "…" in mail and "x" * EMAIL_CELL_MAX_CHARS not in mail
    whatsapp = twilio_server.wait_for(2)[-1].body
    assert "x" * (CHAT_MAX_VALUE_CHARS - 1) + "…" in whatsapp and "x" * CHAT_MAX_VALUE_CHARS not in whatsapp


def test_a_result_whose_values_grow_after_the_first_rows_is_cut_without_fetching_it_whole(db_dsn):
    import tracemalloc

    import database

    pool = database.Pool(db_dsn, size=1)
    try:
        tracemalloc.start()
        # Ten one-byte rows first: a batch sized on them alone would next fetch thousands of 50 kB rows at once.
        columns, rows, cut = database.run_query(
            pool, query="SELECT CASE WHEN g <= 10 THEN 'x' ELSE repeat('y', 50000) END AS v "
                        "FROM generate_series(1, 20000) AS g", timeout_seconds=10, max_rows=10_000,
            max_bytes=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pool.close()
    assert cut and 10 < len(rows) <= 30, len(rows)
    assert peak < 10_000_000, f"peak {peak / 1e6:.0f} MB for a 1 MB budget"
