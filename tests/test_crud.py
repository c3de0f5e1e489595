"""Changing and removing data sources, teams and users through the API, against the real servers."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import psycopg2
import pytest

import database

from tests.conftest import (_new_database, create_orders_table, drop_database, dsn_with, eventually, free_port,
                            insert_orders)


@pytest.fixture
def other_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A second fresh database without the service's schema."""
    name = _new_database(pg_admin_dsn)
    yield dsn_with(pg_admin_dsn, dbname=name)
    drop_database(pg_admin_dsn, name)


def add_source(service, name: str, dsn: str) -> dict:
    response = service.client.post("/data-sources/", json={"name": name, "dsn": dsn, "allow_privileged_role": True})
    assert response.status_code == 201, response.text
    return response.json()


def emails_with(smtp_server, text: str) -> list:
    return [m for m in smtp_server.messages if text in m.message.get_body(("plain",)).get_content()]


def test_a_team_is_renamed_and_deleted_and_its_users_stay_without_a_team(service):
    team = service.client.post("/teams/", json={"name": "night"}).json()
    service.client.post("/teams/", json={"name": "day"})
    user = service.client.post("/users/", json={"name": "Ada", "email": "ada@example.com", "team_id": team["id"]})

    renamed = service.client.put(f"/teams/{team['id']}", json={"name": "nights", "description": "22-06"})

    assert renamed.status_code == 200 and renamed.json()["name"] == "nights"
    assert renamed.json()["description"] == "22-06" and renamed.json()["created_at"] == team["created_at"]
    conflict = service.client.put(f"/teams/{team['id']}", json={"name": "day"})
    assert conflict.status_code == 409 and "day" in conflict.json()["detail"]
    assert service.client.put(f"/teams/{team['id']}", json={"name": ""}).status_code == 422
    assert service.client.get(f"/teams/{team['id']}").json()["name"] == "nights", "a refused change stores nothing"
    missing = "00000000-0000-4000-8000-000000000000"
    assert service.client.put(f"/teams/{missing}", json={"name": "x"}).status_code == 404
    assert service.client.delete(f"/teams/{missing}").status_code == 404

    assert service.client.delete(f"/teams/{team['id']}").status_code == 204

    assert service.client.get(f"/teams/{team['id']}").status_code == 404
    assert service.client.get(f"/users/{user.json()['id']}").json()["team_id"] is None


def test_a_user_is_changed_and_deleted_and_the_alerts_they_created_stay(service, db_dsn):
    create_orders_table(db_dsn)
    ada = service.client.post("/users/", json={"name": "Ada", "email": "ada@example.com"}).json()
    service.client.post("/users/", json={"name": "Bob", "email": "bob@example.com"})
    team = service.client.post("/teams/", json={"name": "night"}).json()
    alert = service.create_alert(created_by=ada["id"])

    changed = service.client.put(f"/users/{ada['id']}", json={"name": "Ada L.", "email": "ada.l@example.com",
                                                               "phone": "+14155550100", "team_id": team["id"]})

    assert changed.status_code == 200
    assert {k: changed.json()[k] for k in ("name", "email", "phone", "team_id")} == {
        "name": "Ada L.", "email": "ada.l@example.com", "phone": "+14155550100", "team_id": team["id"]}
    taken = service.client.put(f"/users/{ada['id']}", json={"name": "Ada", "email": "bob@example.com"})
    assert taken.status_code == 409 and "bob@example.com" in taken.json()["detail"]
    no_team = service.client.put(f"/users/{ada['id']}", json={"name": "Ada", "email": "ada@example.com",
                                                               "team_id": "00000000-0000-4000-8000-000000000000"})
    assert no_team.status_code == 422 and no_team.json()["detail"][0]["loc"] == ["body", "team_id"]
    bad_phone = service.client.put(f"/users/{ada['id']}", json={"name": "Ada", "email": "ada@example.com",
                                                                 "phone": "12"})
    assert bad_phone.status_code == 422
    assert service.client.get(f"/users/{ada['id']}").json()["email"] == "ada.l@example.com"

    assert service.client.delete(f"/users/{ada['id']}").status_code == 204

    assert service.client.get(f"/users/{ada['id']}").status_code == 404
    assert service.client.get(f"/alert-configs/{alert['id']}").json()["created_by"] is None


def test_a_data_source_in_use_is_not_deleted_and_the_default_one_never(service, smtp_server, other_dsn):
    create_orders_table(other_dsn)
    source = add_source(service, "warehouse", other_dsn)
    service.create_alert(data_source_id=source["id"])
    smtp_server.wait_for(1)

    refused = service.client.delete(f"/data-sources/{source['id']}")

    assert refused.status_code == 409 and "1 alert(s) use data source warehouse" in refused.json()["detail"]
    assert "move_alerts_to" in refused.json()["detail"]
    assert service.client.get(f"/data-sources/{source['id']}").status_code == 200
    default = service.client.get("/data-sources/").json()[0]
    assert service.client.delete(f"/data-sources/{default['id']}").status_code == 409
    assert service.client.put(f"/data-sources/{default['id']}", json={"name": "x", "host": "h"}).status_code == 409
    nowhere = service.client.delete(f"/data-sources/{source['id']}",
                                    params={"move_alerts_to": "00000000-0000-4000-8000-000000000000"})
    assert nowhere.status_code == 422 and nowhere.json()["detail"][0]["loc"] == ["query", "move_alerts_to"]
    assert service.client.delete(f"/data-sources/{source['id']}",
                                 params={"move_alerts_to": source["id"]}).status_code == 422
    insert_orders(other_dsn, ["ORD-STILL-WATCHED"])
    eventually(lambda: emails_with(smtp_server, "ORD-STILL-WATCHED"), message="the alert to keep firing")


def test_deleting_a_data_source_moves_its_alerts_and_they_fire_from_the_new_one(
        service, smtp_server, empty_dsn, other_dsn):
    create_orders_table(empty_dsn)
    create_orders_table(other_dsn)
    old = add_source(service, "old", empty_dsn)
    new = add_source(service, "new", other_dsn)
    alert = service.create_alert(data_source_id=old["id"])
    smtp_server.wait_for(1)
    service.wait_idle()

    moved = service.client.delete(f"/data-sources/{old['id']}", params={"move_alerts_to": new["id"]})

    assert moved.status_code == 204, moved.text
    assert service.client.get(f"/data-sources/{old['id']}").status_code == 404
    assert service.client.get(f"/alert-configs/{alert['id']}").json()["data_source_id"] == new["id"]
    service.wait_idle()
    insert_orders(other_dsn, ["ORD-NEW-SOURCE"])
    insert_orders(empty_dsn, ["ORD-OLD-SOURCE"])
    eventually(lambda: emails_with(smtp_server, "ORD-NEW-SOURCE"), message="an alert from the new source")
    service.wait_idle()
    assert not emails_with(smtp_server, "ORD-OLD-SOURCE")
    status = service.client.get("/health").json()["scheduler"]["listeners"]
    assert new["id"] in status and old["id"] not in status


def test_a_changed_dsn_is_checked_and_the_listener_follows_it_to_the_new_database(
        service, smtp_server, empty_dsn, other_dsn):
    create_orders_table(empty_dsn)
    create_orders_table(other_dsn)
    source = add_source(service, "warehouse", empty_dsn)
    alert = service.create_alert(data_source_id=source["id"])
    smtp_server.wait_for(1)
    service.wait_idle()

    unreachable = service.client.put(f"/data-sources/{source['id']}", json={
        "name": "warehouse", "dsn": dsn_with(other_dsn, host="127.0.0.1", port=str(free_port())),
        "allow_privileged_role": True})
    privileged = service.client.put(f"/data-sources/{source['id']}", json={"name": "warehouse", "dsn": other_dsn})
    assert unreachable.status_code == 422 and unreachable.json()["detail"][0]["loc"] == ["body", "dsn"]
    assert privileged.status_code == 422 and "can do more than read" in privileged.json()["detail"][0]["msg"]
    assert service.client.get(f"/data-sources/{source['id']}").json() == source, "a refused change stores nothing"

    changed = service.client.put(f"/data-sources/{source['id']}", json={
        "name": "warehouse-2", "dsn": other_dsn, "password": "not-returned-8b1f", "allow_privileged_role": True})

    assert changed.status_code == 200, changed.text
    assert changed.json()["name"] == "warehouse-2" and changed.json()["has_password"] is True
    assert "not-returned-8b1f" not in changed.text and "not-returned-8b1f" not in service.client.get(
        "/data-sources/").text
    service.wait_idle()
    insert_orders(empty_dsn, ["ORD-OLD-DATABASE"])
    insert_orders(other_dsn, ["ORD-NEW-DATABASE"])
    eventually(lambda: emails_with(smtp_server, "ORD-NEW-DATABASE"), message="an event from the new database")
    service.wait_idle()
    assert not emails_with(smtp_server, "ORD-OLD-DATABASE")
    assert service.client.get(f"/alert-configs/{alert['id']}").json()["events_enabled"] is True


def test_renaming_a_data_source_keeps_its_password_and_needs_no_new_check(service, other_dsn):
    source = add_source(service, "warehouse", other_dsn + " password=kept-secret")
    assert source["has_password"] is True

    renamed = service.client.put(f"/data-sources/{source['id']}", json={
        "name": "archive", "dsn": other_dsn, "allow_privileged_role": True})

    assert renamed.status_code == 200 and renamed.json()["name"] == "archive"
    assert renamed.json()["has_password"] is True, "a password left out keeps the stored one"
    add_source(service, "other", other_dsn)
    conflict = service.client.put(f"/data-sources/{source['id']}", json={
        "name": "other", "dsn": other_dsn, "allow_privileged_role": True})
    assert conflict.status_code == 409
    assert service.client.get(f"/data-sources/{source['id']}").json()["name"] == "archive"


def test_a_write_that_postgresql_ends_to_break_a_deadlock_is_run_again(service, db_dsn):
    night = service.client.post("/teams/", json={"name": "night"}).json()["id"]
    day = service.client.post("/teams/", json={"name": "day"}).json()["id"]
    other = psycopg2.connect(db_dsn)
    attempts = []
    try:
        with other.cursor() as cur:
            # This session waits long before it looks for deadlocks, so the service's transaction is the one ended.
            cur.execute("SET deadlock_timeout = '20s'; SET search_path = alert_service")
            cur.execute("UPDATE team SET description = 'other' WHERE id = %s", (day,))
        blocker = threading.Thread(target=lambda: other.cursor().execute(
            "UPDATE team SET description = 'other' WHERE id = %s", (night,)))

        def work(cur):
            attempts.append(1)
            cur.execute("UPDATE team SET description = 'service' WHERE id = %s", (night,))
            if len(attempts) == 1:
                blocker.start()
                time.sleep(0.3)  # the other session now waits for this row
                threading.Timer(3, other.commit).start()  # it ends once the deadlock is broken
            cur.execute("UPDATE team SET description = 'service' WHERE id = %s RETURNING id", (day,))
            return cur.fetchone()["id"]

        assert str(database.in_transaction(service.services.pool, work)) == day
    finally:
        blocker.join(10)
        other.close()
    assert len(attempts) == 2
    assert service.client.get(f"/teams/{night}").json()["description"] == "service"
