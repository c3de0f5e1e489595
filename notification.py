"""Notification channels (SMTP email, Twilio WhatsApp), message rendering, and the outbox dispatcher."""

from __future__ import annotations

import hashlib
import html
import logging
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
from datetime import datetime, timedelta, timezone
from email.utils import formatdate, parseaddr
from typing import Any, Protocol, Sequence
from uuid import UUID

import database
import rules
import templating
from cluster import Lease
from config import Settings, ascii_email
from metrics import Metrics
from templating import TemplateFailed

logger = logging.getLogger(__name__)

WHATSAPP_MAX_CHARS = 1600
EMAIL_MAX_ROWS = 100
WHATSAPP_TRUNCATION_NOTE = "\n… (message cut at 1600 characters; see the email or the API for every row)"
# A stored alert returning a 5 MB value must not store 5 MB in every message copy: values shown in a message are
# cut at MESSAGE_MAX_VALUE_CHARS, an email's text at EMAIL_MAX_CHARS, each with a visible note.
MESSAGE_MAX_VALUE_CHARS = 1_000
EMAIL_MAX_CHARS = 100_000
EMAIL_TRUNCATION_NOTE = "\n… (message cut at 100,000 characters; see the API for every row)\n"
MAX_BACKOFF_SECONDS = 6 * 3600
# Servers commonly drop idle sessions after a minute or more; a kept session is used for 30 s at most.
SMTP_IDLE_SECONDS = 30.0
_SMTP_POLICY = compat32.clone(linesep="\r\n")  # SMTP wants CRLF line ends; sendmail sends bytes as they are


class NotificationError(Exception):
    """A message could not be sent; `permanent` errors are never retried."""

    def __init__(self, message: str, *, permanent: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


class Channel(Protocol):
    """Sends one message or raises NotificationError; never touches the database. A channel whose provider may
    have accepted a message whose answer was lost (a crash mid-request) and that can look it up has
    `find_accepted(recipient=, digest=, since=)`, returning the provider's id of such a message or None."""

    name: str

    def send(self, *, recipient: str, subject: str | None, body: str, html_body: str | None,
             notification_id: str | None = None) -> str | None:
        """Deliver one message (`notification_id`: the first outbox row it carries) and return the provider's
        message id."""


# --- rendering -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """The texts of one alert message on every channel."""

    subject: str
    text: str
    html: str
    whatsapp: str


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


def render_message(*, alert: dict, notice: rules.Notice) -> Rendered:
    """Render the email (text and HTML) and WhatsApp texts of one notice, with the alert's template if it has one."""
    name, priority = alert["name"], alert["priority"]
    subject = f"[{priority}] {name}: {notice.headline}"
    columns, rows = notice.columns, notice.rows
    intro = _INTROS[notice.kind].format(name=name, headline=notice.headline, total=_plural(len(rows), "row"))
    paragraphs = [intro] + [p for p in (notice.detail, alert.get("description")) if p]
    shown = rows[:_rows_within(columns, rows[:EMAIL_MAX_ROWS], EMAIL_MAX_CHARS)]
    hidden = len(rows) - len(shown)
    more = f"… and {_plural(hidden, 'more row')} not shown." if hidden else None

    template = alert.get("message_template")
    custom = None
    if template:
        try:
            custom = render_template(template, template_context(alert=alert, notice=notice))
        except TemplateFailed as exc:
            paragraphs.append(f"(The alert's message template failed, so this is the default message: {exc})")

    if custom is not None:
        text = custom if custom.endswith("\n") else custom + "\n"
        html_text = f"<html><body><pre>{html.escape(custom)}</pre></body></html>"
        whatsapp = f"*{subject}*\n{custom}"
    else:
        text = "\n".join(paragraphs + _text_table(columns, shown) + ([more] if more else [])) + "\n"
        html_parts = [f"<p>{html.escape(p)}</p>" for p in paragraphs] + _html_table(columns, shown)
        if more:
            html_parts.append(f"<p>{html.escape(more)}</p>")
        html_text = "<html><body>" + "".join(html_parts) + "</body></html>"
        wa_lines = [f"*{subject}*"] + ([notice.detail] if notice.detail else [])
        length = sum(len(line) + 1 for line in wa_lines)
        for row in rows:  # only as many as can be shown: a result can have 10,000 rows
            if length > WHATSAPP_MAX_CHARS:
                break
            wa_lines.append("• " + ", ".join(f"{c}={_cell(v)}" for c, v in zip(columns, row)))
            length += len(wa_lines[-1]) + 1
        whatsapp = "\n".join(wa_lines)
    if len(text) > EMAIL_MAX_CHARS:
        text = text[: EMAIL_MAX_CHARS - len(EMAIL_TRUNCATION_NOTE)] + EMAIL_TRUNCATION_NOTE
    if len(html_text) > 4 * EMAIL_MAX_CHARS:  # escaping can make it longer than the text, never more than this
        html_text = f"<html><body><pre>{html.escape(text)}</pre></body></html>"
    if len(whatsapp) > WHATSAPP_MAX_CHARS:
        whatsapp = whatsapp[: WHATSAPP_MAX_CHARS - len(WHATSAPP_TRUNCATION_NOTE)] + WHATSAPP_TRUNCATION_NOTE
    return Rendered(subject=subject, text=text, html=html_text, whatsapp=whatsapp)


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
    *, rendered: Rendered, channels: dict, alert_id: Any, incident_id: Any, kind: str, decision_key: str | None = None
) -> list[dict]:
    """One outbox row per recipient of every channel; with a decision key, each row carries an idempotency key
    derived from it, its channel and its recipient."""
    rows = _unkeyed_outbox_rows(rendered=rendered, channels=channels, alert_id=alert_id, incident_id=incident_id,
                                kind=kind)
    if decision_key is not None:
        for row in rows:
            row["idempotency_key"] = hashlib.sha256(
                f"{decision_key}/{row['channel']}/{row['recipient']}".encode()).hexdigest()
    return rows


def _unkeyed_outbox_rows(*, rendered: Rendered, channels: dict, alert_id: Any, incident_id: Any,
                         kind: str) -> list[dict]:
    rows = []
    for address in channels.get("email", []):
        rows.append({"alert_config_id": alert_id, "incident_id": incident_id, "kind": kind, "channel": "email",
                     "recipient": address, "subject": rendered.subject, "body": rendered.text,
                     "html": rendered.html})
    for number in channels.get("whatsapp", []):
        rows.append({"alert_config_id": alert_id, "incident_id": incident_id, "kind": kind, "channel": "whatsapp",
                     "recipient": number, "subject": None, "body": rendered.whatsapp, "html": None})
    return rows


@dataclass(frozen=True)
class Message:
    """What one send carries: the subject (email only), the text and the HTML (email only)."""

    subject: str | None
    body: str
    html: str | None
    carries: int = 1  # how many of the group's rows, from the first: the rest wait for the next send


# A group holds at most this many rows: about EMAIL_MAX_CHARS of typical messages; the rest go in the next send.
GROUP_MAX_ROWS = 100
_HTML_OPEN, _HTML_CLOSE = "<html><body>", "</body></html>"


def combine_messages(rows: Sequence[dict]) -> Message:
    """One message carrying, in order, as many of the queued rows of one alert, channel and recipient as fit in one
    message of that channel (at least the first; one row is sent as stored). `carries` says how many: the rest
    are left for the next send, never cut away."""
    first = rows[0]
    if len(rows) == 1:
        return Message(subject=first["subject"], body=first["body"], html=first["html"])
    if first["channel"] == "whatsapp":
        bodies = [first["body"]]
        size = len(first["body"])
        for row in rows[1:]:
            if size + 2 + len(row["body"]) > WHATSAPP_MAX_CHARS:
                break
            bodies.append(row["body"])
            size += 2 + len(row["body"])
        return Message(subject=None, body="\n\n".join(bodies), html=None, carries=len(bodies))
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


def _heading(number: int, count: int, row: dict) -> str:
    return f"--- update {number} of {count}: {row['subject']} ---"


def _html_inner(row: dict) -> str:
    """The body of a row's HTML document, or its text when it has none."""
    page = row["html"]
    if not page:
        return f"<pre>{html.escape(row['body'])}</pre>"
    if page.startswith(_HTML_OPEN) and page.endswith(_HTML_CLOSE):
        return page[len(_HTML_OPEN):-len(_HTML_CLOSE)]
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


class EmailChannel:
    """Email through SMTP. Each sender thread keeps its session open for SMTP_IDLE_SECONDS, so an alert does not
    pay for TCP, TLS and AUTH every time; a kept session that the server closed is replaced and retried once."""

    name = "email"

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
             notification_id: str | None = None) -> str | None:
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
                                          body=body, html_body=html_body, notification_id=notification_id)
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


class WhatsAppChannel:
    """WhatsApp through Twilio's Messages API, using the official client pointed at TWILIO_API_BASE_URL."""

    name = "whatsapp"

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
             notification_id: str | None = None) -> str | None:
        """Send one WhatsApp message; Twilio 4xx other than 429 are permanent errors."""
        if not self.settings.whatsapp_enabled:
            raise NotificationError(
                "WhatsApp is not configured: set TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_FROM_NUMBER",
                permanent=True,
            )
        from twilio.base.exceptions import TwilioException, TwilioRestException

        client = self._client()
        try:
            with SendDeadline(self.settings.send_timeout_seconds) as deadline:
                message = client.messages.create(
                    from_=f"whatsapp:{self.settings.twilio_from_number}", to=f"whatsapp:{recipient}", body=body
                )
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


    def find_accepted(self, *, recipient: str, digest: str, since: datetime) -> str | None:
        """The sid of a message Twilio accepted for this recipient, from our number, created since `since` (less a
        minute for clock skew), whose body has this digest; None when there is none. Twilio's Messages API takes
        no idempotency key, so this look-up is what keeps a send interrupted by a crash from being repeated."""
        from twilio.base.exceptions import TwilioException

        try:
            with SendDeadline(self.settings.send_timeout_seconds):
                # Newest first; a page is plenty: only messages of the last minutes to one recipient can match.
                recent = self._client().messages.list(to=f"whatsapp:{recipient}",
                                                      from_=f"whatsapp:{self.settings.twilio_from_number}", limit=50)
        except TwilioException as exc:
            raise NotificationError(f"Twilio message look-up failed: {exc}") from None
        except Exception as exc:  # requests' connection and timeout errors
            raise NotificationError(f"Twilio unreachable for a message look-up: {type(exc).__name__}: {exc}") from None
        earliest = since - timedelta(minutes=1)
        for message in recent:
            created = message.date_created
            if created is not None and created.tzinfo is None:
                created = created.replace(tzinfo=timezone.utc)
            if (created is None or created >= earliest) and body_digest(message.body or "") == digest:
                return message.sid
        return None


def body_digest(body: str) -> str:
    """The digest of a message's text, recorded before a send and compared with the provider's copy after a crash."""
    return hashlib.sha256(body.encode()).hexdigest()


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
    try:
        return min(float(value), MAX_BACKOFF_SECONDS) if value is not None else None
    except ValueError:
        return None


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
        self, pool: database.Pool, settings: Settings, channels: dict[str, Channel] | None = None,
        threads_per_channel: int | None = None, metrics: Metrics | None = None, lease: Lease | None = None,
    ) -> None:
        self.pool = pool
        # Claims are made in this instance's name and last while its lease does. Without a shared lease, the
        # dispatcher holds one of its own.
        self.lease = lease
        self._own_lease = lease is None
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.channels = channels or {"email": EmailChannel(settings), "whatsapp": WhatsAppChannel(settings)}
        threads = {"email": settings.smtp_connections, "whatsapp": settings.twilio_connections}
        self._threads = {name: threads_per_channel or threads.get(name, 4) for name in self.channels}
        limits = {"email": settings.smtp_max_per_second, "whatsapp": settings.twilio_max_per_second}
        started = time.monotonic()
        self._rates = {name: SendRate(limits.get(name, 0.0), now=started) for name in self.channels}
        # A hung SMTP server occupies only the email threads; WhatsApp keeps its own.
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
                first = group[0]
                message = combine_messages(group)
                rows, later = group[:message.carries], group[message.carries:]
                ids = [row["id"] for row in rows]
                if self._may_send(channel, rows, message, claimant):
                    started = time.monotonic()
                    try:
                        provider_id = channel.send(recipient=first["recipient"], subject=message.subject,
                                                   body=message.body, html_body=message.html,
                                                   notification_id=str(first["id"]))
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
            if later:  # what did not fit in this message goes in the next one
                with self.pool.transaction() as cur:
                    database.release_notifications(cur, notification_ids=[row["id"] for row in later],
                                                   claimant=claimant)
        except database.DatabaseError as exc:
            # The claim expires after its lease and the rows are sent again: a duplicate, never a loss.
            logger.error("could not record the outcome of notification %s: %s", _some(ids), exc)
        finally:
            with self._lock:
                self._in_flight[first["channel"]] -= 1
            self._wake.set()

    def _record_sent(self, rows: list[dict], claimant: UUID, provider_id: str | None) -> None:
        """Record one message's rows as sent, with an activity on each incident they belong to."""
        first, ids = rows[0], [row["id"] for row in rows]
        with self.pool.transaction() as cur:
            sent = set(database.mark_notification_sent(cur, notification_ids=ids, claimant=claimant,
                                                       provider_message_id=provider_id))
            database.insert_activities(cur, activities=[
                {"action": "notified", "incident_id": incident_id, "alert_config_id": alert_id,
                 "details": {"channel": first["channel"], "recipient": first["recipient"]}}
                for incident_id, alert_id in _incidents(row for row in rows if row["id"] in sent)
                if incident_id is not None])
        self.metrics.notified(channel=first["channel"], status="success", count=len(sent))
        if len(sent) < len(ids):
            logger.warning("notification %s was sent after its claim passed to another sender",
                           _some([i for i in ids if i not in sent]))
        logger.info("sent %s notification %s to %s", first["channel"], _some(ids), first["recipient"])

    def _settle_interrupted(self, channel: Channel, group: list[dict], claimant: UUID) -> list[dict]:
        """Rows whose last send began but whose outcome was never recorded (the sender died or froze mid-request):
        where the channel can look them up, those the provider has are recorded as sent, not sent again. Returns
        the rows still to send."""
        find = getattr(channel, "find_accepted", None)
        interrupted = [row for row in group if row.get("send_started_at") is not None]
        if find is None or not interrupted:
            return group
        settled: set = set()
        for digest in {row["send_digest"] for row in interrupted}:
            these = [row for row in interrupted if row["send_digest"] == digest]
            provider_id = find(recipient=these[0]["recipient"], digest=digest,
                               since=min(row["send_started_at"] for row in these))
            if provider_id is None:
                continue
            with self.pool.transaction() as cur:
                marked = database.mark_notification_sent(
                    cur, notification_ids=[row["id"] for row in these], claimant=claimant,
                    provider_message_id=provider_id)
            settled |= set(marked)
            logger.warning("%s notification %s was accepted by the provider (%s) before its sender stopped; "
                           "recorded as sent, not sent again", these[0]["channel"], _some([r["id"] for r in these]),
                           provider_id)
            self.metrics.notified(channel=these[0]["channel"], status="success", count=len(marked))
        return [row for row in group if row["id"] not in settled]

    def _may_send(self, channel: Channel, rows: list[dict], message: Message, claimant: UUID) -> bool:
        """Whether this instance may still send these rows: its lease holds, and (for a channel whose sends can be
        looked up) the claim is still ours as the send is recorded as begun."""
        if not self.lease.valid():
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
                     "details": {"channel": first["channel"], "recipient": first["recipient"], "error": reason}}
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
                         _some([row["id"] for row in failed]), first["recipient"], exc)
        if retried:
            logger.warning("%s notification %s to %s failed (attempt %s), will retry: %s", first["channel"],
                           _some(retried), first["recipient"], max(row["attempts"] for row in retry), exc)


def _some(ids: Sequence[Any]) -> str:
    """Notification ids for a log line: the first, and how many more."""
    return str(ids[0]) if len(ids) == 1 else f"{ids[0]} and {len(ids) - 1} more"


def _incidents(rows) -> list[tuple[Any, Any]]:
    """The distinct (incident, alert) pairs of some rows, in order (the incident is None for an initial report)."""
    pairs: dict[Any, Any] = {}
    for row in rows:
        pairs.setdefault(row["incident_id"], row["alert_config_id"])
    return list(pairs.items())
