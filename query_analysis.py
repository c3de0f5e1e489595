"""Checks an alert query with PostgreSQL's own parser and finds the tables it reads."""

from __future__ import annotations

from dataclasses import dataclass

import pglast
from pglast import ast
from pglast.visitors import Visitor

_WRITING_NODES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)


class QueryRejected(ValueError):
    """The text is not exactly one read-only query."""


@dataclass(frozen=True)
class TableRef:
    """A relation named in a query; schema is None when the name is unqualified."""

    schema: str | None
    name: str


class _Collector(Visitor):
    """Walks a parse tree once, gathering relation names, CTE names and anything that writes or locks."""

    def __init__(self) -> None:
        super().__init__()
        self.relations: set[TableRef] = set()
        self.cte_names: set[str] = set()
        self.problems: list[str] = []

    def visit_RangeVar(self, ancestors, node: ast.RangeVar) -> None:
        self.relations.add(TableRef(node.schemaname, node.relname))

    def visit_CommonTableExpr(self, ancestors, node: ast.CommonTableExpr) -> None:
        self.cte_names.add(node.ctename)

    def visit_SelectStmt(self, ancestors, node: ast.SelectStmt) -> None:
        if node.intoClause is not None:
            self.problems.append("SELECT INTO creates a table; alert queries may only read")
        if node.lockingClause:
            self.problems.append("locking clauses (FOR UPDATE, FOR SHARE, ...) are not allowed in alert queries")

    def visit(self, ancestors, node):  # noqa: D102 - one hook for every node type
        if isinstance(node, _WRITING_NODES):
            kind = type(node).__name__.removesuffix("Stmt").upper()
            self.problems.append(f"the query contains {kind}; alert queries may only read")
        return None


def analyse_query(text: str) -> list[TableRef]:
    """Return the relations a single read-only query reads, or raise QueryRejected saying why it is not one."""
    if not text or not text.strip():
        raise QueryRejected("the query is empty")
    try:
        statements = pglast.parse_sql(text)
    except pglast.parser.ParseError as exc:
        raise QueryRejected(f"syntax error: {exc}") from None
    if len(statements) != 1:
        raise QueryRejected(f"expected exactly one statement, found {len(statements)}")
    statement = statements[0].stmt
    if not isinstance(statement, ast.SelectStmt):
        kind = type(statement).__name__.removesuffix("Stmt").upper()
        raise QueryRejected(f"only SELECT, WITH ... SELECT, VALUES and TABLE are allowed, not {kind}")
    collector = _Collector()
    collector(statement)
    if collector.problems:
        raise QueryRejected(collector.problems[0])
    # An unqualified name that matches a CTE is the CTE, not a table.
    tables = [ref for ref in collector.relations if not (ref.schema is None and ref.name in collector.cte_names)]
    return sorted(tables, key=lambda ref: (ref.schema or "", ref.name))
