"""Property-based API testing from the OpenAPI schema: no 5xx and no response outside the schema."""

from __future__ import annotations

import threading
import time

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from psycopg2 import sql
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

import api
from config import load_settings
from tests.conftest import TEST_SECRET_KEY, admin_execute, drop_database, dsn_with, free_port, wait_for_health


@pytest.fixture(scope="module")
def api_url(pg_admin_dsn, template_database, tmp_path_factory):
    """The real service behind uvicorn on a free port, with a database of its own."""
    name = f"alert_fuzz_{int(time.time() * 1000) % 10**9}"
    admin_execute(pg_admin_dsn, sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(name), sql.Identifier(template_database)))
    dsn = dsn_with(pg_admin_dsn, dbname=name)
    admin_execute(dsn, "CREATE TABLE dc_order (order_number text, created_at timestamptz DEFAULT now())")
    port = free_port()
    settings = load_settings(_env_file=None, db_connection=dsn, log_file="", secret_key=TEST_SECRET_KEY,
                             data_dir=str(tmp_path_factory.mktemp("data")), query_timeout_seconds=5)
    server = uvicorn.Server(uvicorn.Config(api.create_app(settings), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    wait_for_health(port, "uvicorn")
    yield url
    server.should_exit = True
    thread.join(20)
    drop_database(pg_admin_dsn, name)


@pytest.fixture(scope="module")
def api_schema(api_url):
    return schemathesis.openapi.from_url(f"{api_url}/api/openapi.json")


def test_no_request_gets_a_5xx_or_an_off_schema_response(api_schema, api_url):
    # Each operation gets its own bounded Hypothesis run (schemathesis' pytest plugin does not load on pytest 9).
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20
    for operation in operations:
        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=25, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(base_url=api_url, checks=[not_a_server_error, response_schema_conformance])

        check()
