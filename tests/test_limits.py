"""What comes out of an alert query is bounded: result bytes, message sizes and stored incident data."""

from __future__ import annotations

import resource

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
