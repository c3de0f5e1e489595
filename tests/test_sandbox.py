"""The query sandbox: one statement whatever the session's settings, a read-only role, the service's own schema."""

from __future__ import annotations

import json
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import psycopg2
import psycopg2.extensions
import pytest
from psycopg2 import sql
from pydantic import SecretStr

import database
from tests.conftest import (
    Service, admin_execute, create_orders_table, dsn_with, eventually, execute, fetch, insert_orders,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def secret(value: str) -> SecretStr:
    return SecretStr(value)


def dbname(dsn: str) -> str:
    return psycopg2.extensions.parse_dsn(dsn)["dbname"]


@pytest.fixture
def make_role(pg_admin_dsn: str) -> Iterator[Callable[..., str]]:
    """Create login roles for one test (roles belong to the whole server) and drop them afterwards."""
    made: list[tuple[str, tuple[str, ...]]] = []

    def make(*, attributes: str = "", databases: tuple[str, ...] = ()) -> str:
        name = f"sandbox_{uuid.uuid4().hex[:10]}"
        admin_execute(pg_admin_dsn, sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'role-pass-1234' " + attributes).format(
            sql.Identifier(name)))
        made.append((name, databases))
        return name

    yield make
    for name, databases in made:
        for dsn in databases:
            try:
                admin_execute(dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
                admin_execute(dsn, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            except psycopg2.OperationalError:
                pass  # the database is already gone
        admin_execute(pg_admin_dsn, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def alert_body(query: str, data_source_id: str | None = None) -> dict:
    body = {"name": "probe", "query": query, "schedule": "interval:1h",
            "notification_channels": {"email": ["ops@example.com"]}}
    if data_source_id is not None:
        body["data_source_id"] = data_source_id
    return body


def add_source(service: Service, dsn: str, **extra) -> dict:
    response = service.client.post("/data-sources/", json={"name": f"src-{uuid.uuid4().hex[:6]}", "dsn": dsn, **extra})
    assert response.status_code == 201, response.text
    return response.json()


# --- exactly one statement, whatever the session's settings ------------------------------------------------------

MARKER = Path(tempfile.gettempdir()) / f"alert-sandbox-{uuid.uuid4().hex}"

# Each is one SELECT of string literals as the parser (and a server with standard_conforming_strings on) reads it;
# with it off, a backslash escapes the quote and the rest becomes COMMIT and statements that write.
ATTACKS = {
    "backslash-quote": r"SELECT '\', '; COMMIT; CREATE TABLE pwned (x int); -- ' AS tail",
    "copy-to-program": r"SELECT '\', '; COMMIT; COPY (SELECT 1) TO PROGRAM $p$touch " + str(MARKER) + r"$p$; -- '",
    "e-string": r"SELECT E'\\', '; COMMIT; CREATE TABLE pwned (x int); -- '",
    "dollar-quote": r"SELECT '\', $$'; COMMIT; CREATE TABLE pwned (x int); -- $$",
}


def every_path(service: Service, query: str, data_source_id: str) -> list:
    """Send the query through create, dry runs of an unsaved and a saved alert, and run-now."""
    body = alert_body(query, data_source_id)
    responses = [service.client.post("/alert-configs/test", json=body)]
    created = service.client.post("/alert-configs/", json=body)
    responses.append(created)
    if created.status_code == 201:
        alert_id = created.json()["id"]
        responses.append(service.client.post(f"/alert-configs/{alert_id}/test"))
        responses.append(service.client.post(f"/alert-configs/{alert_id}/run"))
    return responses


def assert_one_statement_or_refused(response) -> None:
    assert response.status_code < 500, response.text
    if 400 <= response.status_code < 500:
        return
    body = response.json()
    if "rows" in body:  # a dry run: the texts came back as string literals, the first one a lone backslash
        assert body["error"] is None and body["row_count"] == 1, body
        assert body["rows"][0][0] == "\\" and "COMMIT" in body["rows"][0][1], body
    elif body["last_evaluation"] is not None:  # an alert after run-now: its evaluation read one row
        assert body["last_evaluation"]["outcome"] != "error" and body["last_evaluation"]["row_count"] == 1, body


@pytest.fixture(params=["dsn-options", "alter-role", "alter-database", "default-source"])
def lax_source(request, settings, db_dsn, empty_dsn, make_role) -> Iterator[tuple[Service, str, str]]:
    """A running service and a data source whose sessions read strings with standard_conforming_strings off, set
    in each way PostgreSQL allows; yields the service, the data source id and the DSN of the database it reads."""
    how = request.param
    off = "standard_conforming_strings = off"
    target = empty_dsn
    if how == "alter-database":
        admin_execute(empty_dsn, sql.SQL("ALTER DATABASE {} SET " + off).format(sql.Identifier(dbname(empty_dsn))))
    if how == "default-source":
        target = db_dsn
        admin_execute(db_dsn, sql.SQL("ALTER DATABASE {} SET " + off).format(sql.Identifier(dbname(db_dsn))))
    service = Service(settings).start()
    try:
        if how == "default-source":
            source_id = service.client.get("/data-sources/").json()[0]["id"]
        elif how == "dsn-options":
            source_id = add_source(service, dsn_with(empty_dsn, options=f"-c {off.replace(' ', '')}"),
                                   allow_privileged_role=True)["id"]
        elif how == "alter-role":
            # The worst case: a superuser, whose COPY TO PROGRAM would run a shell command.
            role = make_role(attributes="SUPERUSER", databases=(empty_dsn,))
            admin_execute(empty_dsn, sql.SQL("ALTER ROLE {} SET " + off).format(sql.Identifier(role)))
            source_id = add_source(service, dsn_with(empty_dsn, user=role, password="role-pass-1234"),
                                   allow_privileged_role=True)["id"]
        else:
            source_id = add_source(service, empty_dsn, allow_privileged_role=True)["id"]
        yield service, source_id, target
    finally:
        service.stop()


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_string_that_hides_statements_runs_as_one_select_whatever_the_session_settings(lax_source, attack):
    service, source_id, target = lax_source
    try:
        for response in every_path(service, ATTACKS[attack], source_id):
            assert_one_statement_or_refused(response)
        service.wait_idle()
        assert fetch(target, "SELECT to_regclass('public.pwned')") == [(None,)], "a smuggled CREATE TABLE ran"
        assert not MARKER.exists(), "a smuggled COPY ... TO PROGRAM ran"
    finally:
        MARKER.unlink(missing_ok=True)


@pytest.mark.parametrize("setting", ["standard_conforming_strings', 'off", "client_encoding', 'SQL_ASCII"])
def test_a_query_that_changes_a_setting_cannot_change_how_the_next_query_of_its_batch_is_read(empty_dsn, setting):
    """Queries of one batch share a session: what one changes is undone before the next one's text is sent."""
    execute(empty_dsn, "CREATE TABLE victim (x int)")
    pool = database.Pool(empty_dsn, size=1, name="data source")
    try:
        results = database.run_queries(pool, queries=[
            f"SELECT pg_catalog.set_config('{setting}', false) AS changed",
            "SELECT '\\', 'x; COMMIT; DROP TABLE victim; COMMIT; --' AS a",
            "SELECT current_setting('standard_conforming_strings') AS scs, current_setting('client_encoding') AS enc",
        ], timeout_seconds=5, max_rows=10)
    finally:
        pool.close()
    assert fetch(empty_dsn, "SELECT to_regclass('public.victim') IS NOT NULL") == [(True,)], "a smuggled DROP ran"
    assert results[1][0][1] == [("\\", "x; COMMIT; DROP TABLE victim; COMMIT; --")], results[1]
    assert results[2][0][1] == [("on", "UTF8")], results[2]


def test_alert_sessions_read_strings_as_the_parser_does_and_are_read_only_by_default(lax_source):
    service, source_id, _ = lax_source
    response = service.client.post("/alert-configs/test", json=alert_body(
        "SELECT current_setting('standard_conforming_strings') AS scs, "
        "current_setting('default_transaction_read_only') AS ro, current_setting('client_encoding') AS enc",
        source_id))
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == [["on", "on", "UTF8"]]


def test_a_client_encoding_from_the_dsn_options_does_not_change_what_the_server_reads(service, empty_dsn):
    source = add_source(service, dsn_with(empty_dsn, options="-c client_encoding=SJIS"), allow_privileged_role=True)
    response = service.client.post("/alert-configs/test", json=alert_body(
        "SELECT current_setting('client_encoding') AS enc, 'ソ\\' AS text", source["id"]))
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == [["UTF8", "ソ\\"]]


# --- least privilege on the default data source ------------------------------------------------------------------


def refusal(response) -> str:
    """The error a dry run answered with: a 422 at validation, or the query's error when it failed running."""
    if response.status_code == 422:
        return json.dumps(response.json()["detail"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["error"], f"the query ran: {body}"
    return body["error"]


def dry_run(service: Service, query: str):
    return service.client.post("/alert-configs/test", json=alert_body(query))


def service_sessions(db_dsn: str) -> list[tuple]:
    """The sessions of the service's own role (the reader role's own sessions are not the service's)."""
    return fetch(db_dsn, "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                         "AND application_name LIKE 'alert-service%%' AND usename = current_user ORDER BY 1")


@pytest.mark.parametrize("query", [
    "SELECT pg_read_file('postgresql.conf')",
    "SELECT pg_read_file('.env')",
    "SELECT pg_read_binary_file('/etc/hostname')",
    "SELECT pg_ls_dir('.')",
    "SELECT lo_import('/etc/hostname')",
])
def test_the_alert_author_cannot_read_server_files(service, query):
    assert "permission denied" in refusal(dry_run(service, query))


@pytest.mark.parametrize("query", [
    "SELECT name, password FROM alert_service.data_source",
    "SELECT password FROM data_source",
    "SELECT query_to_xml('SELECT password FROM alert_service.data_source', true, true, '')",
    "SELECT * FROM alert_service.reader_credential",
])
def test_the_alert_author_cannot_read_the_services_own_tables(service, query):
    message = refusal(dry_run(service, query))
    assert "alert_service" in message or ("data_source" in message and "does not exist" in message), message


def test_the_alert_author_cannot_stop_the_services_sessions(service, db_dsn, smtp_server):
    create_orders_table(db_dsn)
    service.create_alert(notification_channels={"email": ["ops@example.com"]})  # a listener session runs
    smtp_server.wait_for(1)
    before = service_sessions(db_dsn)
    assert before
    for function in ("pg_terminate_backend", "pg_cancel_backend"):
        message = refusal(dry_run(service, f"SELECT {function}(pid) FROM pg_stat_activity "
                                           "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
        # PostgreSQL 15 says "must be a superuser to terminate superuser process", later ones "permission denied".
        assert "permission denied" in message or "must be a superuser" in message, message
    assert set(before) <= set(service_sessions(db_dsn))
    insert_orders(db_dsn, ["ORD-STILL-LISTENING"])
    assert "ORD-STILL-LISTENING" in smtp_server.wait_for(2)[1].message.get_body(("plain",)).get_content()


def test_the_alert_author_cannot_call_administrative_functions(service, db_dsn):
    reload_time = fetch(db_dsn, "SELECT pg_conf_load_time()")
    stats_reset = fetch(db_dsn, "SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()")
    service_role = fetch(db_dsn, "SELECT current_user")[0][0]
    for query in ("SELECT pg_create_physical_replication_slot('pwned_slot')",
                  "SELECT pg_create_logical_replication_slot('pwned_slot', 'test_decoding')",
                  "SELECT pg_stat_reset()", "SELECT pg_reload_conf()", "SELECT pg_rotate_logfile()",
                  f"SELECT set_config('role', '{service_role}', true)",
                  f"SELECT set_config('session_authorization', '{service_role}', true)"):
        message = refusal(dry_run(service, query))
        assert "permission denied" in message or "must be superuser" in message, (query, message)
    assert fetch(db_dsn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pwned_slot'") == [(0,)]
    assert fetch(db_dsn, "SELECT pg_conf_load_time()") == reload_time
    assert fetch(db_dsn, "SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()") == \
        stats_reset


def test_the_default_source_runs_as_a_role_that_only_reads(service, db_dsn):
    default = service.client.get("/data-sources/").json()[0]
    role = default["role"]
    assert role["role"] == database.reader_role_name(dbname(db_dsn))
    assert role["read_only"] and not role["superuser"] and not role["can_write"] and not role["can_create"], role
    attributes = fetch(db_dsn, "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, "
                               "rolcanlogin, has_schema_privilege(rolname, 'alert_service', 'USAGE') "
                               "FROM pg_roles WHERE rolname = %s", (role["role"],))
    assert attributes == [(False, False, False, False, False, True, False)]
    assert dry_run(service, "SELECT current_user AS me").json()["rows"] == [[role["role"]]]


def test_the_reader_can_read_tables_created_before_and_after_start_up(settings, db_dsn):
    execute(db_dsn, "CREATE SCHEMA sales; CREATE TABLE sales.before_start (x int); INSERT INTO sales.before_start "
                    "VALUES (1)")
    service = Service(settings).start()
    try:
        execute(db_dsn, "CREATE SCHEMA later; CREATE TABLE later.after_start (x int); "
                        "INSERT INTO later.after_start VALUES (2); CREATE VIEW public.v AS SELECT 3 AS x")
        response = dry_run(service, "SELECT x FROM sales.before_start UNION ALL SELECT x FROM later.after_start "
                                    "UNION ALL SELECT x FROM v ORDER BY 1")
        assert response.status_code == 200, response.text
        assert response.json()["rows"] == [[1], [2], [3]]
    finally:
        service.stop()


def test_without_the_right_to_create_roles_start_up_says_what_to_do(db_dsn, make_role):
    plain = make_role(databases=(db_dsn,))
    pool = database.service_pool(dsn_with(db_dsn, user=plain, password="role-pass-1234"), size=1)
    try:
        with pytest.raises(database.ReaderRoleError, match="CREATEROLE.*READER_DSN"):
            database.ensure_reader_role(pool, database_dsn=db_dsn)
    finally:
        pool.close()


def test_reader_dsn_names_the_role_alert_queries_run_as_and_must_only_read(settings, db_dsn, make_role):
    reader = make_role(databases=(db_dsn,))
    service = Service(settings.model_copy(update={"reader_dsn": secret(
        dsn_with(db_dsn, user=reader, password="role-pass-1234"))})).start()
    try:
        assert dry_run(service, "SELECT current_user AS me").json()["rows"] == [[reader]]
    finally:
        service.stop()
    superuser = Service(settings.model_copy(update={"reader_dsn": settings.db_connection}))
    with pytest.raises(database.ReaderRoleError, match="superuser"):
        superuser.start()


# --- other data sources: the role is checked -------------------------------------------------------------------


def test_a_superuser_data_source_is_refused_unless_allowed_and_shows_its_rights(service, empty_dsn):
    refused = service.client.post("/data-sources/", json={"name": "admin", "dsn": empty_dsn})
    assert refused.status_code == 422
    message = refused.json()["detail"][0]["msg"]
    assert "superuser" in message and "allow_privileged_role" in message and "GRANT SELECT" in message, message
    assert len(service.client.get("/data-sources/").json()) == 1, "nothing was stored"

    allowed = add_source(service, empty_dsn, allow_privileged_role=True)
    shown = service.client.get(f"/data-sources/{allowed['id']}").json()
    assert shown["allow_privileged_role"] is True
    assert shown["role"]["superuser"] and shown["role"]["can_write"] and not shown["role"]["read_only"]


def test_only_the_operator_can_let_data_sources_opt_into_a_privileged_role(settings, empty_dsn):
    strict = Service(settings.model_copy(update={"allow_privileged_data_sources": False})).start()
    try:
        refused = strict.client.post("/data-sources/", json={"name": "admin", "dsn": empty_dsn,
                                                             "allow_privileged_role": True})
        assert refused.status_code == 422, refused.text
        assert "ALLOW_PRIVILEGED_DATA_SOURCES=true" in refused.json()["detail"][0]["msg"]
        assert len(strict.client.get("/data-sources/").json()) == 1, "nothing was stored"
    finally:
        strict.stop()


@pytest.mark.parametrize("grant, reason", [
    ("GRANT INSERT ON stock TO {}", "can write to tables (public.stock)"),
    ("GRANT UPDATE (qty) ON stock TO {}", "can write to tables (public.stock)"),
    ("GRANT TRUNCATE ON stock TO {}", "can write to tables (public.stock)"),
    ("GRANT CREATE ON SCHEMA public TO {}", "can create objects in schemas (public)"),
    ("GRANT pg_signal_backend TO {}", "member of pg_signal_backend"),
    ("GRANT pg_read_server_files TO {}", "member of pg_read_server_files"),
    ("ALTER ROLE {} CREATEROLE", "CREATEROLE"),
])
def test_a_role_that_can_write_or_administer_is_refused_with_why(service, empty_dsn, make_role, grant, reason):
    execute(empty_dsn, "CREATE TABLE stock (sku text, qty int)")
    role = make_role(databases=(empty_dsn,))
    admin_execute(empty_dsn, sql.SQL(grant).format(sql.Identifier(role)))
    dsn = dsn_with(empty_dsn, user=role, password="role-pass-1234")
    refused = service.client.post("/data-sources/", json={"name": "writer", "dsn": dsn})
    assert refused.status_code == 422 and reason in refused.json()["detail"][0]["msg"], refused.text
    shown = add_source(service, dsn, allow_privileged_role=True)["role"]
    assert not shown["read_only"] and not shown["superuser"]


def readme_recipe() -> str:
    """The SQL of the README's read-only role recipe."""
    text = README.read_text()
    section = text[text.index("## Recommended: a read-only role per data source"):]
    return re.search(r"```sql\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def recipe_role(empty_dsn: str) -> Iterator[str]:
    """A role made in the data source database by the README's recipe, under a name of its own."""
    role = f"alert_reader_{uuid.uuid4().hex[:8]}"
    recipe = (readme_recipe().replace("alert_reader", role).replace("choose-a-password", "recipe-pass-1234")
              .replace("ON DATABASE tsdb", f"ON DATABASE {dbname(empty_dsn)}"))
    admin_execute(empty_dsn, recipe)
    yield role
    admin_execute(empty_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
    admin_execute(empty_dsn, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    admin_execute(empty_dsn, sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_the_readme_recipe_makes_a_role_the_service_accepts_as_read_only(service, empty_dsn, recipe_role):
    create_orders_table(empty_dsn)
    insert_orders(empty_dsn, ["ORD-1"])
    source = add_source(service, dsn_with(empty_dsn, user=recipe_role, password="recipe-pass-1234"))
    assert source["role"]["read_only"] and source["allow_privileged_role"] is False, source
    execute(empty_dsn, "CREATE TABLE later (x int)")  # covered by the recipe's default privileges
    response = service.client.post("/alert-configs/test", json=alert_body(
        "SELECT order_number, (SELECT count(*) FROM later) AS n FROM dc_order", source["id"]))
    assert response.status_code == 200 and response.json()["rows"] == [["ORD-1", 0]], response.text


def test_a_trigger_role_gives_a_read_only_source_events_without_running_its_queries(
        service, empty_dsn, recipe_role, smtp_server):
    create_orders_table(empty_dsn)
    reader_dsn = dsn_with(empty_dsn, user=recipe_role, password="recipe-pass-1234")
    elsewhere = service.client.post("/data-sources/", json={
        "name": "wrong", "dsn": reader_dsn, "trigger_dsn": dsn_with(empty_dsn, dbname="postgres")})
    assert elsewhere.status_code == 422 and "not " + dbname(empty_dsn) in elsewhere.text, elsewhere.text

    source = add_source(service, reader_dsn, trigger_dsn=empty_dsn)
    assert source["trigger_connection_params"]["dbname"] == dbname(empty_dsn)
    alert = service.create_alert(data_source_id=source["id"], query="SELECT order_number, current_user AS ran_as "
                                 "FROM dc_order", notification_channels={"email": ["ops@example.com"]})
    assert alert["events_enabled"], alert
    smtp_server.wait_for(1)
    insert_orders(empty_dsn, ["ORD-EVENT"])
    body = smtp_server.wait_for(2)[1].message.get_body(("plain",)).get_content()
    assert "ORD-EVENT" in body and recipe_role in body



def test_data_sources_on_one_database_with_different_roles_keep_each_others_triggers(
        service, empty_dsn, recipe_role, smtp_server):
    create_orders_table(empty_dsn)
    reader = add_source(service, dsn_with(empty_dsn, user=recipe_role, password="recipe-pass-1234"),
                        trigger_dsn=empty_dsn)
    owner = add_source(service, empty_dsn, allow_privileged_role=True)
    kept = service.create_alert(data_source_id=reader["id"], notification_channels={"email": ["ops@example.com"]})
    dropped = service.create_alert(name="Other", data_source_id=owner["id"],
                                   notification_channels={"email": ["other@example.com"]})
    smtp_server.wait_for(2)
    assert service.client.delete(f"/alert-configs/{dropped['id']}").status_code == 204
    service.wait_idle()
    assert service.client.get(f"/alert-configs/{kept['id']}").json()["events_enabled"]

    insert_orders(empty_dsn, ["ORD-STILL-WATCHED"])

    assert "ORD-STILL-WATCHED" in smtp_server.wait_for(3)[2].message.get_body(("plain",)).get_content()

# --- the service's own schema ----------------------------------------------------------------------------------


def test_an_alert_on_the_services_own_incidents_is_refused_and_nothing_loops(service, db_dsn, smtp_server):
    """The issue's repro: an alert on the incident table, then inserts as insert_test.py makes them."""
    for query in ("SELECT id, title FROM alert_service.incident",
                  "SELECT id, title FROM incident"):  # the reader's search_path has no alert_service
        response = service.client.post("/alert-configs/", json=alert_body(query))
        assert response.status_code == 422, response.text
        assert "alert_service" in response.text or 'relation \\"incident\\" does not exist' in response.text

    # Through the service's database as a privileged data source, and through a view there.
    execute(db_dsn, "CREATE VIEW public.my_incidents AS SELECT id, title FROM alert_service.incident")
    same_database = add_source(service, db_dsn, allow_privileged_role=True)
    for query in ("SELECT id, title FROM alert_service.incident", "SELECT id, title FROM my_incidents"):
        response = service.client.post("/alert-configs/", json=alert_body(query, same_database["id"]))
        assert response.status_code == 422 and "own schema alert_service" in response.text, response.text

    create_orders_table(db_dsn)
    service.create_alert(notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    insert_orders(db_dsn, ["ORD-1", "ORD-2"])
    smtp_server.wait_for(2)
    service.wait_idle()
    time.sleep(1)
    service.wait_idle()
    assert len(service.sql("SELECT id FROM incident")) == 1, "one incident for the one insert, none from itself"
    assert len(smtp_server.messages) == 2


def test_an_alert_stored_on_the_services_schema_gets_no_trigger(service, db_dsn, smtp_server):
    """An alert saved before the schema existed (or written by hand) still cannot wake itself."""
    service.sql("INSERT INTO alert_config (name, query, data_source_id, schedule, notification_channels, "
                "watched_tables) SELECT 'old', 'SELECT id FROM alert_service.incident', id, 'interval:1h', "
                "'{\"email\": [\"ops@example.com\"]}', '{alert_service.incident}' FROM data_source WHERE is_default")
    service.restart()
    old = eventually(lambda: [a for a in service.client.get("/alert-configs/").json() if a["events_error"]])[0]
    assert "alert_service cannot be watched" in old["events_error"]
    assert fetch(db_dsn, "SELECT count(*) FROM pg_trigger WHERE tgname = 'alert_service_notify'") == [(0,)]


def test_a_user_table_named_like_a_service_table_neither_shadows_nor_is_shadowed(service, db_dsn, smtp_server):
    execute(db_dsn, "CREATE TABLE public.incident (id int, title text); "
                    "INSERT INTO public.incident VALUES (1, 'user row')")
    assert service.client.get("/incidents/").json() == []
    alert = service.create_alert(query="SELECT id, title FROM incident ORDER BY id",
                                 notification_channels={"email": ["ops@example.com"]})
    assert alert["watched_tables"] == ["public.incident"] and alert["events_enabled"], alert
    assert "user row" in smtp_server.wait_for(1)[0].message.get_body(("plain",)).get_content()
    execute(db_dsn, "INSERT INTO public.incident VALUES (2, 'second')")
    smtp_server.wait_for(2)
    service.wait_idle()
    assert len(smtp_server.messages) == 2, "the service's own incident writes did not wake the alert"
    assert fetch(db_dsn, "SELECT count(*) FROM public.incident") == [(2,)]


# --- upgrading an install whose tables are in public ---------------------------------------------------------------


def test_an_install_from_before_the_schema_moves_its_tables_in_place(settings, empty_dsn):
    conn = psycopg2.connect(empty_dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, description text NOT NULL, "
                        "applied_at timestamptz NOT NULL DEFAULT now())")
            for version, description, statements in database.MIGRATIONS[:3]:
                cur.execute(statements)
                cur.execute("INSERT INTO schema_migrations VALUES (%s, %s)", (version, description))
            cur.execute("INSERT INTO team (name) VALUES ('kept')")
            cur.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
            if cur.fetchone():
                cur.execute("ALTER TABLE evaluation DROP CONSTRAINT evaluation_pkey; "
                            "SELECT create_hypertable('evaluation', 'started_at')")
    finally:
        conn.close()
    service = Service(settings.model_copy(update={"db_connection": secret(empty_dsn)})).start()
    try:
        assert [t["name"] for t in service.client.get("/teams/").json()] == ["kept"]
        alert = service.create_alert(query="SELECT 1 AS one")
        service.wait_idle()
        assert service.client.get(f"/alert-configs/{alert['id']}/evaluations").json()
    finally:
        service.stop()
    left_in_public = fetch(empty_dsn, "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                      "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')")
    assert left_in_public == []
    assert fetch(empty_dsn, "SELECT count(*) FROM alert_service.schema_migrations") == [(len(database.MIGRATIONS),)]


def test_a_data_source_on_the_services_own_database_shares_its_triggers_with_the_default(
        service, db_dsn, smtp_server):
    create_orders_table(db_dsn)
    same_database = add_source(service, db_dsn, allow_privileged_role=True)
    other = service.create_alert(data_source_id=same_database["id"], notification_channels={"email": ["a@example.com"]})
    service.create_alert(name="Default", notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(2)
    assert service.client.delete(f"/alert-configs/{other['id']}").status_code == 204
    service.wait_idle()
    insert_orders(db_dsn, ["ORD-SHARED"])
    assert "ORD-SHARED" in smtp_server.wait_for(3)[2].message.get_body(("plain",)).get_content()
