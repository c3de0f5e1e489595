"""Notification channels (one Transport class per channel, in a registry), message rendering, and the outbox
dispatcher."""

from __future__ import annotations

import base64
import decimal
import hashlib
import hmac
import html
import json
import logging
import re
import smtplib
import socket
import ssl
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.header import Header
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from datetime import date, datetime, timedelta, timezone, tzinfo
from email.utils import formatdate, parseaddr, parsedate_to_datetime
from typing import Any, ClassVar, Sequence
from urllib.parse import urlsplit
from uuid import UUID
from zoneinfo import ZoneInfo

import database
import rules
import templating
from cluster import Lease
from config import Settings, ascii_email, is_e164
from metrics import Metrics
from templating import TemplateFailed

logger = logging.getLogger(__name__)

WHATSAPP_MAX_CHARS = 1600
EMAIL_MAX_ROWS = 100
WHATSAPP_TRUNCATION_NOTE = "\n… (message cut at 1600 characters; see the email or the incident page for every row)"
# A stored alert returning a 5 MB value must not store 5 MB in every message copy: values shown in a message are
# cut at MESSAGE_MAX_VALUE_CHARS, an email's text at EMAIL_MAX_CHARS, each with a visible note.
MESSAGE_MAX_VALUE_CHARS = 1_000
EMAIL_MAX_CHARS = 100_000
EMAIL_TRUNCATION_NOTE = "\n… (message cut at 100,000 characters; see the API for every row)\n"
MAX_BACKOFF_SECONDS = 6 * 3600
SMS_MAX_CHARS = 1600  # Twilio's limit of one SMS body (up to 10 segments)
URL_MAX_CHARS = 2048
HTTP_READ_TIMEOUT_SECONDS = 10.0
# A webhook carries at most this many rows, in about this many characters: the receiver can read the rest in the API.
WEBHOOK_MAX_ROWS = 100
WEBHOOK_MAX_CHARS = 100_000
WEBHOOK_TIMESTAMP_HEADER = "X-Alert-Timestamp"
WEBHOOK_SIGNATURE_HEADER = "X-Alert-Signature"
WEBHOOK_DELIVERY_HEADER = "X-Alert-Delivery"
# Slack's limits (https://api.slack.com/reference/block-kit/blocks): header text 150 characters, section text
# 3,000, 50 blocks a message; the top-level text is the notification's fallback.
SLACK_HEADER_MAX_CHARS = 150
SLACK_SECTION_MAX_CHARS = 3000
SLACK_MAX_BLOCKS = 50
SLACK_TEXT_MAX_CHARS = 3000
SLACK_MAX_ROWS = 100
# Servers commonly drop idle sessions after a minute or more; a kept session is used for 30 s at most.
SMTP_IDLE_SECONDS = 30.0
_SMTP_POLICY = compat32.clone(linesep="\r\n")  # SMTP wants CRLF line ends; sendmail sends bytes as they are


class NotificationError(Exception):
    """A message could not be sent; `permanent` errors are never retried."""

    def __init__(self, message: str, *, permanent: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


class Transport:
    """One channel: its settings, how it renders an alert's message for its medium, how it coalesces queued
    messages, how it sends, and how it classifies errors. Sends one message or raises NotificationError
    (`permanent`, `retry_after`); never touches the database. Registered with @register under `name`, the key
    of notification_channels and of the outbox's channel column. A transport whose provider may have accepted a
    message whose answer was lost (a crash mid-request), and that can look it up, has `find_accepted(recipient=,
    digest=, since=)`, returning the provider's ids of such messages, newest first (empty when there is none)."""

    name: ClassVar[str]
    # How a person names this channel's recipients (the API schema's description).
    recipients_noun: ClassVar[str] = "recipients"
    # The JSON schema of one recipient in the API.
    recipient_schema: ClassVar[dict] = {"type": "string"}

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        """True when the settings this channel needs are present."""
        return True

    @classmethod
    def connections(cls, settings: Settings) -> int:
        """How many sends of this channel may run at once (its sender threads)."""
        return 4

    @classmethod
    def max_per_second(cls, settings: Settings) -> float:
        """How many sends a second this channel may start; 0 is no limit."""
        return 0.0

    @classmethod
    def recipients(cls, values: Sequence[str]) -> list[str]:
        """The recipients as stored and sent (normalised, each once), or ValueError naming the bad ones."""
        return list(dict.fromkeys(value.strip() for value in values))

    @classmethod
    def render(cls, content: "Content") -> "Text":
        """The message of one notice in this channel's form, as its outbox rows store it."""
        raise NotImplementedError

    @classmethod
    def finish(cls, text: "Text", *, alert_id: Any, incident_id: Any, links: "Links") -> "Text":
        """The rendered text with what is known only when the outbox rows are written (the incident's id)."""
        return text

    @classmethod
    def combine(cls, rows: Sequence[dict]) -> "Message":
        """One message carrying as many of the queued rows of one alert and recipient as fit (at least the first);
        by default one row at a time."""
        first = rows[0]
        return Message(subject=first["subject"], body=first["body"], html=first["html"])

    @classmethod
    def describe(cls, recipient: str) -> str:
        """The recipient as logs and activities show it (a URL that is itself a credential is cut to its host)."""
        return recipient

    def send(self, *, recipient: str, subject: str | None, body: str, html_body: str | None,
             key: str | None = None) -> str | None:
        """Deliver one message and return the provider's message id; `key` identifies it across retries."""
        raise NotImplementedError


TRANSPORTS: dict[str, type[Transport]] = {}


def register(transport: type[Transport]) -> type[Transport]:
    """Make a transport a channel of the service (a class decorator)."""
    TRANSPORTS[transport.name] = transport
    return transport


def channel_names() -> list[str]:
    """The names of every registered channel, in registration order."""
    return list(TRANSPORTS)


# --- rendering -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Content:
    """One notice of an alert before it takes any channel's form: what every transport renders from."""

    alert: dict
    notice: rules.Notice
    subject: str
    paragraphs: list[str]  # the default message's text: what happened, the condition's detail, the description
    custom: str | None  # the alert's message template's output, when it has one that rendered
    zone: tzinfo = timezone.utc  # TIMEZONE: timestamps in the rows are shown in it


@dataclass(frozen=True)
class Text:
    """What an outbox row of one channel stores: the subject and HTML (email only) and the body."""

    subject: str | None
    body: str
    html: str | None = None
    template: dict | None = None  # WhatsApp: the approved template and its variables, sent instead of the body


@dataclass(frozen=True)
class Links:
    """Where a person can look at an incident and its alert (PUBLIC_BASE_URL); empty without it. With a signing
    key (from SECRET_KEY) it also makes the signed link to an incident's page, valid until `expires_at`."""

    base_url: str | None = None
    signing_key: bytes | None = None
    expires_at: int = 0  # Unix time
    zone: tzinfo = timezone.utc  # TIMEZONE, to say until when a link works

    @classmethod
    def from_settings(cls, settings: Settings, *, now: datetime) -> "Links":
        """The links of messages queued at `now`: signed page links when PUBLIC_BASE_URL and SECRET_KEY are set."""
        zone = ZoneInfo(settings.timezone)
        if not settings.incident_links_enabled:
            return cls(settings.public_base_url, zone=zone)
        return cls(settings.public_base_url, page_signing_key(settings.secret_key.get_secret_value()),
                   int(now.timestamp() + settings.incident_link_hours * 3600), zone)

    def page(self, incident_id: Any) -> str | None:
        """The signed link to an incident's page, or None without PUBLIC_BASE_URL, SECRET_KEY or an incident."""
        if not (self.base_url and self.signing_key and incident_id):
            return None
        return f"{self.base_url}{INCIDENT_PAGE_PATH}/{sign_incident(self.signing_key, incident_id, self.expires_at)}"

    def of(self, *, alert_id: Any, incident_id: Any) -> dict[str, str]:
        """The links of one alert and incident, by name."""
        if not self.base_url:
            return {}
        links = {"alert": f"{self.base_url}/alert-configs/{alert_id}"} if alert_id else {}
        if incident_id:
            links["incident"] = f"{self.base_url}/incidents/{incident_id}"
            links["activities"] = f"{self.base_url}/incidents/{incident_id}/activities"
        return links


# The incident page, reached from messages without an API key: /i/<incident id>.<expiry>.<signature>.
INCIDENT_PAGE_PATH = "/i"
_SIGNATURE_BYTES = 18  # 144 bits of HMAC-SHA256: 24 characters in the link


class LinkRefused(Exception):
    """A page link that is not ours, was altered, or has expired (`expired` says which)."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


def page_signing_key(secret_key: str) -> bytes:
    """The key that signs page links, derived from SECRET_KEY for this one use (it also encrypts passwords)."""
    return hmac.new(secret_key.encode(), b"alert-service incident page links", hashlib.sha256).digest()


def _page_signature(key: bytes, incident_id: str, expires_at: int) -> str:
    digest = hmac.new(key, f"{incident_id}.{expires_at}".encode(), hashlib.sha256).digest()[:_SIGNATURE_BYTES]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign_incident(key: bytes, incident_id: Any, expires_at: int) -> str:
    """The token of a page link: the incident's id, when the link expires, and their signature."""
    return f"{incident_id}.{expires_at}.{_page_signature(key, str(incident_id), expires_at)}"


def verify_incident(key: bytes, token: str, *, now: float) -> UUID:
    """The incident a page link's token names, or LinkRefused when it is not signed with `key` or has expired."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1].isascii() or not parts[1].isdigit() or len(parts[1]) > 12:
        raise LinkRefused("This link is not valid.")
    incident, expires, signature = parts
    try:
        incident_id = UUID(incident)
    except ValueError:
        raise LinkRefused("This link is not valid.") from None
    if not hmac.compare_digest(signature.encode(), _page_signature(key, incident, int(expires)).encode()):
        raise LinkRefused("This link is not valid.")
    if int(expires) < now:
        raise LinkRefused("This link has expired.", expired=True)
    return incident_id


@dataclass(frozen=True)
class Rendered:
    """The texts of one alert message on every channel its alert uses (and email and WhatsApp, for previews)."""

    subject: str
    text: str
    html: str
    texts: dict[str, Text]

    @property
    def whatsapp(self) -> str:
        """The WhatsApp text."""
        return self.texts["whatsapp"].body


def _cell(value: Any) -> str:
    return "NULL" if value is None else cut_text(str(value), MESSAGE_MAX_VALUE_CHARS)


def cut_text(text: str, limit: int) -> str:
    """The text, or its first `limit` characters and a note saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}… (cut, {len(text):,} characters in all)"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


_INTROS = {
    "initial_report": "The alert '{name}' was created. Its query currently returns {total}.",
    "incident": "The alert '{name}' found {headline}.",
    "digest": "The alert '{name}' gathered {headline}.",
    "repeat": "The alert '{name}' is still firing.",
    "resolved": "The alert '{name}' is resolved.",
    "failing": "The alert '{name}' is failing: its query did not run.",
    "recovered": "The alert '{name}' works again: its query runs.",
}


def compose(*, alert: dict, notice: rules.Notice, zone: tzinfo = timezone.utc) -> Content:
    """What a notice says, before any channel's form, with the alert's template if it has one."""
    name, priority = alert["name"], alert["priority"]
    subject = f"[{priority}] {name}: {notice.headline}"
    intro = _INTROS[notice.kind].format(name=name, headline=notice.headline, total=_plural(len(notice.rows), "row"))
    paragraphs = [intro] + [p for p in (notice.detail, alert.get("description")) if p]
    template = alert.get("message_template")
    custom = None
    if template:
        try:
            custom = render_template(template, template_context(alert=alert, notice=notice))
        except TemplateFailed as exc:
            paragraphs.append(f"(The alert's message template failed, so this is the default message: {exc})")
    return Content(alert=alert, notice=notice, subject=subject, paragraphs=paragraphs, custom=custom, zone=zone)


# Channels a user or team named in notification_channels can be reached on, and the user's field each uses.
PERSON_ADDRESSES = {"email": "email", "whatsapp": "phone", "sms": "phone"}


def expand_recipients(channels: dict, people: Sequence[dict]) -> dict[str, list[str]]:
    """The addresses per channel: those given, and the current ones of the users and team members named (on
    `user_channels`, email by default), each once."""
    expanded = {name: list(channels.get(name) or []) for name in TRANSPORTS}
    for name in channels.get("user_channels") or ["email"]:
        field = PERSON_ADDRESSES.get(name)
        if field is None or name not in expanded:
            continue
        for person in people:
            address = person.get(field)
            if address and address not in expanded[name]:
                expanded[name].append(address)
    return expanded


def referenced_people(channels: dict) -> tuple[list[str], list[str]]:
    """The user ids and team ids named in notification_channels."""
    return list(channels.get("users") or []), list(channels.get("teams") or [])


def render_message(*, alert: dict, notice: rules.Notice, tz: str = "UTC") -> Rendered:
    """Render one notice for email, WhatsApp and every other channel the alert has recipients on, with times in
    the IANA zone `tz` (TIMEZONE)."""
    content = compose(alert=alert, notice=notice, zone=ZoneInfo(tz))
    channels = alert.get("notification_channels") or {}
    names = dict.fromkeys(["email", "whatsapp", *channels, *(channels.get("user_channels") or [])])
    texts = {name: TRANSPORTS[name].render(content) for name in names if name in TRANSPORTS}
    email = texts["email"]
    return Rendered(subject=content.subject, text=email.body, html=email.html, texts=texts)


# What a WhatsApp template variable can be filled with.
TEMPLATE_SOURCES = ("alert_name", "priority", "kind", "headline", "subject", "detail", "description", "row_count",
                    "first_rows", "incident_link")
TEMPLATE_VARIABLE_MAX_CHARS = 200
TEMPLATE_FIRST_ROWS = 3


def template_variables(content: Content, mapping: dict[str, str]) -> dict[str, str]:
    """The values of a WhatsApp template's variables for one notice: each variable is filled with the message field
    it is mapped to (TEMPLATE_SOURCES)."""
    alert, notice = content.alert, content.notice
    first = "; ".join(", ".join(f"{c}={_cell(v)}" for c, v in zip(notice.columns, row))
                      for row in notice.rows[:TEMPLATE_FIRST_ROWS])
    fields = {"alert_name": alert["name"], "priority": alert["priority"], "kind": notice.kind,
              "headline": notice.headline, "subject": content.subject, "detail": notice.detail or "",
              "description": alert.get("description") or "", "row_count": str(len(notice.rows)),
              "first_rows": first or "(no rows)", "incident_link": _PAGE_MARK}  # filled in by finish()
    # WhatsApp refuses a variable with a line break, a tab or more than four spaces in a row, and an empty one.
    return {name: cut_text_to(" ".join(fields[source].split()) or "-", TEMPLATE_VARIABLE_MAX_CHARS)
            for name, source in mapping.items()}


# A text message shows the first rows (values cut at CHAT_MAX_VALUE_CHARS) and how many more there are; the
# incident page, linked below them, has the rest.
CHAT_MAX_ROWS = 5
CHAT_MAX_VALUE_CHARS = 100
# Room kept at the end of a text message for the incident page's link, added once the incident exists.
CHAT_LINK_ROOM = 200


def _chat_text(content: Content, *, heading: str, limit: int) -> str:
    """A short text message (WhatsApp, SMS): the heading, the detail and the first rows, in `limit` characters
    less room for the incident's link."""
    limit -= CHAT_LINK_ROOM
    if content.custom is not None:
        text = f"{heading}\n{content.custom}"
    else:
        notice = content.notice
        lines = [heading] + ([notice.detail] if notice.detail else [])
        length = sum(len(line) + 1 for line in lines)
        shown = 0
        for row in notice.rows[:CHAT_MAX_ROWS]:
            line = "• " + ", ".join(f"{c}={display_value(v, content.zone, CHAT_MAX_VALUE_CHARS)}"
                                    for c, v in zip(notice.columns, row))
            if shown and length + len(line) + 1 > limit:
                break
            lines.append(line)
            length += len(line) + 1
            shown += 1
        if len(notice.rows) > shown:
            lines.append(f"… and {_plural(len(notice.rows) - shown, 'more row')}")
        text = "\n".join(lines)
    if len(text) > limit:
        text = text[: limit - len(WHATSAPP_TRUNCATION_NOTE)] + WHATSAPP_TRUNCATION_NOTE
    return text


def _finish_chat(text: Text, page: str | None) -> Text:
    """A text message with the incident page's link on its last line (in the room _chat_text kept for it)."""
    if text.template is not None:
        # A template carries the link only in a variable mapped to incident_link ("-" when there is no page).
        variables = {name: (page or "-") if value == _PAGE_MARK else value
                     for name, value in text.template["variables"].items()}
        return Text(subject=text.subject, body=text.body + (f"\nOpen: {page}" if page else ""), html=None,
                    template={**text.template, "variables": variables})
    if not page:
        return text
    line, body = f"\nOpen: {page}", text.body
    if len(body) + len(line) > SMS_MAX_CHARS:  # a PUBLIC_BASE_URL longer than the room kept
        body = body[: SMS_MAX_CHARS - len(line) - len(WHATSAPP_TRUNCATION_NOTE)] + WHATSAPP_TRUNCATION_NOTE
    return Text(subject=text.subject, body=body + line, html=None)


def _rows_within(columns: Sequence[str], rows: Sequence[Sequence[Any]], limit: int) -> int:
    """How many of the rows fit a table of about `limit` characters (at least one)."""
    size = sum(len(c) + 2 for c in columns)
    for count, row in enumerate(rows):
        size += sum(len(_cell(v)) + 2 for v in row)
        if size > limit:
            return max(count, 1)
    return len(rows)


def _text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    if not columns or not rows:
        return []
    widths = [max([len(c)] + [len(_cell(r[i])) for r in rows]) for i, c in enumerate(columns)]
    return ["", "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
            "  ".join("-" * w for w in widths),
            *("  ".join(_cell(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)]


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    if not columns or not rows:
        return []
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return [f'<table border="1" cellpadding="4" cellspacing="0"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>"]


# --- the email ---------------------------------------------------------------------------------------------------

# A saturated badge with white text reads on a light page and on a dark one (mail clients that darken a message
# leave a coloured cell's own text alone); every colour gives white text at least 4.5:1 (WCAG AA), and the
# priority is spelt out in the badge and in the plain text, never told by colour alone.
PRIORITY_COLOURS = {"CRITICAL": "#b91c1c", "HIGH": "#c2410c", "MEDIUM": "#a16207", "LOW": "#1d4ed8"}
_KIND_LABELS = {"initial_report": "Initial report", "incident": "Firing", "digest": "Digest", "repeat": "Still firing",
                "resolved": "Resolved", "failing": "Failing", "recovered": "Recovered"}
# An email shows this many rows (a person reads them on a phone at night); the incident page has the rest.
EMAIL_TABLE_ROWS = 50
# A value longer than this is cut with an ellipsis in the email's table (the page shows it whole).
EMAIL_CELL_MAX_CHARS = 60
# The parts that need the incident's page link lie between these markers: `finish` fills the link in once the
# incident's id exists, or removes them when there is no link.
_LINKED = re.compile(r"<!--linked-->.*?<!--/linked-->", re.S)
_PAGE_MARK, _UNTIL_MARK = "%%INCIDENT_PAGE%%", "%%LINK_UNTIL%%"
_FONT = "-apple-system,BlinkMacSystemFont,'Segoe UI',Roboto,Helvetica,Arial,sans-serif"


# Rows reach rendering as JSON values (rules.jsonable): a timestamp is its text, a numeric its digits.
_TIMESTAMP_TEXT = re.compile(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d{1,6})?([+-]\d\d(:?\d\d)?|Z)?$")
_NUMBER_TEXT = re.compile(r"^-?(0|[1-9]\d*)(\.\d+)?$")  # not "007": a code with leading zeros is text


def display_value(value: Any, zone: tzinfo, limit: int = EMAIL_CELL_MAX_CHARS) -> str:
    """A result value as a person reads it: timestamps in `zone` to the second, long text cut with '…'."""
    if value is None:
        return "NULL"
    if isinstance(value, str) and _TIMESTAMP_TEXT.match(value):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.strftime("%Y-%m-%d %H:%M:%S")
        return value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z")
    if isinstance(value, date):
        return value.isoformat()
    return cut_text_to(" ".join(str(value).split()) if isinstance(value, str) else str(value), limit)


def is_number(value: Any) -> bool:
    """Whether a value is shown right-aligned (a number, or a numeric's text; not a boolean)."""
    if isinstance(value, str):
        return len(value) <= 40 and bool(_NUMBER_TEXT.match(value))
    return isinstance(value, (int, float, decimal.Decimal)) and not isinstance(value, bool)


def _is_time(value: Any) -> bool:
    return isinstance(value, datetime) or isinstance(value, str) and bool(_TIMESTAMP_TEXT.match(value))


def format_time(moment: datetime, zone: tzinfo) -> str:
    """A moment in `zone`, to the minute, with the zone's abbreviation."""
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")


def _email_text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], zone: tzinfo) -> list[str]:
    if not columns or not rows:
        return []
    cells = [[display_value(v, zone) for v in row] for row in rows]
    numeric = [bool(rows) and all(is_number(r[i]) or r[i] is None for r in rows) for i in range(len(columns))]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return ["", line(columns), "  ".join("-" * w for w in widths), *(line(r) for r in cells)]


def _email_html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], zone: tzinfo) -> str:
    if not columns or not rows:
        return ""
    cell = "padding:6px 10px;border-bottom:1px solid #e5e7eb;font-size:14px;line-height:20px;vertical-align:top;"
    head = "".join(
        f'<th align="{"right" if rows and is_number(rows[0][i]) else "left"}" style="{cell}font-weight:600;'
        f'color:#374151;background:#f9fafb;white-space:nowrap;">{html.escape(c)}</th>' for i, c in enumerate(columns))
    body = "".join(
        "<tr>" + "".join(
            f'<td align="{"right" if is_number(v) else "left"}" style="{cell}color:#111827;'
            f'{"font-variant-numeric:tabular-nums;white-space:nowrap;" if is_number(v) or _is_time(v) else "overflow-wrap:anywhere;word-break:break-word;"}">'
            f"{html.escape(display_value(v, zone))}</td>" for v in row) + "</tr>" for row in rows)
    return (f'<div style="overflow-x:auto;"><table role="table" cellpadding="0" cellspacing="0" border="0" '
            f'style="border-collapse:collapse;width:100%;font-family:{_FONT};"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _email_page(subject: str, inner: str, colour: str) -> str:
    """The email's HTML document: a centred card at most 640 px wide, inline styles only."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="color-scheme" content="light dark"><meta name="supported-color-schemes" content="light dark">'
        f"<title>{html.escape(subject)}</title></head>"
        '<body style="margin:0;padding:0;background:#f3f4f6;">'
        '<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0" '
        'style="background:#f3f4f6;"><tr><td align="center" style="padding:16px 8px;">'
        '<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0" '
        f'style="max-width:640px;table-layout:fixed;background:#ffffff;border-top:6px solid {colour};border-radius:4px;'
        f'font-family:{_FONT};color:#111827;">{inner}</table></td></tr></table></body></html>')


def render_email(content: Content) -> tuple[str, str]:
    """The plain text and the HTML of the default email: the priority and the alert's name on top, the headline,
    what happened, the rows (the first EMAIL_TABLE_ROWS), the alert's description, then the actions (added by
    EmailChannel.finish)."""
    alert, notice, zone = content.alert, content.notice, content.zone
    priority, name = alert["priority"], alert["name"]
    colour = PRIORITY_COLOURS.get(priority, "#374151")
    kind = _KIND_LABELS.get(notice.kind, notice.kind)
    intro, rest = content.paragraphs[0], content.paragraphs[1:]
    description = alert.get("description")
    notes = [p for p in rest if p != description]
    columns, rows = notice.columns, notice.rows
    shown = rows[:_rows_within(columns, rows[:EMAIL_TABLE_ROWS], EMAIL_MAX_CHARS)]
    hidden = len(rows) - len(shown)
    more = f"… and {_plural(hidden, 'more row')}" if hidden else None

    text = [f"[{priority}] {name}", f"{kind}: {notice.headline}", "", intro, *notes]
    text += _email_text_table(columns, shown, zone)
    if more:
        text.append(more)
    if description:
        text += ["", f"About this alert: {description}"]

    badge = (f'<span style="display:inline-block;background:{colour};color:#ffffff;font-weight:700;font-size:12px;'
             f'line-height:16px;letter-spacing:1px;padding:3px 8px;border-radius:3px;">{html.escape(priority)}</span>')
    label = (f'<span style="font-size:13px;line-height:16px;color:#4b5563;padding-left:8px;">'
             f"{html.escape(kind)}</span>")
    cell = "padding:0 24px 12px 24px;"
    inner = [
        f'<tr><td style="padding:20px 24px 4px 24px;">{badge}{label}</td></tr>',
        f'<tr><td style="{cell}"><h1 style="margin:8px 0 4px 0;font-size:22px;line-height:28px;font-weight:700;'
        f'color:#111827;">{html.escape(name)}</h1><p style="margin:0;font-size:17px;line-height:24px;'
        f'color:{colour};font-weight:600;">{html.escape(notice.headline)}</p></td></tr>',
        *(f'<tr><td style="{cell}"><p style="margin:0;font-size:15px;line-height:22px;color:#111827;">'
          f"{html.escape(p)}</p></td></tr>" for p in [intro, *notes]),
    ]
    table = _email_html_table(columns, shown, zone)
    if table:
        inner.append(f'<tr><td style="padding:4px 16px 8px 16px;">{table}</td></tr>')
    if more:
        inner.append(f'<tr><td style="{cell}"><p style="margin:0;font-size:14px;line-height:20px;color:#4b5563;">'
                     f'{html.escape(more)}<!--linked--> &middot; <a href="{_PAGE_MARK}" style="color:#1d4ed8;">'
                     "see them all</a><!--/linked--></p></td></tr>")
    if description:
        inner.append(f'<tr><td style="{cell}"><p style="margin:0;font-size:14px;line-height:20px;color:#4b5563;">'
                     f'<b style="color:#374151;">About this alert:</b> {html.escape(description)}</p></td></tr>')
    button = (f'<a href="{_PAGE_MARK}" style="display:inline-block;background:{colour};color:#ffffff;'
              'font-weight:700;font-size:15px;line-height:20px;text-decoration:none;padding:12px 20px;'
              'border-radius:4px;">Open the incident</a>')
    inner.append(f'<!--linked--><tr><td style="padding:8px 24px 16px 24px;">{button}<p style="margin:10px 0 0 0;'
                 'font-size:13px;line-height:18px;color:#4b5563;">Acknowledge, resolve or mute it for 1, 8 or 24 '
                 f"hours from there, without an API key. The link works until {_UNTIL_MARK}.</p></td></tr>"
                 "<!--/linked-->")
    inner.append('<tr><td style="padding:12px 24px 20px 24px;border-top:1px solid #e5e7eb;font-size:12px;'
                 'line-height:16px;color:#6b7280;">Sent by the alert service for TimescaleDB and PostgreSQL.'
                 "</td></tr>")
    return "\n".join(text) + "\n", _email_page(content.subject, "".join(inner), colour)


def finish_email(text: Text, *, page: str | None, expires_at: int, zone: tzinfo) -> Text:
    """The rendered email with the incident page's link filled in (and its parts removed without one)."""
    if text.html is None or "<!--linked-->" not in text.html:
        return text
    if not page:
        return Text(subject=text.subject, body=text.body, html=_LINKED.sub("", text.html), template=text.template)
    until = format_time(datetime.fromtimestamp(expires_at, timezone.utc), zone)
    page_html = text.html.replace(_PAGE_MARK, html.escape(page, quote=True)).replace(_UNTIL_MARK, html.escape(until))
    body = text.body + f"\nOpen the incident (acknowledge, resolve, mute): {page}\nThe link works until {until}.\n"
    return Text(subject=text.subject, body=body, html=page_html, template=text.template)


TEMPLATE_MAX_ROWS = 1000


def template_context(*, alert: dict, notice: rules.Notice) -> dict:
    """The variables a message template sees."""
    # Rows are capped so a template that loops over rows in rows stays cheap; counts.rows is the full count.
    rows = [dict(zip(notice.columns, row)) for row in notice.rows[:TEMPLATE_MAX_ROWS]]
    return {
        "alert": {"name": alert["name"], "description": alert.get("description"), "priority": alert["priority"]},
        "kind": notice.kind, "headline": notice.headline, "detail": notice.detail, "columns": notice.columns,
        "rows": rows, "new_rows": rows if notice.kind in ("incident", "digest", "initial_report") else [],
        "counts": {"rows": len(notice.rows)},
        "incident": {"title": notice.headline},
    }


def render_template(template: str, context: dict) -> str:
    """Render a message template in a render process, within its time, memory and output limits."""
    return templating.render(template, context)


def check_template(template: str) -> None:
    """Render a template once against sample values, raising TemplateFailed if it cannot be used."""
    sample = rules.Notice("incident", "2 new rows", ["order_number", "qty"], [["ORD1", 3], ["ORD2", 5]],
                          open_incident=True, detail="Condition met: qty <= 5 in any row.")
    render_template(template, template_context(alert={"name": "Sample", "description": "", "priority": "HIGH"},
                                               notice=sample))


def outbox_rows(
    *, rendered: Rendered, channels: dict, alert_id: Any, incident_id: Any, kind: str, links: Links = Links(),
    decision_key: str | None = None,
) -> list[dict]:
    """One outbox row per recipient of every registered channel; with a decision key, each row carries an
    idempotency key derived from it, its channel and its recipient."""
    rows = []
    for name, transport in TRANSPORTS.items():
        recipients = channels.get(name) or []
        if not recipients:
            continue
        # render_message rendered every channel of the alert these channels belong to.
        text = transport.finish(rendered.texts[name], alert_id=alert_id, incident_id=incident_id, links=links)
        for recipient in recipients:
            rows.append({"alert_config_id": alert_id, "incident_id": incident_id, "kind": kind, "channel": name,
                         "recipient": recipient, "subject": text.subject, "body": text.body, "html": text.html,
                         "template": text.template})
    if decision_key is not None:
        for row in rows:
            row["idempotency_key"] = hashlib.sha256(
                f"{decision_key}/{row['channel']}/{row['recipient']}".encode()).hexdigest()
    return rows


@dataclass(frozen=True)
class Message:
    """What one send carries: the subject (email only), the text and the HTML (email only)."""

    subject: str | None
    body: str
    html: str | None
    carries: int = 1  # how many of the group's rows, from the first: the rest wait for the next send
    template: dict | None = None  # WhatsApp: sent instead of the body (one template message carries one row)


# A group holds at most this many rows: about EMAIL_MAX_CHARS of typical messages; the rest go in the next send.
GROUP_MAX_ROWS = 100
_HTML_OPEN, _HTML_CLOSE = "<html><body>", "</body></html>"


def combine_messages(rows: Sequence[dict]) -> Message:
    """One message carrying, in order, as many of the queued rows of one alert, channel and recipient as fit in one
    message of that channel (at least the first; one row is sent as stored). `carries` says how many: the rest
    are left for the next send, never cut away."""
    first = rows[0]
    if len(rows) == 1 or first.get("template"):
        return Message(subject=first["subject"], body=first["body"], html=first["html"], template=first.get("template"))
    return TRANSPORTS[first["channel"]].combine(rows)


def _combine_chat(rows: Sequence[dict], limit: int) -> Message:
    """Short texts joined by a blank line, as many as fit in `limit` characters."""
    bodies = [rows[0]["body"]]
    size = len(rows[0]["body"])
    for row in rows[1:]:
        if size + 2 + len(row["body"]) > limit or row.get("template"):  # a template goes in a message of its own
            break
        bodies.append(row["body"])
        size += 2 + len(row["body"])
    return Message(subject=None, body="\n\n".join(bodies), html=None, carries=len(bodies))


def _heading(number: int, count: int, row: dict) -> str:
    return f"--- update {number} of {count}: {row['subject']} ---"


def _html_inner(row: dict) -> str:
    """The body of a row's HTML document, or its text when it has none."""
    page = row["html"]
    if not page:
        return f"<pre>{html.escape(row['body'])}</pre>"
    if page.startswith(_HTML_OPEN) and page.endswith(_HTML_CLOSE):
        return page[len(_HTML_OPEN):-len(_HTML_CLOSE)]
    start, end = page.find("<body"), page.rfind("</body>")
    if start >= 0 and end > start and (opened := page.find(">", start)) >= 0:
        return page[opened + 1:end]  # a whole document (head and styled body): its body's content
    return page


def retry_delay(*, attempts: int, base_seconds: float, retry_after: float | None = None) -> float:
    """Exponential backoff from RETRY_DELAY_MINUTES (base, 2×base, 4×base …), never shorter than Retry-After."""
    delay = min(base_seconds * (2 ** max(0, attempts - 1)), MAX_BACKOFF_SECONDS)
    return max(delay, retry_after or 0.0)


# --- channels --------------------------------------------------------------------------------------------------


class SendDeadline:
    """A total time limit for one send. Socket timeouts bound each read, so a server that trickles a line a second
    never trips them; at the deadline this shuts the send's sockets down, which ends any read in progress."""

    _current = threading.local()

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list = []
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "SendDeadline":
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()
        SendDeadline._current.value = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        SendDeadline._current.value = None

    @classmethod
    def current(cls) -> "SendDeadline | None":
        """The deadline of the send running on this thread, if any."""
        return getattr(cls._current, "value", None)

    def watch(self, get_socket) -> None:
        """Shut down `get_socket()` (read at the deadline: STARTTLS replaces a socket) when time is up."""
        with self._lock:
            self._sockets.append(get_socket)
            expired = self.expired
        if expired:
            _shut_down(get_socket())

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for get_socket in sockets:
            _shut_down(get_socket())


def _shut_down(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        # The plain socket's shutdown, also for an SSL socket: it only needs the read in the sender thread to end.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


class _DeadlineWatched:
    """Mixed into smtplib's clients: the socket is shut down at the send's deadline (the greeting can trickle too)."""

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        deadline = SendDeadline.current()
        if deadline is not None:
            deadline.watch(lambda: self.sock or sock)
        return sock


class _WatchedSMTP(_DeadlineWatched, smtplib.SMTP):
    """smtplib.SMTP under the send's deadline."""


class _WatchedSMTP_SSL(_DeadlineWatched, smtplib.SMTP_SSL):
    """smtplib.SMTP_SSL under the send's deadline."""


@register
class EmailChannel(Transport):
    """Email through SMTP. Each sender thread keeps its session open for SMTP_IDLE_SECONDS, so an alert does not
    pay for TCP, TLS and AUTH every time; a kept session that the server closed is replaced and retried once."""

    name = "email"
    recipients_noun = "email addresses"
    recipient_schema = {"type": "string", "format": "email"}

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return settings.email_enabled

    @classmethod
    def connections(cls, settings: Settings) -> int:
        return settings.smtp_connections

    @classmethod
    def max_per_second(cls, settings: Settings) -> float:
        return settings.smtp_max_per_second

    @classmethod
    def recipients(cls, values: Sequence[str]) -> list[str]:
        # Stored as it is sent: an internationalised domain in IDNA form, and only ASCII before the @, so an
        # address that is accepted here does not fail at every send.
        return list(dict.fromkeys(ascii_email(value) for value in values))

    @classmethod
    def render(cls, content: Content) -> Text:
        """The text and HTML of the email."""
        if content.custom is not None:
            custom = content.custom
            text = custom if custom.endswith("\n") else custom + "\n"
            html_text = (f"<html><body><pre>{html.escape(custom)}</pre><!--linked--><p><a href=\"{_PAGE_MARK}\">"
                         f"Open the incident</a> (the link works until {_UNTIL_MARK})</p><!--/linked--></body></html>")
        else:
            text, html_text = render_email(content)
        if len(text) > EMAIL_MAX_CHARS:
            text = text[: EMAIL_MAX_CHARS - len(EMAIL_TRUNCATION_NOTE)] + EMAIL_TRUNCATION_NOTE
        if len(html_text) > 4 * EMAIL_MAX_CHARS:  # escaping can make it longer than the text, never more than this
            html_text = f"<html><body><pre>{html.escape(text)}</pre></body></html>"
        return Text(subject=content.subject, body=text, html=html_text)

    @classmethod
    def finish(cls, text: Text, *, alert_id: Any, incident_id: Any, links: Links) -> Text:
        """The email with the signed link to its incident's page (when there is one)."""
        return finish_email(text, page=links.page(incident_id), expires_at=links.expires_at, zone=links.zone)

    @classmethod
    def combine(cls, rows: Sequence[dict]) -> Message:
        first = rows[0]
        # Whole updates only, as many as fit in one email (the first always does: it was cut to size when rendered).
        # The headings are sized for the whole group, so the updates chosen still fit once numbered.
        carried, size = 0, 0
        for number, row in enumerate(rows, 1):
            length = len(_heading(number, len(rows), row)) + len(row["body"]) + 2
            if carried and size + length > EMAIL_MAX_CHARS:
                break
            carried, size = carried + 1, size + length
        texts, html_parts = [], []
        for number, row in enumerate(rows[:carried], 1):
            heading = _heading(number, carried, row)
            texts.append(f"{heading}\n{row['body']}")
            html_parts.append(f"<hr><p><b>{html.escape(heading)}</b></p>{_html_inner(row)}")
        text = "\n".join(texts)
        if len(text) > EMAIL_MAX_CHARS:  # one update alone, already at the limit, and its heading
            text = text[: EMAIL_MAX_CHARS - len(EMAIL_TRUNCATION_NOTE)] + EMAIL_TRUNCATION_NOTE
        html_text = _HTML_OPEN + "".join(html_parts) + _HTML_CLOSE
        if len(html_text) > 4 * EMAIL_MAX_CHARS:
            html_text = f"<html><body><pre>{html.escape(text)}</pre></body></html>"
        subject = first["subject"] if carried == 1 else f"{first['subject']} (+{_plural(carried - 1, 'more update')})"
        return Message(subject=subject, body=text, html=html_text, carries=carried)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()
        # smtplib would look this up (possibly through DNS) on every connection.
        self._hostname = socket.getfqdn()

    def _tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.settings.smtp_ca_file) if self.settings.smtp_ca_file else None)

    def _open(self) -> smtplib.SMTP:
        s = self.settings
        if s.smtp_security == "ssl":
            client = _WatchedSMTP_SSL(s.smtp_host, s.smtp_port, local_hostname=self._hostname,
                                      timeout=s.smtp_timeout_seconds, context=self._tls_context())
        else:
            client = _WatchedSMTP(s.smtp_host, s.smtp_port, local_hostname=self._hostname,
                                  timeout=s.smtp_timeout_seconds)
        try:
            if s.smtp_security == "starttls":
                client.starttls(context=self._tls_context())
            if s.smtp_username:
                client.login(s.smtp_username, s.smtp_password.get_secret_value() if s.smtp_password else "")
        except BaseException:
            _quit_quietly(client)
            raise
        return client

    def _session(self) -> tuple[smtplib.SMTP, bool]:
        """This thread's SMTP session and whether it is a kept one."""
        kept = getattr(self._local, "client", None)
        if kept is not None and time.monotonic() - self._local.used < SMTP_IDLE_SECONDS:
            return kept, True
        self.close_session()
        self._local.client = self._open()
        return self._local.client, False

    def close_session(self) -> None:
        """Close this thread's kept session, if any."""
        kept = getattr(self._local, "client", None)
        self._local.client = None
        if kept is not None:
            _quit_quietly(kept)

    def send(self, *, recipient: str, subject: str | None, body: str, html_body: str | None,
             key: str | None = None) -> str | None:
        """Send one multipart email; SMTP 5xx replies are permanent errors, everything else is retried."""
        s = self.settings
        if not s.email_enabled:
            raise NotificationError(
                "email is not configured: set SMTP_HOST and SMTP_USERNAME (or SMTP_FROM)", permanent=True
            )
        try:
            # Rows queued before addresses were checked at the API may still hold a Unicode address.
            recipient = ascii_email(recipient)
        except ValueError as exc:
            raise NotificationError(str(exc), permanent=True) from None
        message, message_id = build_email(sender=s.email_sender, recipient=recipient, subject=subject or "Alert",
                                          body=body, html_body=html_body, notification_id=key)
        with SendDeadline(s.send_timeout_seconds) as deadline:
            try:
                for _ in range(2):
                    client, kept = self._session()
                    deadline.watch(lambda: client.sock)
                    try:
                        client.sendmail(s.email_sender, [recipient], message)
                    except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
                        self.close_session()
                        if kept and not deadline.expired:
                            continue  # the server dropped the idle session: one fresh try, not a failed attempt
                        raise exc
                    except BaseException:
                        self.close_session()
                        raise
                    self._local.used = time.monotonic()
                    return message_id
            except smtplib.SMTPRecipientsRefused as exc:
                code, reply = next(iter(exc.recipients.values()))
                raise NotificationError(f"SMTP refused recipient: {code} {_decode(reply)}",
                                        permanent=code >= 500) from None
            except smtplib.SMTPResponseException as exc:
                raise NotificationError(
                    f"SMTP error {exc.smtp_code}: {_decode(exc.smtp_error)}", permanent=exc.smtp_code >= 500
                ) from None
            except (OSError, smtplib.SMTPException) as exc:
                if deadline.expired:
                    raise NotificationError(
                        f"SMTP send did not finish within SEND_TIMEOUT_SECONDS ({s.send_timeout_seconds:g}s): the "
                        "server answers too slowly; the session was dropped") from None
                if isinstance(exc, (socket.timeout, TimeoutError)):
                    raise NotificationError(f"SMTP server did not answer within {s.smtp_timeout_seconds:g}s") from None
                raise NotificationError(f"SMTP failed: {type(exc).__name__}: {exc}") from None
        raise NotificationError("SMTP server closed the connection twice")


def build_email(*, sender: str, recipient: str, subject: str, body: str, html_body: str | None,
                notification_id: str | None = None) -> tuple[bytes, str]:
    """The message as bytes (text, and HTML when given, as alternatives) and its Message-ID, derived from the
    notification it carries: a copy sent again after a crash (SMTP accepted it, the process died before recording
    that) has the same Message-ID, so a mail system or a person can tell it is the same message."""
    # The compat32 MIME classes build this in a quarter of the time of EmailMessage's header registry.
    text_part = MIMEText(body, "plain", "utf-8")
    if html_body:
        message = MIMEMultipart("alternative")
        message.attach(text_part)
        message.attach(MIMEText(html_body, "html", "utf-8"))
    else:
        message = text_part
    domain = parseaddr(sender)[1].rpartition("@")[2] or "alert-service"
    message_id = f"<notification-{notification_id or uuid.uuid4()}@{domain}>"
    message["Subject"] = Header(subject, "utf-8").encode() if not subject.isascii() else subject
    message["From"] = sender
    message["To"] = recipient
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = message_id
    return message.as_bytes(policy=_SMTP_POLICY), message_id


def _quit_quietly(client: smtplib.SMTP) -> None:
    try:
        client.quit()
    except (OSError, smtplib.SMTPException):
        client.close()


def _decode(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


@register
class WhatsAppChannel(Transport):
    """WhatsApp through Twilio's Messages API, using the official client pointed at TWILIO_API_BASE_URL."""

    name = "whatsapp"
    recipients_noun = "WhatsApp numbers"
    recipient_schema = {"type": "string", "pattern": r"^(whatsapp:)?\+[1-9][0-9]{7,14}$"}

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return settings.whatsapp_enabled

    @classmethod
    def connections(cls, settings: Settings) -> int:
        return settings.twilio_connections

    @classmethod
    def max_per_second(cls, settings: Settings) -> float:
        return settings.twilio_max_per_second

    @classmethod
    def recipients(cls, values: Sequence[str]) -> list[str]:
        return _e164_numbers(values, cls.recipients_noun, prefix="whatsapp:")

    @classmethod
    def render(cls, content: Content) -> Text:
        """The subject in bold, then the detail and as many rows as fit in 1,600 characters; with the alert's
        approved template, that template and its variables are sent instead (the text stays as the record)."""
        body = _chat_text(content, heading=f"*{content.subject}*", limit=WHATSAPP_MAX_CHARS)
        template = content.alert.get("whatsapp_template")
        if not template:
            return Text(subject=None, body=body)
        return Text(subject=None, body=body, template={
            "content_sid": template["content_sid"],
            "variables": template_variables(content, template.get("variables") or {})})

    @classmethod
    def finish(cls, text: Text, *, alert_id: Any, incident_id: Any, links: Links) -> Text:
        """The text with the signed link to its incident's page (a template message keeps its variables)."""
        return _finish_chat(text, links.page(incident_id))

    @classmethod
    def combine(cls, rows: Sequence[dict]) -> Message:
        return _combine_chat(rows, WHATSAPP_MAX_CHARS)

    not_configured = "WhatsApp is not configured: set TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_FROM_NUMBER"

    def _sender(self) -> str:
        return f"whatsapp:{self.settings.twilio_from_number}"

    def _address(self, recipient: str) -> str:
        return f"whatsapp:{recipient}"

    def _callback(self) -> dict:
        # Twilio reports delivered, read, failed or undelivered there; without it, DeliveryStatusPoller asks.
        base = self.settings.public_base_url
        return {"status_callback": f"{base}{TWILIO_STATUS_PATH}"} if base else {}

    def fetch_status(self, sid: str) -> tuple[str, int | None]:
        """Twilio's current status of one message and its error code."""
        from twilio.base.exceptions import TwilioException

        try:
            with SendDeadline(self.settings.send_timeout_seconds):
                message = self._client().messages(sid).fetch()
        except TwilioException as exc:
            raise NotificationError(f"Twilio request failed: {exc}") from None
        except Exception as exc:  # requests' connection and timeout errors
            raise NotificationError(f"Twilio unreachable: {type(exc).__name__}") from None
        return message.status, int(message.error_code) if message.error_code else None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            from twilio.http.http_client import TwilioHttpClient
            from twilio.rest import Client

            base_url = self.settings.twilio_api_base_url

            class _BaseUrlHttpClient(TwilioHttpClient):
                """Sends every request to TWILIO_API_BASE_URL instead of Twilio's public hosts."""

                last_response = None

                def request(self, method, url, *args, **kwargs):
                    for host in ("https://api.twilio.com", "https://messaging.twilio.com"):
                        if url.startswith(host):
                            url = base_url + url[len(host):]
                            break
                    # TwilioRestException carries no headers; keep the response to read Retry-After.
                    self.last_response = super().request(method, url, *args, **kwargs)
                    return self.last_response

            http_client = _BaseUrlHttpClient(timeout=self.settings.smtp_timeout_seconds)
            for scheme in ("https://", "http://"):
                http_client.session.mount(scheme, _deadline_adapter())
            # The requests session of one client is not shared between threads.
            client = Client(
                self.settings.twilio_account_sid,
                self.settings.twilio_auth_token.get_secret_value(),
                http_client=http_client,
            )
            self._local.client = client
        return client

    def send(self, *, recipient: str, subject: str | None, body: str, html_body: str | None,
             key: str | None = None, template: dict | None = None) -> str | None:
        """Send one WhatsApp message; Twilio 4xx other than 429 are permanent errors."""
        if not self.enabled(self.settings):
            raise NotificationError(self.not_configured, permanent=True)
        from twilio.base.exceptions import TwilioException, TwilioRestException

        client = self._client()
        try:
            with SendDeadline(self.settings.send_timeout_seconds) as deadline:
                content = ({"content_sid": template["content_sid"],
                            "content_variables": json.dumps(template["variables"], ensure_ascii=False)}
                           if template else {"body": body})
                message = client.messages.create(from_=self._sender(), to=self._address(recipient), **content,
                                                 **self._callback())
            if deadline.expired:  # http.client reads a header block cut short as a complete one
                raise TimeoutError("the answer was cut at the deadline")
        except TwilioRestException as exc:
            status = exc.status or 0
            text = f"Twilio error {exc.code or status}: {exc.msg}"
            temporary = status == 429 or status >= 500
            response = getattr(self._client().http_client, "last_response", None)
            raise NotificationError(text, permanent=not temporary, retry_after=_retry_after(response)) from None
        except TwilioException as exc:
            raise NotificationError(f"Twilio request failed: {exc}") from None
        except Exception as exc:  # requests' connection and timeout errors, without importing requests here
            if deadline.expired:
                raise NotificationError(
                    f"Twilio did not answer within SEND_TIMEOUT_SECONDS ({self.settings.send_timeout_seconds:g}s)"
                ) from None
            raise NotificationError(f"Twilio unreachable: {type(exc).__name__}: {exc}") from None
        return message.sid


    def find_accepted(self, *, recipient: str, digest: str, since: datetime) -> list[str]:
        """The sids of the messages Twilio accepted for this recipient, from our number, created since `since` (less
        a minute for clock skew), whose body has this digest, newest first. Twilio's Messages API takes no
        idempotency key, so this look-up is what keeps a send interrupted by a crash from being repeated."""
        from twilio.base.exceptions import TwilioException

        try:
            with SendDeadline(self.settings.send_timeout_seconds):
                # Newest first; a page is plenty: only messages of the last minutes to one recipient can match.
                recent = self._client().messages.list(to=self._address(recipient), from_=self._sender(), limit=50)
        except TwilioException as exc:
            raise NotificationError(f"Twilio message look-up failed: {exc}") from None
        except Exception as exc:  # requests' connection and timeout errors
            raise NotificationError(f"Twilio unreachable for a message look-up: {type(exc).__name__}: {exc}") from None
        earliest = since - timedelta(minutes=1)
        found = []
        for message in recent:
            created = message.date_created
            if created is not None and created.tzinfo is None:
                created = created.replace(tzinfo=timezone.utc)
            if (created is None or created >= earliest) and body_digest(message.body or "") == digest:
                found.append(message.sid)
        return found


def body_digest(body: str) -> str:
    """The digest of a message's text, recorded before a send and compared with the provider's copy after a crash."""
    return hashlib.sha256(body.encode()).hexdigest()


def _e164_numbers(values: Sequence[str], noun: str, *, prefix: str) -> list[str]:
    """Phone numbers as sent (without `prefix`), each once, or ValueError naming those not in E.164 form."""
    cleaned = [value.strip().removeprefix(prefix) for value in values]
    bad = [number for number in cleaned if not is_e164(number)]
    if bad:
        raise ValueError(f"{', '.join(bad)}: {noun} must be in E.164 form, '+' and 8 to 15 digits")
    return list(dict.fromkeys(cleaned))


def _deadline_adapter():
    """A requests adapter whose connections are shut down at the current SendDeadline (a trickled response
    never trips the per-read timeout)."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def watched(base):
        class Watched(base):
            def connect(self):
                super().connect()
                self._watch()

            def request(self, *args, **kwargs):
                self._watch()  # a kept-alive connection is not connected again
                return super().request(*args, **kwargs)

            def _watch(self):
                deadline = SendDeadline.current()
                if deadline is not None:
                    deadline.watch(lambda: self.sock)

        return Watched

    class Pool(HTTPConnectionPool):
        ConnectionCls = watched(HTTPConnection)

    class TlsPool(HTTPSConnectionPool):
        ConnectionCls = watched(HTTPSConnection)

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TlsPool}

    return Adapter()


def _retry_after(response: Any) -> float | None:
    headers = getattr(response, "headers", None) or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_BACKOFF_SECONDS)
    except ValueError:
        pass
    try:  # the other form RFC 9110 allows: an HTTP date
        return min(max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0), MAX_BACKOFF_SECONDS)
    except (TypeError, ValueError):
        return None


@register
class SmsChannel(WhatsAppChannel):
    """SMS through the same Twilio account as WhatsApp, from TWILIO_SMS_FROM_NUMBER (or TWILIO_FROM_NUMBER)."""

    name = "sms"
    recipients_noun = "SMS numbers"
    recipient_schema = {"type": "string", "pattern": r"^\+[1-9][0-9]{7,14}$"}
    not_configured = ("SMS is not configured: set TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_SMS_FROM_NUMBER "
                      "(or TWILIO_FROM_NUMBER)")

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return settings.sms_enabled

    @classmethod
    def recipients(cls, values: Sequence[str]) -> list[str]:
        return _e164_numbers(values, cls.recipients_noun, prefix="")

    @classmethod
    def render(cls, content: Content) -> Text:
        """The subject, then the detail and as many rows as fit in 1,600 characters (Twilio's limit of one SMS
        body, sent as up to ten segments)."""
        return Text(subject=None, body=_chat_text(content, heading=content.subject, limit=SMS_MAX_CHARS))

    @classmethod
    def combine(cls, rows: Sequence[dict]) -> Message:
        return _combine_chat(rows, SMS_MAX_CHARS)

    def _sender(self) -> str:
        return self.settings.sms_sender

    def _address(self, recipient: str) -> str:
        return recipient


def _urls(values: Sequence[str], noun: str) -> list[str]:
    """URLs as sent, each once, or ValueError naming those that are not http(s) URLs with a host."""
    cleaned = [value.strip() for value in values]
    bad = []
    for url in cleaned:
        try:
            parts = urlsplit(url)
            usable = parts.scheme in ("http", "https") and parts.hostname and len(url) <= URL_MAX_CHARS
        except ValueError:
            usable = False
        if not usable:
            bad.append(url[:100])
    if bad:
        raise ValueError(f"{', '.join(bad)}: {noun} must be http:// or https:// URLs with a host, at most "
                         f"{URL_MAX_CHARS} characters")
    return list(dict.fromkeys(cleaned))


def _url_host(url: str) -> str:
    """A URL cut to its scheme and host: the path of a Slack or webhook URL is often its only credential."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/…"


def classify_http(status: int, *, retry_after: float | None, reason: str) -> NotificationError | None:
    """None for a 2xx answer; otherwise the error: 408, 429 and 5xx are retried (no sooner than Retry-After),
    a redirect or any other 4xx is permanent."""
    if 200 <= status < 300:
        return None
    text = f"HTTP {status}: {reason}" if reason else f"HTTP {status}"
    if status in (408, 429) or status >= 500:
        return NotificationError(text, retry_after=retry_after)
    if 300 <= status < 400:
        return NotificationError(f"{text} (the URL redirects; use the URL it redirects to)", permanent=True)
    return NotificationError(text, permanent=True)


class _HttpChannel(Transport):
    """A channel that POSTs a JSON body to a URL per recipient, within SEND_TIMEOUT_SECONDS."""

    recipient_schema = {"type": "string", "format": "uri"}

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._local = threading.local()

    @classmethod
    def connections(cls, settings: Settings) -> int:
        return settings.webhook_connections

    @classmethod
    def recipients(cls, values: Sequence[str]) -> list[str]:
        return _urls(values, cls.recipients_noun)

    @classmethod
    def describe(cls, recipient: str) -> str:
        return _url_host(recipient)

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            # A requests session is not shared between threads.
            session = requests.Session()
            session.trust_env = False  # no proxy or .netrc credentials picked up from the environment
            for scheme in ("https://", "http://"):
                session.mount(scheme, _deadline_adapter())
            self._local.session = session
        return session

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> Any:
        """POST the body and return the response, or raise NotificationError as classify_http says."""
        import requests

        timeout = min(HTTP_READ_TIMEOUT_SECONDS, self.settings.send_timeout_seconds)
        try:
            with SendDeadline(self.settings.send_timeout_seconds) as deadline:
                response = self._session().post(url, data=body, headers=headers, timeout=timeout,
                                                allow_redirects=False)
                reason = response.text[:200].strip()
            if deadline.expired:
                raise requests.ConnectionError("the answer was cut at the deadline")
        except requests.RequestException as exc:
            if deadline.expired:
                raise NotificationError(f"{_url_host(url)} did not answer within SEND_TIMEOUT_SECONDS "
                                        f"({self.settings.send_timeout_seconds:g}s)") from None
            # The exception's text holds the whole URL, whose path may be the credential.
            raise NotificationError(f"{_url_host(url)} unreachable: {type(exc).__name__}") from None
        error = classify_http(response.status_code, retry_after=_retry_after(response), reason=reason)
        if error is not None:
            raise error
        return response


@register
class WebhookChannel(_HttpChannel):
    """A JSON document POSTed to a URL per recipient, signed with HMAC-SHA256 over the timestamp and the body."""

    name = "webhook"
    recipients_noun = "webhook URLs"
    not_configured = "webhooks are not configured: set WEBHOOK_SIGNING_SECRET"

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return settings.webhook_signing_secret is not None

    @classmethod
    def render(cls, content: Content) -> Text:
        """The documented JSON body (see the README's Webhook section), without the incident until it exists."""
        alert, notice = content.alert, content.notice
        rows = notice.rows[:_rows_within(notice.columns, notice.rows[:WEBHOOK_MAX_ROWS], WEBHOOK_MAX_CHARS)]
        document = {
            "version": 1, "kind": notice.kind, "subject": content.subject, "headline": notice.headline,
            "detail": notice.detail,
            "text": content.custom if content.custom is not None else "\n".join(content.paragraphs),
            "alert": {"id": str(alert["id"]) if alert.get("id") else None, "name": alert["name"],
                      "priority": alert["priority"], "description": alert.get("description")},
            "incident": None, "columns": list(notice.columns),
            "rows": [[_json_cell(value) for value in row] for row in rows],
            "row_count": len(notice.rows), "rows_omitted": len(notice.rows) - len(rows), "links": {},
        }
        return Text(subject=content.subject, body=json.dumps(document, ensure_ascii=False))

    @classmethod
    def finish(cls, text: Text, *, alert_id: Any, incident_id: Any, links: Links) -> Text:
        document = json.loads(text.body)
        if alert_id:
            document["alert"]["id"] = str(alert_id)
        document["incident"] = {"id": str(incident_id)} if incident_id else None
        document["links"] = links.of(alert_id=alert_id, incident_id=incident_id)
        return Text(subject=text.subject, body=json.dumps(document, ensure_ascii=False))

    def send(self, *, recipient: str, subject: str | None, body: str, html_body: str | None,
             key: str | None = None) -> str | None:
        """POST the body with its signature; the delivery id stays the same on every retry of one message."""
        if not self.enabled(self.settings):
            raise NotificationError(self.not_configured, permanent=True)
        data = body.encode()
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": "alert-service",
                   WEBHOOK_TIMESTAMP_HEADER: timestamp,
                   WEBHOOK_SIGNATURE_HEADER: webhook_signature(
                       self.settings.webhook_signing_secret.get_secret_value(), timestamp, data)}
        if key:
            headers[WEBHOOK_DELIVERY_HEADER] = key
        self._post(recipient, data, headers)
        return key


def webhook_signature(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: 'sha256=' and the hex HMAC-SHA256 of '<timestamp>.<body>' under the secret."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


@register
class SlackChannel(_HttpChannel):
    """A Block Kit message POSTed to a Slack incoming-webhook URL per recipient, cut to Slack's limits."""

    name = "slack"
    recipients_noun = "Slack incoming-webhook URLs"

    @classmethod
    def render(cls, content: Content) -> Text:
        """A header, the text, the rows as a table in a code block and a line for the rows that did not fit."""
        notice = content.notice
        blocks: list[dict] = [{"type": "header", "text": {
            "type": "plain_text", "text": cut_text_to(content.subject, SLACK_HEADER_MAX_CHARS)}}]
        if content.custom is not None:
            blocks.append(_slack_section(content.custom))
        else:
            blocks.append(_slack_section("\n".join(content.paragraphs[1:] or content.paragraphs)))
            rows = notice.rows

            def table_of(count: int) -> str:
                return _slack_escape("```" + "\n".join(_text_table(notice.columns, rows[:count])[1:]) + "```")

            # The most rows whose table fits one section: a table only grows with its rows, so a binary search.
            low, high = 0, min(len(rows), SLACK_MAX_ROWS)
            while low < high:
                middle = (low + high + 1) // 2
                if len(table_of(middle)) <= SLACK_SECTION_MAX_CHARS:
                    low = middle
                else:
                    high = middle - 1
            shown, table = low, table_of(low) if low else ""
            if table:
                blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": table}})
            if len(rows) > shown:
                blocks.append({"type": "context", "elements": [
                    {"type": "mrkdwn", "text": f"… and {_plural(len(rows) - shown, 'more row')}"}]})
        payload = {"text": cut_text_to(content.subject, SLACK_TEXT_MAX_CHARS), "blocks": blocks}
        return Text(subject=content.subject, body=json.dumps(payload, ensure_ascii=False))

    @classmethod
    def finish(cls, text: Text, *, alert_id: Any, incident_id: Any, links: Links) -> Text:
        url = links.of(alert_id=alert_id, incident_id=incident_id).get("incident")
        if not url:
            return text
        payload = json.loads(text.body)
        payload["blocks"].append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"<{url}|Open the incident>"}]})
        return Text(subject=text.subject, body=json.dumps(payload, ensure_ascii=False))

    @classmethod
    def combine(cls, rows: Sequence[dict]) -> Message:
        """Whole messages, divided by a line, as many as fit in Slack's 50 blocks."""
        payloads = [json.loads(rows[0]["body"])]
        count = len(payloads[0]["blocks"])
        for row in rows[1:]:
            payload = json.loads(row["body"])
            if count + 1 + len(payload["blocks"]) > SLACK_MAX_BLOCKS:
                break
            payloads.append(payload)
            count += 1 + len(payload["blocks"])
        blocks = list(payloads[0]["blocks"])
        for payload in payloads[1:]:
            blocks += [{"type": "divider"}, *payload["blocks"]]
        more = len(payloads) - 1
        text = payloads[0]["text"] + (f" (+{_plural(more, 'more update')})" if more else "")
        body = json.dumps({"text": cut_text_to(text, SLACK_TEXT_MAX_CHARS), "blocks": blocks}, ensure_ascii=False)
        return Message(subject=rows[0]["subject"], body=body, html=None, carries=len(payloads))

    def send(self, *, recipient: str, subject: str | None, body: str, html_body: str | None,
             key: str | None = None) -> str | None:
        """POST the message; Slack answers 200 'ok', 4xx such as 404 channel_not_found for good."""
        self._post(recipient, body.encode(), {"Content-Type": "application/json", "User-Agent": "alert-service"})
        return None


def cut_text_to(text: str, limit: int) -> str:
    """The text, or its first characters and '…', in at most `limit` characters."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn reads <...> as links and mentions: a value such as <!channel> must not notify anyone.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_section(text: str) -> dict:
    escaped = _slack_escape(text)
    if len(escaped) > SLACK_SECTION_MAX_CHARS:
        escaped = escaped[: SLACK_SECTION_MAX_CHARS - 40] + "… (cut at Slack's limit)"
    return {"type": "section", "text": {"type": "mrkdwn", "text": escaped or " "}}


def _json_cell(value: Any) -> Any:
    value = rules.jsonable(value)
    return cut_text(value, MESSAGE_MAX_VALUE_CHARS) if isinstance(value, str) else value


# --- delivery status that Twilio reports after accepting a message -----------------------------------------------

TWILIO_STATUS_PATH = "/twilio/status"
# Twilio's message statuses in the order they happen; a callback that arrives late never moves a status back.
_DELIVERY_ORDER = {"accepted": 0, "scheduled": 0, "queued": 1, "sending": 2, "sent": 3, "delivered": 4,
                   "undelivered": 4, "failed": 4, "read": 5, "canceled": 4}
FINAL_DELIVERY_STATUSES = ("delivered", "read", "failed", "undelivered", "canceled")
DELIVERY_FAILED = ("failed", "undelivered")
# Plain words for the commonest errors (https://www.twilio.com/docs/api/errors).
TWILIO_ERROR_HINTS = {
    63016: "Outside WhatsApp's 24-hour window: the recipient has not written to your WhatsApp sender in the last "
           "24 hours, and a free-form message is only allowed inside it. Give the alert an approved template "
           "(whatsapp_template), or ask the recipient to message your sender first.",
    21211: "Not a valid phone number: check the recipient's number, in E.164 form with its country code.",
    21408: "Your Twilio account may not send to this country: enable it in the Twilio console under Messaging, "
           "Settings, Geo permissions.",
    21610: "The recipient replied STOP to your sender: nothing reaches them until they reply START.",
    63003: "WhatsApp could not find the recipient: the number has no WhatsApp account, or it is mistyped.",
    63024: "Not a valid recipient on this channel: the number cannot receive WhatsApp messages from your sender.",
}
# Without PUBLIC_BASE_URL, statuses are asked for: up to this many times a message, within this long of its send.
DELIVERY_MAX_CHECKS = 8
DELIVERY_MAX_AGE_SECONDS = 24 * 3600
DELIVERY_CHECKS_PER_PASS = 20


def delivery_hint(error_code: int | None) -> str | None:
    """What a Twilio error code means and what to do, for the commonest ones."""
    return TWILIO_ERROR_HINTS.get(error_code) if error_code is not None else None


def delivery_moves_on(current: str | None, reported: str) -> bool:
    """Whether a reported status is news: callbacks can arrive out of order, and a late 'sent' must not undo
    'delivered'."""
    if reported not in _DELIVERY_ORDER:
        return False
    return current is None or _DELIVERY_ORDER[reported] > _DELIVERY_ORDER.get(current, -1)


def record_delivery_status(pool: database.Pool, *, provider_message_id: str, status: str,
                           error_code: int | None) -> int:
    """Record a status Twilio reports for one message on the notifications it carried, with an incident activity
    when it failed; return how many notifications changed."""
    status = status.lower()
    with pool.transaction() as cur:
        rows = [row for row in database.notifications_by_provider_message(cur, provider_message_id=provider_message_id)
                if delivery_moves_on(row["delivery_status"], status)]
        if not rows:
            return 0
        database.set_delivery_status(cur, notification_ids=[row["id"] for row in rows], status=status,
                                     error_code=error_code)
        if status in DELIVERY_FAILED:
            database.insert_activities(cur, activities=[
                {"action": "notification_undelivered", "incident_id": incident_id, "alert_config_id": alert_id,
                 "details": {"channel": rows[0]["channel"], "recipient": _shown(rows[0]), "status": status,
                             "error_code": error_code, "hint": delivery_hint(error_code)}}
                for incident_id, alert_id in _incidents(rows)])
    if status in DELIVERY_FAILED:
        logger.warning("%s message %s to %s was %s (Twilio error %s)", rows[0]["channel"], provider_message_id,
                       _shown(rows[0]), status, error_code)
    return len(rows)


class DeliveryStatusPoller:
    """Without PUBLIC_BASE_URL Twilio cannot call back: this asks Twilio for the status of messages in flight,
    a few at a time, each after a doubling delay (TWILIO_STATUS_POLL_SECONDS, then twice that …), at most
    DELIVERY_MAX_CHECKS times within DELIVERY_MAX_AGE_SECONDS of the send."""

    def __init__(self, pool: database.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.twilio = WhatsAppChannel(settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start asking in a background thread."""
        self._thread = threading.Thread(target=self._run, name="delivery-status", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop asking; a request in progress ends within SEND_TIMEOUT_SECONDS."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        interval = min(self.settings.twilio_status_poll_seconds, 5.0)
        while not self._stop.wait(interval):
            try:
                self.check_once()
            except database.DatabaseUnavailable as exc:
                logger.warning("delivery status checks cannot reach the database: %s", exc)
            except Exception:
                logger.exception("delivery status check failed; continuing")

    def check_once(self) -> int:
        """Ask Twilio about the messages due; return how many answered."""
        with self.pool.transaction() as cur:
            due = database.claim_delivery_checks(
                cur, channels=[name for name, t in TRANSPORTS.items() if issubclass(t, WhatsAppChannel)],
                final=FINAL_DELIVERY_STATUSES, limit=DELIVERY_CHECKS_PER_PASS, max_checks=DELIVERY_MAX_CHECKS,
                base_seconds=self.settings.twilio_status_poll_seconds, max_age_seconds=DELIVERY_MAX_AGE_SECONDS)
        answered = 0
        for sid in due:
            if self._stop.is_set():
                break
            try:
                status, error_code = self.twilio.fetch_status(sid)
            except NotificationError as exc:
                logger.info("could not ask Twilio about message %s: %s", sid, exc)
                continue
            record_delivery_status(self.pool, provider_message_id=sid, status=status, error_code=error_code)
            answered += 1
        return answered


# --- the outbox dispatcher -------------------------------------------------------------------------------------


class SendRate:
    """A token bucket: `per_second` sends a second, in bursts of up to a second's worth; 0 is no limit."""

    def __init__(self, per_second: float, *, now: float) -> None:
        self.per_second = per_second
        self.capacity = max(1.0, per_second)
        self._tokens = self.capacity
        self._updated = now

    def _refill(self, now: float) -> None:
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.per_second)
        self._updated = now

    def available(self, now: float) -> int:
        """How many sends may start now."""
        if not self.per_second:
            return 1 << 30
        self._refill(now)
        return int(self._tokens)

    def take(self, count: int, now: float) -> None:
        """Count `count` sends started now."""
        if self.per_second:
            self._refill(now)
            self._tokens -= count

    def seconds_until_available(self, now: float) -> float:
        """Seconds until the next send may start (0 when one may start now)."""
        if not self.per_second:
            return 0.0
        self._refill(now)
        return max(0.0, (1.0 - self._tokens) / self.per_second)


def group_claimed(rows: Sequence[dict]) -> list[list[dict]]:
    """Claimed rows as groups of one alert, channel and recipient, each in the order its rows were queued."""
    groups: dict[tuple, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["created_at"], r["seq"])):
        key = (row["alert_config_id"] or row["id"], row["channel"], row["recipient"])
        groups.setdefault(key, []).append(row)
    return list(groups.values())


class Dispatcher:
    """Claims due outbox rows by group, sends each group as one message on its channel's own threads, within the
    channel's rate limit, and records the outcome on every row."""

    def __init__(
        self, pool: database.Pool, settings: Settings, channels: dict[str, Transport] | None = None,
        threads_per_channel: int | None = None, metrics: Metrics | None = None, lease: Lease | None = None,
    ) -> None:
        self.pool = pool
        # Claims are made in this instance's name and last while its lease does. Without a shared lease, the
        # dispatcher holds one of its own.
        self.lease = lease
        self._own_lease = lease is None
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.channels = channels or {name: transport(settings) for name, transport in TRANSPORTS.items()}
        self._threads = {name: threads_per_channel or TRANSPORTS[name].connections(settings) for name in self.channels}
        started = time.monotonic()
        self._rates = {name: SendRate(TRANSPORTS[name].max_per_second(settings), now=started)
                       for name in self.channels}
        # A hung SMTP server occupies only the email threads; every other channel keeps its own.
        self._executors = {
            name: ThreadPoolExecutor(max_workers=self._threads[name], thread_name_prefix=f"send-{name}")
            for name in self.channels
        }
        self._in_flight = {name: 0 for name in self.channels}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.healthy = True

    def lease_seconds(self, channel: str) -> float:
        """How long a claim lasts: longer than any send can take, so a live sender is never overtaken."""
        return self.settings.send_timeout_seconds + self.settings.smtp_timeout_seconds + 30

    def start(self) -> None:
        """Start the dispatch loop in a background thread."""
        if self._own_lease:
            self.lease = Lease(self.pool.dsn, self.settings)
            self.lease.start()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming, and wait up to `timeout` seconds for sends in progress; a send that hangs longer is
        abandoned (its claim expires and the message is sent again: a duplicate, never a loss)."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=False)
        while time.monotonic() < deadline:
            with self._lock:
                if not any(self._in_flight.values()):
                    break
            time.sleep(0.05)
        if self._own_lease and self.lease is not None:
            self.lease.leave()

    def wake(self) -> None:
        """Tell the loop that new rows are waiting (called after an evaluation commits)."""
        self._wake.set()

    @property
    def alive(self) -> bool:
        """True while the loop thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            wait = 1.0
            try:
                handed = self.dispatch_once()
                now = time.monotonic()
                with self._lock:
                    free = [n for n in self.channels if self._in_flight[n] < self._threads[n]]
                    open_channels = [n for n in free if self._rates[n].available(now) > 0]
                    # A channel at its rate limit is woken when its next send may start; its rows wait meanwhile
                    # and go out together then.
                    for name in free:
                        if name not in open_channels:
                            wait = min(wait, self._rates[name].seconds_until_available(now))
                # A full channel (a hung SMTP server) is woken by its senders finishing, not by polling. After a
                # claim, the next claim is the quicker way to learn whether more is due.
                if open_channels and handed:
                    wait = 0.0
                elif open_channels:
                    with self.pool.transaction() as cur:
                        due = database.seconds_until_next_due(cur, channels=open_channels)
                    if due is not None:
                        wait = min(wait, due)
                self.healthy = True
            except database.DatabaseUnavailable as exc:
                self.healthy = False
                logger.warning("dispatcher cannot reach the database: %s", exc)
            except Exception:
                self.healthy = False
                logger.exception("dispatcher loop failed; continuing")
            self._wake.wait(max(wait, 0.01))

    def dispatch_once(self) -> int:
        """Claim the groups each channel has room and rate for and hand them to its threads; return how many."""
        handed = 0
        if not self.lease.valid():
            return 0  # claims are made in the lease's name: none while it is in doubt
        claimant = self.lease.instance_id
        for name in self.channels:
            with self._lock:
                room = min(self._threads[name] - self._in_flight[name], self._rates[name].available(time.monotonic()))
            if room <= 0:
                continue
            with self.pool.transaction() as cur:
                claimed = database.claim_due_notifications(
                    cur, channel=name, limit=room, lease_seconds=self.lease_seconds(name), claimant=claimant,
                    rows_per_group=GROUP_MAX_ROWS,
                )
            groups = group_claimed(claimed)
            with self._lock:
                self._rates[name].take(len(groups), time.monotonic())
                self._in_flight[name] += len(groups)
            for group in groups:
                self._executors[name].submit(self._deliver, group, claimant)
                handed += 1
        return handed

    def _deliver(self, group: list[dict], claimant: UUID) -> None:
        first = group[0]
        channel = self.channels[first["channel"]]
        rows, later = group, []
        ids = [row["id"] for row in rows]
        try:
            try:
                group = self._settle_interrupted(channel, group, claimant)
                if not group:
                    return
                # Rows of a send another sender began and never recorded may have gone out as one message: they
                # go again together and alone, so a receiver gets that same message (the same Message-ID, the
                # same rows), never a bigger one under the same Message-ID.
                began = min(row["send_started_at"] for row in group)
                batch = [row for row in group if row["send_started_at"] == began]
                first = batch[0]
                message = combine_messages(batch)
                rows = batch[:message.carries]
                ids = [row["id"] for row in rows]
                carried = set(ids)
                later = [row for row in group if row["id"] not in carried]
                if later:
                    # Given back before the send, so that only the rows it carries are marked as in a send.
                    self._release(later, claimant)
                    later = []
                if self._may_send(channel, rows, message, claimant):
                    started = time.monotonic()
                    try:
                        # Only WhatsApp takes a template; the other channels' send has no such argument.
                        extra = {"template": message.template} if message.template else {}
                        provider_id = channel.send(recipient=first["recipient"], subject=message.subject,
                                                   body=message.body, html_body=message.html, key=str(first["id"]),
                                                   **extra)
                    finally:
                        self.metrics.sent(channel=first["channel"], seconds=time.monotonic() - started)
                else:  # given back (if the database lets us), for a sender that may send them
                    rows, ids, later = [], [], group
            except NotificationError as exc:
                self._record_failure(rows, claimant, exc)
            except Exception as exc:  # a bug in a channel must not kill the sender thread
                logger.exception("channel %s raised unexpectedly", first["channel"])
                self._record_failure(rows, claimant, NotificationError(f"{type(exc).__name__}: {exc}"))
            else:
                if rows:
                    self._record_sent(rows, claimant, provider_id)
            if later:  # not sent: for a sender that may send them
                self._release(later, claimant)
        except database.DatabaseError as exc:
            # The claim expires after its lease and the rows are sent again: a duplicate, never a loss.
            logger.error("could not record the outcome of notification %s: %s", _some(ids), exc)
        finally:
            with self._lock:
                self._in_flight[first["channel"]] -= 1
            self._wake.set()

    def _release(self, rows: list[dict], claimant: UUID) -> None:
        """Give back claimed rows that this send does not carry: what did not fit goes in the next one."""
        with self.pool.transaction() as cur:
            database.release_notifications(cur, notification_ids=[row["id"] for row in rows], claimant=claimant)

    def _record_sent(self, rows: list[dict], claimant: UUID, provider_id: str | None) -> None:
        """Record one message's rows as sent, with an activity on each incident they belong to."""
        first, ids = rows[0], [row["id"] for row in rows]
        with self.pool.transaction() as cur:
            sent = set(database.mark_notification_sent(cur, notification_ids=ids, claimant=claimant,
                                                       provider_message_id=provider_id))
            database.insert_activities(cur, activities=[
                {"action": "notified", "incident_id": incident_id, "alert_config_id": alert_id,
                 "details": {"channel": first["channel"], "recipient": _shown(first)}}
                for incident_id, alert_id in _incidents(row for row in rows if row["id"] in sent)
                if incident_id is not None])
        self.metrics.notified(channel=first["channel"], status="success", count=len(sent))
        if len(sent) < len(ids):
            logger.warning("notification %s was sent after its claim passed to another sender",
                           _some([i for i in ids if i not in sent]))
        logger.info("sent %s notification %s to %s", first["channel"], _some(ids), _shown(first))

    def _settle_interrupted(self, channel: Transport, group: list[dict], claimant: UUID) -> list[dict]:
        """Rows whose last send began but whose outcome was never recorded (the sender died or froze mid-request):
        where the channel can look them up, those the provider has are recorded as sent, not sent again. Returns
        the rows still to send."""
        find = getattr(channel, "find_accepted", None)
        interrupted = [row for row in group if row.get("send_digest") is not None]
        if find is None or not interrupted:
            return group
        settled: set = set()
        for digest in {row["send_digest"] for row in interrupted}:
            these = [row for row in interrupted if row["send_digest"] == digest]
            found = find(recipient=these[0]["recipient"], digest=digest,
                         since=min(row["send_started_at"] for row in these))
            if not found:
                continue
            with self.pool.transaction() as cur:
                # A message of the same text recorded for an earlier notification is not this one's.
                recorded = database.recorded_provider_messages(cur, provider_message_ids=found)
                provider_id = next((sid for sid in found if sid not in recorded), None)
                if provider_id is None:
                    continue
                marked = database.mark_notification_sent(
                    cur, notification_ids=[row["id"] for row in these], claimant=claimant,
                    provider_message_id=provider_id)
            settled |= set(marked)
            logger.warning("%s notification %s was accepted by the provider (%s) before its sender stopped; "
                           "recorded as sent, not sent again", these[0]["channel"], _some([r["id"] for r in these]),
                           provider_id)
            self.metrics.notified(channel=these[0]["channel"], status="success", count=len(marked))
        return [row for row in group if row["id"] not in settled]

    def _may_send(self, channel: Transport, rows: list[dict], message: Message, claimant: UUID) -> bool:
        """Whether this instance may still send these rows: its lease holds, and (for a channel whose sends can be
        looked up) the claim is still ours as the send is recorded as begun."""
        # A lease renewed under a new id (the process froze past its lease and joined again) is no lease for a
        # claim made under the old one: another instance may have taken that claim over and sent it.
        if not self.lease.valid() or self.lease.instance_id != claimant:
            logger.warning("notification %s not sent: this instance's lease is in doubt; another instance takes it "
                           "over when the claim lapses", _some([row["id"] for row in rows]))
            return False
        if getattr(channel, "find_accepted", None) is None:
            return True
        ids = [row["id"] for row in rows]
        with self.pool.transaction() as cur:
            held = database.mark_send_started(cur, notification_ids=ids, claimant=claimant,
                                              digest=body_digest(message.body))
        return len(held) == len(ids)

    def _record_failure(self, rows: list[dict], claimant: UUID, exc: NotificationError) -> None:
        first = rows[0]
        shown = _shown(first)
        # Each row gives up after its own attempts; the rest retry together after the group's longest backoff.
        final = [row for row in rows if exc.permanent or row["attempts"] > self.settings.max_retries]
        retry = [row for row in rows if row not in final]
        with self.pool.transaction() as cur:
            failed = []
            for attempts in sorted({row["attempts"] for row in final}):
                reason = str(exc) if exc.permanent else f"{exc} (gave up after {attempts} attempts)"
                ids = [row["id"] for row in final if row["attempts"] == attempts]
                marked = set(database.mark_notification_failed(cur, notification_ids=ids, claimant=claimant,
                                                               error=reason))
                failed += [row for row in final if row["id"] in marked]
                database.insert_activities(cur, activities=[
                    {"action": "notification_failed", "incident_id": incident_id, "alert_config_id": alert_id,
                     "details": {"channel": first["channel"], "recipient": shown, "error": reason}}
                    for incident_id, alert_id in _incidents(row for row in final if row["id"] in marked)])
            retried = []
            if retry:
                delay = retry_delay(attempts=max(row["attempts"] for row in retry),
                                    base_seconds=self.settings.retry_delay_seconds, retry_after=exc.retry_after)
                retried = database.mark_notification_retry(cur, notification_ids=[row["id"] for row in retry],
                                                           claimant=claimant, error=str(exc), delay_seconds=delay)
        self.metrics.notified(channel=first["channel"], status="failed", count=len(failed))
        self.metrics.notified(channel=first["channel"], status="retry", count=len(retried))
        # Rows whose claim passed to another sender are recorded by that sender.
        if failed:
            logger.error("%s notification %s to %s FAILED: %s", first["channel"],
                         _some([row["id"] for row in failed]), shown, exc)
        if retried:
            logger.warning("%s notification %s to %s failed (attempt %s), will retry: %s", first["channel"],
                           _some(retried), shown, max(row["attempts"] for row in retry), exc)


def _shown(row: dict) -> str:
    """A row's recipient as logs and activities show it."""
    transport = TRANSPORTS.get(row["channel"])
    return transport.describe(row["recipient"]) if transport else row["recipient"]


def _some(ids: Sequence[Any]) -> str:
    """Notification ids for a log line: the first, and how many more."""
    return str(ids[0]) if len(ids) == 1 else f"{ids[0]} and {len(ids) - 1} more"


def _incidents(rows) -> list[tuple[Any, Any]]:
    """The distinct (incident, alert) pairs of some rows, in order (the incident is None for an initial report)."""
    pairs: dict[Any, Any] = {}
    for row in rows:
        pairs.setdefault(row["incident_id"], row["alert_config_id"])
    return list(pairs.items())
