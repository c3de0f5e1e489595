"""The pure part of alerts as code: reading a file and planning what applying it changes."""

from __future__ import annotations

import yaml

import config_plan


def entries(**kinds: dict) -> dict:
    return {kind: kinds.get(kind, {}) for kind in config_plan.KINDS}


def test_a_plan_creates_before_it_deletes_and_deletes_alerts_before_what_they_use():
    current = entries(data_sources={"old": {"name": "old", "dsn": "host=a"}},
                      alerts={"gone": {"name": "gone", "data_source": "old"},
                              "same": {"name": "same", "priority": "LOW"}})
    desired = entries(data_sources={"new": {"name": "new", "dsn": "host=b"}},
                      alerts={"same": {"name": "same", "priority": "HIGH"}})

    plan = config_plan.plan(desired, current, prune=config_plan.KINDS)

    assert [str(change) for change in plan.changes] == [
        "+ create data source new", "~ update alert same (priority)", "- delete alert gone",
        "- delete data source old"]
    assert [c.action for c in config_plan.plan(desired, current).changes] == ["create", "update"]
    assert [str(c) for c in config_plan.plan(desired, current, prune=["alerts"]).changes][-1] == "- delete alert gone"
    assert config_plan.plan(current, current, prune=config_plan.KINDS).empty


def test_every_entry_and_field_of_a_file_has_its_line():
    document, errors = config_plan.load("version: 1\nalerts:\n  - name: a\n\n    query: SELECT 1\n  - name: b\n")

    assert errors == []
    assert [e["name"] for e in document.entries["alerts"]] == ["a", "b"]
    assert document.line("alerts", 0, "query") == 5 and document.line("alerts", 1) == 6
    assert str(document.error("alerts", 0, ["query"], "bad")) == "line 5: alerts[0].query: bad"


def test_a_file_of_the_wrong_shape_is_refused_with_where():
    _, errors = config_plan.load("alerts: {name: a}\nwidgets: []\nversion: 2\nteams: [3]\n")

    assert {(e.loc, e.line) for e in errors} == {
        (("alerts",), 1), (("widgets",), 2), (("version",), 3), (("teams", 0), 4)}


def test_a_dumped_file_reads_back_to_the_same_entries_with_queries_as_written():
    query = "SELECT a\nFROM t\nWHERE b = 'x: y'"
    dumped = config_plan.dump(entries(alerts={"z": {"name": "z", "query": query, "description": None},
                                              "a": {"name": "a", "query": "SELECT 1"}}))

    assert "query: |-\n    SELECT a\n    FROM t\n" in dumped and "description" not in dumped
    assert [a["name"] for a in yaml.safe_load(dumped)["alerts"]] == ["a", "z"]
    assert yaml.safe_load(dumped)["alerts"][1]["query"] == query


def test_only_alert_secret_variables_are_read_from_the_environment():
    environ = {"ALERT_SECRET_DB": "s3cret", "SECRET_KEY": "k"}

    assert config_plan.resolve_secret("pw=${ALERT_SECRET_DB}", environ) == "pw=s3cret"
    for name in ("SECRET_KEY", "ALERT_SECRET_MISSING"):
        try:
            config_plan.resolve_secret(f"${{{name}}}", environ)
        except KeyError as missing:
            assert missing.args[0] == name
        else:
            raise AssertionError(f"{name} was resolved")
