"""Checks an alert query with PostgreSQL's own parser; finds the tables it reads and what else its result uses."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from pglast.parser import ParseError, parse_sql_json, scan

_WRITING_NODES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})


class QueryRejected(ValueError):
    """The text is not exactly one read-only query."""


@dataclass(frozen=True)
class TableRef:
    """A relation named in a query; schema is None when the name is unqualified."""

    schema: str | None
    name: str


class _Collector:
    """Walks a parse tree once, gathering the relations it reads (not the CTEs in scope where they are named), the
    functions it calls, what makes it depend on the clock or the session, and anything that writes or locks."""

    # The tree is libpg_query's JSON as plain dicts and lists, not pglast's node objects: building those alone takes
    # longer than parsing and walking the plain tree (about 330 against 190 microseconds for a two-table join), and
    # start-up walks every alert's query.
    # A node is {"Type": {fields}}; a field that can hold only one struct type holds its fields directly.

    def __init__(self) -> None:
        self.relations: set[TableRef] = set()
        self.functions: set[tuple[str | None, str]] = set()
        self.time_dependent: dict[str, None] = {}  # ordered and without repeats
        self.problems: list[str] = []

    def walk(self, tree, ctes: frozenset[str] = frozenset()) -> None:
        if isinstance(tree, list):
            for item in tree:
                self.walk(item, ctes)
        elif isinstance(tree, dict):
            if len(tree) == 1:
                kind, fields = next(iter(tree.items()))
                if kind[:1].isupper():  # node types are capitalised, field names are not
                    self._visit(kind, fields, ctes)
                    return
            for value in tree.values():
                self.walk(value, ctes)

    def _visit(self, kind: str, fields: dict, ctes: frozenset[str]) -> None:
        if kind == "SelectStmt":
            self._walk_select(fields, ctes)
            return
        if kind == "RangeVar":
            # An unqualified name is a CTE where one of that name is in scope, and a relation everywhere else.
            if "schemaname" in fields or fields["relname"] not in ctes:
                self.relations.add(TableRef(fields.get("schemaname"), fields["relname"]))
            return
        if kind in _WRITING_NODES:
            self.problems.append(f"the query contains {_statement_kind(kind)}; alert queries may only read")
        else:
            self._note_dependency(kind, fields)
        for value in fields.values():
            self.walk(value, ctes)

    def _walk_select(self, fields: dict, ctes: frozenset[str]) -> None:
        if "intoClause" in fields:
            self.problems.append("SELECT INTO creates a table; alert queries may only read")
        if "lockingClause" in fields:
            self.problems.append("locking clauses (FOR UPDATE, FOR SHARE, ...) are not allowed in alert queries")
        if "withClause" in fields:
            ctes = self._walk_with(fields["withClause"], ctes)
        for name, value in fields.items():
            if name in ("larg", "rarg"):  # the arms of UNION, INTERSECT and EXCEPT, each a SELECT of its own
                self._walk_select(value, ctes)
            elif name != "withClause":
                self.walk(value, ctes)

    def _walk_with(self, clause: dict, outer: frozenset[str]) -> frozenset[str]:
        """Walk a WITH list, each CTE seeing the names PostgreSQL lets it see; return the names its query sees."""
        ctes = [item["CommonTableExpr"] for item in clause["ctes"]]
        names = [cte["ctename"] for cte in ctes]
        for position, cte in enumerate(ctes):
            # A plain CTE sees only the ones before it; under RECURSIVE every one sees all, itself included.
            visible = names if clause.get("recursive") else names[:position]
            self.walk(cte["ctequery"], outer | frozenset(visible))
        return outer | frozenset(names)

    def _note_dependency(self, kind: str, fields: dict) -> None:
        if kind == "FuncCall":
            names = [part["String"]["sval"] for part in fields["funcname"]]
            self.functions.add((names[-2] if len(names) > 1 else None, names[-1]))
        elif kind == "SQLValueFunction":
            keyword = fields["op"].removeprefix("SVFOP_").removesuffix("_N")
            self.time_dependent.setdefault(
                f"uses {keyword}, whose value changes with time" if keyword in _CLOCK_KEYWORDS
                else f"uses {keyword}, which depends on the session, not on the tables")
        elif kind == "A_Const" and "sval" in fields and _names_the_clock(fields["sval"].get("sval", "")):
            value = fields["sval"]["sval"]
            shown = value if len(value) <= 40 else value[:37] + "..."
            self.time_dependent.setdefault(
                f"uses the literal {shown!r}, which read as a date or time means the moment the query runs")
        elif kind == "RangeTableSample":
            self.time_dependent.setdefault("samples rows with TABLESAMPLE, which may pick other rows at each run")
        elif kind == "ColumnRef":
            column = fields["fields"][-1].get("String", {}).get("sval")
            if column in _SYSTEM_COLUMNS_THAT_MOVE:
                self.time_dependent.setdefault(
                    f"reads the system column {column}, which {_SYSTEM_COLUMNS_THAT_MOVE[column]} changes without "
                    "firing triggers")


# SQLValueFunction keywords that read the clock; the others (CURRENT_USER, CURRENT_SCHEMA, ...) read the session.
_CLOCK_KEYWORDS = frozenset({"CURRENT_DATE", "CURRENT_TIME", "CURRENT_TIMESTAMP", "LOCALTIME", "LOCALTIMESTAMP"})
# Date and time input turns these words into the current time wherever a string meets a date or time type: in a
# cast, but also as an untyped literal compared with a timestamp column ("WHERE at > 'today'"), which the parse tree
# cannot tell apart from a text comparison. The input routine skips punctuation around words (')(today)(' is
# today), so any word of the literal counts, not only the whole of it.
_CLOCK_WORDS = frozenset({"now", "today", "tomorrow", "yesterday"})
# System columns whose values change without a write (xmin is set only by writes, which fire triggers).
_SYSTEM_COLUMNS_THAT_MOVE = {"ctid": "a table rewrite (VACUUM FULL, CLUSTER)", "xmax": "a row lock",
                             "cmin": "a row lock", "cmax": "a row lock"}

# Not listed, on purpose:
# - Operators. They are not function calls here, and the built-in ones are immutable or stable only because they
#   read the TimeZone or text search configuration of the session (timestamptz + interval, date = timestamptz,
#   text @@ text); none reads the clock. A user-defined operator in another schema is not checked.
# - Row order. Without ORDER BY the rows come in an unspecified order that may differ between runs over the same
#   data (synchronized scans, parallel workers), so LIMIT, DISTINCT ON or array_agg may pick other rows. The last
#   result is still a correct answer to the query over unchanged tables, which is all a skipped run relies on.


def _statement_kind(node_type: str) -> str:
    return node_type.removesuffix("Stmt").upper()


def _names_the_clock(text: str) -> bool:
    return not _CLOCK_WORDS.isdisjoint(re.findall(r"[a-z]+", text.lower()))


def _parse_one_select(text: str) -> _Collector:
    """Parse a single read-only query and walk it, or raise QueryRejected saying why it is not one."""
    if not text or not text.strip():
        raise QueryRejected("the query is empty")
    try:
        statements = json.loads(parse_sql_json(text)).get("stmts", [])
    except ParseError as exc:
        raise QueryRejected(f"syntax error: {exc}") from None
    if len(statements) != 1:
        raise QueryRejected(f"expected exactly one statement, found {len(statements)}")
    kind = next(iter(statements[0]["stmt"]))
    if kind != "SelectStmt":
        raise QueryRejected(f"only SELECT, WITH ... SELECT, VALUES and TABLE are allowed, not {_statement_kind(kind)}")
    collector = _Collector()
    collector.walk(statements[0]["stmt"])
    if collector.problems:
        raise QueryRejected(collector.problems[0])
    return collector


def _sorted_refs(refs: set[TableRef]) -> list[TableRef]:
    return sorted(refs, key=lambda ref: (ref.schema or "", ref.name))


def analyse_query(text: str) -> list[TableRef]:
    """Return the relations a single read-only query reads, or raise QueryRejected saying why it is not one."""
    return _sorted_refs(_parse_one_select(text).relations)


@dataclass(frozen=True)
class QueryDependencies:
    """What a query's result depends on: the relations it reads, the functions it calls (schema or None, name, as
    PostgreSQL folded them) and, in plain words, what makes it depend on the clock or the session besides those."""

    relations: tuple[TableRef, ...]
    functions: tuple[tuple[str | None, str], ...]
    time_dependent: tuple[str, ...]


def dependencies(text: str) -> QueryDependencies:
    """What a single read-only query depends on, or QueryRejected saying why it is not one."""
    collector = _parse_one_select(text)
    return QueryDependencies(
        relations=tuple(_sorted_refs(collector.relations)),
        functions=tuple(sorted(collector.functions, key=lambda pair: (pair[0] or "", pair[1]))),
        time_dependent=tuple(collector.time_dependent),
    )


def stable_reason(deps: QueryDependencies, *, tables: Mapping[tuple[str | None, str], str | None],
                  unstable_tables: Mapping[str, str], functions: Mapping[tuple[str | None, str], str | None],
                  watched_tables_with_triggers: Collection[str]) -> str | None:
    """None when the query's result can change only when one of its watched tables does; otherwise the first reason
    why it can change without that. `tables`, `unstable_tables` and `functions` are database.describe_dependencies'
    answer for these dependencies (or more); anything it does not cover counts as a reason."""
    if deps.time_dependent:
        return deps.time_dependent[0]
    for pair in deps.functions:
        if pair not in functions:
            return f"calls {_function_name(pair)}(), which was not checked"
        if functions[pair] is not None:
            return functions[pair]
    for ref in deps.relations:
        shown = ref.name if ref.schema is None else f"{ref.schema}.{ref.name}"
        if (ref.schema, ref.name) not in tables:
            return f"reads {shown}, which was not checked"
        key = tables[(ref.schema, ref.name)]
        if key is None:
            return f"reads {shown}, which does not exist"
        if key in unstable_tables:
            return unstable_tables[key]
        if key not in watched_tables_with_triggers:
            return f"reads {key}, which has no change trigger"
    return None


def _function_name(pair: tuple[str | None, str]) -> str:
    return pair[1] if pair[0] is None else f"{pair[0]}.{pair[1]}"


# --- incremental evaluation ------------------------------------------------------------------------------------

# The setting that carries a change's rows (as the text of an array of the table's row type) into the session that
# runs the alert's query over them; set with set_config(..., true) just before, so it lives only in that savepoint.
DELTA_SETTING = "alert_service.delta"
# SelectStmt fields that make a result more than "each row of the table, filtered and projected on its own".
_NOT_ROW_BY_ROW = {
    "withClause": "has a WITH clause", "distinctClause": "uses DISTINCT", "groupClause": "groups rows",
    "havingClause": "has HAVING", "windowClause": "uses a window", "limitCount": "has LIMIT",
    "limitOffset": "has OFFSET", "valuesLists": "is a VALUES list", "larg": "is a set operation",
    "intoClause": "creates a table", "lockingClause": "locks rows",
}
_AGGREGATE_FLAGS = ("agg_star", "agg_distinct", "agg_filter", "agg_order", "agg_within_group", "over")


@dataclass(frozen=True)
class DeltaForm:
    """An alert query that only filters and projects the rows of one table: its result over the rows a statement
    added is exactly the part of the full result those rows make. `before` and `after` are the query's text
    around the table's name, which a delta query replaces with the rows."""

    table: TableRef
    before: str
    after: str
    alias: str | None  # None when the query names no alias: the rows then take the table's name

    def query(self, row_type: str) -> str:
        """The query over the rows in DELTA_SETTING; `row_type` is the table's quoted `schema.table`."""
        rows = f"pg_catalog.unnest(pg_catalog.current_setting('{DELTA_SETTING}')::{row_type}[])"
        named = "" if self.alias is not None else f" AS {quote_ident(self.table.name)}"
        return f"{self.before}{rows}{named}{self.after}"


def quote_ident(name: str) -> str:
    """An identifier quoted as PostgreSQL's quote_ident() would always do it."""
    return '"' + name.replace('"', '""') + '"'


def delta_form(text: str) -> DeltaForm | str:
    """The query's DeltaForm, or in plain words why its result cannot be computed from the changed rows alone.
    Which functions it calls (aggregates, set-returning, volatile) is for the catalog to say, not the parser."""
    try:
        statements = json.loads(parse_sql_json(text)).get("stmts", [])
    except ParseError as exc:
        return f"syntax error: {exc}"
    if len(statements) != 1 or "SelectStmt" not in statements[0]["stmt"]:
        return "it is not one SELECT"
    select = statements[0]["stmt"]["SelectStmt"]
    for name, reason in _NOT_ROW_BY_ROW.items():
        if name in select:
            return f"the query {reason}"
    from_clause = select.get("fromClause", [])
    if len(from_clause) != 1 or "RangeVar" not in from_clause[0]:
        return "the query does not read exactly one table (joins and subqueries in FROM need the whole tables)"
    relation = from_clause[0]["RangeVar"]
    if not relation.get("inh", False):
        return "the query reads ONLY the table"
    problem = _row_by_row_problem({key: value for key, value in select.items() if key != "fromClause"})
    if problem:
        return problem
    # libpg_query gives byte offsets, the scanner character offsets.
    start = len(text.encode("utf-8")[:relation["location"]].decode("utf-8", "ignore"))
    tokens = [token for token in scan(text) if token.name not in ("C_COMMENT", "SQL_COMMENT")]
    position = next((i for i, token in enumerate(tokens) if token.start == start), None)
    if position is None:
        return "the table's name could not be found in the text"
    end = position + 2 * sum(1 for part in ("catalogname", "schemaname") if part in relation)  # name . name . name
    if end >= len(tokens):
        return "the table's name could not be found in the text"
    if position > 0 and tokens[position - 1].name == "TABLE":  # TABLE t is SELECT * FROM t
        before = text[:tokens[position - 1].start] + "SELECT * FROM "
    else:
        before = text[:start]
    alias = relation.get("alias", {}).get("aliasname")
    return DeltaForm(table=TableRef(relation.get("schemaname"), relation["relname"]), before=before,
                     after=text[tokens[end].end + 1:], alias=alias)


def _row_by_row_problem(tree) -> str | None:
    """Why a part of a query needs more than one row at a time (a subquery, an aggregate, a window), or None."""
    if isinstance(tree, list):
        return next((p for item in tree if (p := _row_by_row_problem(item))), None)
    if not isinstance(tree, dict):
        return None
    if "SubLink" in tree:
        return "the query has a subquery, which reads beyond the changed rows"
    if "FuncCall" in tree and any(flag in tree["FuncCall"] for flag in _AGGREGATE_FLAGS):
        return "the query aggregates or uses a window"
    if "GroupingFunc" in tree:
        return "the query groups rows"
    return next((p for value in tree.values() if (p := _row_by_row_problem(value))), None)


def delta_table(deps: QueryDependencies, form: DeltaForm | str, *,
                tables: Mapping[tuple[str | None, str], str | None],
                functions: Mapping[tuple[str | None, str], str | None],
                delta_tables: Mapping[str, str | None],
                delta_functions: Mapping[tuple[str | None, str], str | None]) -> tuple[str | None, str | None]:
    """(the table's key, None) when the query's result over the rows a statement added is exactly what those rows
    add to its full result, else (None, why not). The mappings are database.describe_dependencies' answer."""
    if isinstance(form, str):
        return None, form
    if deps.time_dependent:
        return None, deps.time_dependent[0]
    for pair in deps.functions:
        for facts in (functions, delta_functions):
            if pair not in facts:
                return None, f"calls {_function_name(pair)}(), which was not checked"
            if facts[pair] is not None:
                return None, facts[pair]
    key = tables.get((form.table.schema, form.table.name))
    if key is None:
        return None, "the table it reads was not found"
    reason = delta_tables.get(key, f"{key} was not checked")
    return (None, reason) if reason is not None else (key, None)
