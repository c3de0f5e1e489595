"""Alerts as code: export, import and `main.py apply`, against the real servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.conftest import (TEST_SECRET_KEY, Service, _new_database, create_orders_table, drop_database, dsn_with,
                            eventually, insert_orders)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_service(pg_admin_dsn, template_database, settings) -> Iterator[Service]:
    """A second service on a database of its own, with the same SMTP and Twilio servers."""
    name = _new_database(pg_admin_dsn, template_database)
    dsn = dsn_with(pg_admin_dsn, dbname=name)
    running = Service(settings.model_copy(update={"db_connection": type(settings.db_connection)(dsn)})).start()
    yield running
    running.stop()
    drop_database(pg_admin_dsn, name)


def export(service) -> str:
    response = service.client.get("/alert-configs/export")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/yaml")
    return response.text


def apply(service, text: str, **params) -> dict:
    response = service.client.post("/alert-configs/import", content=text.encode(),
                                   params={k: str(v).lower() for k, v in params.items()})
    assert response.status_code == 200, response.text
    return response.json()


def refused(service, text: str, **params) -> list[dict]:
    response = service.client.post("/alert-configs/import", content=text.encode(),
                                   params={k: str(v).lower() for k, v in params.items()})
    assert response.status_code == 422, response.text
    return response.json()["detail"]


def populate(service, db_dsn: str, empty_dsn: str) -> None:
    """One of everything: a data source, a team, a user, and alerts of several shapes."""
    create_orders_table(db_dsn)
    create_orders_table(empty_dsn)
    source = service.client.post("/data-sources/", json={
        "name": "warehouse", "dsn": empty_dsn + " password=never-exported-4c1d", "allow_privileged_role": True})
    assert source.status_code == 201, source.text
    team = service.client.post("/teams/", json={"name": "night", "description": "22:00-06:00"}).json()
    user = service.client.post("/users/", json={"name": "Ada", "email": "ada@example.com", "phone": "+14155550100",
                                                "team_id": team["id"]}).json()
    service.create_alert(name="Orders", created_by=user["id"],
                         query="SELECT order_number\nFROM dc_order\nORDER BY order_number")
    service.create_alert(name="Warehouse stock", data_source_id=source.json()["id"], key_columns=["order_number"],
                         trigger_condition={"type": "row_count", "operator": ">=", "value": 3, "for": "60s"},
                         message_template="{{ rows | length }} orders", priority="CRITICAL")
    paused = service.create_alert(name="Paused", schedule="cron:*/5 * * * *",
                                  notification_channels={"email": ["ops@example.com"]})
    service.client.put(f"/alert-configs/{paused['id']}/status", params={"status": "INACTIVE"})


def test_an_exported_file_applied_to_a_fresh_service_gives_the_same_alerts_and_twice_changes_nothing(
        service, fresh_service, smtp_server, db_dsn, empty_dsn):
    populate(service, db_dsn, empty_dsn)
    exported = export(service)
    assert "never-exported-4c1d" not in exported and "password" not in exported
    fresh_dsn = fresh_service.settings.db_connection.get_secret_value()
    create_orders_table(fresh_dsn)

    first = apply(fresh_service, exported)

    assert first["summary"] == {"create": 6, "update": 0, "delete": 0}
    assert export(fresh_service) == exported
    assert apply(fresh_service, exported) == {"applied": True, "changes": [],
                                              "summary": {"create": 0, "update": 0, "delete": 0}}
    alerts = {a["name"]: a for a in fresh_service.client.get("/alert-configs/").json()}
    assert alerts["Paused"]["status"] == "INACTIVE" and alerts["Orders"]["status"] == "ACTIVE"
    assert alerts["Warehouse stock"]["condition"]["for"] == "1m"
    # The scheduler took the new alerts up as if they came through the API: an event wakes one within moments.
    insert_orders(fresh_dsn, ["ORD-AFTER-IMPORT"])
    eventually(lambda: any("ORD-AFTER-IMPORT" in m.message.get_body(("plain",)).get_content()
                           for m in smtp_server.messages), message="an alert created by an import to fire")


def test_a_dry_run_returns_the_plan_and_changes_nothing_and_prune_deletes_what_the_file_lacks(
        service, db_dsn, empty_dsn):
    populate(service, db_dsn, empty_dsn)
    before = export(service)
    document = yaml.safe_load(before)
    document["alerts"] = [a for a in document["alerts"] if a["name"] != "Paused"]
    document["alerts"][0]["priority"] = "LOW"
    document["alerts"].append({"name": "New one", "query": "SELECT 1 AS one", "schedule": "interval:1h",
                               "notification_channels": {"email": ["new@example.com"]}})
    document["teams"].append({"name": "day"})
    edited = yaml.safe_dump(document, sort_keys=False)

    planned = apply(service, edited, prune=True, dry_run=True)

    assert planned["applied"] is False
    assert planned["changes"] == [
        {"action": "create", "kind": "team", "name": "day", "fields": []},
        {"action": "update", "kind": "alert", "name": "Orders", "fields": ["priority"]},
        {"action": "create", "kind": "alert", "name": "New one", "fields": []},
        {"action": "delete", "kind": "alert", "name": "Paused", "fields": []}]
    assert export(service) == before, "a dry run changes nothing"

    kept = apply(service, edited)
    assert kept["summary"] == {"create": 2, "update": 1, "delete": 0}
    assert "Paused" in {a["name"] for a in service.client.get("/alert-configs/").json()}, "no prune, no delete"
    pruned = apply(service, edited, prune=True)
    assert pruned["changes"] == [{"action": "delete", "kind": "alert", "name": "Paused", "fields": []}]
    assert {a["name"]: a["priority"] for a in service.client.get("/alert-configs/").json()} == {
        "Orders": "LOW", "Warehouse stock": "CRITICAL", "New one": "MEDIUM"}
    only_teams = apply(service, "teams:\n  - name: day\n  - name: night\n    description: 22:00-06:00\n",
                       prune=True)
    assert only_teams["changes"] == [], "prune deletes only from the sections a file has"
    assert apply(service, "", prune=True)["changes"] == []


BAD_FILE = """\
version: 1
teams:
  - name: night
  - name: night
users:
  - name: Bob
    email: not-an-address
    team: nobody
alerts:
  - name: Fine
    query: SELECT order_number FROM dc_order
    schedule: interval:1h
    notification_channels: {email: [ok@example.com]}
  - name: Bad schedule
    query: SELECT 1 AS one
    schedule: every now and then
    notification_channels: {whatsapp: ["12345"]}
  - name: Wrong column
    query: SELECT no_such_column FROM dc_order
    schedule: interval:1h
    notification_channels: {email: [ok@example.com]}
  - name: Elsewhere
    query: SELECT 1 AS one
    data_source: nowhere
    schedule: interval:1h
    notification_channels: {email: [ok@example.com]}
"""


def test_a_bad_file_is_refused_whole_with_every_problem_and_its_line(service, db_dsn):
    create_orders_table(db_dsn)

    problems = refused(service, BAD_FILE)

    found = {(tuple(p["loc"]), p["line"]) for p in problems}
    assert (("teams", 1, "name"), 4) in found
    assert (("users", 0, "email"), 7) in found
    assert (("users", 0, "team"), 8) in found, "a refused entry's references are checked too"
    assert (("alerts", 1, "schedule"), 16) in found
    assert (("alerts", 1, "notification_channels", "whatsapp"), 17) in found
    assert (("alerts", 2, "query"), 19) in found
    assert (("alerts", 3, "data_source"), 24) in found
    assert any("no_such_column" in p["msg"] for p in problems)
    assert service.client.get("/alert-configs/").json() == [] and service.client.get("/teams/").json() == []
    syntax = refused(service, "alerts:\n  - name: [unclosed\n")
    assert syntax[0]["loc"] == ["file"] and syntax[0]["line"] == 3
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefg", "bcdefgh"))
    assert "values once its aliases" in refused(service, laughs)[0]["msg"]
    own = refused(service, "data_sources:\n  - name: default\n    host: 127.0.0.1\n")
    assert own[0]["loc"] == ["data_sources", 0, "name"] and "service's own database" in own[0]["msg"]


def test_a_data_source_password_comes_from_an_alert_secret_variable_and_no_other(service, empty_dsn, monkeypatch):
    monkeypatch.setenv("ALERT_SECRET_WAREHOUSE", "from-the-environment")
    source = (f"data_sources:\n  - name: warehouse\n    dsn: \"{empty_dsn}\"\n    allow_privileged_role: true\n"
              "    password: ${ALERT_SECRET_WAREHOUSE}\n")

    assert apply(service, source)["summary"]["create"] == 1

    stored = service.client.get("/data-sources/").json()[1]
    assert stored["name"] == "warehouse" and stored["has_password"] is True
    assert apply(service, source)["changes"] == [], "the same password is no change"
    leak = refused(service, source.replace("ALERT_SECRET_WAREHOUSE", "SECRET_KEY"))
    assert leak[0]["loc"] == ["data_sources", 0, "password"] and "ALERT_SECRET_" in leak[0]["msg"]


def test_main_py_apply_plans_applies_and_then_has_nothing_to_change(db_dsn, tmp_path):
    create_orders_table(db_dsn)
    path = tmp_path / "alerts.yaml"
    path.write_text("alerts:\n  - name: Orders\n    query: SELECT order_number FROM dc_order\n"
                    "    schedule: interval:5m\n    notification_channels: {email: [ops@example.com]}\n")
    env = {**os.environ, "DB_CONNECTION": db_dsn, "SECRET_KEY": TEST_SECRET_KEY, "LOG_FILE": "",
           "DATA_DIR": str(tmp_path / "data")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "main.py", "apply", str(path), *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)

    dry = run("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "+ create alert Orders" in dry.stdout and "dry run: nothing was changed" in dry.stdout
    done = run()
    assert done.returncode == 0 and "applied" in done.stdout
    again = run()
    assert again.returncode == 0 and "nothing to change" in again.stdout
    path.write_text("alerts:\n  - name: Orders\n    schedule: interval:5m\n")
    bad = run()
    assert bad.returncode == 1 and "line 2: alerts[0].query" in bad.stderr and "nothing was changed" in bad.stderr


def test_main_py_apply_reaches_a_running_service_at_once(service, smtp_server, db_dsn, tmp_path):
    create_orders_table(db_dsn)
    insert_orders(db_dsn, ["ORD-APPLIED"])
    path = tmp_path / "alerts.yaml"
    path.write_text("alerts:\n  - name: Orders\n    query: SELECT order_number FROM dc_order\n"
                    "    schedule: interval:1h\n    notification_channels: {email: [ops@example.com]}\n")
    env = {**os.environ, "DB_CONNECTION": db_dsn, "SECRET_KEY": TEST_SECRET_KEY, "LOG_FILE": "",
           "DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "main.py", "apply", str(path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # The running service was told: its initial report arrives well before its 30 s look for unannounced changes.
    mail = smtp_server.wait_for(1, timeout=10)[0]
    assert "ORD-APPLIED" in mail.message.get_body(("plain",)).get_content()
    eventually(lambda: service.services.scheduler.status()["active_alerts"] == 1, timeout=5)
