"""Pure decisions of the alert engine: schedules, trigger conditions, row fingerprints and the result diff."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence

from croniter import croniter

FINGERPRINT_SIZE = 16
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_INTERVAL = re.compile(r"interval:(\d{1,9})([smhd])")
MAX_INTERVAL_SECONDS = 366 * 86400
# The original design's free text; every spelling of it means "new rows".
_NEW_ROWS_ALIASES = {"", "new_rows", "new rows", "new row", "new row added", "new rows added"}


class RuleError(ValueError):
    """A schedule or trigger condition that cannot be used."""


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: every `seconds` seconds, or on a five-field cron expression."""

    text: str
    seconds: int | None = None
    cron: str | None = None

    def next_run(self, after: datetime) -> datetime:
        """The first run time strictly after `after` (cron schedules only; intervals are relative)."""
        if self.cron is None:
            raise RuleError("interval schedules have no absolute next run")
        return croniter(self.cron, after).get_next(datetime)


def parse_schedule(text: str) -> Schedule:
    """Parse `interval:<n>s|m|h|d` or `cron:<5 fields>`, raising RuleError with an example on bad input."""
    text = (text or "").strip()
    if text.startswith("interval:"):
        match = _INTERVAL.fullmatch(text)
        if not match:
            raise RuleError(
                f"invalid interval {text!r}: use interval:<positive whole number><s|m|h|d>, such as interval:30s"
            )
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
        if seconds < 1:
            raise RuleError(f"invalid interval {text!r}: the interval must be at least 1 second")
        if seconds > MAX_INTERVAL_SECONDS:
            raise RuleError(f"invalid interval {text!r}: the interval must be at most 366 days")
        return Schedule(text=text, seconds=seconds)
    if text.startswith("cron:"):
        expression = text.removeprefix("cron:").strip()
        fields = expression.split()
        if len(fields) != 5 or not croniter.is_valid(expression):
            raise RuleError(
                f"invalid cron schedule {text!r}: use cron: and five fields (minute hour day month weekday), "
                "such as cron:*/5 * * * *"
            )
        return Schedule(text=f"cron:{' '.join(fields)}", cron=" ".join(fields))
    raise RuleError(f"invalid schedule {text!r}: use interval:<n>s|m|h|d (interval:30s) or cron:<5 fields>")


def parse_trigger_condition(text: str | None) -> str:
    """Normalise a trigger condition to its type name; only `new_rows` exists so far."""
    normalised = " ".join((text or "").strip().lower().rstrip(".").split())
    if normalised in _NEW_ROWS_ALIASES:
        return "new_rows"
    raise RuleError(
        f"unknown trigger condition {text!r}: use new_rows (or the original wording 'New row added')"
    )


def _encode_value(value: Any) -> bytes:
    # Type tag plus text form: 1 and '1' and True must not collide, NULL is distinct from 'None'.
    if value is None:
        return b"\x00N"
    return type(value).__name__.encode() + b"\x00" + str(value).encode("utf-8", "surrogatepass")


def row_fingerprint(values: Sequence[Any]) -> bytes:
    """A 16-byte digest of a row's values, stable across processes and restarts."""
    digest = hashlib.blake2b(digest_size=FINGERPRINT_SIZE)
    for value in values:
        encoded = _encode_value(value)
        digest.update(len(encoded).to_bytes(4, "big"))
        digest.update(encoded)
    return digest.digest()


def key_indexes(columns: Sequence[str], key_columns: Sequence[str] | None) -> list[int] | None:
    """Positions of the key columns in the result, or None when the whole row is the identity."""
    if not key_columns:
        return None
    missing = [name for name in key_columns if name not in columns]
    if missing:
        raise RuleError(f"key column(s) {', '.join(missing)} not in the query's result columns {list(columns)}")
    return [list(columns).index(name) for name in key_columns]


def identities(rows: Iterable[Sequence[Any]], keys: list[int] | None) -> list[bytes]:
    """The identity fingerprint of each row, in order."""
    if keys is None:
        return [row_fingerprint(row) for row in rows]
    return [row_fingerprint([row[i] for i in keys]) for row in rows]


def new_row_positions(previous: frozenset[bytes] | set[bytes], current: Sequence[bytes]) -> list[int]:
    """Positions of the rows whose identity was not in the previous result (each identity reported once)."""
    seen: set[bytes] = set()
    positions = []
    for index, identity in enumerate(current):
        if identity not in previous and identity not in seen:
            positions.append(index)
        seen.add(identity)
    return positions


def pack_fingerprints(fingerprints: Iterable[bytes]) -> bytes:
    """Store a set of fingerprints as one sorted byte string."""
    return b"".join(sorted(set(fingerprints)))


def unpack_fingerprints(packed: bytes | memoryview | None) -> frozenset[bytes]:
    """Inverse of pack_fingerprints."""
    if not packed:
        return frozenset()
    data = bytes(packed)
    return frozenset(data[i : i + FINGERPRINT_SIZE] for i in range(0, len(data), FINGERPRINT_SIZE))


def jsonable(value: Any) -> Any:
    """A query result value as JSON: numbers, strings, booleans and null stay, everything else becomes text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, (bytes, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    return str(value)
