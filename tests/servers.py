"""Real loopback servers (SMTP, a trickling SMTP, silent TCP, a TCP banner, a TCP proxy that can stop answering, Twilio
API, webhook and Slack receivers) that tests and benchmarks use instead of mocks."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import select
import socket
import ssl
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
SMTP_SECURITY_MODES = ("starttls", "ssl", "none")
_S = TypeVar("_S", bound="_LoopbackServer")


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed, CA-capable cert for localhost/127.0.0.1 into directory; return (cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = datetime.now(timezone.utc)
    # keyCertSign, SKI and AKI keep the cert acceptable as its own trust anchor under VERIFY_X509_STRICT (3.13+).
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCALHOST))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


class _LoopbackServer:
    """Port bookkeeping and context-manager support shared by the servers."""

    host = LOCALHOST

    def __init__(self) -> None:
        self._port: int | None = None
        self._cond = threading.Condition()

    @property
    def port(self) -> int:
        """Port on 127.0.0.1, picked free on first use and kept across stop()/start()."""
        if self._port is None:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((LOCALHOST, 0))
                self._port = int(probe.getsockname()[1])
        return self._port

    def start(self) -> None:
        """Start serving (no-op if already running)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop serving (no-op if not running)."""
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class ReceivedMail:
    """One message accepted by SmtpServer, with its envelope and receipt times."""

    message: EmailMessage
    mail_from: str
    rcpt_tos: list[str]
    auth_user: str | None
    received_at: float  # time.monotonic()
    received_wall: float  # time.time()


class _QuietSession(Session):
    """Session without the legacy login_data property, which logs a deprecation warning on every AUTH."""

    login_data: Any = None


class _QuietSMTP(SMTP):
    """aiosmtpd SMTP protocol using _QuietSession."""

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)


class _Controller(Controller):
    """Controller whose stop() also drops live client connections, like a real server going down."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._protocols: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def factory(self) -> SMTP:
        smtpd = _QuietSMTP(self.handler, **self.SMTP_kwargs)
        self._protocols.add(smtpd)
        return smtpd

    def stop(self, no_assert: bool = False) -> None:
        async def abort_all() -> None:
            for smtpd in list(self._protocols):
                if isinstance(smtpd.transport, asyncio.Transport):
                    smtpd.transport.abort()
            await asyncio.sleep(0)

        # Plain Controller.stop() leaves accepted sockets open (and leaking) until garbage collection.
        if self._thread is not None:
            asyncio.run_coroutine_threadsafe(abort_all(), self.loop).result(timeout=5)
        super().stop(no_assert)


class _SmtpHandler:
    """aiosmtpd handler hooks recording into the owning SmtpServer."""

    def __init__(self, owner: SmtpServer) -> None:
        self.owner = owner

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        # aiosmtpd's auth_required only counts STARTTLS as encryption, so implicit TLS would need
        # auth_require_tls=False (which warns); gating MAIL here works the same for every mode.
        if self.owner.security != "none" and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        owner = self.owner
        if not owner._released.is_set():
            with owner._cond:
                owner._held += 1
                owner._cond.notify_all()
            try:
                while not owner._released.is_set():
                    await asyncio.sleep(0.01)
            finally:
                with owner._cond:
                    owner._held -= 1
        received_at, received_wall = time.monotonic(), time.time()
        with owner._cond:
            owner._data_attempts += 1
            if owner._scripted:
                code, text = owner._scripted.pop(0)
                return f"{code} {text}"
        message = cast(EmailMessage, BytesParser(policy=default_policy).parsebytes(envelope.original_content or b""))
        auth_user = session.auth_data if session.authenticated else None
        mail = ReceivedMail(message, envelope.mail_from or "", list(envelope.rcpt_tos), auth_user,
                            received_at, received_wall)
        with owner._cond:
            owner._messages.append(mail)
            owner._cond.notify_all()
        return "250 OK"


class SmtpServer(_LoopbackServer):
    """aiosmtpd server on 127.0.0.1 (STARTTLS, implicit TLS or plain) with AUTH and scripted DATA replies."""

    def __init__(self, directory: Path, username: str = "alerts", password: str = "smtp-secret",
                 security: str = "starttls") -> None:
        super().__init__()
        if security not in SMTP_SECURITY_MODES:
            raise ValueError(f"security must be one of {SMTP_SECURITY_MODES}, not {security!r}")
        self.username, self.password, self.security = username, password, security
        self._cert, self._key = make_self_signed_cert(Path(directory))
        self._controller: _Controller | None = None
        self._messages: list[ReceivedMail] = []
        self._scripted: list[tuple[int, str]] = []
        self._data_attempts = 0
        self._released = threading.Event()
        self._released.set()
        self._held = 0

    @property
    def ca_file(self) -> Path:
        """Self-signed certificate for clients to use as their CA bundle."""
        return self._cert

    @property
    def messages(self) -> list[ReceivedMail]:
        """Snapshot of accepted messages, oldest first."""
        with self._cond:
            return list(self._messages)

    @property
    def data_attempts(self) -> int:
        """Number of DATA commands seen, including scripted rejections."""
        with self._cond:
            return self._data_attempts

    def start(self) -> None:
        """Listen on the kept port (with a fresh Controller: a stopped one has closed its loop)."""
        if self._controller is not None:
            return
        kwargs: dict[str, Any] = {"authenticator": self._authenticate, "auth_require_tls": False}
        if self.security != "none":
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self._cert, self._key)
            if self.security == "starttls":
                kwargs.update(tls_context=context, require_starttls=True, auth_require_tls=True)
            else:
                kwargs["ssl_context"] = context
        # server_hostname names the banner and avoids a possibly slow socket.getfqdn() per connection.
        controller = _Controller(_SmtpHandler(self), hostname=LOCALHOST, port=self.port,
                                 server_hostname="localhost", **kwargs)
        controller.start()
        self._controller = controller
        logger.debug("SMTP server (%s) listening on %s:%d", self.security, LOCALHOST, self.port)

    def stop(self) -> None:
        """Stop listening and drop open sessions; the port stays reserved for start()."""
        self._released.set()
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
            logger.debug("SMTP server on port %d stopped", self.port)

    def clear(self) -> None:
        """Forget received messages, DATA attempts and pending scripted replies."""
        with self._cond:
            self._messages.clear()
            self._scripted.clear()
            self._data_attempts = 0

    def hold(self) -> None:
        """Keep every message waiting after its DATA (a slow server: not yet accepted) until release()."""
        self._released.clear()

    def release(self) -> None:
        """Accept the held messages and stop holding."""
        self._released.set()

    def wait_held(self, count: int, timeout: float = 10) -> None:
        """Block until `count` messages are held."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._held >= count, timeout):
                raise AssertionError(f"expected {count} held SMTP message(s) within {timeout}s, got {self._held}")

    @property
    def held(self) -> int:
        """Messages waiting for release()."""
        with self._cond:
            return self._held

    def reply_code_for_next(self, code: int, text: str, times: int = 1) -> None:
        """Answer the next `times` DATA commands with `code text` instead of accepting the message."""
        if not 400 <= code <= 599:
            raise ValueError(f"scripted SMTP reply must be a 4xx/5xx code, not {code}")
        with self._cond:
            self._scripted.extend([(code, text)] * times)

    def wait_for(self, count: int, timeout: float = 10) -> list[ReceivedMail]:
        """Block until at least count messages were accepted; return all accepted messages."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= count, timeout):
                raise AssertionError(
                    f"expected at least {count} SMTP message(s) on port {self.port} within {timeout}s, got "
                    f"{len(self._messages)} (DATA attempts: {self._data_attempts}, "
                    f"subjects: {[m.message['Subject'] for m in self._messages]})")
            return list(self._messages)

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        """aiosmtpd authenticator accepting only the configured username/password."""
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode(errors="replace")
            if user == self.username and auth_data.password.decode(errors="replace") == self.password:
                return AuthResult(success=True, auth_data=user)
            logger.debug("SMTP AUTH %s rejected for user %r", mechanism, user)
        return AuthResult(success=False, handled=False)


class HangingServer(_LoopbackServer):
    """TCP listener on 127.0.0.1 whose connections complete the handshake but never receive a byte."""

    def __init__(self) -> None:
        super().__init__()
        self._listener: socket.socket | None = None

    def start(self) -> None:
        """Listen on the kept port."""
        if self._listener is None:
            # The kernel completes handshakes for the backlog by itself; never calling accept() keeps
            # those connections open and silent without a thread, and close() resets them all.
            self._listener = socket.create_server((LOCALHOST, self.port), backlog=128)

    def stop(self) -> None:
        """Close the listener, resetting every waiting connection."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class BannerServer(_LoopbackServer):
    """TCP server on 127.0.0.1 that writes a banner to every connection and closes it, as a non-PostgreSQL
    service (HTTP, SSH, SMTP) would."""

    def __init__(self, banner: bytes = b"HTTP/1.1 400 Bad Request\r\nServer: banner-secret/1.0\r\n\r\n") -> None:
        super().__init__()
        self.banner = banner
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen on the kept port and answer in a daemon thread."""
        if self._listener is None:
            self._listener = socket.create_server((LOCALHOST, self.port))
            self._thread = threading.Thread(target=self._serve, args=(self._listener,), daemon=True,
                                            name=f"banner-{self.port}")
            self._thread.start()

    def _serve(self, listener: socket.socket) -> None:
        listener.settimeout(0.1)  # closing a socket does not wake a thread blocked in accept()
        while listener.fileno() != -1:
            try:
                connection, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # the listener was closed
            with connection:
                try:
                    connection.sendall(self.banner)
                except OSError:
                    pass

    def stop(self) -> None:
        """Close the listener."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self._thread is not None:
                self._thread.join(5)


class TricklingSmtpServer(_LoopbackServer):
    """Plain SMTP on 127.0.0.1 without AUTH that accepts mail, except that DATA for a recipient containing 'slow'
    is answered with a `250-` continuation line every second, for ever."""

    def __init__(self) -> None:
        super().__init__()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._stopping = threading.Event()
        self.delivered: list[str] = []  # recipients of accepted messages
        self.trickled = 0  # DATA replies trickled so far

    def start(self) -> None:
        """Listen on the kept port and serve each connection on its own thread."""
        if self._listener is None:
            self._stopping.clear()
            self._listener = socket.create_server((LOCALHOST, self.port))
            threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def stop(self) -> None:
        """Close the listener and every open connection."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._cond:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._cond:
                self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            reader = conn.makefile("rb")
            conn.sendall(b"220 localhost trickling ESMTP\r\n")
            recipients: list[str] = []
            while not self._stopping.is_set():
                line = reader.readline()
                if not line:
                    return
                command = line.decode(errors="replace").strip()
                verb = command[:4].upper()
                if verb in ("EHLO", "HELO"):
                    conn.sendall(b"250-localhost\r\n250 8BITMIME\r\n")
                elif verb == "MAIL":
                    recipients = []
                    conn.sendall(b"250 OK\r\n")
                elif verb == "RCPT":
                    recipients.append(command.split(":", 1)[1].strip(" <>"))
                    conn.sendall(b"250 OK\r\n")
                elif verb == "DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    while reader.readline() not in (b".\r\n", b""):
                        pass
                    if any("slow" in r for r in recipients):
                        with self._cond:
                            self.trickled += 1
                        while not self._stopping.wait(1.0):
                            conn.sendall(b"250-still working\r\n")
                        return
                    with self._cond:
                        self.delivered.extend(recipients)
                    conn.sendall(b"250 OK\r\n")
                elif verb == "QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 OK\r\n")
        except OSError:
            return
        finally:
            conn.close()


class TcpProxy(_LoopbackServer):
    """TCP listener on 127.0.0.1 forwarding each connection to a target (host and port, or a Unix socket
    directory and port as libpq names them). In black-hole mode it keeps every socket open and forwards nothing:
    a server that accepted the connection and then stopped answering."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__()
        self.target_host = target_host
        self.target_port = target_port
        self.black_hole = False
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._stopped = threading.Event()

    def start(self) -> None:
        """Listen on the kept port and forward."""
        if self._listener is None:
            self._stopped.clear()
            self._listener = socket.create_server((LOCALHOST, self.port), backlog=128)
            threading.Thread(target=self._accept, args=(self._listener,), name="proxy-accept", daemon=True).start()

    def stop(self) -> None:
        """Close the listener and every connection."""
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._cond:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.close()
            except OSError:
                pass

    def _upstream(self) -> socket.socket:
        if self.target_host.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(f"{self.target_host}/.s.PGSQL.{self.target_port}")
            return sock
        return socket.create_connection((self.target_host, self.target_port))

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._cond:
                self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), name="proxy-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        # A connection that arrives in black-hole mode is held without ever reaching the target.
        while self.black_hole and not self._stopped.is_set():
            time.sleep(0.05)
        try:
            upstream = self._upstream()
        except OSError:
            client.close()
            return
        with self._cond:
            self._sockets.append(upstream)
        threading.Thread(target=self._pump, args=(upstream, client), name="proxy-pump", daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        while not self._stopped.is_set():
            if self.black_hole:
                time.sleep(0.05)
                continue
            try:
                readable, _, _ = select.select([source], [], [], 0.1)
                if not readable:
                    continue
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
            except (OSError, ValueError):
                break
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass(frozen=True)
class TwilioRequest:
    """One request seen by TwilioServer and the HTTP status it was answered with."""

    to: str
    from_: str
    body: str
    path: str
    answered_status: int
    received_at: float  # time.monotonic()
    received_wall: float  # time.time()
    content_sid: str | None = None  # a WhatsApp template send: the template and its variables (JSON) in place of Body
    content_variables: str | None = None


@dataclass(frozen=True)
class StatusCallback:
    """A status callback as Twilio makes it: the URL, the form fields and the X-Twilio-Signature header."""

    url: str
    form: dict[str, str]
    headers: dict[str, str]


def _twilio_error(status: int, code: int | None, message: str) -> dict[str, Any]:
    """Error body in the shape the Twilio REST API uses."""
    more_info = None if code is None else f"https://www.twilio.com/docs/errors/{code}"
    return {"code": code, "message": message, "more_info": more_info, "status": status}


class _TwilioHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its TwilioServer."""

    daemon_threads = True

    def __init__(self, owner: TwilioServer, port: int) -> None:
        self.owner = owner
        super().__init__((LOCALHOST, port), _TwilioHandler)


class _TwilioHandler(BaseHTTPRequestHandler):
    """Request handler delegating to TwilioServer._answer."""

    # HTTP/1.0 closes each connection after its response, so no pooled keep-alive connection
    # can keep being served after stop().
    protocol_version = "HTTP/1.0"
    server: _TwilioHTTPServer

    def do_POST(self) -> None:
        received = (time.monotonic(), time.time())
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        if self.server.owner._take_trickle():
            # A header line a second: every read gets a byte well within any read timeout, and no answer ends.
            self.wfile.write(b"HTTP/1.0 201 Created\r\n")
            while not self.server.owner._stopping.is_set():
                try:
                    self.wfile.write(b"X-Still-Working: yes\r\n")
                    self.wfile.flush()
                except OSError:
                    return
                self.server.owner._stopping.wait(1.0)
            return
        form = {key: values[0] for key, values in parse_qs(raw, keep_blank_values=True).items()}
        status, payload, headers = self.server.owner._answer(self.path, self.headers.get("Authorization"), form,
                                                             received)
        data = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(data)),
                            **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        owner = self.server.owner
        if self.path.split("?", 1)[0].endswith("/Messages.json"):
            status, payload = owner._list(self.path, self.headers.get("Authorization"))
        else:
            status, payload = owner._fetch(self.path, self.headers.get("Authorization"))
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("twilio server %s - " + format, self.address_string(), *args)


class TwilioServer(_LoopbackServer):
    """Twilio-compatible Messages API over plain HTTP on 127.0.0.1, with scripted error answers."""

    def __init__(self, account_sid: str = "ACtest00000000000000000000000000",
                 auth_token: str = "twilio-secret") -> None:
        super().__init__()
        self.account_sid, self.auth_token = account_sid, auth_token
        self._httpd: _TwilioHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._requests: list[TwilioRequest] = []
        self._lists = 0
        self._scripted: list[tuple[int, dict[str, Any], dict[str, str]]] = []
        self._trickles = 0
        self._stopping = threading.Event()
        self._messages: dict[str, dict[str, Any]] = {}  # sid: the Message resource, as GET returns it
        self.fetches: dict[str, int] = {}  # sid: how many times its status was asked for

    @property
    def base_url(self) -> str:
        """Replacement for https://api.twilio.com."""
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def requests(self) -> list[TwilioRequest]:
        """Snapshot of every request received, oldest first."""
        with self._cond:
            return list(self._requests)

    @property
    def delivered(self) -> list[TwilioRequest]:
        """Snapshot of requests answered 201 Created."""
        with self._cond:
            return [r for r in self._requests if r.answered_status == 201]

    def start(self) -> None:
        """Serve on the kept port in a daemon thread."""
        if self._httpd is None:
            self._httpd = _TwilioHTTPServer(self, self.port)
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"twilio-{self.port}", daemon=True)
            self._stopping.clear()
            self._thread.start()
            logger.debug("Twilio server listening on %s", self.base_url)

    def stop(self) -> None:
        """Stop serving; the port stays reserved for start()."""
        if self._httpd is not None and self._thread is not None:
            self._stopping.set()
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd, self._thread = None, None

    def clear(self) -> None:
        """Forget recorded requests and pending scripted answers."""
        with self._cond:
            self._requests.clear()
            self._scripted.clear()

    def script(self, status: int, code: int | None = None, message: str = "", times: int = 1,
               retry_after: str | None = None) -> None:
        """Answer the next `times` authenticated requests with a Twilio-style error."""
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        with self._cond:
            self._scripted.extend([(status, _twilio_error(status, code, message), headers)] * times)

    def trickle(self, times: int = 1) -> None:
        """Answer the next `times` requests with a header line a second, for ever (a server too slow to use)."""
        with self._cond:
            self._trickles += times

    def _take_trickle(self) -> bool:
        with self._cond:
            if self._trickles:
                self._trickles -= 1
                return True
            return False

    @property
    def lists(self) -> int:
        """How many message list (look-up) requests were answered."""
        with self._cond:
            return self._lists

    def _list(self, path: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        """Twilio's message list, newest first, filtered by To and From (one page)."""
        expected = "Basic " + base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if authorization != expected:
            return 401, _twilio_error(401, 20003, "Authenticate")
        route, _, query = path.partition("?")
        uri = f"/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        if route != uri:
            return 404, _twilio_error(404, 20404, f"The requested resource {path} was not found")
        params = {key: values[0] for key, values in parse_qs(query).items()}
        size = int(params.get("PageSize", 50))
        with self._cond:
            self._lists += 1
            found = [{k: v for k, v in m.items() if not k.startswith("_")} for m in reversed(self._messages.values())
                     if params.get("To", m["to"]) == m["to"] and params.get("From", m["from"]) == m["from"]][:size]
        return 200, {"messages": found, "first_page_uri": f"{uri}?PageSize={size}&Page=0", "next_page_uri": None,
                     "previous_page_uri": None, "page": 0, "page_size": size, "start": 0, "end": len(found) - 1,
                     "uri": path}

    def wait_for(self, count: int, timeout: float = 10) -> list[TwilioRequest]:
        """Block until at least count requests were answered 201; return those."""
        with self._cond:  # a Condition's default lock is an RLock, so self.delivered can re-acquire it
            if not self._cond.wait_for(lambda: len(self.delivered) >= count, timeout):
                raise AssertionError(
                    f"expected at least {count} delivered Twilio message(s) within {timeout}s, got "
                    f"{len(self.delivered)} (answers so far: {[r.answered_status for r in self._requests]})")
            return self.delivered

    def _answer(self, path: str, authorization: str | None, form: dict[str, str],
                received: tuple[float, float]) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Decide and record (status, JSON body, extra headers) for one POST."""
        expected = "Basic " + base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        headers: dict[str, str] = {}
        with self._cond:
            if authorization != expected:
                status, payload = 401, _twilio_error(401, 20003, "Authenticate")
                headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
            elif path.split("?", 1)[0] != f"/2010-04-01/Accounts/{self.account_sid}/Messages.json":
                status, payload = 404, _twilio_error(404, 20404, f"The requested resource {path} was not found")
            elif self._scripted:
                status, payload, headers = self._scripted.pop(0)
            else:
                status, payload = self._create_message(form)
            self._requests.append(TwilioRequest(form.get("To", ""), form.get("From", ""), form.get("Body", ""),
                                                path, status, *received, content_sid=form.get("ContentSid"),
                                                content_variables=form.get("ContentVariables")))
            self._cond.notify_all()
        return status, payload, headers

    def report(self, sid: str, status: str, error_code: int | None = None) -> StatusCallback | None:
        """Move a message to a status, as Twilio does when the carrier answers, and return the status callback Twilio
        would then make (None when it was sent without a StatusCallback URL): to that URL, signed with the auth
        token as Twilio signs it."""
        from twilio.request_validator import RequestValidator

        with self._cond:
            message = self._messages[sid]
            message.update(status=status, error_code=error_code)
            url = message["_callback"]
        if not url:
            return None
        form = {"MessageSid": sid, "SmsSid": sid, "AccountSid": self.account_sid, "MessageStatus": status,
                "SmsStatus": status, "To": message["to"], "From": message["from"], "ApiVersion": "2010-04-01"}
        if error_code is not None:
            form["ErrorCode"] = str(error_code)
        signature = RequestValidator(self.auth_token).compute_signature(url, form)
        return StatusCallback(url=url, form=form, headers={"X-Twilio-Signature": signature})

    def callback_url(self, sid: str) -> str | None:
        """The StatusCallback a message was sent with."""
        with self._cond:
            return self._messages[sid]["_callback"]

    def _fetch(self, path: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        """GET of one Message resource."""
        expected = "Basic " + base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        prefix = f"/2010-04-01/Accounts/{self.account_sid}/Messages/"
        with self._cond:
            if authorization != expected:
                return 401, _twilio_error(401, 20003, "Authenticate")
            sid = path.split("?", 1)[0].removeprefix(prefix).removesuffix(".json")
            self.fetches[sid] = self.fetches.get(sid, 0) + 1
            if not path.startswith(prefix) or sid not in self._messages:
                return 404, _twilio_error(404, 20404, f"The requested resource {path} was not found")
            return 200, {k: v for k, v in self._messages[sid].items() if not k.startswith("_")}

    def _create_message(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Twilio's 400 for a missing parameter, or 201 with a freshly queued Message resource."""
        for field, code, text in (("To", 21604, "A 'To' phone number is required."),
                                  ("From", 21603, "A 'From' phone number is required."),
                                  ("Body", 21602, "Message body is required.")):
            if not form.get(field) and not (field == "Body" and form.get("ContentSid")):
                return 400, _twilio_error(400, code, text)
        sid, now = "SM" + uuid.uuid4().hex, format_datetime(datetime.now(timezone.utc))
        uri = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}"
        self._messages[sid] = message = {
            "sid": sid, "account_sid": self.account_sid, "messaging_service_sid": None,
            "to": form["To"], "from": form["From"], "body": form.get("Body", ""), "status": "queued",
            "date_created": now, "date_updated": now, "date_sent": None, "uri": f"{uri}.json",
            "num_segments": "1", "num_media": "0", "direction": "outbound-api", "price": None,
            "price_unit": "USD", "error_code": None, "error_message": None, "api_version": "2010-04-01",
            "subresource_uris": {"media": f"{uri}/Media.json"}, "_callback": form.get("StatusCallback"),
        }
        return 201, {k: v for k, v in message.items() if not k.startswith("_")}


@dataclass(frozen=True)
class HttpPost:
    """One POST seen by an HttpReceiver and the status it was answered with."""

    path: str
    headers: dict[str, str]
    body: bytes
    answered_status: int

    def json(self) -> Any:
        return json.loads(self.body)


class _ReceiverHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: Any

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, text, headers = self.server.owner._answer(self.path, dict(self.headers.items()), body)
        data = text.encode()
        self.send_response(status)
        for name, value in {"Content-Type": "text/plain; charset=utf-8", "Content-Length": str(len(data)),
                            **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("receiver %s - " + format, self.address_string(), *args)


class HttpReceiver(_LoopbackServer):
    """An HTTP server on 127.0.0.1 that records POSTs, answers 200 or a scripted status, and can check each POST
    (`check` returns an error status and text, or None to accept)."""

    def __init__(self) -> None:
        super().__init__()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._posts: list[HttpPost] = []
        self._scripted: list[tuple[int, str, dict[str, str]]] = []

    def url(self, path: str = "/hook") -> str:
        return f"http://{LOCALHOST}:{self.port}{path}"

    @property
    def posts(self) -> list[HttpPost]:
        """Every POST received, oldest first."""
        with self._cond:
            return list(self._posts)

    @property
    def accepted(self) -> list[HttpPost]:
        """The POSTs answered 2xx."""
        return [post for post in self.posts if 200 <= post.answered_status < 300]

    def start(self) -> None:
        if self._httpd is None:
            self._httpd = ThreadingHTTPServer((LOCALHOST, self.port), _ReceiverHandler)
            self._httpd.daemon_threads = True
            self._httpd.owner = self  # type: ignore[attr-defined]
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"receiver-{self.port}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None and self._thread is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd, self._thread = None, None

    def script(self, status: int, text: str = "", times: int = 1, retry_after: str | None = None) -> None:
        """Answer the next `times` acceptable POSTs with this status."""
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        with self._cond:
            self._scripted.extend([(status, text, headers)] * times)

    def wait_for(self, count: int, timeout: float = 10) -> list[HttpPost]:
        """Block until at least `count` POSTs were answered 2xx; return those."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.accepted) >= count, timeout):
                raise AssertionError(f"expected {count} accepted POST(s) within {timeout}s, got "
                                     f"{[p.answered_status for p in self._posts]}")
            return self.accepted

    def check(self, headers: dict[str, str], body: bytes) -> tuple[int, str] | None:
        return None

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, dict[str, str]]:
        refused = self.check(headers, body)
        with self._cond:
            if refused is not None:
                (status, text), extra = refused, {}
            elif self._scripted:
                status, text, extra = self._scripted.pop(0)
            else:
                status, text, extra = 200, "ok", {}
            self._posts.append(HttpPost(path, headers, body, status))
            self._cond.notify_all()
        return status, text, extra


class WebhookReceiver(HttpReceiver):
    """A webhook receiver that verifies the signature as the README's recipe does, and answers 401 otherwise."""

    def __init__(self, secret: str, tolerance_seconds: float = 300) -> None:
        super().__init__()
        self.secret, self.tolerance_seconds = secret, tolerance_seconds

    def check(self, headers: dict[str, str], body: bytes) -> tuple[int, str] | None:
        import hashlib
        import hmac

        timestamp = headers.get("X-Alert-Timestamp", "")
        signature = headers.get("X-Alert-Signature", "")
        expected = "sha256=" + hmac.new(self.secret.encode(), timestamp.encode() + b"." + body,
                                        hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature, expected):
            return 401, "bad signature"
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > self.tolerance_seconds:
            return 401, "stale timestamp"
        return None


class SlackReceiver(HttpReceiver):
    """A Slack-compatible incoming webhook: 400 invalid_blocks (as Slack answers) for a message over Slack's limits
    (50 blocks, header text 150 characters, section text 3,000), 200 'ok' otherwise."""

    def check(self, headers: dict[str, str], body: bytes) -> tuple[int, str] | None:
        try:
            payload = json.loads(body)
        except ValueError:
            return 400, "invalid_payload"
        blocks = payload.get("blocks", [])
        if not payload.get("text") and not blocks:
            return 400, "no_text"
        if len(blocks) > 50:
            return 400, "invalid_blocks"
        for block in blocks:
            text = (block.get("text") or {}).get("text", "")
            if block["type"] == "header" and (len(text) > 150 or block["text"]["type"] != "plain_text"):
                return 400, "invalid_blocks"
            if block["type"] == "section" and not 1 <= len(text) <= 3000:
                return 400, "invalid_blocks"
        return None


def _serve_demo_inbox(smtp_port: int, twilio_port: int) -> None:
    """Run the loopback SMTP and Twilio servers in the foreground and print what they receive (`make inbox`)."""
    import tempfile

    smtp = SmtpServer(Path(tempfile.mkdtemp(prefix="alert-inbox-")), security="none")
    twilio = TwilioServer()
    smtp._port, twilio._port = smtp_port, twilio_port
    smtp.start()
    twilio.start()
    print("Local inbox running. Put these lines in .env and restart the service:\n")
    print(f"SMTP_HOST=127.0.0.1\nSMTP_PORT={smtp_port}\nSMTP_SECURITY=none\nSMTP_USERNAME={smtp.username}\n"
          f"SMTP_PASSWORD={smtp.password}\nSMTP_FROM=alerts@example.com\nTWILIO_ACCOUNT_SID={twilio.account_sid}\n"
          f"TWILIO_AUTH_TOKEN={twilio.auth_token}\nTWILIO_FROM_NUMBER=+14155238886\n"
          f"TWILIO_API_BASE_URL={twilio.base_url}\n", flush=True)
    seen_mail = seen_sms = 0
    try:
        while True:
            time.sleep(0.1)
            # One snapshot each, and the counts move on by what was printed: a message that arrives while these
            # are printed is printed on the next pass (reading the lengths again afterwards skipped it).
            mails, texts = smtp.messages[seen_mail:], twilio.requests[seen_sms:]
            for mail in mails:
                body = mail.message.get_body(("plain",))
                print(f"--- email to {', '.join(mail.rcpt_tos)}: {mail.message['Subject']}\n"
                      f"{body.get_content() if body else ''}", flush=True)
            for sms in texts:
                print(f"--- WhatsApp to {sms.to} (answered {sms.answered_status}):\n{sms.body}\n", flush=True)
            seen_mail, seen_sms = seen_mail + len(mails), seen_sms + len(texts)
    except KeyboardInterrupt:
        pass
    finally:
        smtp.stop()
        twilio.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="A local inbox: loopback SMTP and Twilio servers that print messages.")
    parser.add_argument("--smtp-port", type=int, default=2525)
    parser.add_argument("--twilio-port", type=int, default=8026)
    arguments = parser.parse_args()
    _serve_demo_inbox(arguments.smtp_port, arguments.twilio_port)
