"""Whether an alert query's result can change only when one of its watched tables changes: what the parser sees in
the text (query_analysis.dependencies), what the data source's catalog says about the relations and functions it
names (database.describe_dependencies), and the decision over both (query_analysis.stable_reason)."""

from __future__ import annotations

import psycopg2
import pytest

import database
from query_analysis import QueryRejected, TableRef, analyse_query, dependencies, stable_reason
from tests.conftest import dsn_with, execute


# --- what the text says -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("query, words", [
    ("SELECT current_timestamp", "CURRENT_TIMESTAMP, whose value changes with time"),
    ("SELECT * FROM t WHERE d = current_date", "CURRENT_DATE"),
    ("SELECT localtimestamp(3), localtime", "LOCALTIMESTAMP"),
    ("SELECT current_time", "CURRENT_TIME"),
    ("SELECT * FROM t WHERE owner = current_user", "CURRENT_USER, which depends on the session"),
    ("SELECT session_user", "SESSION_USER"),
    ("SELECT * FROM t WHERE at > 'now'::timestamptz - interval '5 minutes'", "'now'"),
    ("SELECT * FROM t WHERE at > timestamp 'today'", "'today'"),
    ("SELECT * FROM t WHERE d = CAST(' Tomorrow ' AS date)", "' Tomorrow '"),
    ("SELECT * FROM t WHERE at > 'yesterday'", "'yesterday'"),  # coerced to the column's type: no cast in the text
    ("SELECT * FROM t WHERE at > ')(today'", "')(today'"),  # date/time input skips the punctuation
    ("SELECT * FROM t WHERE at > 'now'::text::timestamptz", "'now'"),
    ("SELECT * FROM t TABLESAMPLE bernoulli (10)", "TABLESAMPLE"),
    ("SELECT * FROM t TABLESAMPLE system (10) REPEATABLE (1)", "TABLESAMPLE"),
    ("SELECT t.ctid, a FROM t", "ctid, which a table rewrite"),
    ("SELECT xmax FROM t", "xmax, which a row lock"),
])
def test_clock_and_session_constructs_that_are_not_function_calls_make_a_query_time_dependent(query, words):
    reasons = dependencies(query).time_dependent
    assert reasons and words in reasons[0], reasons


@pytest.mark.parametrize("query", [
    "SELECT * FROM t WHERE status = 'unknown' AND note <> 'known'",
    "SELECT * FROM t WHERE at > timestamptz '2026-01-01' + interval '1 day'",
    "SELECT 'epoch'::timestamptz, 'infinity'::date, xmin FROM t",
    "SELECT a, count(*) FROM t GROUP BY a ORDER BY 2 DESC LIMIT 5",
])
def test_constants_and_plain_columns_do_not_make_a_query_time_dependent(query):
    assert dependencies(query).time_dependent == ()


def test_every_function_call_is_listed_with_its_schema_as_postgresql_folds_the_names():
    deps = dependencies(
        'SELECT Now(), pg_catalog.clock_timestamp(), RANDOM(), nextval(\'s\'), "MyFunc"(a), Public.Score(a) FROM t')
    assert deps.functions == ((None, "MyFunc"), (None, "nextval"), (None, "now"), (None, "random"),
                              ("pg_catalog", "clock_timestamp"), ("public", "score"))


def test_functions_are_found_in_lateral_joins_subqueries_ctes_filters_windows_and_order_by():
    deps = dependencies(
        "WITH c AS (SELECT f1(a) FROM t) "
        "SELECT count(*) FILTER (WHERE f2(b)), row_number() OVER (ORDER BY f3(b)) "
        "FROM u, LATERAL generate_series(1, f4(u.n)) g, ROWS FROM (f5()) r "
        "WHERE u.id IN (SELECT f6(id) FROM v) ORDER BY f7(u.n)")
    assert {name for _, name in deps.functions} == {
        "f1", "f2", "f3", "f4", "f5", "f6", "f7", "count", "row_number", "generate_series"}
    assert deps.relations == (TableRef(None, "t"), TableRef(None, "u"), TableRef(None, "v"))


def test_sql_syntax_that_stands_for_a_function_is_listed_as_the_function():
    deps = dependencies("SELECT extract(epoch FROM at), at AT TIME ZONE 'UTC' FROM t")
    assert deps.functions == (("pg_catalog", "extract"), ("pg_catalog", "timezone"))


def test_a_cte_shadows_a_table_of_its_name_only_where_it_is_in_scope():
    assert dependencies("WITH t AS (SELECT 1) SELECT * FROM t").relations == ()
    # The CTE lives inside the subquery; the t joined outside it is the table, and is watched.
    assert dependencies("SELECT * FROM (WITH t AS (SELECT 1) SELECT * FROM t) x, t").relations == (
        TableRef(None, "t"),)
    assert analyse_query("SELECT * FROM (WITH t AS (SELECT 1) SELECT * FROM t) x, t") == [TableRef(None, "t")]
    # Without RECURSIVE a CTE sees only those before it: b inside a is the table b.
    assert dependencies("WITH a AS (SELECT * FROM b), b AS (SELECT * FROM a) SELECT * FROM b").relations == (
        TableRef(None, "b"),)
    assert dependencies("WITH RECURSIVE a AS (SELECT 1 UNION ALL SELECT * FROM a) SELECT * FROM a").relations == ()
    # A qualified name is never a CTE.
    assert dependencies("WITH t AS (SELECT 1) SELECT * FROM t, public.t").relations == (TableRef("public", "t"),)


def test_dependencies_refuse_what_is_not_one_read_only_query():
    for query in ("DELETE FROM t", "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x", "SELECT 1; SELECT 2"):
        with pytest.raises(QueryRejected):
            dependencies(query)


# --- the decision -----------------------------------------------------------------------------------------------

ORDERS = {"tables": {(None, "orders"): "public.orders"}, "unstable_tables": {},
          "functions": {(None, "lower"): None, (None, "now"): "calls now(), whose value changes with time"}}


def test_a_query_over_watched_tables_with_triggers_and_immutable_functions_is_stable():
    deps = dependencies("SELECT lower(name) FROM orders WHERE amount > 100")
    assert stable_reason(deps, watched_tables_with_triggers={"public.orders"}, **ORDERS) is None


def test_a_query_that_reads_no_table_and_calls_nothing_unsafe_is_stable():
    assert stable_reason(dependencies("SELECT 1"), watched_tables_with_triggers=set(), tables={},
                         unstable_tables={}, functions={}) is None


def test_the_first_reason_is_the_clock_then_an_unsafe_function_then_a_table():
    assert stable_reason(dependencies("SELECT now(), current_date FROM orders"),
                         watched_tables_with_triggers={"public.orders"}, **ORDERS) == (
        "uses CURRENT_DATE, whose value changes with time")
    assert stable_reason(dependencies("SELECT * FROM orders WHERE at > now() - interval '5 minutes'"),
                         watched_tables_with_triggers={"public.orders"}, **ORDERS) == (
        "calls now(), whose value changes with time")
    assert stable_reason(dependencies("SELECT * FROM orders"), watched_tables_with_triggers=set(), **ORDERS) == (
        "reads public.orders, which has no change trigger")
    unstable = {**ORDERS, "unstable_tables": {"public.orders": "public.orders is a view: ..."}}
    assert stable_reason(dependencies("SELECT * FROM orders"), watched_tables_with_triggers={"public.orders"},
                         **unstable) == "public.orders is a view: ..."


def test_what_the_catalog_was_not_asked_about_or_does_not_have_is_a_reason():
    assert stable_reason(dependencies("SELECT upper(name) FROM orders"),
                         watched_tables_with_triggers={"public.orders"}, **ORDERS) == (
        "calls upper(), which was not checked")
    assert stable_reason(dependencies("SELECT * FROM orders, refunds"),
                         watched_tables_with_triggers={"public.orders"}, **ORDERS) == (
        "reads refunds, which was not checked")
    missing = {**ORDERS, "tables": {(None, "orders"): None}}
    assert stable_reason(dependencies("SELECT * FROM orders"), watched_tables_with_triggers=set(), **missing) == (
        "reads orders, which does not exist")


# --- what the catalog says --------------------------------------------------------------------------------------


@pytest.fixture
def reader_pool(db_dsn):
    """Read-only sessions of the role alert queries run as on the default data source (not a superuser)."""
    service = database.service_pool(db_dsn, size=1)
    try:
        reader_dsn = database.ensure_reader_role(service, database_dsn=db_dsn)
    finally:
        service.close()
    pool = database.Pool(database.read_only_dsn(reader_dsn), 1, name="alert queries")
    yield pool
    pool.close()


def watch(dsn: str, *tables: str, events: str = "INSERT OR UPDATE OR DELETE OR TRUNCATE") -> None:
    """Put the service's change trigger on these tables (`schema.table` keys), firing on the given events."""
    service = database.service_pool(dsn, size=1)
    try:
        assert database.sync_triggers(service, wanted=set(tables)) == {}
    finally:
        service.close()
    for table in tables:
        execute(dsn, f"DROP TRIGGER {database.TRIGGER_NAME} ON {table}; "
                     f"CREATE TRIGGER {database.TRIGGER_NAME} AFTER {events} ON {table} FOR EACH STATEMENT "
                     f"EXECUTE FUNCTION {database.TRIGGER_SCHEMA}.{database.TRIGGER_FUNCTION}()")


def described_reason(pool, query: str, watched: set[str]) -> str | None:
    """stable_reason for a query, with the catalog facts of the pool's data source."""
    deps = dependencies(query)
    described = database.describe_dependencies(
        pool, relations=[(ref.schema, ref.name) for ref in deps.relations], functions=deps.functions)
    for key in ("versions", "delta_tables", "delta_functions"):
        described.pop(key)
    return stable_reason(deps, watched_tables_with_triggers=watched, **described)


def test_a_plain_table_is_stable_only_when_its_trigger_hears_every_change_truncate_included(db_dsn, reader_pool):
    execute(db_dsn, "CREATE TABLE orders (id int, amount numeric)")
    watch(db_dsn, "public.orders", events="INSERT OR UPDATE OR DELETE")
    query = "SELECT id FROM orders WHERE abs(amount) > 100"
    # The service's trigger today fires on INSERT, UPDATE and DELETE: a TRUNCATE would go unheard.
    assert described_reason(reader_pool, query, {"public.orders"}) == (
        "public.orders's change trigger does not fire on TRUNCATE")

    watch(db_dsn, "public.orders")
    assert described_reason(reader_pool, query, {"public.orders"}) is None
    assert described_reason(reader_pool, "SELECT id FROM public.orders", {"public.orders"}) is None

    execute(db_dsn, f"ALTER TABLE orders DISABLE TRIGGER {database.TRIGGER_NAME}")
    assert described_reason(reader_pool, query, {"public.orders"}) == "public.orders's change trigger is disabled"


def test_partitioned_tables_partitions_and_inheritance_are_unstable(db_dsn, reader_pool):
    execute(db_dsn, "CREATE TABLE parted (a int) PARTITION BY RANGE (a); "
                    "CREATE TABLE parted_low PARTITION OF parted FOR VALUES FROM (0) TO (10); "
                    "CREATE TABLE parent (a int); CREATE TABLE child () INHERITS (parent)")
    watch(db_dsn, "public.parted", "public.parted_low", "public.parent", "public.child")
    described = database.describe_dependencies(
        reader_pool, relations=[(None, "parted"), (None, "parted_low"), ("public", "parent"), (None, "child")],
        functions=[])
    assert described["tables"] == {(None, "parted"): "public.parted", (None, "parted_low"): "public.parted_low",
                                   ("public", "parent"): "public.parent", (None, "child"): "public.child"}
    unstable = described["unstable_tables"]
    assert "is a partitioned table" in unstable["public.parted"]
    assert "is a partition" in unstable["public.parted_low"]
    assert "has inheritance children" in unstable["public.parent"]
    assert "inherits from another table" in unstable["public.child"]


def test_views_materialized_views_foreign_tables_and_sequences_are_unstable(db_dsn, reader_pool):
    execute(db_dsn, "CREATE TABLE base (a int); CREATE VIEW recent AS SELECT * FROM base; "
                    "CREATE MATERIALIZED VIEW totals AS SELECT count(*) FROM base; "
                    "CREATE FOREIGN DATA WRAPPER nowhere; CREATE SERVER far FOREIGN DATA WRAPPER nowhere; "
                    "CREATE FOREIGN TABLE remote (a int) SERVER far; CREATE SEQUENCE ids")
    watch(db_dsn, "public.base")
    assert described_reason(reader_pool, "SELECT * FROM base", {"public.base"}) is None
    # The view reads only base, which is watched, but what it calls (now(), say) is not checked.
    assert described_reason(reader_pool, "SELECT * FROM recent", {"public.base"}) == (
        "public.recent is a view: what it reads and calls is not checked")
    assert described_reason(reader_pool, "SELECT * FROM totals", {"public.base"}) == (
        "public.totals is a materialized view: REFRESH changes it without firing triggers")
    assert "foreign table" in described_reason(reader_pool, "SELECT * FROM remote", set())
    assert "sequence" in described_reason(reader_pool, "SELECT last_value FROM ids", set())
    # REFRESH MATERIALIZED VIEW fires no trigger because a materialized view cannot have one at all.
    with pytest.raises(psycopg2.errors.WrongObjectType):
        execute(db_dsn, f"CREATE TRIGGER heard AFTER INSERT ON totals FOR EACH STATEMENT "
                        f"EXECUTE FUNCTION {database.TRIGGER_SCHEMA}.{database.TRIGGER_FUNCTION}()")


def test_unlogged_tables_row_security_system_catalogs_and_missing_relations_are_unstable(db_dsn, reader_pool):
    execute(db_dsn, 'CREATE UNLOGGED TABLE scratch (a int); CREATE TABLE "Secret Notes" (a int); '
                    'ALTER TABLE "Secret Notes" ENABLE ROW LEVEL SECURITY')
    watch(db_dsn, "public.scratch", 'public."Secret Notes"')
    assert "unlogged" in described_reason(reader_pool, "SELECT * FROM scratch", {"public.scratch"})
    assert "row-level security" in described_reason(reader_pool, 'SELECT * FROM "Secret Notes"',
                                                     {'public."Secret Notes"'})
    assert described_reason(reader_pool, "SELECT count(*) FROM pg_stat_activity", set()) == (
        "reads pg_catalog.pg_stat_activity, a system catalog or view, which has no change trigger")
    assert described_reason(reader_pool, "SELECT * FROM nowhere_to_be_found", set()) == (
        "reads nowhere_to_be_found, which does not exist")


def test_only_immutable_functions_of_pg_catalog_are_safe(db_dsn, reader_pool):
    execute(db_dsn, "CREATE FUNCTION public.double_it(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1 * 2'")
    described = database.describe_dependencies(reader_pool, relations=[], functions=[
        (None, "lower"), ("pg_catalog", "abs"), (None, "now"), (None, "clock_timestamp"), (None, "random"),
        (None, "nextval"), (None, "to_char"), (None, "double_it"), ("public", "double_it"), (None, "no_such_fn")])
    functions = described["functions"]
    assert functions[(None, "lower")] is None and functions[("pg_catalog", "abs")] is None
    assert functions[(None, "now")] == "calls now(), whose value changes with time"
    assert "volatile" in functions[(None, "clock_timestamp")] and "volatile" in functions[(None, "random")]
    assert "volatile" in functions[(None, "nextval")]
    assert "only stable" in functions[(None, "to_char")]
    # Labelled IMMUTABLE, but by a user: it could read a table.
    assert "outside pg_catalog" in functions[(None, "double_it")]
    assert "outside pg_catalog" in functions[("public", "double_it")]
    assert "does not have" in functions[(None, "no_such_fn")]


def test_a_function_of_a_built_in_name_in_a_schema_on_the_search_path_makes_the_name_unsafe(db_dsn, reader_pool):
    # lower(text) would still be pg_catalog's, but lower(int) would be this one: overloads are not told apart.
    execute(db_dsn, "CREATE FUNCTION public.lower(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1'")
    functions = database.describe_dependencies(
        reader_pool, relations=[], functions=[(None, "lower"), ("pg_catalog", "lower")])["functions"]
    assert functions[(None, "lower")] == ("calls lower(), which may be public.lower(), a function outside "
                                          "pg_catalog: it may read tables or the clock whatever its label says")
    assert functions[("pg_catalog", "lower")] is None


def test_nothing_to_describe_costs_no_round_trip(db_dsn):
    pool = database.Pool(database.read_only_dsn(dsn_with(db_dsn, dbname="no_such_database")), 1)
    assert database.describe_dependencies(pool, relations=[], functions=[]) == {
        "tables": {}, "unstable_tables": {}, "functions": {}, "versions": {}, "delta_tables": {}, "delta_functions": {}}
    pool.close()


# --- TimescaleDB ------------------------------------------------------------------------------------------------


@pytest.fixture
def tsdb_reader_pool(db_dsn, reader_pool):
    """The reader's pool on a database with the timescaledb extension, or a skip saying why it is absent."""
    try:
        execute(db_dsn, "CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg2.Error as exc:
        pytest.skip(f"TimescaleDB is not available on this server ({str(exc).strip().splitlines()[0]})")
    return reader_pool


def test_hypertables_continuous_aggregates_and_timescaledbs_own_tables_are_unstable(db_dsn, tsdb_reader_pool):
    execute(db_dsn, "CREATE TABLE metrics (at timestamptz NOT NULL, value float8); "
                    "SELECT create_hypertable('metrics', 'at')")
    watch(db_dsn, "public.metrics")
    execute(db_dsn, "CREATE MATERIALIZED VIEW hourly WITH (timescaledb.continuous) AS "
                    "SELECT time_bucket('1 hour', at) AS hour, avg(value) FROM metrics GROUP BY 1 WITH NO DATA")
    # Empty: a hypertable without chunks has no inheritance children yet.
    assert described_reason(tsdb_reader_pool, "SELECT * FROM metrics", {"public.metrics"}) == (
        "public.metrics is a hypertable: retention drops chunks without firing its triggers")
    assert "continuous aggregate" in described_reason(tsdb_reader_pool, "SELECT * FROM hourly", {"public.metrics"})
    assert "TimescaleDB's own" in described_reason(
        tsdb_reader_pool, "SELECT * FROM _timescaledb_catalog.hypertable", set())


def test_without_timescaledb_a_plain_table_is_described_all_the_same(empty_dsn):
    execute(empty_dsn, "CREATE TABLE plain (a int)")
    pool = database.Pool(database.read_only_dsn(empty_dsn), 1)
    try:
        described = database.describe_dependencies(pool, relations=[(None, "plain")], functions=[])
        assert described.pop("versions").keys() == {"public.plain"}
        assert described == {"tables": {(None, "plain"): "public.plain"},
                             "unstable_tables": {"public.plain": "public.plain has no change trigger"},
                             "functions": {},
                             "delta_tables": {"public.plain": "public.plain has no trigger that logs changed rows"},
                             "delta_functions": {}}
    finally:
        pool.close()


def test_a_tables_version_changes_with_its_definition_and_not_with_its_rows(db_dsn, reader_pool):
    execute(db_dsn, "CREATE TABLE versioned (a int, b text)")

    def version() -> str:
        return database.describe_dependencies(reader_pool, relations=[(None, "versioned")],
                                              functions=[])["versions"]["public.versioned"]

    first = version()
    execute(db_dsn, "INSERT INTO versioned VALUES (1, 'x'); ANALYZE versioned")
    assert version() == first
    execute(db_dsn, "ALTER TABLE versioned RENAME COLUMN b TO c")
    renamed = version()
    assert renamed != first
    execute(db_dsn, "REVOKE ALL ON versioned FROM PUBLIC; GRANT SELECT ON versioned TO PUBLIC")
    assert version() != renamed
