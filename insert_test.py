"""Insert demo orders into dc_order to fire alerts by hand: python insert_test.py [--count N] [--table NAME]."""

from __future__ import annotations

import argparse
import random
import sys

import psycopg2
import psycopg2.extras
from psycopg2 import sql

import database
from config import ConfigError, load_settings

BUSINESS_UNITS = ["North", "South", "East", "West"]
PRIORITIES = ["LOW", "MEDIUM", "HIGH"]
PIPELINES = ["standard", "express", "bulk"]


def parse_table(name: str) -> sql.Identifier:
    """`table` or `schema.table` as a quoted identifier."""
    parts = name.split(".")
    if len(parts) > 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"{name!r} is not a table name or schema.table")
    return sql.Identifier(*parts)


def ensure_table(cur, table: sql.Identifier) -> None:
    """Create the demo table if missing; a hypertable when TimescaleDB is installed."""
    cur.execute("SELECT to_regclass(%s)", (table.as_string(cur),))
    if cur.fetchone()[0] is not None:
        return
    cur.execute(sql.SQL(
        "CREATE TABLE {} (order_number text NOT NULL, business_unit text, priority text, "
        "pipeline text, created_at timestamptz NOT NULL DEFAULT now())"
    ).format(table))
    cur.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
    if cur.fetchone():
        cur.execute("SELECT create_hypertable(%s::regclass, 'created_at')", (table.as_string(cur),))


def insert_orders(cur, table: sql.Identifier, count: int) -> list[str]:
    """Insert `count` orders with order numbers after the highest one present, in one statement."""
    cur.execute(sql.SQL(
        "SELECT COALESCE(max(substring(order_number FROM '[0-9]+$')::bigint), 0) FROM {} WHERE order_number ~ '^ORD[0-9]+$'"
    ).format(table))
    start = cur.fetchone()[0] + 1
    numbers = [f"ORD{n:08d}" for n in range(start, start + count)]
    rows = [(n, random.choice(BUSINESS_UNITS), random.choice(PRIORITIES), random.choice(PIPELINES)) for n in numbers]
    psycopg2.extras.execute_values(
        cur, sql.SQL("INSERT INTO {} (order_number, business_unit, priority, pipeline) VALUES %s").format(table), rows
    )
    return numbers


def main(argv: list[str] | None = None) -> int:
    """Create the table if needed, insert the rows in one transaction, and print their order numbers."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1, help="how many rows to insert (default 1)")
    parser.add_argument("--table", type=parse_table, default=sql.Identifier("dc_order"),
                        help="table or schema.table (default dc_order)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    try:
        dsn = database.resolve_dsn(load_settings())
    except (ConfigError, database.DatabaseError) as exc:
        print(f"insert_test: {exc}", file=sys.stderr)
        return 2
    conn = database.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            ensure_table(cur, args.table)
            numbers = insert_orders(cur, args.table, args.count)
    finally:
        conn.close()
    shown = ", ".join(numbers[:10]) + (f" … ({len(numbers)} in all)" if len(numbers) > 10 else "")
    print(f"inserted {len(numbers)} row(s): {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
