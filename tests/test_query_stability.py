"""Whether an alert query's result can change only when one of its watched tables changes: what the parser sees in
the text (query_analysis.dependencies), what the data source's catalog says about the relations and functions it
names (database.describe_dependencies), and the decision over both (query_analysis.stable_reason)."""

from __future__ import annotations

import pytest

from query_analysis import QueryRejected, TableRef, analyse_query, dependencies, stable_reason


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
