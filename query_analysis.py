"""Checks an alert query with PostgreSQL's own parser; finds the tables it reads and what else its result uses."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from pglast.parser import ParseError, parse_sql_json

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
