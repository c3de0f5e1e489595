"""Swagger UI and ReDoc are served by the service itself: headless Chromium renders both with every host but the
service unreachable, and the pages ask nothing of any other host."""

from __future__ import annotations

import re
import threading
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import uvicorn

import api
from config import load_settings
from tests.browser import CHROMIUM, HeadlessChromium
from tests.conftest import (TEST_SECRET_KEY, Service, _new_database, drop_database, dsn_with, free_port,
                            wait_for_health)

# Screenshots are kept here after the run (ignored by git), for a person to look at.
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary on PATH (chromium, chromium-browser or google-chrome): install "
                             "one (Debian: apt-get install chromium) to render the API docs in a browser")


@pytest.fixture(scope="module")
def service_url(pg_admin_dsn, template_database, tmp_path_factory) -> Iterator[str]:
    """The real service behind uvicorn on a loopback port, with a database of its own."""
    name = _new_database(pg_admin_dsn, template_database)
    settings = load_settings(_env_file=None, db_connection=dsn_with(pg_admin_dsn, dbname=name), log_file="",
                             secret_key=TEST_SECRET_KEY, data_dir=str(tmp_path_factory.mktemp("data")))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api.create_app(settings), host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_health(port, "uvicorn")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(20)
    drop_database(pg_admin_dsn, name)


@pytest.fixture
def browser(tmp_path) -> Iterator[HeadlessChromium]:
    """Headless Chromium that can reach loopback only (other hosts go to a proxy port where nothing listens)."""
    with HeadlessChromium(tmp_path / "profile", dead_port=free_port(), height=2400) as chromium:
        yield chromium


def sent_elsewhere(requests: list[tuple[str, str | None]], service_url: str) -> list[str]:
    """The requests that left the browser for anything but the service (data: and blob: URLs never leave the page,
    and a request the page's Content-Security-Policy refused is never sent)."""
    return [url for url, blocked in requests if blocked != "csp"
            and not url.startswith((service_url + "/", "data:", f"blob:{service_url}/"))]


@needs_chromium
def test_swagger_ui_renders_every_operation_with_no_network_but_the_service(service_url, browser):
    browser.open(f"{service_url}{api.DOCS_URL}")
    operations = browser.wait_for("document.querySelectorAll('.opblock').length >= 20 && "
                                  "[...document.querySelectorAll('.opblock-summary-path')].map(e => e.dataset.path)")
    assert {"/alert-configs/", "/incidents/", "/metrics", "/health"} <= set(operations), operations
    ARTIFACTS.mkdir(exist_ok=True)
    browser.screenshot(ARTIFACTS / "swagger-ui.png")
    requests = browser.requests()
    requested = [url for url, _ in requests]
    assert f"{service_url}{api.OPENAPI_URL}" in requested
    assert any(url.endswith(".js") for url in requested) and any(url.endswith(".css") for url in requested)
    outside = sent_elsewhere(requests, service_url)
    assert outside == [], f"the page asked other hosts: {outside}"
    assert (ARTIFACTS / "swagger-ui.png").stat().st_size > 20_000, "the screenshot is blank"


@needs_chromium
def test_redoc_renders_every_operation_with_no_network_but_the_service(service_url, browser):
    browser.open(f"{service_url}{api.REDOC_URL}")
    browser.wait_for("document.querySelectorAll('[data-section-id^=\"operation/\"]').length >= 20")
    assert "/alert-configs/" in browser.evaluate("document.body.innerText")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.screenshot(ARTIFACTS / "redoc.png")
    outside = sent_elsewhere(browser.requests(), service_url)
    assert outside == [], f"the page asked other hosts: {outside}"


def test_the_docs_pages_load_everything_from_the_service_itself(service_url):
    for path in (api.DOCS_URL, api.REDOC_URL):
        with urllib.request.urlopen(f"{service_url}{path}", timeout=5) as response:
            page = response.read().decode()
        references = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)["\']', page)
        assert len(references) >= 2, page  # the script, and the icon (and Swagger UI's style sheet)
        assert "http://" not in page and "https://" not in page, page
        for reference in references:
            assert reference.startswith("/") and not reference.startswith("//"), reference
            with urllib.request.urlopen(f"{service_url}{reference}", timeout=5) as asset:
                assert asset.status == 200 and asset.read(), reference


def test_with_an_api_key_set_the_docs_and_their_assets_need_none(settings):
    key = "docs-key-0123456789abcdef"
    secured = Service(settings.model_copy(update={"api_key": load_settings(_env_file=None, api_key=key).api_key}))
    secured.start()
    try:
        client = secured.client
        for path in (api.DOCS_URL, api.REDOC_URL, api.OPENAPI_URL, f"{api.DOCS_ASSETS_URL}/swagger-ui-bundle.js",
                     f"{api.DOCS_ASSETS_URL}/redoc.standalone.js", f"{api.DOCS_ASSETS_URL}/favicon.png"):
            assert client.get(path).status_code == 200, path
        # The assets' prefix is no way round the key (the client would resolve a plain "..").
        sneaking = client.get(f"{api.DOCS_ASSETS_URL}/%2e%2e/%2e%2e/metrics")
        assert sneaking.status_code == 404 and "alert_service" not in sneaking.text
        assert client.get("/metrics").status_code == 401
        assert "default-src 'self'" in client.get(api.DOCS_URL).headers["content-security-policy"]
    finally:
        secured.stop()
