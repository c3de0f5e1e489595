"""Settings for the alert service, read from the environment and `.env`."""

from __future__ import annotations

from email.utils import formataddr, parseaddr
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """A setting has a value the service cannot start with."""


class Settings(BaseSettings):
    """Every setting of the service; environment variable names are the field names in upper case."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    db_connection: SecretStr | None = None
    # Alert queries on the default data source run as this role; unset, the service creates and manages one.
    reader_dsn: SecretStr | None = None
    # Whether a data source may opt into a privileged role at all: the operator's call, not an API user's.
    allow_privileged_data_sources: bool = False

    smtp_host: str | None = None
    smtp_port: int = Field(587, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str | None = None
    smtp_security: Literal["starttls", "ssl", "none"] = "starttls"
    smtp_ca_file: Path | None = None
    smtp_timeout_seconds: float = Field(10.0, gt=0, le=600)
    send_timeout_seconds: float = Field(60.0, gt=0, le=3600)
    # SMTP sessions open at once (one per email sender thread); the messages of one alert and recipient that
    # queue up meanwhile go out together as one.
    smtp_connections: int = Field(4, ge=1, le=64)
    # Amazon SES's production accounts started at 14 a second for years (its sandbox allows 1); 0 is no limit.
    smtp_max_per_second: float = Field(14.0, ge=0, le=10_000)

    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr | None = None
    twilio_from_number: str | None = None
    twilio_api_base_url: str = "https://api.twilio.com"
    twilio_connections: int = Field(4, ge=1, le=64)
    # Twilio's default throughput of a WhatsApp sender for text messages is 10 a second; 0 is no limit.
    twilio_max_per_second: float = Field(10.0, ge=0, le=10_000)

    # Without PUBLIC_BASE_URL, a message's delivery status is asked for this long after its send, then after
    # twice that, and so on (at most 8 times within a day).
    twilio_status_poll_seconds: float = Field(30.0, gt=0, le=3600)
    # SMS through the same Twilio account: this sender, or TWILIO_FROM_NUMBER when unset.
    twilio_sms_from_number: str | None = None

    # Where people reach this service: links in messages (incident, alert) and Twilio's delivery status callbacks.
    public_base_url: str | None = None
    # Webhook bodies are signed with this (HMAC-SHA256); webhooks are sent only when it is set.
    webhook_signing_secret: SecretStr | None = None
    # Requests open at once per HTTP channel (webhook, Slack).
    webhook_connections: int = Field(4, ge=1, le=64)

    retry_delay_minutes: float = Field(10.0, ge=0, le=24 * 60)
    max_retries: int = Field(3, ge=0, le=100)

    api_host: str = "0.0.0.0"
    api_port: int = Field(8000, ge=1, le=65535)
    data_dir: Path = Path("./data")
    log_file: str = "app.log"
    workers: int = Field(4, ge=1, le=64)
    # Unset: WORKERS - 1 (at least 1), so one data source that hangs always leaves a worker to the others.
    workers_per_data_source: int | None = Field(None, ge=1, le=64)
    dry_run_workers: int = Field(2, ge=1, le=32)
    # new_rows alerts over one table that only filter and project are evaluated from the rows a statement changed.
    incremental_evaluation: bool = True
    query_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    max_result_rows: int = Field(10_000, ge=1, le=1_000_000)
    max_result_bytes: int = Field(16_000_000, ge=10_000, le=2_000_000_000)
    template_timeout_seconds: float = Field(2.0, gt=0, le=60)
    template_memory_mb: int = Field(256, ge=64, le=16_384)
    template_processes: int = Field(2, ge=1, le=32)

    # Several instances may share one service database: one that has not renewed its lease for this long is taken
    # for dead and its data sources are taken over (INSTANCE_NAME labels it in /health; unset, host:pid).
    instance_lease_seconds: float = Field(3.0, ge=0.5, le=300)
    instance_name: str | None = Field(None, max_length=200)

    error_notify_after: int = Field(3, ge=1, le=1000)
    evaluation_retention_days: float = Field(30.0, gt=0, le=3650)

    api_key: SecretStr | None = None
    secret_key: SecretStr | None = None

    @field_validator(
        "smtp_host", "smtp_username", "smtp_from", "twilio_account_sid", "twilio_from_number",
        "twilio_sms_from_number", "public_base_url", "instance_name", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `.env.example` ships `SMTP_HOST=` lines; an empty value means "not configured", not "empty host".
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @field_validator(
        "db_connection", "reader_dsn", "smtp_password", "twilio_auth_token", "smtp_ca_file", "api_key", "secret_key",
        "webhook_signing_secret", mode="before"
    )
    @classmethod
    def _blank_secret_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("workers_per_data_source", mode="before")
    @classmethod
    def _blank_number_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("workers_per_data_source")
    @classmethod
    def _share_within_workers(cls, value: int | None, info: ValidationInfo) -> int | None:
        workers = info.data.get("workers")
        if value is not None and workers is not None and value > workers:
            raise ValueError(f"must not exceed WORKERS ({workers})")
        return value

    @model_validator(mode="after")
    def _default_share(self) -> "Settings":
        if self.workers_per_data_source is None:
            self.workers_per_data_source = max(self.workers - 1, 1)
        return self

    @field_validator("api_key")
    @classmethod
    def _keys_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            keys = [k.strip() for k in value.get_secret_value().split(",") if k.strip()]
            if not keys:
                return None
            if any(len(k) < 16 for k in keys):
                raise ValueError("each key must be at least 16 characters (python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        return value

    @field_validator("secret_key")
    @classmethod
    def _fernet_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from cryptography.fernet import Fernet

            try:
                Fernet(value.get_secret_value().encode())
            except (ValueError, TypeError):
                raise ValueError(
                    "must be a Fernet key: 32 url-safe base64-encoded bytes "
                    "(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
                ) from None
        return value

    @field_validator("reader_dsn")
    @classmethod
    def _reader_dsn_parses(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            import psycopg2.extensions

            try:
                psycopg2.extensions.parse_dsn(value.get_secret_value())
            except psycopg2.ProgrammingError:
                raise ValueError("not a libpq connection string or URI") from None
        return value

    @field_validator("smtp_ca_file")
    @classmethod
    def _ca_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {value} does not exist")
        return value

    @field_validator("smtp_username", "smtp_password")
    @classmethod
    def _login_is_ascii(cls, value: str | SecretStr | None) -> str | SecretStr | None:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is not None and not text.isascii():
            # smtplib encodes AUTH in ASCII: any other character would fail every send, not start-up.
            raise ValueError("must be ASCII: the SMTP login is sent in ASCII")
        return value

    @field_validator("smtp_from")
    @classmethod
    def _from_is_sendable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # "Alerts <alerts@example.com>" or a bare address; the display name may be any text.
        name, address = parseaddr(value) if "<" in value else ("", value)
        address = ascii_email(address)
        return formataddr((name, address), "utf-8") if name else address

    @field_validator("twilio_from_number", "twilio_sms_from_number")
    @classmethod
    def _from_number_is_e164(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.removeprefix("whatsapp:")
        if not is_e164(value):
            raise ValueError("must be a number in E.164 form, such as +14155238886")
        return value

    @field_validator("twilio_api_base_url")
    @classmethod
    def _base_url_is_http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("public_base_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")) or "?" in value or "#" in value:
            raise ValueError("must be the URL people and Twilio reach this service at, such as "
                             "https://alerts.example.com, without a query or fragment")
        return value.rstrip("/")

    @field_validator("webhook_signing_secret")
    @classmethod
    def _signing_secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (python -c 'import secrets; print(secrets.token_hex(32))')")
        return value

    @property
    def email_sender(self) -> str | None:
        """The From address of alert emails."""
        return self.smtp_from or self.smtp_username

    @property
    def email_enabled(self) -> bool:
        """True when enough SMTP settings are present to send email."""
        return bool(self.smtp_host and self.email_sender)

    @property
    def whatsapp_enabled(self) -> bool:
        """True when enough Twilio settings are present to send WhatsApp messages."""
        return bool(self.twilio_account_sid and self.twilio_auth_token and self.twilio_from_number)

    @property
    def sms_enabled(self) -> bool:
        """True when enough Twilio settings are present to send SMS."""
        return bool(self.twilio_account_sid and self.twilio_auth_token and self.sms_sender)

    @property
    def sms_sender(self) -> str | None:
        """The number SMS are sent from."""
        return self.twilio_sms_from_number or self.twilio_from_number

    @property
    def api_keys(self) -> list[str]:
        """The accepted API keys; empty when API_KEY is unset."""
        if self.api_key is None:
            return []
        return [key.strip() for key in self.api_key.get_secret_value().split(",") if key.strip()]

    @property
    def retry_delay_seconds(self) -> float:
        """RETRY_DELAY_MINUTES in seconds."""
        return self.retry_delay_minutes * 60.0


def is_e164(number: str) -> bool:
    """True for a phone number in E.164 form: '+' then 8 to 15 digits, not starting with 0."""
    digits = number[1:]
    return number.startswith("+") and digits.isascii() and digits.isdigit() and 8 <= len(digits) <= 15 and digits[0] != "0"


def ascii_email(address: str) -> str:
    """The address as every SMTP server takes it (an internationalised domain in IDNA form), or ValueError."""
    from email_validator import EmailNotValidError, validate_email

    local_part = address.rpartition("@")[0]
    if not local_part.isascii():
        # Such a mailbox needs SMTPUTF8 on every server on the way; without it each send would fail for good.
        raise ValueError(f"{address}: only ASCII characters are accepted before the @ (delivering to this mailbox "
                         "needs SMTPUTF8, which many mail servers lack); use an ASCII address for it")
    try:
        result = validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ValueError(f"{address}: {exc}") from None
    return result.ascii_email


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning validation errors into one message that names each bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]).upper() if error["loc"] else "settings"
            problems.append(f"{name}: {error['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
