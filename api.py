"""The HTTP API: routes, request and response schemas, and the mapping of domain errors to status codes."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping
from urllib.parse import parse_qsl, urlsplit
from uuid import UUID
from zoneinfo import ZoneInfo

import fastapi_offline
import psycopg2.extensions
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, create_model,
                      field_validator, model_serializer, model_validator)

import config_plan
import database
import incident_page
import query_analysis
import rules
import templating
from config import Settings, ascii_email, is_e164, load_settings
import notification
from cluster import Lease, Membership, messages
from notification import Dispatcher
from evaluation import DryRunsBusy
from metrics import Metrics
from scheduler import AlertScheduler

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_000_000
TOO_LARGE = f"request body over {MAX_BODY_BYTES} bytes"
MISSING_KEY = "missing API key: send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'"
# The scheduler and the dispatcher each get this long to stop; what still hangs then is abandoned.
STOP_SECONDS = 4.0
# /health waits this long for the service database, so it answers within a second even when the database hangs.
HEALTH_PING_SECONDS = 0.8
MUTE_LIMIT = datetime(3000, 1, 1, tzinfo=timezone.utc)
# Swagger UI and ReDoc, with their scripts, styles and icon served from here (no CDN): the docs work offline.
DOCS_URL = "/api/docs"
REDOC_URL = "/api/redoc"
DOCS_ASSETS_URL = "/api/docs-assets"
OPENAPI_URL = "/api/openapi.json"
# The docs pages may load nothing from another origin. ReDoc's sidebar asks a CDN for its logo whatever its options;
# this keeps the browser from sending that request (the logo hides itself when it does not load).
DOCS_CONTENT_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                       "img-src 'self' data:; worker-src 'self' blob:; frame-ancestors 'self'")


# --- wiring ----------------------------------------------------------------------------------------------------


@dataclass
class Services:
    """Everything the routes need, started and stopped with the app."""

    settings: Settings
    pool: database.Pool
    box: database.SecretBox
    sources: database.SourcePools
    dispatcher: Dispatcher | None = None  # None without background threads (the apply command)
    delivery_poller: notification.DeliveryStatusPoller | None = None  # asks Twilio when it cannot call back
    scheduler: AlertScheduler | None = None
    membership: Membership | None = None
    metrics: Metrics | None = None
    health_ping: asyncio.Future | None = None  # the database ping /health requests are waiting on


def start_services(settings: Settings, dsn: str | None = None) -> Services:
    """Connect, migrate, and start the dispatcher and the scheduler."""
    services = open_services(settings, dsn)
    try:
        services.metrics = Metrics(channels=notification.channel_names())
        lease = Lease(services.pool.dsn, settings)
        services.dispatcher = Dispatcher(services.pool, settings, metrics=services.metrics, lease=lease)
        services.scheduler = AlertScheduler(services.pool, settings, sources=services.sources,
                                            on_outbox=services.dispatcher.wake, metrics=services.metrics)
        services.membership = Membership(services.pool, lease, on_acquire=services.scheduler.source_acquired,
                                         on_release=services.scheduler.source_released,
                                         on_message=services.scheduler.peer_message)
        services.scheduler.attach(services.membership)
        services.metrics.watch(pool=services.pool, scheduler_status=services.scheduler.status)
    except BaseException:
        services.sources.close()
        services.pool.close()
        raise
    try:
        # Started in the background: the first templated message should not wait for them, nor start-up.
        templating.start(processes=settings.template_processes, timeout_seconds=settings.template_timeout_seconds,
                         memory_mb=settings.template_memory_mb)
        # The lease first: claims and stores are made in its name. Then the alerts are registered, and only then
        # does this instance take its share of the data sources (which starts their listeners and catch-ups).
        lease.start()
        services.dispatcher.start()
        services.scheduler.start()
        services.membership.start()
        if not settings.public_base_url and (settings.whatsapp_enabled or settings.sms_enabled):
            services.delivery_poller = notification.DeliveryStatusPoller(services.pool, settings)
            services.delivery_poller.start()
    except BaseException:
        stop_services(services)
        raise
    return services


def open_services(settings: Settings, dsn: str | None = None) -> Services:
    """Connect, migrate, and check the stored secrets and the role alert queries run as: what the routes need,
    without the background threads."""
    dsn = dsn or database.resolve_dsn(settings)
    logger.info("service database: %s", database.describe_dsn(dsn))
    pool = database.service_pool(dsn, size=settings.workers + settings.dry_run_workers + 8,
                                 deadline_seconds=database.SERVICE_DEADLINE_SECONDS)
    try:
        database.migrate(pool)
        database.allow_channels(pool, channels=notification.channel_names())
        box = database.SecretBox(settings.secret_key.get_secret_value() if settings.secret_key else None)
        # Fail at start-up, not at the first alert, when the key cannot read what is stored.
        database.check_stored_secrets(pool, box)
        # Alert queries on the default source never run as the service's own role: fail here rather than run them so.
        try:
            reader_dsn = (settings.reader_dsn.get_secret_value() if settings.reader_dsn
                          else database.ensure_reader_role(pool, database_dsn=dsn))
            rights = database.check_reader(reader_dsn)
        except database.ReaderRoleError as exc:
            logger.error("cannot start: %s", exc)
            raise
        with pool.transaction() as cur:
            default = database.get_data_source(cur, data_source_id=None)
            database.store_role_rights(cur, data_source_id=default["id"], rights=rights)
        logger.info("alert queries on the default data source run as role %s", rights["role"])
        sources = database.SourcePools(pool, size=settings.workers_per_data_source + 1, box=box, database_dsn=dsn,
                                       reader_dsn=reader_dsn,
                                       deadline_seconds=database.query_deadline(settings.query_timeout_seconds),
                                       api_size=settings.dry_run_workers + 1)
    except BaseException:
        pool.close()
        raise
    return Services(settings=settings, pool=pool, box=box, sources=sources)


def stop_services(services: Services) -> None:
    """Stop background threads (abandoning any that hang), then close every connection: bounded in time."""
    # Evaluations store nothing from here on; then the render processes go, so that an evaluation rendering a
    # runaway template ends now instead of holding up the stop.
    try:
        if services.scheduler is not None:
            services.scheduler.stopping()
        templating.stop()
        if services.membership is not None:
            services.membership.stop()
            # Nothing is stored from here on (and a store still running is fenced by the new epoch): the others
            # take the data sources over now, not after the sends below have finished or timed out.
            services.membership.lease.hand_over()
        if services.scheduler is not None:
            services.scheduler.stop(timeout=STOP_SECONDS)
        if services.dispatcher is not None:
            services.dispatcher.stop(timeout=STOP_SECONDS)
        if services.delivery_poller is not None:
            services.delivery_poller.stop(timeout=STOP_SECONDS)
        if services.membership is not None:
            # Last: the claims of the sends above last while the lease does; ending it frees any left over.
            services.membership.lease.leave()
    finally:
        services.sources.close()
        services.pool.close()
        # Here and not only at exit: under `uvicorn api:app` a SIGTERM ends the process without running atexit
        # handlers.
        database.stop_embedded_server()


def create_app(settings: Settings | None = None, dsn: str | None = None) -> FastAPI:
    """The FastAPI application; the scheduler and dispatcher run for as long as its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.services = await run_in_threadpool(start_services, settings or load_settings(), dsn)
        try:
            yield
        finally:
            await run_in_threadpool(stop_services, app.state.services)

    app = FastAPI(
        title="Alert service for TimescaleDB and PostgreSQL",
        # Counts bytes as they arrive, so a chunked body without Content-Length is cut at the limit too.
        max_body_size=MAX_BODY_BYTES,
        description="Register SQL queries; get email and WhatsApp alerts when their results change.",
        version="1.0.0",
        docs_url=None,  # FastAPI's own pages load Swagger UI and ReDoc from a CDN: see _install_docs
        redoc_url=None,
        openapi_url=OPENAPI_URL,
        lifespan=lifespan,
    )
    _install_docs(app)
    _install_error_handlers(app)
    _install_routes(app)
    _install_metrics(app)
    _install_twilio_status(app)
    _install_incident_page(app)
    return app


def _install_docs(app: FastAPI) -> None:
    """Swagger UI and ReDoc with every script, style sheet and icon served by the service, from fastapi-offline's
    copy of them, so the docs work without internet."""
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static"),
              name="docs-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{OPENAPI_URL}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            # Otherwise Swagger UI may offer to check the schema at validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None})
        page.headers["Content-Security-Policy"] = DOCS_CONTENT_POLICY
        return page

    @app.get(REDOC_URL, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{OPENAPI_URL}", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png", with_google_fonts=False)
        page.headers["Content-Security-Policy"] = DOCS_CONTENT_POLICY
        return page


def _services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(_services)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="One of the keys in API_KEY")
_bearer = HTTPBearer(auto_error=False, description="One of the keys in API_KEY, as a bearer token")


def require_api_key(
    request: Request,
    header_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Accept the request when API_KEY is unset, or when X-API-Key or a bearer token matches one of its keys."""
    keys = request.app.state.services.settings.api_keys
    if not keys:
        return
    offered = header_key or (bearer.credentials if bearer else None)
    if offered is None:
        raise HTTPException(401, MISSING_KEY, headers={"WWW-Authenticate": "Bearer"})
    if not _key_matches(offered, keys):
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


def _key_matches(offered: str, keys: list[str]) -> bool:
    # Compare with every key, without stopping early, so timing says nothing about which key is close.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(offered.encode(), key.encode())
    return matched


def _authenticated(request: Request) -> bool:
    """Whether a request carries a valid key (always true when API_KEY is unset)."""
    return _key_refusal(request) is None


def _key_refusal(request: Request) -> str | None:
    """Why a request's key is not accepted, or None when it is (or API_KEY is unset)."""
    keys = request.app.state.services.settings.api_keys
    if not keys:
        return None
    offered = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization", "")
    if offered is None and authorization.lower().startswith("bearer "):
        offered = authorization[7:].strip()
    if offered is None:
        return MISSING_KEY
    return None if _key_matches(offered, keys) else "invalid API key"


# --- errors ----------------------------------------------------------------------------------------------------


def field_error(field: str, message: str) -> HTTPException:
    """A 422 in FastAPI's own validation shape, naming the body field."""
    return HTTPException(
        status_code=422,
        detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}],
    )


def not_found(kind: str, ident: UUID) -> HTTPException:
    """A 404 naming what was not found."""
    return HTTPException(status_code=404, detail=f"{kind} {ident} not found")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(database.DatabaseUnavailable)
    async def _unavailable(request: Request, exc: database.DatabaseUnavailable):
        return JSONResponse(status_code=503, content={"detail": f"database unavailable: {exc}"})

    @app.exception_handler(database.Deadlock)
    async def _deadlock(request: Request, exc: database.Deadlock):
        return JSONResponse(status_code=503, content={"detail": str(exc)}, headers={"Retry-After": "1"})

    @app.exception_handler(database.Conflict)
    async def _conflict(request: Request, exc: database.Conflict):
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # The default handler echoes the whole input back, which may include a password.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "value_error")}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(413)
    async def _too_large(request: Request, exc: HTTPException):
        return JSONResponse(status_code=413, content={"detail": TOO_LARGE})

    app.add_middleware(_Gate)


class _Gate:
    """Refuses a request before a byte of its body is read: 401 without a valid key, 413 for a declared length
    over the limit. (FastAPI reads the body before it runs dependencies such as require_api_key.)"""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            refusal = None
            path = scope["path"]
            # Twilio's status callbacks carry Twilio's signature, not an API key, and incident pages a signed link:
            # their routes check those.
            public = (path in ("/health", DOCS_URL, REDOC_URL, OPENAPI_URL, notification.TWILIO_STATUS_PATH)
                      or path.startswith((DOCS_ASSETS_URL + "/", notification.INCIDENT_PAGE_PATH + "/")))
            problem = None if public else _key_refusal(request)
            if problem is not None:
                refusal = JSONResponse(status_code=401, content={"detail": problem},
                                       headers={"WWW-Authenticate": "Bearer"})
            else:
                length = request.headers.get("content-length")
                # isdigit() alone admits digits such as '²' that int() refuses.
                if length is not None and not (length.isascii() and length.isdigit()
                                               and int(length) <= MAX_BODY_BYTES):
                    refusal = JSONResponse(status_code=413, content={"detail": TOO_LARGE})
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- schemas ---------------------------------------------------------------------------------------------------


class Priority(str, Enum):
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"


def _reject_nul(value: Any) -> Any:
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("text must not contain NUL (\\u0000) characters")
    if isinstance(value, dict):
        for item in value.values():
            _reject_nul(item)
    elif isinstance(value, list):
        for item in value:
            _reject_nul(item)
    return value


class RequestBody(BaseModel):
    """Base of every request body: PostgreSQL cannot store NUL characters, so they are a 422, not a 500."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        return _reject_nul(data)


# Stored as it is sent: an internationalised domain in IDNA form, and only ASCII before the @, so an address that
# is accepted here does not fail at every send.
EmailAddress = Annotated[str, AfterValidator(ascii_email), WithJsonSchema({"type": "string", "format": "email"})]


def _recipients_of(transport: type[notification.Transport]):
    """The field validator of one channel's recipients: the transport's own check."""
    def check(cls, values: list[str]) -> list[str]:
        return transport.recipients(values)
    return field_validator(transport.name)(check)


def _someone(self) -> RequestBody:
    """At least one recipient in all, given or by reference."""
    if not any(getattr(self, name) for name in [*notification.TRANSPORTS, "users", "teams"]):
        raise ValueError(f"at least one recipient is needed in {' or '.join(notification.TRANSPORTS)}, or a user "
                         "or team in users or teams")
    return self


# Channels a user is reached on: those a user's record has an address for.
PersonChannel = Literal[tuple(notification.PERSON_ADDRESSES)]


class _StoredChannels(RequestBody):
    """Recipients as stored: email and whatsapp always (as before other channels existed), the rest when given."""

    @model_serializer(mode="wrap")
    def _compact(self, handler) -> dict:
        data = handler(self)
        return {key: value for key, value in data.items()
                if key in ("email", "whatsapp") or (value and not (key == "user_channels" and value == ["email"]))}


# Recipients per channel, one list per registered channel: a new channel is a new field with no edit here.
NotificationChannels = create_model(
    "NotificationChannels",
    __base__=_StoredChannels,
    __doc__="Recipients per channel; at least one recipient in all.",
    __validators__={**{f"_{name}": _recipients_of(transport) for name, transport in notification.TRANSPORTS.items()},
                    "_someone": model_validator(mode="after")(_someone)},
    **{name: (list[Annotated[str, WithJsonSchema(transport.recipient_schema)]],
              Field(default_factory=list, max_length=100, description=transport.recipients_noun))
       for name, transport in notification.TRANSPORTS.items()},
    users=(list[UUID], Field(default_factory=list, max_length=100,
                             description="Users (ids) reached at their current email and phone when a message is "
                                         "queued")),
    teams=(list[UUID], Field(default_factory=list, max_length=100,
                             description="Teams (ids) whose members, as they are when a message is queued, are "
                                         "reached")),
    user_channels=(list[PersonChannel], Field(
        default_factory=lambda: ["email"], min_length=1, max_length=3,
        description="The channels users and team members are reached on: email (their email), whatsapp and sms "
                    "(their phone)")),
)
NotificationChannels.model_config = ConfigDict(extra="forbid", json_schema_extra={
    "example": {"email": ["oncall@example.com"], "whatsapp": ["+14155550123"]}})
NotificationChannels.model_rebuild(force=True)


ChannelName = Literal[tuple(notification.channel_names())]


class WhatsAppTemplate(RequestBody):
    """An approved WhatsApp Content template, and the message field each of its variables is filled with."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "example": {"content_sid": "HX0123456789abcdef0123456789abcdef",
                    "variables": {"1": "alert_name", "2": "row_count", "3": "first_rows"}}})

    content_sid: str = Field(pattern=r"^HX[0-9a-fA-F]{32}$",
                             description="The template's Content SID in Twilio's Content Template Builder")
    variables: dict[Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_]+$")],
                    Literal[notification.TEMPLATE_SOURCES]] = Field(
        default_factory=dict, max_length=20,
        description="Template variable ({{1}}, {{name}}) to message field: " + ", ".join(notification.TEMPLATE_SOURCES))

_ALERT_EXAMPLE = {
    "name": "Order Monitor",
    "description": "Monitor new orders",
    "query": "SELECT order_number, business_unit, priority FROM dc_order",
    "trigger_condition": "New row added",
    "schedule": "interval:1m",
    "notification_channels": {"email": ["oncall@example.com"], "whatsapp": ["+14155550123"]},
    "priority": "MEDIUM",
}


class AlertConfigIn(RequestBody):
    """An alert definition as sent by a client."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": _ALERT_EXAMPLE})

    name: str = Field(min_length=1, max_length=255)
    description: str | None = Field(None, max_length=10_000)
    query: str = Field(min_length=1, max_length=100_000)
    data_source_id: UUID | None = None
    trigger_condition: str | dict[str, Any] | None = Field(
        "New row added",
        description="'New row added' (new rows), removed_rows, any_change, empty, not_empty, or an object such as "
                    "{\"type\": \"threshold\", \"column\": \"qty\", \"operator\": \"<=\", \"value\": 5, "
                    "\"for\": \"5m\", \"repeat_every\": \"1h\"}; change conditions take \"cooldown\": \"5m\"",
    )
    message_template: str | None = Field(
        None, max_length=20_000,
        description="Jinja2 template (sandboxed) for the message body; variables: alert, kind, headline, detail, "
                    "columns, rows, new_rows, counts, incident",
    )
    key_columns: list[Annotated[str, Field(min_length=1, max_length=63)]] | None = Field(None, max_length=32)
    schedule: str = Field(max_length=255)
    notification_channels: NotificationChannels
    whatsapp_template: WhatsAppTemplate | None = Field(
        None, description="Send WhatsApp messages as this approved template: delivery then does not depend on the "
                          "24-hour window (error 63016)")
    priority: Priority = Priority.MEDIUM
    created_by: UUID | None = None

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the name must not be blank")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError("the name must be one line without control characters (it is the email subject)")
        return value.strip()

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        try:
            return rules.parse_schedule(value).text
        except rules.RuleError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("trigger_condition")
    @classmethod
    def _condition(cls, value: str | dict | None) -> str | dict:
        if isinstance(value, str) and len(value) > 255:
            raise ValueError("at most 255 characters")
        try:
            rules.parse_condition(value)
        except rules.RuleError as exc:
            raise ValueError(str(exc)) from None
        if value is None or (isinstance(value, str) and not value.strip()):
            return "New row added"
        return value

    @field_validator("message_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        # Only normalised here: rendering it runs in validate_alert, off the event loop.
        return value if value is not None and value.strip() else None

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        try:
            query_analysis.analyse_query(value)
        except query_analysis.QueryRejected as exc:
            raise ValueError(str(exc)) from None
        return value


class LastEvaluation(BaseModel):
    """The most recent evaluation of an alert."""

    id: int
    cause: str
    started_at: datetime
    duration_ms: float
    row_count: int | None
    new_row_count: int | None
    truncated: bool
    outcome: str
    error: str | None


class AlertConfigOut(BaseModel):
    """A stored alert."""

    model_config = ConfigDict(json_schema_extra={"example": {
        **_ALERT_EXAMPLE, "id": "3f1c2a4e-8a43-4f7e-9a55-1c2d3e4f5a6b",
        "data_source_id": "0b9f1f6e-4d1c-4f7a-8f0e-2a3b4c5d6e7f", "status": "ACTIVE", "key_columns": None,
        "created_by": None, "watched_tables": ["public.dc_order"], "events_enabled": True, "events_error": None,
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z", "last_evaluation": None}})

    id: UUID
    name: str
    description: str | None
    query: str
    data_source_id: UUID
    trigger_condition: str | dict[str, Any]
    condition: dict[str, Any] = Field(description="The trigger condition in its normalised structured form")
    message_template: str | None
    key_columns: list[str] | None
    schedule: str
    notification_channels: dict[str, list[str]]
    whatsapp_template: dict[str, Any] | None = None
    priority: Priority
    status: str
    created_by: UUID | None
    watched_tables: list[str]
    events_enabled: bool = Field(description="True when committed changes to the watched tables wake this alert")
    events_error: str | None = Field(description="Why events are off, when they are")
    muted_until: datetime | None = Field(description="While in the future, incidents are recorded but not sent")
    condition_state: Literal["OK", "PENDING", "FIRING"] | None = Field(
        None, description="State conditions: OK, PENDING (waiting out 'for') or FIRING; null before the first run")
    consecutive_errors: int = Field(0, description="Evaluations in a row whose query failed (ERROR when > 0)")
    created_at: datetime
    updated_at: datetime
    last_evaluation: LastEvaluation | None = None


class DataSourceIn(RequestBody):
    """Another PostgreSQL or TimescaleDB database that alerts can query: a DSN, or its parts."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
        "name": "warehouse", "type": "postgresql", "host": "db.example.com", "port": 5432, "dbname": "tsdb",
        "user": "alert_reader", "password": "secret", "sslmode": "require"}})

    name: str = Field(min_length=1, max_length=255)
    type: Literal["postgresql"] = "postgresql"
    dsn: str | None = Field(None, max_length=2000, description="libpq URI or key=value string")
    host: str | None = Field(None, max_length=255)
    port: int | None = Field(None, ge=1, le=65535)
    dbname: str | None = Field(None, max_length=255)
    user: str | None = Field(None, max_length=255)
    password: str | None = Field(None, max_length=1000)
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = None
    allow_privileged_role: bool = Field(
        False, description="Accept a role that is a superuser or can write or administer the database (refused "
                           "otherwise, and always unless the operator set ALLOW_PRIVILEGED_DATA_SOURCES=true); "
                           "alert queries still run in read-only transactions")
    trigger_dsn: str | None = Field(
        None, max_length=2000,
        description="Optional libpq string of a role that owns the watched tables, used only to install the change "
                    "triggers that wake alerts within milliseconds; alert queries never run as it")

    @model_validator(mode="after")
    def _dsn_or_parts(self) -> "DataSourceIn":
        parts = (self.host, self.port, self.dbname, self.user, self.sslmode)
        if self.dsn and any(p is not None for p in parts):
            raise ValueError("give either dsn or host/port/dbname/user/password, not both")
        if not self.dsn and not self.host:
            raise ValueError("give dsn, or at least host")
        return self

    def connection_params(self) -> tuple[dict, str | None]:
        """libpq keywords without the password, and the password."""
        if self.dsn:
            params = _parse_dsn(self.dsn, "dsn")
        else:
            params = {k: v for k, v in {"host": self.host, "port": self.port, "dbname": self.dbname,
                                        "user": self.user, "sslmode": self.sslmode}.items() if v is not None}
        password = params.pop("password", None) or self.password
        return {k: str(v) for k, v in params.items()}, password

    def trigger_params(self) -> tuple[dict | None, str | None]:
        """The trigger role's libpq keywords without the password, and its password (None, None without one)."""
        if not self.trigger_dsn:
            return None, None
        params = _parse_dsn(self.trigger_dsn, "trigger_dsn")
        password = params.pop("password", None)
        return {k: str(v) for k, v in params.items()}, password


def _parse_dsn(text: str, field: str) -> dict:
    try:
        params = psycopg2.extensions.parse_dsn(text)
    except psycopg2.ProgrammingError:
        raise field_error(field, "not a valid libpq connection string or URI") from None
    for secret in ("sslpassword", "passfile", "sslkey"):
        if secret in params:
            # Only the password is stored encrypted; other secrets would be returned and kept in clear.
            raise field_error(field, f"{secret} is not supported in a data source; use a password")
    return params


class RoleRights(BaseModel):
    """What the role a data source connects as may do: checked when the data source is added (for the default
    source, the role alert queries run as, at every start)."""

    role: str
    read_only: bool = Field(description="True when none of the rights below is held")
    superuser: bool
    can_write: bool = Field(description="INSERT, UPDATE, DELETE or TRUNCATE on some table")
    can_create: bool = Field(description="CREATE on a schema or on the database")
    attributes: list[str] = Field(description="CREATEROLE, CREATEDB, REPLICATION, BYPASSRLS when held")
    member_of: list[str] = Field(description="Predefined roles that can write, run programs, read files or signal")
    writable_tables: list[str] = Field(description="Up to five tables it can write")


class DataSourceOut(BaseModel):
    """A stored data source; the password is never returned."""

    id: UUID
    name: str
    type: str
    is_default: bool
    connection_params: dict[str, str]
    has_password: bool
    allow_privileged_role: bool = False
    role: RoleRights | None = Field(None, description="null for a data source added before roles were checked")
    trigger_connection_params: dict[str, str] | None = Field(
        None, description="The role that installs change triggers, when it is not the data source's own")
    created_at: datetime


class TeamIn(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"name": "Warehouse on-call"}})

    name: str = Field(min_length=1, max_length=255)
    description: str | None = Field(None, max_length=10_000)


class TeamOut(BaseModel):
    id: UUID
    name: str
    description: str | None
    created_at: datetime


class UserIn(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
        "name": "Ada Operator", "email": "ada@example.com", "phone": "+14155550123"}})

    name: str = Field(min_length=1, max_length=255)
    email: EmailAddress
    phone: str | None = None
    team_id: UUID | None = None

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None) -> str | None:
        if value is not None and not is_e164(value):
            raise ValueError("phone must be in E.164 form, '+' and 8 to 15 digits")
        return value


class UserOut(BaseModel):
    id: UUID
    name: str
    email: str
    phone: str | None
    team_id: UUID | None
    created_at: datetime


class IncidentOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "id": "5b7c9d1e-2f3a-4b5c-8d9e-0f1a2b3c4d5e", "alert_config_id": "3f1c2a4e-8a43-4f7e-9a55-1c2d3e4f5a6b",
        "alert_name": "Order Monitor", "title": "[MEDIUM] Order Monitor: 1 new row", "description": "...",
        "priority": "MEDIUM", "status": "ACTIVE",
        "incident_data": {"columns": ["order_number"], "new_rows": [{"order_number": "ORD00000011"}],
                          "new_row_count": 1, "result_truncated": False},
        "created_at": "2026-01-01T00:00:00Z", "resolved_at": None, "resolved_by": None}})

    id: UUID
    alert_config_id: UUID | None
    alert_name: str
    title: str
    description: str | None
    priority: Priority
    status: str
    incident_data: dict[str, Any]
    created_at: datetime
    acknowledged_at: datetime | None = None
    acknowledged_by: str | None = None
    resolved_at: datetime | None
    resolved_by: str | None


class ResolveIn(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"resolved_by": "ada", "comment": "restocked"}})

    resolved_by: str | None = Field(None, max_length=255)
    comment: str | None = Field(None, max_length=10_000)


class AcknowledgeIn(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"acknowledged_by": "ada",
                                                                             "comment": "looking into it"}})

    acknowledged_by: str | None = Field(None, max_length=255)
    comment: str | None = Field(None, max_length=10_000)


class MuteIn(RequestBody):
    """Mute until a time, for a duration, or unmute with both null."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"duration": "2h"}})

    until: datetime | None = Field(None, description="Mute until this time (with a time zone)")
    duration: str | None = Field(None, max_length=32, description="Or mute for 30m, 2h, 1d …")

    @field_validator("until")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("give a time zone, such as 2030-01-01T08:00:00Z")
        if value is not None and not datetime(2000, 1, 1, tzinfo=timezone.utc) < value < MUTE_LIMIT:
            raise ValueError("give a time between the year 2000 and 2999")
        return value

    @field_validator("duration")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        try:
            rules.parse_duration(value, name="duration")
        except rules.RuleError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _one(self) -> "MuteIn":
        if self.until is not None and self.duration is not None:
            raise ValueError("give until or duration, not both")
        return self


class MessagePreview(BaseModel):
    kind: str
    email_subject: str
    email_text: str
    email_html: str | None = Field(None, description="The HTML part of the email, exactly as it would be sent")
    whatsapp_text: str
    texts: dict[str, str] = Field(description="The body each channel of the alert would send, by channel")
    whatsapp_template: dict[str, Any] | None = Field(
        None, description="With the alert's WhatsApp template: its content_sid and the variables that would be sent")
    link: str | None = Field(None, description="The signed link to the incident's page the messages would carry "
                                               "(with PUBLIC_BASE_URL and SECRET_KEY, for a notice about an incident)")


class TestResult(BaseModel):
    """What an evaluation would do now; nothing is stored or sent."""

    outcome: str
    error: str | None
    columns: list[str]
    rows: list[list[Any]] = Field(description="The first 100 rows of the result")
    row_count: int
    truncated: bool
    summary: dict[str, Any] = Field(description="The diff against the stored result, or the condition check")
    condition_state: str
    would_notify: bool
    messages: list[MessagePreview]


class ActivityOut(BaseModel):
    id: UUID
    incident_id: UUID | None
    alert_config_id: UUID | None
    action: str
    actor: str | None
    details: dict[str, Any]
    created_at: datetime


class NotificationOut(BaseModel):
    id: UUID
    incident_id: UUID | None
    alert_config_id: UUID | None
    kind: str
    channel: str
    recipient: str
    subject: str | None
    body: str
    status: str
    attempts: int
    next_attempt_at: datetime
    provider_message_id: str | None
    error: str | None
    created_at: datetime
    sent_at: datetime | None
    delivery_status: str | None = Field(description="What the provider reported after accepting the message "
                                        "(Twilio: queued, sent, delivered, read, failed, undelivered)")
    delivery_error_code: int | None
    delivery_hint: str | None = Field(description="What delivery_error_code means and what to do")
    delivery_updated_at: datetime | None


class EvaluationOut(LastEvaluation):
    pass


# --- routes ----------------------------------------------------------------------------------------------------

Skip = Annotated[int, Query(ge=0, le=1_000_000)]
Limit = Annotated[int, Query(ge=1, le=1000)]


def _result_meaning_changed(old: dict, new: dict) -> bool:
    """True when an update changes what the stored state means (query, source, keys, condition), so the alert
    starts again with an initial report; timing options (for, repeat_every, cooldown) keep the state."""
    timing = ("for", "repeat_every", "cooldown")
    old_condition = {k: v for k, v in old["condition"].items() if k not in timing}
    new_condition = {k: v for k, v in new["condition"].items() if k not in timing}
    return old_condition != new_condition or any(
        old[k] != new[k] for k in ("query", "data_source_id", "key_columns"))


def _fetch_or_404(services: Services, kind: str, ident: UUID, fetch) -> dict:
    """One row read with `fetch(cur)`, or a 404 naming what was not found."""
    with services.pool.transaction() as cur:
        row = fetch(cur)
    if row is None:
        raise not_found(kind, ident)
    return row


def _alert_out(row: dict) -> AlertConfigOut:
    return AlertConfigOut(**{
        **row, "events_enabled": row["events_error"] is None,
        "trigger_condition": row["trigger_condition"] if row["trigger_condition"] is not None else row["condition"],
        "consecutive_errors": row.get("consecutive_errors") or 0,
    })


def privileged_role_message(role: str, problems: list[str], *, opt_in_allowed: bool) -> str:
    """Why a data source's role is refused, and what to do instead."""
    opt_in = ("send \"allow_privileged_role\": true to accept this role" if opt_in_allowed else
              "ask the service's operator to set ALLOW_PRIVILEGED_DATA_SOURCES=true, then send "
              "\"allow_privileged_role\": true")
    return (f"the role {role} can do more than read: {'; '.join(problems)}. Alert queries need a read-only role: "
            f"CREATE ROLE alert_reader LOGIN PASSWORD '...'; GRANT CONNECT ON DATABASE <db> TO alert_reader; "
            f"GRANT USAGE ON SCHEMA public TO alert_reader; GRANT SELECT ON ALL TABLES IN SCHEMA public TO "
            f"alert_reader (README: 'Recommended: a read-only role per data source'), or {opt_in}")


def check_trigger_role(params: dict, password: str | None, *, database_name: str) -> None:
    """A 422 unless the trigger DSN connects, to the same database as the data source."""
    dsn = psycopg2.extensions.make_dsn(**params, **({"password": password} if password else {}))
    connected_to = describe_role_of(dsn, field="trigger_dsn", name="trigger role")["database"]
    if connected_to != database_name:
        raise field_error("trigger_dsn", f"connects to database {connected_to}, not {database_name} where the "
                                         "alert queries run")


def describe_role_of(dsn: str, *, field: str, name: str) -> dict:
    """What the role a DSN logs in as may do; a 422 on `field` when it cannot log in, alike for every reason (the
    API user chooses the address: anything more would make this a port scanner)."""
    try:
        database.probe(dsn)
    except database.DatabaseUnavailable as exc:
        raise field_error(field, str(exc)) from None
    pool = database.Pool(dsn, size=1, name=name, deadline_seconds=database.ROLE_CHECK_DEADLINE_SECONDS)
    try:
        return database.describe_role(pool)
    except database.DatabaseUnavailable:
        # It let us in a moment ago: say no more about it now than the probe would.
        raise field_error(field, database.PROBE_FAILED) from None
    except database.QueryFailed as exc:
        raise field_error(field, str(exc)) from None
    finally:
        pool.close()


def service_schema_error(tables: list[str]) -> HTTPException | None:
    """A 422 when a query reads the service's own tables: they change at every evaluation, so an alert on them
    would wake itself."""
    own = [table for table in tables if database.in_service_schema(table)]
    if not own:
        return None
    return field_error("query", f"alerts cannot read the service's own schema {database.SERVICE_SCHEMA} "
                                f"({', '.join(own)}): the service writes it at every evaluation")


def validate_alert(services: Services, body: AlertConfigIn, *, source: dict | None = None,
                   pool: database.Pool | None = None) -> dict:
    """Check everything that needs the database; return the fields to store. An import passes the data source
    and the pool to compile on when the source is not stored yet (or about to change)."""
    with services.pool.transaction() as cur:
        if source is None:
            source = database.get_data_source(cur, data_source_id=body.data_source_id)
        if source is None:
            raise field_error("data_source_id", f"data source {body.data_source_id} does not exist")
        if body.created_by is not None and database.get_user(cur, user_id=body.created_by) is None:
            raise field_error("created_by", f"user {body.created_by} does not exist")
    refs = query_analysis.analyse_query(body.query)
    # Named outright: refused before the query is sent (on the default source the reader could not read it).
    named = service_schema_error([database.table_key(r.schema, r.name) for r in refs if r.schema is not None])
    if named is not None:
        raise named
    try:
        if pool is None:
            pool = services.sources.get(source["id"], for_api=True)
        columns = rules.unique_columns(database.compile_query(
            pool, query=body.query, timeout_seconds=services.settings.query_timeout_seconds))
        tables = database.resolve_tables(pool, refs=[(r.schema, r.name) for r in refs])
    except database.QueryFailed as exc:
        raise field_error("query", f"PostgreSQL rejected the query: {exc}") from None
    except database.DatabaseUnavailable as exc:
        if source["is_default"]:
            raise
        # As at the probe: libpq's text would show an API user what answers at the source's address now.
        logger.warning("data source %s (%s) unreachable while saving an alert: %s", source["name"], source["id"],
                       exc)
        raise field_error("data_source_id", f"could not connect to the data source {source['name']}: it did "
                                            "not accept a login; the service's log has the reason") from None
    # Through a view, or on a data source that is the service's own database with a privileged role.
    watched = service_schema_error(tables)
    if watched is not None:
        raise watched
    try:
        rules.key_indexes(columns, body.key_columns)
    except rules.RuleError as exc:
        raise field_error("key_columns", str(exc)) from None
    channels = body.notification_channels
    if channels.users or channels.teams:
        with services.pool.transaction() as cur:
            missing = database.missing_people(cur, user_ids=channels.users, team_ids=channels.teams)
        if missing:
            raise field_error("notification_channels", f"{', '.join(missing)} does not exist")
    if body.message_template is not None:
        try:
            notification.check_template(body.message_template)
        except notification.TemplateFailed as exc:
            raise field_error("message_template", f"the template does not render: {exc}") from None
    condition = rules.parse_condition(body.trigger_condition)
    try:
        rules.check_condition_columns(condition, columns)
    except rules.RuleError as exc:
        raise field_error("trigger_condition", str(exc)) from None
    fields = body.model_dump(mode="json")
    fields.update(data_source_id=source["id"], created_by=body.created_by, priority=body.priority.value,
                  condition=condition.as_dict(),
                  trigger_condition=body.trigger_condition if isinstance(body.trigger_condition, str) else None)
    fields["watched_tables"] = tables
    return fields


def _error_list(exc: HTTPException | ValidationError) -> list[dict]:
    """A 4xx's or a model's errors as a list of {loc, msg}."""
    if isinstance(exc, ValidationError):
        return [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
    if isinstance(exc.detail, str):
        return [{"loc": [], "msg": exc.detail}]
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.detail]


def restart_alert_state(cur, *, alert_id: UUID, reason: str) -> None:
    """The alert starts again from scratch (its next evaluation is an initial report); an open incident of the
    old definition is resolved rather than left to dangle."""
    state = database.get_alert_state(cur, alert_id=alert_id)
    if state is not None and state["firing_incident_id"] is not None:
        database.resolve_incident(cur, incident_id=state["firing_incident_id"], resolved_by=None)
        database.insert_activity(cur, action="auto_resolved", incident_id=state["firing_incident_id"],
                                 alert_id=alert_id, details={"reason": reason})
    database.clear_alert_state(cur, alert_id=alert_id)


def alert_body(row: dict) -> dict:
    """A stored alert as the request body that would create it."""
    return {
        "name": row["name"], "description": row["description"], "query": row["query"],
        "data_source_id": row["data_source_id"],
        "trigger_condition": row["trigger_condition"] if row["trigger_condition"] is not None else row["condition"],
        "message_template": row["message_template"], "key_columns": row["key_columns"],
        "schedule": row["schedule"], "notification_channels": row["notification_channels"],
        "priority": row["priority"], "created_by": row["created_by"], "whatsapp_template": row["whatsapp_template"],
    }


def check_data_source(services: Services, body: DataSourceIn, *, stored: dict | None = None) -> dict:
    """Check a data source as creating one does (it logs in, its role's rights, the trigger role) and return the
    columns to store, with `connection_changed` and `dsn` (it holds the password: never log it). For an update
    (`stored`: its row with the encrypted passwords), a password left out keeps the stored one, and an unchanged
    connection is not checked again."""
    params, password = body.connection_params()
    trigger_params, trigger_password = body.trigger_params()
    sealed = stored["password"] if stored is not None and password is None else None
    trigger_sealed = (stored["trigger_password"] if stored is not None and trigger_password is None
                      and trigger_params is not None else None)
    try:
        if sealed is not None:
            password = services.box.open(sealed)
        if trigger_sealed is not None:
            trigger_password = services.box.open(trigger_sealed)
    except database.SecretKeyError as exc:
        raise field_error("password", str(exc)) from None
    changed = (stored is None or params != stored["connection_params"]
               or trigger_params != stored["trigger_connection_params"]
               or (sealed is None and password is not None)
               or (trigger_sealed is None and trigger_password is not None))
    rights = None if stored is None else stored["role"]
    dsn = psycopg2.extensions.make_dsn(**params, **({"password": password} if password else {}))
    if changed or rights is None:
        rights = describe_role_of(dsn, field="dsn" if body.dsn else "host", name=f"data source {body.name}")
    problems = database.role_problems(rights)
    opt_in_allowed = services.settings.allow_privileged_data_sources
    if problems and not (body.allow_privileged_role and opt_in_allowed):
        raise field_error("dsn" if body.dsn else "user", privileged_role_message(
            rights["role"], problems, opt_in_allowed=opt_in_allowed))
    if trigger_params is not None and changed:
        check_trigger_role(trigger_params, trigger_password, database_name=rights["database"])
    try:
        if sealed is None and password:
            sealed = services.box.seal(password)
        if trigger_sealed is None and trigger_password:
            trigger_sealed = services.box.seal(trigger_password)
    except database.SecretKeyError as exc:
        raise field_error("password", str(exc)) from None
    return {"name": body.name, "connection_params": params, "password": sealed,
            "allow_privileged_role": body.allow_privileged_role, "role_rights": rights,
            "trigger_connection_params": trigger_params, "trigger_password": trigger_sealed,
            "connection_changed": changed, "dsn": dsn}


# --- alerts as code --------------------------------------------------------------------------------------------


# The shape of a configuration file, for the OpenAPI schema; its entries are the bodies of the create endpoints,
# with names in place of ids (README: "Alerts as code").
_FILE_SCHEMA = {"type": "object", "required": ["version", *config_plan.KINDS], "properties": {
    "version": {"type": "integer", "enum": [config_plan.FORMAT_VERSION]},
    **{kind: {"type": "array", "items": {"type": "object"}} for kind in config_plan.KINDS}}}


class ImportResult(BaseModel):
    """What an import changed, or with dry_run would change."""

    model_config = ConfigDict(json_schema_extra={"example": {
        "applied": True, "changes": [{"action": "create", "kind": "alert", "name": "Order Monitor", "fields": []}],
        "summary": {"create": 1, "update": 0, "delete": 0}}})

    applied: bool = Field(description="False for a dry run: nothing was changed")
    changes: list[dict[str, Any]]
    summary: dict[str, int]


def _dsn_text(params: dict | None) -> str | None:
    # Keywords in one order, so that equal connections compare equal as text.
    return None if params is None else psycopg2.extensions.make_dsn(**dict(sorted(params.items())))


def _stored_configuration(cur) -> tuple[dict, dict, list[str]]:
    """The stored configuration as a file's entries (kind -> key -> entry), the rows by kind and key, and the names
    that more than one alert has."""
    rows = database.configuration(cur)
    entries: dict[str, dict] = {kind: {} for kind in config_plan.KINDS}
    by_key: dict[str, dict] = {kind: {} for kind in config_plan.KINDS}
    source_names = {r["id"]: None if r["is_default"] else r["name"] for r in rows["data_sources"]}
    team_names = {r["id"]: r["name"] for r in rows["teams"]}
    user_emails = {r["id"]: r["email"] for r in rows["users"]}
    for row in rows["data_sources"]:
        if row["is_default"]:
            by_key["default"] = row
            continue
        entries["data_sources"][row["name"]] = {
            "name": row["name"], "dsn": _dsn_text(row["connection_params"]),
            "allow_privileged_role": row["allow_privileged_role"],
            "trigger_dsn": _dsn_text(row["trigger_connection_params"])}
        by_key["data_sources"][row["name"]] = row
    for row in rows["teams"]:
        entries["teams"][row["name"]] = {"name": row["name"], "description": row["description"]}
        by_key["teams"][row["name"]] = row
    for row in rows["users"]:
        entries["users"][row["email"]] = {"name": row["name"], "email": row["email"], "phone": row["phone"],
                                          "team": team_names.get(row["team_id"])}
        by_key["users"][row["email"]] = row
    duplicates = []
    for row in rows["alerts"]:
        if row["name"] in entries["alerts"]:
            duplicates.append(row["name"])
        body = alert_body(row)
        if isinstance(body["trigger_condition"], dict):
            try:  # in the order a person writes it (jsonb keeps keys by length)
                body["trigger_condition"] = rules.parse_condition(body["trigger_condition"]).as_dict()
            except rules.RuleError:
                pass  # stored by an older version: exported as it is, and refused with the reason when applied
        entries["alerts"][row["name"]] = {
            **{k: body[k] for k in ("name", "description", "query")},
            "data_source": source_names[row["data_source_id"]],
            **{k: body[k] for k in ("trigger_condition", "message_template", "key_columns", "schedule",
                                    "notification_channels", "priority")},
            "status": row["status"], "created_by": user_emails.get(row["created_by"]),
            # Only when set, so the files of alerts without one read as before.
            **({"whatsapp_template": body["whatsapp_template"]} if body["whatsapp_template"] else {})}
        by_key["alerts"][row["name"]] = row
    return entries, by_key, sorted(set(duplicates))


def _duplicate_names_message(names: list[str]) -> str:
    return (f"more than one alert is named {', '.join(map(repr, names))}: alerts as code matches alerts by name; "
            f"rename them first (PUT /alert-configs/{{id}})")


def export_configuration(services: Services) -> str:
    """Every data source (without its password), team, user and alert as a configuration file."""
    with services.pool.transaction() as cur:
        entries, _, duplicates = _stored_configuration(cur)
    if duplicates:
        raise database.Conflict(_duplicate_names_message(duplicates))
    return config_plan.dump(entries)


@dataclass
class _Desired:
    """A file's entries once validated: as entries to compare, and as the request bodies they stand for."""

    entries: dict[str, dict] = field(default_factory=lambda: {kind: {} for kind in config_plan.KINDS})
    bodies: dict[tuple[str, str], Any] = field(default_factory=dict)
    index: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, key): the entry's place in the file
    broken: dict[str, set] = field(default_factory=lambda: {kind: set() for kind in config_plan.KINDS})
    references: list[config_plan.Reference] = field(default_factory=list)  # of every entry, refused ones too


def _reference(entry: dict, name: str, errors: list, document: config_plan.Document, kind: str, index: int,
               choices: tuple[str, ...] | None = None, desired: _Desired | None = None) -> Any:
    """Take a field that names something (text or null) out of an entry; with `desired`, record the reference."""
    value = entry.pop(name, None)
    if value is not None and not isinstance(value, str):
        errors.append(document.error(kind, index, [name], "must be text (a name) or null"))
        return None
    if choices is not None and value is not None and value not in choices:
        errors.append(document.error(kind, index, [name], f"must be one of {', '.join(choices)}"))
    if name == "created_by" and value is not None:
        try:
            value = ascii_email(value)  # users are keyed by their address as stored
        except ValueError:
            pass  # then no user has it, which is reported
    if desired is not None and value is not None:
        desired.references.append(config_plan.Reference(kind, index, name, value))
    return value


def _validate_entries(document: config_plan.Document, environ: Mapping[str, str]) -> tuple[_Desired, list]:
    """Every entry through the model the API uses for it; the errors of all of them."""
    desired, errors = _Desired(), []
    keys = []
    for kind in config_plan.KINDS:
        for index, raw in enumerate(document.entries[kind]):
            entry = dict(raw)
            found: list = []
            try:
                if kind == "data_sources":
                    for name in ("dsn", "password", "trigger_dsn"):
                        try:
                            entry[name] = config_plan.resolve_secret(entry.get(name), environ)
                        except KeyError as missing:
                            found.append(document.error(kind, index, [name],
                                                        config_plan.secret_reference_problem(missing.args[0])))
                    if found:
                        raise _Refused
                    body = DataSourceIn(**entry)
                    params, password = body.connection_params()
                    trigger_params, trigger_password = body.trigger_params()
                    item = {"name": body.name, "dsn": _dsn_text(params),
                            "allow_privileged_role": body.allow_privileged_role,
                            "trigger_dsn": _dsn_text(trigger_params)}
                    # Kept only to compare with the stored one; a plan names the field, never its value.
                    item.update({k: v for k, v in (("password", password), ("trigger_password", trigger_password))
                                 if v})
                elif kind == "teams":
                    body = TeamIn(**entry)
                    item = {"name": body.name, "description": body.description}
                elif kind == "users":
                    team = _reference(entry, "team", found, document, kind, index, desired=desired)
                    body = UserIn(**entry)
                    item = {"name": body.name, "email": body.email, "phone": body.phone, "team": team}
                else:
                    source = _reference(entry, "data_source", found, document, kind, index, desired=desired)
                    creator = _reference(entry, "created_by", found, document, kind, index, desired=desired)
                    status = _reference(entry, "status", found, document, kind, index, ("ACTIVE", "INACTIVE"))
                    body = AlertConfigIn(**entry)
                    condition = body.trigger_condition
                    item = {"name": body.name, "description": body.description, "query": body.query,
                            "data_source": source,
                            "trigger_condition": condition if isinstance(condition, str)
                            else rules.parse_condition(condition).as_dict(),
                            "message_template": body.message_template, "key_columns": body.key_columns,
                            "schedule": body.schedule, "notification_channels": body.notification_channels.model_dump(),
                            "priority": body.priority.value, "status": status or "ACTIVE", "created_by": creator,
                            "whatsapp_template": body.whatsapp_template.model_dump()
                            if body.whatsapp_template else None}
                if found:
                    raise _Refused
            except (ValidationError, HTTPException) as exc:
                found += [document.error(kind, index, [p for p in e["loc"] if p != "body"], e["msg"])
                          for e in _error_list(exc)]
            except _Refused:
                pass
            if found:
                errors += found
                key = raw.get(config_plan.KEYS[kind])
                if isinstance(key, str):
                    desired.broken[kind].add(key.strip())
                continue
            key = item[config_plan.KEYS[kind]]
            keys.append((kind, index, key))
            if (kind, key) not in desired.index:
                desired.entries[kind][key] = item
                desired.bodies[(kind, key)] = body
                desired.index[(kind, key)] = index
    errors += config_plan.duplicate_errors(keys, document)
    return desired, errors


class _Refused(Exception):
    """An entry already has errors: go on to the next."""


def _forget_unchanged_secrets(services: Services, desired: _Desired, stored: dict) -> None:
    """Drop a file's password where it equals the stored one, so that it plans as no change."""
    for key, item in desired.entries["data_sources"].items():
        row = stored["data_sources"].get(key)
        for name in ("password", "trigger_password"):
            if name in item and row is not None and row[name] is not None:
                try:
                    if services.box.open(row[name]) == item[name]:
                        del item[name]
                except database.SecretKeyError:
                    pass  # planned as a change; applying it reports the key problem


def _check_changes(services: Services, plan: config_plan.Plan, desired: _Desired, stored: dict,
                   document: config_plan.Document) -> tuple[dict, dict, list]:
    """What creating or updating each entry needs the databases for, as the API checks it: data sources log in,
    alert queries compile on their (new) data source. Returns the data sources' columns and the alerts' fields."""
    errors: list = []
    sources: dict[str, dict] = {}
    alerts: dict[str, dict] = {}
    for change in plan.of("create", "data_sources") + plan.of("update", "data_sources"):
        row = stored["data_sources"].get(change.key)
        try:
            sources[change.key] = check_data_source(services, desired.bodies[("data_sources", change.key)],
                                                    stored=row)
        except HTTPException as exc:
            index = desired.index[("data_sources", change.key)]
            errors += [document.error("data_sources", index, [p for p in e["loc"] if p != "body"], e["msg"])
                       for e in _error_list(exc)]
            desired.broken["data_sources"].add(change.key)
    pools: dict[str, database.Pool] = {}
    try:
        for change in plan.of("create", "alerts") + plan.of("update", "alerts"):
            if change.action == "update" and set(change.fields) <= {"status"}:
                continue
            item = desired.entries["alerts"][change.key]
            name = item["data_source"]
            if name in desired.broken["data_sources"]:
                continue  # its data source's problem is reported already
            pool = None
            if name is None:
                source = stored["default"]
            elif name in sources and sources[name]["connection_changed"]:
                source = {"id": None, "name": name, "is_default": False}
                if name not in pools:
                    pools[name] = database.Pool(database.read_only_dsn(sources[name]["dsn"]), 1,
                                                name=f"data source {name} (configuration check)",
                                                deadline_seconds=services.sources.deadline_seconds)
                pool = pools[name]
            elif name in stored["data_sources"]:
                source = stored["data_sources"][name]
            else:
                continue  # reported as a reference to nothing
            try:
                alerts[change.key] = validate_alert(services, desired.bodies[("alerts", change.key)], source=source,
                                                    pool=pool)
            except HTTPException as exc:
                index = desired.index[("alerts", change.key)]
                errors += [document.error("alerts", index, [p for p in e["loc"] if p != "body"], e["msg"])
                           for e in _error_list(exc)]
    finally:
        for pool in pools.values():
            pool.close()
    return sources, alerts, errors


def apply_configuration(services: Services, text: str, *, prune: bool = False, dry_run: bool = False,
                        environ: Mapping[str, str] | None = None) -> config_plan.Plan:
    """Make the service's configuration what a file describes, matched by name, in one transaction; return the plan.

    With prune, of each kind the file has a section for, what that section lacks is deleted; with dry_run nothing is
    changed. FileRefused lists every problem when anything is wrong, and then nothing is changed. The scheduler, when
    the service runs one, takes the changes up as it does the API's."""
    document, errors = config_plan.load(text)
    # Only the kinds the file has a section for: a file of alerts alone, pruned, leaves the users be.
    pruned = document.sections if prune else set()
    desired, found = _validate_entries(document, os.environ if environ is None else environ)
    errors += found
    with services.pool.transaction() as cur:
        current, stored, duplicates = _stored_configuration(cur)
        for key, row in stored["data_sources"].items():
            secret = database.get_data_source_connection(cur, data_source_id=row["id"])
            stored["data_sources"][key] = {**row, **secret}
    if duplicates:
        errors.append(config_plan.FileError(("service",), _duplicate_names_message(duplicates)))
    default_name = stored["default"]["name"]
    if default_name in desired.entries["data_sources"]:
        index = desired.index[("data_sources", default_name)]
        errors.append(document.error("data_sources", index, ["name"], f"{default_name!r} is the service's own "
                                     "database, which is not configured in a file (leave data_source out of an "
                                     "alert to use it)"))
        del desired.entries["data_sources"][default_name]
    for item in desired.entries["alerts"].values():
        if item["data_source"] == default_name:
            item["data_source"] = None  # as an export leaves it out
    references = [r for r in desired.references if not (r.field == "data_source" and r.value == default_name)]
    _forget_unchanged_secrets(services, desired, stored)
    errors += config_plan.reference_errors(references, desired.entries, current, prune=pruned, document=document,
                                           broken=desired.broken)
    plan = config_plan.plan(desired.entries, current, prune=pruned)
    # The entries that passed so far are checked against the databases too, so that one answer lists everything.
    sources, alerts, found = _check_changes(services, plan, desired, stored, document)
    errors += found
    if errors:
        raise config_plan.FileRefused(sorted(errors, key=lambda e: (e.line or 0)))
    if dry_run or plan.empty:
        return plan
    changed_alerts, changed_sources = _write_plan(services, plan, desired, current, sources, alerts)
    if services.scheduler is not None:
        services.scheduler.alerts_changed(changed_alerts)
        for source_id in changed_sources:
            services.scheduler.data_source_changed(source_id)
    else:
        # The apply command: the instances running on this database are told, as one instance tells the others.
        with services.pool.transaction() as cur:
            for message in messages("alerts", "apply", changed_alerts) if changed_alerts else []:
                database.publish(cur, message=message)
            for source_id in changed_sources:
                database.publish(cur, message=f"source apply {source_id}")
    return plan


def _write_plan(services: Services, plan: config_plan.Plan, desired: _Desired, planned_on: dict, sources: dict,
                alerts: dict) -> tuple[list[UUID], list[UUID]]:
    """Apply a checked plan in one transaction; the alerts changed, and the data sources to reconnect."""
    def write(cur) -> tuple[list[UUID], list[UUID]]:
        changed_alerts: list[UUID] = []
        changed_sources: list[UUID] = []
        database.lock_configuration(cur)
        current, stored, _ = _stored_configuration(cur)
        if current != planned_on:
            raise database.Conflict("the configuration changed while the file was being checked; apply it again")
        ids = {kind: {key: row["id"] for key, row in stored[kind].items()} for kind in config_plan.KINDS}
        default_id = stored["default"]["id"]
        for change in plan.changes:
            kind, key = change.kind, change.key
            item = desired.entries[kind].get(key)
            if change.action == "delete":
                remove = {"data_sources": lambda i: database.delete_data_source(cur, data_source_id=i),
                          "teams": lambda i: database.delete_team(cur, team_id=i),
                          "users": lambda i: database.delete_user(cur, user_id=i),
                          "alerts": lambda i: database.delete_alert(cur, alert_id=i)}[kind]
                remove(ids[kind][key])
                if kind == "alerts":
                    changed_alerts.append(ids[kind][key])
                elif kind == "data_sources":
                    changed_sources.append(ids[kind][key])
            elif kind == "data_sources":
                columns = {k: v for k, v in sources[key].items() if k not in ("connection_changed", "dsn")}
                if change.action == "create":
                    ids[kind][key] = database.insert_data_source(cur, **columns)["id"]
                else:
                    database.update_data_source(cur, data_source_id=ids[kind][key], **columns)
                    if sources[key]["connection_changed"]:
                        changed_sources.append(ids[kind][key])
            elif kind == "teams":
                if change.action == "create":
                    ids[kind][key] = database.insert_team(cur, name=item["name"],
                                                          description=item["description"])["id"]
                else:
                    database.update_team(cur, team_id=ids[kind][key], name=item["name"],
                                         description=item["description"])
            elif kind == "users":
                person = {"name": item["name"], "email": item["email"], "phone": item["phone"],
                          "team_id": ids["teams"][item["team"]] if item["team"] is not None else None}
                if change.action == "create":
                    ids[kind][key] = database.insert_user(cur, **person)["id"]
                else:
                    database.update_user(cur, user_id=ids[kind][key], **person)
            else:
                alert_id = ids[kind].get(key)
                if key in alerts:
                    fields = {**alerts[key], "created_by": ids["users"].get(item["created_by"]),
                              "data_source_id": (ids["data_sources"][item["data_source"]]
                                                 if item["data_source"] is not None else default_id)}
                    if alert_id is None:
                        alert_id = database.insert_alert(cur, fields=fields)["id"]
                    else:
                        old = database.get_alert(cur, alert_id=alert_id)
                        row = database.update_alert(cur, alert_id=alert_id, fields=fields)
                        if _result_meaning_changed(old, row):
                            restart_alert_state(cur, alert_id=alert_id, reason="the alert's definition changed")
                    database.set_alert_watch(cur, alert_id=alert_id, watched_tables=fields["watched_tables"],
                                             events_error=None)
                if change.action == "create" and item["status"] != "ACTIVE" or "status" in change.fields:
                    database.set_alert_status(cur, alert_id=alert_id, status=item["status"])
                changed_alerts.append(alert_id)
        return changed_alerts, changed_sources

    return database.in_transaction(services.pool, write)


def _install_routes(app: FastAPI) -> None:  # noqa: C901 - one place that lists every route
    router = APIRouter(dependencies=[Depends(require_api_key)])

    # Before /alert-configs/{alert_id}, which would otherwise take "export" for an id.
    @router.get("/alert-configs/export", response_class=PlainTextResponse, tags=["alerts as code"], responses={
        200: {"content": {"application/yaml": {"schema": _FILE_SCHEMA}}, "description": "The configuration file"}})
    def export_alert_configs(services: ServicesDep):
        """Every alert, data source (without its password), team and user as a YAML file to keep in git."""
        return PlainTextResponse(export_configuration(services), media_type="application/yaml")

    @router.post("/alert-configs/import", response_model=ImportResult, tags=["alerts as code"], openapi_extra={
        "requestBody": {"required": True, "content": {"application/yaml": {"schema": _FILE_SCHEMA}}}})
    async def import_alert_configs(
            request: Request, services: ServicesDep,
            prune: Annotated[bool, Query(description="Delete what the file no longer has")] = False,
            dry_run: Annotated[bool, Query(description="Only return the plan; change nothing")] = False):
        """Apply a configuration file (the export's format) by name: create, update and with prune delete. A file
        with any problem is refused whole, every problem listed with its line; nothing is half-applied."""
        try:
            text = (await request.body()).decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPException(422, [{"loc": ["body"], "msg": "the body must be a YAML file in UTF-8",
                                       "type": "value_error"}]) from None
        try:
            plan = await run_in_threadpool(apply_configuration, services, text, prune=prune, dry_run=dry_run)
        except config_plan.FileRefused as exc:
            raise HTTPException(422, [error.as_dict() for error in exc.errors]) from None
        return {"applied": not dry_run, **plan.as_dict()}

    @router.post("/alert-configs/", response_model=AlertConfigOut, status_code=201, tags=["alerts"])
    def create_alert(body: AlertConfigIn, services: ServicesDep):
        """Create an alert; its current result is sent once as the initial report."""
        fields = validate_alert(services, body)

        def insert(cur) -> dict:
            row = database.insert_alert(cur, fields=fields)
            database.set_alert_watch(cur, alert_id=row["id"], watched_tables=fields["watched_tables"],
                                     events_error=None)
            return row

        row = database.in_transaction(services.pool, insert)
        services.scheduler.alert_changed(row["id"])
        return _get_alert(services, row["id"])

    @router.get("/alert-configs/", response_model=list[AlertConfigOut], tags=["alerts"])
    def list_alerts(services: ServicesDep, status: Literal["ACTIVE", "INACTIVE"] | None = None,
                    priority: Priority | None = None, skip: Skip = 0, limit: Limit = 100):
        """List alerts, optionally by status and priority."""
        with services.pool.transaction() as cur:
            rows = database.list_alerts(cur, status=status, priority=priority.value if priority else None,
                                        skip=skip, limit=limit)
        return [_alert_out(r) for r in rows]

    def _get_alert(services: Services, alert_id: UUID) -> AlertConfigOut:
        return _alert_out(_fetch_or_404(services, "alert config", alert_id,
                                        lambda cur: database.get_alert(cur, alert_id=alert_id)))

    @router.get("/alert-configs/{alert_id}", response_model=AlertConfigOut, tags=["alerts"])
    def get_alert(alert_id: UUID, services: ServicesDep):
        """One alert with its last evaluation."""
        return _get_alert(services, alert_id)

    @router.put("/alert-configs/{alert_id}", response_model=AlertConfigOut, tags=["alerts"])
    def update_alert(alert_id: UUID, body: AlertConfigIn, services: ServicesDep):
        """Replace an alert's definition; takes effect at once. A new query re-sends an initial report."""
        _get_alert(services, alert_id)
        fields = validate_alert(services, body)

        def update(cur) -> None:
            old = database.get_alert(cur, alert_id=alert_id)
            if old is None:
                raise not_found("alert config", alert_id)
            row = database.update_alert(cur, alert_id=alert_id, fields=fields)
            database.set_alert_watch(cur, alert_id=alert_id, watched_tables=fields["watched_tables"],
                                     events_error=None)
            if _result_meaning_changed(old, row):
                restart_alert_state(cur, alert_id=alert_id, reason="the alert's definition changed")

        database.in_transaction(services.pool, update)
        services.scheduler.alert_changed(alert_id)
        return _get_alert(services, alert_id)

    @router.put("/alert-configs/{alert_id}/status", response_model=AlertConfigOut, tags=["alerts"])
    def set_alert_status(alert_id: UUID, services: ServicesDep,
                         status: Annotated[Literal["ACTIVE", "INACTIVE"], Query(description="ACTIVE or INACTIVE")]):
        """Pause (INACTIVE) or resume (ACTIVE) an alert."""
        row = database.in_transaction(
            services.pool, lambda cur: database.set_alert_status(cur, alert_id=alert_id, status=status))
        if row is None:
            raise not_found("alert config", alert_id)
        services.scheduler.alert_changed(alert_id)
        return _get_alert(services, alert_id)

    @router.delete("/alert-configs/{alert_id}", status_code=204, tags=["alerts"])
    def delete_alert(alert_id: UUID, services: ServicesDep):
        """Delete an alert; its incidents and notifications are kept."""
        row = database.in_transaction(services.pool, lambda cur: database.delete_alert(cur, alert_id=alert_id))
        if row is None:
            raise not_found("alert config", alert_id)
        services.scheduler.alert_changed(alert_id)

    @router.post("/alert-configs/test", response_model=TestResult, tags=["alerts"])
    def test_new_alert(body: AlertConfigIn, services: ServicesDep):
        """Dry run of an unsaved definition: the rows, the initial report and messages it would send."""
        fields = validate_alert(services, body)
        alert = {**fields, "id": None, "muted_until": None}
        return dry_run(services, alert, None)

    @router.post("/alert-configs/{alert_id}/test", response_model=TestResult, tags=["alerts"])
    def test_alert(alert_id: UUID, services: ServicesDep):
        """Dry run against the stored state: the rows, the diff, whether it would fire, and the exact messages."""
        with services.pool.transaction() as cur:
            alert = database.get_alert(cur, alert_id=alert_id)
            if alert is None:
                raise not_found("alert config", alert_id)
            state = database.get_alert_state(cur, alert_id=alert_id)
        return dry_run(services, alert, state)

    def dry_run(services: Services, alert: dict, state: dict | None) -> dict:
        try:
            return services.scheduler.evaluator.dry_run(alert, state)
        except DryRunsBusy as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": "1"}) from None

    @router.post("/alert-configs/{alert_id}/run", response_model=AlertConfigOut, tags=["alerts"])
    def run_alert(alert_id: UUID, services: ServicesDep):
        """Evaluate now, for real (notifications are sent if it fires); returns the alert with this evaluation."""
        alert = _get_alert(services, alert_id)
        if alert.status != "ACTIVE":
            raise HTTPException(409, "the alert is INACTIVE; resume it with PUT /alert-configs/{id}/status?status=ACTIVE")
        services.scheduler.run_now(alert_id, timeout=services.settings.query_timeout_seconds + 10)
        return _get_alert(services, alert_id)

    @router.put("/alert-configs/{alert_id}/mute", response_model=AlertConfigOut, tags=["alerts"])
    def mute_alert(alert_id: UUID, body: MuteIn, services: ServicesDep):
        """Mute until a time or for a duration (both null: unmute). Incidents are still recorded, nothing is sent."""
        until = body.until
        if body.duration is not None:
            until = datetime.now(timezone.utc) + timedelta(seconds=rules.parse_duration(body.duration, name="duration"))
        if database.in_transaction(
                services.pool, lambda cur: database.set_alert_mute(cur, alert_id=alert_id, until=until)) is None:
            raise not_found("alert config", alert_id)
        return _get_alert(services, alert_id)

    @router.get("/alert-configs/{alert_id}/evaluations", response_model=list[EvaluationOut], tags=["alerts"])
    def list_evaluations(alert_id: UUID, services: ServicesDep, skip: Skip = 0, limit: Limit = 100):
        """An alert's evaluations, newest first."""
        _get_alert(services, alert_id)
        with services.pool.transaction() as cur:
            return database.list_evaluations(cur, alert_id=alert_id, skip=skip, limit=limit)

    @router.post("/data-sources/", response_model=DataSourceOut, status_code=201, tags=["data sources"])
    def create_data_source(body: DataSourceIn, services: ServicesDep):
        """Register another PostgreSQL or TimescaleDB database; the connection is tested first."""
        checked = check_data_source(services, body)
        del checked["connection_changed"], checked["dsn"]
        with services.pool.transaction() as cur:
            return database.insert_data_source(cur, **checked)

    @router.get("/data-sources/", response_model=list[DataSourceOut], tags=["data sources"])
    def list_data_sources(services: ServicesDep, skip: Skip = 0, limit: Limit = 100):
        """Data sources (passwords are never returned)."""
        with services.pool.transaction() as cur:
            return database.list_data_sources(cur, skip=skip, limit=limit)

    @router.get("/data-sources/{data_source_id}", response_model=DataSourceOut, tags=["data sources"])
    def get_data_source(data_source_id: UUID, services: ServicesDep):
        """One data source."""
        return _fetch_or_404(services, "data source", data_source_id,
                             lambda cur: database.get_data_source(cur, data_source_id=data_source_id))

    @router.put("/data-sources/{data_source_id}", response_model=DataSourceOut, tags=["data sources"])
    def update_data_source(data_source_id: UUID, body: DataSourceIn, services: ServicesDep):
        """Replace a data source's definition; a password left out keeps the stored one. A changed connection is
        checked as at creation, and the source's listener and connections start again on it."""
        with services.pool.transaction() as cur:
            stored = database.get_data_source(cur, data_source_id=data_source_id)
            secrets_row = database.get_data_source_connection(cur, data_source_id=data_source_id)
        if stored is None:
            raise not_found("data source", data_source_id)
        if stored["is_default"]:
            raise HTTPException(409, "the default data source is the service's own database: change it with "
                                     "DB_CONNECTION, not through the API")
        checked = check_data_source(services, body, stored={**stored, **secrets_row})
        changed = checked.pop("connection_changed")
        del checked["dsn"]
        with services.pool.transaction() as cur:
            row = database.update_data_source(cur, data_source_id=data_source_id, **checked)
        if row is None:
            raise not_found("data source", data_source_id)
        if changed:
            services.scheduler.data_source_changed(data_source_id)
        return row

    @router.delete("/data-sources/{data_source_id}", status_code=204, tags=["data sources"])
    def delete_data_source(data_source_id: UUID, services: ServicesDep, move_alerts_to: Annotated[
            UUID | None, Query(description="Move the alerts that use it to this data source first")] = None):
        """Delete a data source; refused (409) while alerts use it, unless move_alerts_to names where they go."""
        with services.pool.transaction() as cur:
            source = database.get_data_source(cur, data_source_id=data_source_id)
            alert_ids = database.alert_ids_on_data_source(cur, data_source_id=data_source_id)
            target = (database.get_data_source(cur, data_source_id=move_alerts_to)
                      if move_alerts_to is not None else None)
        if source is None:
            raise not_found("data source", data_source_id)
        if source["is_default"]:
            raise HTTPException(409, "the default data source is the service's own database and cannot be deleted")
        if move_alerts_to is not None and (target is None or move_alerts_to == data_source_id):
            why = "is the data source being deleted" if target is not None else "does not exist"
            raise HTTPException(422, [{"loc": ["query", "move_alerts_to"], "type": "value_error",
                                       "msg": f"data source {move_alerts_to} {why}"}])
        if alert_ids and target is None:
            raise HTTPException(409, f"{len(alert_ids)} alert(s) use data source {source['name']}: delete them, or "
                                     f"send ?move_alerts_to=<id of another data source> to move them there first")
        # Each moved alert must work on its new source: its query compiles there and its tables are found anew.
        moved: dict[UUID, dict] = {}
        with services.pool.transaction() as cur:
            rows = [database.get_alert(cur, alert_id=alert_id) for alert_id in alert_ids]
        for row in rows:
            try:
                moved[row["id"]] = validate_alert(
                    services, AlertConfigIn(**{**alert_body(row), "data_source_id": target["id"]}))
            except (HTTPException, ValidationError) as exc:
                messages = "; ".join(e["msg"] for e in _error_list(exc))
                raise HTTPException(422, [{"loc": ["query", "move_alerts_to"], "type": "value_error",
                                           "msg": f"alert {row['name']} ({row['id']}) cannot move to data source "
                                                  f"{target['name']}: {messages}"}]) from None
        def move_and_delete(cur) -> None:
            if set(database.alert_ids_on_data_source(cur, data_source_id=data_source_id, lock=True)) != set(moved):
                raise HTTPException(409, "alerts on this data source changed meanwhile; try again")
            for alert_id, fields in moved.items():
                database.update_alert(cur, alert_id=alert_id, fields=fields)
                database.set_alert_watch(cur, alert_id=alert_id, watched_tables=fields["watched_tables"],
                                         events_error=None)
                restart_alert_state(cur, alert_id=alert_id, reason="the alert moved to another data source")
            database.delete_data_source(cur, data_source_id=data_source_id)

        database.in_transaction(services.pool, move_and_delete)
        services.scheduler.alerts_changed(list(moved))
        services.scheduler.data_source_changed(data_source_id)

    @router.post("/teams/", response_model=TeamOut, status_code=201, tags=["people"])
    def create_team(body: TeamIn, services: ServicesDep):
        """Create a team."""
        with services.pool.transaction() as cur:
            return database.insert_team(cur, name=body.name, description=body.description)

    @router.get("/teams/", response_model=list[TeamOut], tags=["people"])
    def list_teams(services: ServicesDep, skip: Skip = 0, limit: Limit = 100):
        """Teams."""
        with services.pool.transaction() as cur:
            return database.list_teams(cur, skip=skip, limit=limit)

    @router.get("/teams/{team_id}", response_model=TeamOut, tags=["people"])
    def get_team(team_id: UUID, services: ServicesDep):
        """One team."""
        return _fetch_or_404(services, "team", team_id,
                             lambda cur: database.get_team(cur, team_id=team_id))

    @router.put("/teams/{team_id}", response_model=TeamOut, tags=["people"])
    def update_team(team_id: UUID, body: TeamIn, services: ServicesDep):
        """Replace a team's name and description."""
        row = database.in_transaction(services.pool, lambda cur: database.update_team(
            cur, team_id=team_id, name=body.name, description=body.description))
        if row is None:
            raise not_found("team", team_id)
        return row

    @router.delete("/teams/{team_id}", status_code=204, tags=["people"])
    def delete_team(team_id: UUID, services: ServicesDep):
        """Delete a team; its users stay, without a team."""
        if database.in_transaction(services.pool, lambda cur: database.delete_team(cur, team_id=team_id)) is None:
            raise not_found("team", team_id)

    @router.post("/users/", response_model=UserOut, status_code=201, tags=["people"])
    def create_user(body: UserIn, services: ServicesDep):
        """Create a user."""
        with services.pool.transaction() as cur:
            if body.team_id is not None and database.get_team(cur, team_id=body.team_id) is None:
                raise field_error("team_id", f"team {body.team_id} does not exist")
            return database.insert_user(cur, name=body.name, email=body.email, phone=body.phone,
                                        team_id=body.team_id)

    @router.get("/users/", response_model=list[UserOut], tags=["people"])
    def list_users(services: ServicesDep, skip: Skip = 0, limit: Limit = 100):
        """Users."""
        with services.pool.transaction() as cur:
            return database.list_users(cur, skip=skip, limit=limit)

    @router.get("/users/{user_id}", response_model=UserOut, tags=["people"])
    def get_user(user_id: UUID, services: ServicesDep):
        """One user."""
        return _fetch_or_404(services, "user", user_id,
                             lambda cur: database.get_user(cur, user_id=user_id))

    @router.put("/users/{user_id}", response_model=UserOut, tags=["people"])
    def update_user(user_id: UUID, body: UserIn, services: ServicesDep):
        """Replace a user's details."""
        def update(cur) -> dict:
            if database.get_user(cur, user_id=user_id) is None:
                raise not_found("user", user_id)
            if body.team_id is not None and database.get_team(cur, team_id=body.team_id) is None:
                raise field_error("team_id", f"team {body.team_id} does not exist")
            return database.update_user(cur, user_id=user_id, name=body.name, email=body.email, phone=body.phone,
                                        team_id=body.team_id)

        return database.in_transaction(services.pool, update)

    @router.delete("/users/{user_id}", status_code=204, tags=["people"])
    def delete_user(user_id: UUID, services: ServicesDep):
        """Delete a user; alerts they created stay."""
        if database.in_transaction(services.pool, lambda cur: database.delete_user(cur, user_id=user_id)) is None:
            raise not_found("user", user_id)

    @router.get("/incidents/", response_model=list[IncidentOut], tags=["incidents"])
    def list_incidents(services: ServicesDep, alert_config_id: UUID | None = None,
                       status: Literal["ACTIVE", "ACKNOWLEDGED", "RESOLVED"] | None = None,
                       priority: Priority | None = None, skip: Skip = 0, limit: Limit = 100):
        """Incidents, newest first."""
        with services.pool.transaction() as cur:
            return database.list_incidents(cur, alert_id=alert_config_id, status=status,
                                           priority=priority.value if priority else None, skip=skip, limit=limit)

    @router.get("/incidents/{incident_id}", response_model=IncidentOut, tags=["incidents"])
    def get_incident(incident_id: UUID, services: ServicesDep):
        """One incident with the rows that caused it."""
        return _fetch_or_404(services, "incident", incident_id,
                             lambda cur: database.get_incident(cur, incident_id=incident_id))

    def change_incident(services: Services, incident_id: UUID, *, action: str, actor: str | None,
                        comment: str | None, update) -> dict:
        """Apply `update(cur)` to an incident and record the transition in its activity, in one transaction."""
        with services.pool.transaction() as cur:
            row = update(cur)
            if row is None:
                raise not_found("incident", incident_id)
            database.insert_activity(cur, action=action, incident_id=incident_id, alert_id=row["alert_config_id"],
                                     actor=actor, details={"comment": comment} if comment else {})
        return row

    @router.post("/incidents/{incident_id}/resolve", response_model=IncidentOut, tags=["incidents"])
    def resolve_incident(incident_id: UUID, services: ServicesDep, body: ResolveIn | None = None):
        """Resolve an incident."""
        body = body or ResolveIn()
        return change_incident(services, incident_id, action="resolved", actor=body.resolved_by, comment=body.comment,
                               update=lambda cur: database.resolve_incident(cur, incident_id=incident_id,
                                                                            resolved_by=body.resolved_by))

    @router.post("/incidents/{incident_id}/acknowledge", response_model=IncidentOut, tags=["incidents"])
    def acknowledge_incident(incident_id: UUID, services: ServicesDep, body: AcknowledgeIn | None = None):
        """Acknowledge an incident: someone is on it."""
        body = body or AcknowledgeIn()
        return change_incident(services, incident_id, action="acknowledged", actor=body.acknowledged_by,
                               comment=body.comment,
                               update=lambda cur: database.acknowledge_incident(
                                   cur, incident_id=incident_id, acknowledged_by=body.acknowledged_by))

    @router.get("/incidents/{incident_id}/activities", response_model=list[ActivityOut], tags=["incidents"])
    def list_activities(incident_id: UUID, services: ServicesDep):
        """Everything that happened to an incident, oldest first."""
        with services.pool.transaction() as cur:
            if database.get_incident(cur, incident_id=incident_id) is None:
                raise not_found("incident", incident_id)
            return database.list_activities(cur, incident_id=incident_id)

    @router.get("/notifications/", response_model=list[NotificationOut], tags=["notifications"])
    def list_notifications(services: ServicesDep, incident_id: UUID | None = None,
                           alert_config_id: UUID | None = None,
                           status: Literal["PENDING", "RETRY", "SUCCESS", "FAILED"] | None = None,
                           channel: ChannelName | None = None, skip: Skip = 0, limit: Limit = 100):
        """Notifications, newest first, with their delivery status and error."""
        with services.pool.transaction() as cur:
            rows = database.list_notifications(cur, incident_id=incident_id, alert_id=alert_config_id,
                                               status=status, channel=channel, skip=skip, limit=limit)
        return [{**row, "delivery_hint": notification.delivery_hint(row["delivery_error_code"])} for row in rows]

    app.include_router(router)

    @app.get("/health", tags=["health"])
    async def health(request: Request):
        """200 when the database answers, 503 when it does not; the scheduler's, data sources' and listeners'
        state is included when API_KEY is unset or the request carries a key. Answers within a second whatever
        hangs: it reads the scheduler's state from memory and waits at most HEALTH_PING_SECONDS for the database."""
        services = _services(request)
        body: dict[str, Any] = {}
        authenticated = _authenticated(request)
        if authenticated:
            body = {
                "scheduler": services.scheduler.status(),
                "dispatcher": {"running": services.dispatcher.alive,
                               "reaching_database": services.dispatcher.healthy},
                "channels": {name: transport.enabled(services.settings)
                             for name, transport in notification.TRANSPORTS.items()},
                "cluster": services.membership.status(),
            }
        try:
            # Its own thread, not the request thread pool: requests stuck on a hung server cannot hold it up.
            # One ping at a time, shared by every request meanwhile: a flood of /health while the database hangs
            # holds one pooled connection, not one per request.
            if services.health_ping is None or services.health_ping.done():
                services.health_ping = asyncio.ensure_future(asyncio.to_thread(database.ping, services.pool))
            await asyncio.wait_for(asyncio.shield(services.health_ping), HEALTH_PING_SECONDS)
            body["database"] = "ok"
        except database.DatabaseUnavailable as exc:
            # Without a key, only the coarse state: the error names the database's host, port, user and database.
            body["database"] = f"unavailable: {exc}" if authenticated else "unavailable"
            return JSONResponse(status_code=503, content={"status": "unavailable", **body})
        except asyncio.TimeoutError:
            body["database"] = (f"unavailable: no answer within {HEALTH_PING_SECONDS} s" if authenticated
                                else "unavailable")
            return JSONResponse(status_code=503, content={"status": "unavailable", **body})
        return {"status": "ok", **body}


def _install_metrics(app: FastAPI) -> None:
    router = APIRouter(dependencies=[Depends(require_api_key)])

    @router.get("/metrics", tags=["health"], response_class=Response,
                responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                 "description": "The Prometheus text format (OpenMetrics when asked for)"}})
    def metrics(request: Request, services: ServicesDep) -> Response:
        """The service's figures for Prometheus: evaluations, deliveries, the outbox, incidents, alerts and
        listeners. Needs the API key when one is set (Prometheus sends it as a bearer token)."""
        body, media_type = services.metrics.exposition(request.headers.get("accept"))
        return Response(content=body, media_type=media_type)

    app.include_router(router)


def _install_twilio_status(app: FastAPI) -> None:
    """Twilio's status callbacks: no API key (Twilio cannot send one) but Twilio's signature, checked against
    TWILIO_AUTH_TOKEN and the URL Twilio was given (PUBLIC_BASE_URL)."""

    @app.post(notification.TWILIO_STATUS_PATH, tags=["notifications"], status_code=204,
              responses={403: {"description": "X-Twilio-Signature is missing or does not match"}})
    async def twilio_status(request: Request):
        """Record what Twilio reports about a message it accepted (delivered, read, failed, undelivered and its
        error code). Twilio signs each call with the account's auth token; any other call is a 403."""
        from urllib.parse import parse_qsl

        from twilio.request_validator import RequestValidator

        services = _services(request)
        settings = services.settings
        if not settings.public_base_url or settings.twilio_auth_token is None:
            raise HTTPException(403, "status callbacks need PUBLIC_BASE_URL and TWILIO_AUTH_TOKEN")
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
        url = settings.public_base_url + notification.TWILIO_STATUS_PATH
        if request.url.query:
            url += "?" + request.url.query
        signature = request.headers.get("x-twilio-signature", "")
        validator = RequestValidator(settings.twilio_auth_token.get_secret_value())
        if not signature or not validator.validate(url, form, signature):
            logger.warning("refused a Twilio status callback with a missing or wrong signature")
            raise HTTPException(403, "X-Twilio-Signature does not match: not a call from Twilio for this account")
        sid, status = form.get("MessageSid"), form.get("MessageStatus")
        if not sid or not status:
            raise HTTPException(422, "MessageSid and MessageStatus are required")
        code = form.get("ErrorCode")
        await run_in_threadpool(notification.record_delivery_status, services.pool, provider_message_id=sid,
                                status=status, error_code=int(code) if code and code.isdigit() else None)
        return Response(status_code=204)


def _page_response(content: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(content, status_code=status_code, headers=incident_page.PAGE_HEADERS)


def _page_incident(services: Services, token: str) -> UUID | HTMLResponse:
    """The incident a page link names, or the plain 403 page of a link that is altered, expired or not enabled."""
    settings = services.settings
    if not settings.incident_links_enabled:
        return _page_response(incident_page.refusal_page(
            "Incident links are not enabled here (PUBLIC_BASE_URL and SECRET_KEY)."), 403)
    key = notification.page_signing_key(settings.secret_key.get_secret_value())
    try:
        return notification.verify_incident(key, token, now=datetime.now(timezone.utc).timestamp())
    except notification.LinkRefused as exc:
        logger.info("refused an incident page link: %s", exc)
        return _page_response(incident_page.refusal_page(str(exc)), 403)


def _foreign_origin(request: Request, settings: Settings) -> bool:
    """Whether a POST names an origin other than this service's (a form on another site posting here)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin == "null"
    own = {f"{request.url.scheme}://{request.url.netloc}"}
    if settings.public_base_url:
        parts = urlsplit(settings.public_base_url)
        own.add(f"{parts.scheme}://{parts.netloc}")
    return origin.rstrip("/") not in own


def _install_incident_page(app: FastAPI) -> None:
    """The incident page a message links to: no API key, but a signed link that expires (INCIDENT_LINK_HOURS).
    Reading it changes nothing; each action is a POST from its form, recorded in the timeline "via link"."""
    path = notification.INCIDENT_PAGE_PATH + "/{token}"

    @app.get(path, include_in_schema=False)
    def show_incident_page(token: str, request: Request, done: str | None = None):
        services = _services(request)
        incident_id = _page_incident(services, token)
        if isinstance(incident_id, HTMLResponse):
            return incident_id
        with services.pool.transaction() as cur:
            incident = database.get_incident(cur, incident_id=incident_id)
            if incident is None:
                return _page_response(incident_page.problem_page(
                    "No such incident", "It was deleted, with its alert's history, after this message was sent."), 404)
            alert_id = incident["alert_config_id"]
            alert = database.get_alert(cur, alert_id=alert_id) if alert_id else None
            activities = database.list_activities(cur, incident_id=incident_id)
            evaluation = database.evaluation_at(cur, alert_id=alert_id, at=incident["created_at"]) if alert_id else None
        return _page_response(incident_page.render_page(
            incident=incident, alert=alert, activities=activities, evaluation=evaluation,
            zone=ZoneInfo(services.settings.timezone), now=datetime.now(timezone.utc), done=done))

    @app.post(path, include_in_schema=False)
    async def act_on_incident_page(token: str, request: Request):
        services = _services(request)
        incident_id = _page_incident(services, token)
        if isinstance(incident_id, HTMLResponse):
            return incident_id
        # The signed token in the URL is the credential (no cookie, so no ambient authority a forged cross-site form
        # could borrow); a browser's Origin from another site is refused as well.
        if _foreign_origin(request, services.settings):
            return _page_response(incident_page.refusal_page("This form was sent from another site."), 403)
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
        try:
            action = incident_page.parse_action(form)
        except incident_page.BadAction as exc:
            return _page_response(incident_page.problem_page("Nothing was changed", str(exc)), 422)
        outcome = await run_in_threadpool(_act_via_link, services, incident_id, action)
        if isinstance(outcome, HTMLResponse):
            return outcome
        # Post, then redirect, then get: reloading the page shows the result and sends nothing again.
        return Response(status_code=303, headers={**incident_page.PAGE_HEADERS,
                                                  "Location": f"{request.url.path}?done={outcome}"})


def _act_via_link(services: Services, incident_id: UUID, action: incident_page.Action) -> str | HTMLResponse:
    """Apply a page action and record it in the incident's timeline as done via link; what was done."""
    details: dict[str, Any] = {"via": "link"}
    if action.comment:
        details["comment"] = action.comment

    def work(cur):
        incident = database.get_incident(cur, incident_id=incident_id)
        if incident is None:
            return _page_response(incident_page.problem_page("No such incident", "It was deleted."), 404)
        alert_id = incident["alert_config_id"]
        if action.kind == "acknowledge":
            database.acknowledge_incident(cur, incident_id=incident_id, acknowledged_by=action.name)
            done = "acknowledged"
        elif action.kind == "resolve":
            database.resolve_incident(cur, incident_id=incident_id, resolved_by=action.name)
            done = "resolved"
        else:
            if alert_id is None:
                return _page_response(incident_page.problem_page(
                    "Nothing was changed", "The alert of this incident was deleted: there is nothing to mute."), 409)
            until = datetime.now(timezone.utc) + timedelta(hours=action.hours)
            database.set_alert_mute(cur, alert_id=alert_id, until=until)
            details.update(hours=action.hours, muted_until=until.isoformat())
            done = "muted"
        database.insert_activity(cur, action="alert_muted" if done == "muted" else done, incident_id=incident_id,
                                 alert_id=alert_id, actor=action.name,
                                 details=details)
        return done

    return database.in_transaction(services.pool, work)


# `uvicorn api:app` works too: settings are read when the app starts, in its lifespan.
app = create_app()
