"""Pure decisions of the alert engine: schedules, trigger conditions, row fingerprints and the result diff."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable, Sequence

from croniter import croniter

FINGERPRINT_SIZE = 16
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# [0-9], not \d: \d and int() also take other scripts' digits (３０, ٣٠), which would be stored as written.
_INTERVAL = re.compile(r"interval:([0-9]{1,9})([smhd])")
MAX_INTERVAL_SECONDS = 366 * 86400
# The original design's free text; every spelling of it means "new rows".
_NEW_ROWS_ALIASES = {"", "new_rows", "new rows", "new row", "new row added", "new rows added"}
_DURATION = re.compile(r"([0-9]{1,9})([smhd])")


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
    if not text.isascii():
        raise RuleError(f"invalid schedule {text!r}: use ASCII letters and digits (0-9) only, such as interval:30s "
                        "or cron:*/5 * * * *")
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
        schedule = Schedule(text=f"cron:{' '.join(fields)}", cron=" ".join(fields))
        try:
            # Valid syntax can still never match (February 31st); find out now, not in the scheduler.
            schedule.next_run(datetime(2024, 1, 1))
        except Exception:
            raise RuleError(f"invalid cron schedule {text!r}: it never matches a date") from None
        return schedule
    raise RuleError(f"invalid schedule {text!r}: use interval:<n>s|m|h|d (interval:30s) or cron:<5 fields>")


def row_fingerprint(values: Sequence[Any]) -> bytes:
    """A 16-byte digest of a row's values, stable across processes and restarts."""
    # repr() of the tuple, in C: types stay apart (1, '1', 1.0, True, None and 'None' all differ) at under half
    # the cost of encoding value by value. Every value psycopg2 returns has a stable repr once bytea comes back as
    # bytes rather than memoryview (see database.py).
    return hashlib.blake2b(repr(tuple(values)).encode("utf-8", "surrogatepass"), digest_size=FINGERPRINT_SIZE).digest()


def unique_columns(columns: Sequence[str]) -> list[str]:
    """Result column names made unique (id, id → id, id_2), so rows can be kept as objects without losing values."""
    taken = set(columns)
    seen: set[str] = set()
    unique = []
    for name in columns:
        if name in seen:
            number = 2
            while f"{name}_{number}" in taken:
                number += 1
            name = f"{name}_{number}"
            taken.add(name)
        seen.add(name)
        unique.append(name)
    return unique


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
    blake2b = hashlib.blake2b
    if keys is None:
        return [blake2b(repr(tuple(row)).encode("utf-8", "surrogatepass"), digest_size=FINGERPRINT_SIZE).digest()
                for row in rows]
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
    """Store a set of fingerprints as one byte string (in no particular order)."""
    return b"".join(set(fingerprints))


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


# --- trigger conditions ----------------------------------------------------------------------------------------

CHANGE_TYPES = ("new_rows", "removed_rows", "any_change")
STATE_TYPES = ("row_count", "threshold", "empty", "not_empty")
OPERATORS = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}


def parse_duration(text: str | None, *, name: str) -> int | None:
    """`30s`, `5m`, `2h` or `1d` in seconds; None stays None."""
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise RuleError(f"invalid {name} {text!r}: use text such as 5m")
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match.group(1)) < 1:
        raise RuleError(f"invalid {name} {text!r}: use a positive whole number in ASCII digits (0-9) and s, m, h "
                        "or d, such as 5m")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > MAX_INTERVAL_SECONDS:
        raise RuleError(f"invalid {name} {text!r}: at most 366 days")
    return seconds


@dataclass(frozen=True)
class Condition:
    """A parsed trigger condition. Change types compare with the previous result; state types test this one."""

    type: str = "new_rows"
    operator: str | None = None
    value: float | None = None
    column: str | None = None
    match: str = "any"
    for_seconds: int = 0
    repeat_seconds: int | None = None
    cooldown_seconds: int | None = None

    @property
    def is_state(self) -> bool:
        """True for conditions with a state (OK, PENDING, FIRING) rather than one incident per change."""
        return self.type in STATE_TYPES

    @property
    def needs_snapshot(self) -> bool:
        """True when the previous rows themselves must be kept, not only their fingerprints."""
        return self.type in ("removed_rows", "any_change")

    def describe(self) -> str:
        """The condition in words, for messages."""
        if self.type == "row_count":
            return f"row count {self.operator} {_number(self.value)}"
        if self.type == "threshold":
            scope = "every row" if self.match == "all" else "any row"
            return f"{self.column} {self.operator} {_number(self.value)} in {scope}"
        return {"empty": "the result is empty", "not_empty": "the result is not empty", "new_rows": "new rows",
                "removed_rows": "removed rows", "any_change": "any change"}[self.type]

    def as_dict(self) -> dict:
        """The normalised JSON form stored with the alert."""
        data: dict[str, Any] = {"type": self.type}
        if self.type in ("row_count", "threshold"):
            data.update(operator=self.operator, value=self.value)
        if self.type == "threshold":
            data.update(column=self.column, match=self.match)
        for key, seconds in (("for", self.for_seconds), ("repeat_every", self.repeat_seconds),
                             ("cooldown", self.cooldown_seconds)):
            if seconds:
                data[key] = _seconds_text(seconds)
        return data


def _number(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


def _seconds_text(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_condition(raw: str | dict | None) -> Condition:
    """The original free text (`"New row added"`), a type name, or the structured form as a dict."""
    if raw is None or isinstance(raw, str):
        normalised = " ".join((raw or "").strip().lower().rstrip(".").split())
        if normalised in _NEW_ROWS_ALIASES:
            return Condition()
        if normalised in CHANGE_TYPES or normalised in ("empty", "not_empty"):
            return Condition(type=normalised)
        raise RuleError(
            f"unknown trigger condition {raw!r}: use 'New row added' (new_rows), removed_rows, any_change, empty, "
            "not_empty, or the structured form such as {\"type\": \"threshold\", \"column\": \"qty\", "
            "\"operator\": \"<=\", \"value\": 5}"
        )
    if not isinstance(raw, dict):
        raise RuleError("the trigger condition must be text or an object")
    data = dict(raw)
    kind = data.pop("type", None)
    if kind not in CHANGE_TYPES + STATE_TYPES:
        raise RuleError(f"unknown condition type {kind!r}: use one of {', '.join(CHANGE_TYPES + STATE_TYPES)}")
    fields: dict[str, Any] = {"type": kind}
    if kind in ("row_count", "threshold"):
        operator = data.pop("operator", None)
        if not isinstance(operator, str) or operator not in OPERATORS:
            raise RuleError(f"{kind} needs an operator, one of {' '.join(OPERATORS)}")
        value = data.pop("value", None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RuleError(f"{kind} needs a numeric value, not {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number) or abs(number) > 1e15:
            raise RuleError(f"{kind} needs a finite value of at most 1e15 in size")
        fields.update(operator=operator, value=number)
    if kind == "threshold":
        column = data.pop("column", None)
        if not isinstance(column, str) or not column:
            raise RuleError("threshold needs the column to compare")
        match = data.pop("match", "any")
        if match not in ("any", "all"):
            raise RuleError("match must be 'any' (any row meets it) or 'all' (every row does)")
        fields.update(column=column, match=match)
    durations = {"for": "for_seconds", "repeat_every": "repeat_seconds", "cooldown": "cooldown_seconds"}
    for key, field in durations.items():
        if key in data:
            seconds = parse_duration(data.pop(key), name=key)
            if key in ("for", "repeat_every") and kind in CHANGE_TYPES and seconds:
                raise RuleError(f"'{key}' applies to state conditions ({', '.join(STATE_TYPES)}), not {kind}")
            if key == "cooldown" and kind in STATE_TYPES and seconds:
                raise RuleError(f"'cooldown' applies to change conditions ({', '.join(CHANGE_TYPES)}), not {kind}")
            fields[field] = seconds or (0 if key == "for" else None)
    if data:
        raise RuleError(f"unknown condition field(s) for {kind}: {', '.join(sorted(data))}")
    return Condition(**fields)


def check_condition_columns(condition: Condition, columns: Sequence[str]) -> None:
    """Reject a threshold on a column the query does not return."""
    if condition.type == "threshold" and condition.column not in columns:
        raise RuleError(f"threshold column {condition.column!r} is not in the query's result columns {list(columns)}")


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def state_condition_met(condition: Condition, columns: Sequence[str], rows: Sequence[Sequence[Any]]
                        ) -> tuple[bool, list[int]]:
    """Whether a state condition holds for this result, and the positions of the rows to show for it."""
    every = list(range(len(rows)))
    if condition.type == "empty":
        return len(rows) == 0, []
    if condition.type == "not_empty":
        return len(rows) > 0, every
    compare = OPERATORS[condition.operator]
    if condition.type == "row_count":
        return compare(len(rows), condition.value), every
    index = list(columns).index(condition.column)
    meeting = [i for i, row in enumerate(rows)
               if (number := _numeric(row[index])) is not None and compare(number, condition.value)]
    if condition.match == "all":
        return bool(rows) and len(meeting) == len(rows), meeting
    return bool(meeting), meeting


# --- the evaluation decision -----------------------------------------------------------------------------------


@dataclass
class AlertState:
    """What is remembered about an alert between evaluations (one alert_state row)."""

    initialized: bool = False
    fingerprints: frozenset[bytes] = frozenset()
    snapshot: dict[str, list] | None = None
    condition_state: str = "OK"
    pending_since: datetime | None = None
    firing_incident_id: Any = None
    last_notified_at: datetime | None = None
    cooldown_until: datetime | None = None
    digest: list | None = None
    consecutive_errors: int = 0
    error_notified: bool = False


@dataclass
class Notice:
    """One message to send (to every recipient), and whether it opens an incident."""

    kind: str
    headline: str
    columns: list[str]
    rows: list[list]
    open_incident: bool = False
    detail: str | None = None


@dataclass
class Decision:
    """Everything one evaluation concluded, for the caller to store and send in one transaction."""

    outcome: str
    state: AlertState
    notices: list[Notice]
    resolve_incident: bool = False
    wake_at: datetime | None = None
    summary: dict | None = None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


class _JsonRows:
    """Rows converted to JSON values only when asked for: most evaluations report a few rows of many."""

    def __init__(self, rows: Sequence[Sequence[Any]]) -> None:
        self._rows = rows
        self._done: dict[int, list] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> list:
        if index not in self._done:
            self._done[index] = [jsonable(v) for v in self._rows[index]]
        return self._done[index]

    def all(self) -> list[list]:
        """Every row."""
        return [self[i] for i in range(len(self._rows))]


def _snapshot(rows_json: list[list], identities: Sequence[bytes], row_hashes: Sequence[bytes]) -> dict[str, list]:
    return {identity.hex(): [row_hash.hex(), row] for identity, row_hash, row in zip(identities, row_hashes, rows_json)}


def decide(
    *, condition: Condition, prior: AlertState | None, columns: list[str], rows: Sequence[Sequence[Any]],
    keys: list[int] | None, now: datetime, truncated: bool = False,
) -> Decision:
    """Decide what one successful evaluation means: the new state, the messages, and when to look again."""
    prior = prior or AlertState()
    rows_json = _JsonRows(rows)
    ids = identities(rows, keys)
    state = AlertState(
        initialized=True, fingerprints=frozenset(ids), condition_state=prior.condition_state,
        pending_since=prior.pending_since, firing_incident_id=prior.firing_incident_id,
        last_notified_at=prior.last_notified_at, cooldown_until=prior.cooldown_until, digest=prior.digest,
    )
    notices: list[Notice] = []
    if prior.error_notified:
        notices.append(Notice("recovered", "recovered, the query works again", columns, []))
    if condition.needs_snapshot:
        hashes = ids if keys is None else [row_fingerprint(row) for row in rows]
        state.snapshot = _snapshot(rows_json.all(), ids, hashes)
    if condition.is_state:
        decision = _decide_state(condition, prior, state, columns, rows, rows_json, now)
    else:
        decision = _decide_change(condition, prior, state, columns, rows_json, ids, now, truncated)
    decision.notices[:0] = notices
    return decision


def _decide_change(condition: Condition, prior: AlertState, state: AlertState, columns: list[str],
                   rows_json: _JsonRows, ids: list[bytes], now: datetime, truncated: bool = False) -> Decision:
    if not prior.initialized:
        report = Notice("initial_report", f"initial report, {_plural(len(rows_json), 'row')}", columns,
                        rows_json.all())
        return Decision("triggered", state, [report], summary={"added": len(rows_json), "initial": True})
    added = [rows_json[i] for i in new_row_positions(prior.fingerprints, ids)]
    removed: list[list] = []
    changed: list[list] = []
    if condition.needs_snapshot:
        old = prior.snapshot or {}
        current = state.snapshot or {}
        # In a cut result, a row missing from the window may still exist: only a whole result shows removals.
        removed = [] if truncated else [entry[1] for key, entry in old.items() if key not in current]
        changed = [entry[1] for key, entry in current.items() if key in old and old[key][0] != entry[0]]
    summary = {"added": len(added), "removed": len(removed), "changed": len(changed)}
    if condition.type == "new_rows":
        found, out_columns, headline_word = added, columns, "new row"
    elif condition.type == "removed_rows":
        found, out_columns, headline_word = removed, columns, "removed row"
    else:
        found = [["added", *r] for r in added] + [["removed", *r] for r in removed] + [["changed", *r] for r in changed]
        out_columns, headline_word = ["change", *columns], "change"
    summary["triggering"] = len(found)
    return _notify_change(condition, prior, state, found, out_columns, headline_word, now, summary)


def decide_added(*, condition: Condition, prior: AlertState, columns: list[str], rows: Sequence[Sequence[Any]],
                 keys: list[int] | None, now: datetime) -> Decision:
    """What a new_rows evaluation decides from the rows committed statements added to the result alone (`rows`:
    the query over those rows), given the state the last evaluation left: the same decision the whole result would
    give, since the result is the old one plus these rows."""
    if condition.type != "new_rows" or not prior.initialized or prior.error_notified:
        raise ValueError("an incremental evaluation needs a new_rows alert whose last evaluation succeeded")
    rows_json = _JsonRows(rows)
    ids = identities(rows, keys)
    state = AlertState(
        initialized=True, fingerprints=prior.fingerprints | frozenset(ids), condition_state=prior.condition_state,
        pending_since=prior.pending_since, firing_incident_id=prior.firing_incident_id,
        last_notified_at=prior.last_notified_at, cooldown_until=prior.cooldown_until, digest=prior.digest,
    )
    found = [rows_json[i] for i in new_row_positions(prior.fingerprints, ids)]
    summary = {"added": len(found), "removed": 0, "changed": 0, "triggering": len(found), "incremental": True}
    return _notify_change(condition, prior, state, found, columns, "new row", now, summary)


def _notify_change(condition: Condition, prior: AlertState, state: AlertState, found: list[list],
                   out_columns: list[str], headline_word: str, now: datetime, summary: dict) -> Decision:
    """The message a change condition sends for the rows it found, or the digest it keeps during a cooldown."""
    pending = list(prior.digest or [])
    in_cooldown = bool(condition.cooldown_seconds and prior.cooldown_until and now < prior.cooldown_until)
    if in_cooldown:
        if found:
            state.digest = pending + found
        return Decision("triggered" if found else "no_change", state, [],
                        wake_at=prior.cooldown_until if state.digest else None, summary=summary)
    if not found and not pending:
        return Decision("no_change", state, [], summary=summary)
    if not found:
        # The cooldown ended with changes gathered in it: send them as one digest.
        rows = pending
        notice = Notice("digest", f"{_plural(len(rows), headline_word)} during the cooldown", out_columns, rows,
                        open_incident=True)
        outcome = "no_change"
    else:
        rows = pending + found
        kind = "digest" if pending else "incident"
        notice = Notice(kind, _plural(len(rows), headline_word), out_columns, rows, open_incident=True)
        outcome = "triggered"
    state.digest = None
    state.last_notified_at = now
    if condition.cooldown_seconds:
        state.cooldown_until = now + timedelta(seconds=condition.cooldown_seconds)
    return Decision(outcome, state, [notice], summary=summary)


def _decide_state(condition: Condition, prior: AlertState, state: AlertState, columns: list[str],
                  rows: Sequence[Sequence[Any]], rows_json: _JsonRows, now: datetime) -> Decision:
    met, positions = state_condition_met(condition, columns, rows)
    shown = [rows_json[i] for i in positions]
    summary = {"condition_met": met, "matching_rows": len(positions), "row_count": len(rows_json)}
    described = condition.describe()
    firing = Notice("incident", f"{described} ({_plural(len(shown), 'row')})" if shown else described,
                    columns, shown, open_incident=True, detail=f"Condition met: {described}.")
    if met:
        if prior.condition_state == "FIRING":
            if condition.repeat_seconds and prior.last_notified_at and (
                    now >= prior.last_notified_at + timedelta(seconds=condition.repeat_seconds)):
                state.last_notified_at = now
                repeat = Notice("repeat", f"still firing: {firing.headline}", columns, shown,
                                detail=f"Condition still met: {described}.")
                return Decision("triggered", state, [repeat], wake_at=_next_repeat(condition, now), summary=summary)
            return Decision("no_change", state, [], wake_at=_next_repeat(condition, prior.last_notified_at),
                            summary=summary)
        since = prior.pending_since if prior.condition_state == "PENDING" and prior.pending_since else now
        if condition.for_seconds and now < since + timedelta(seconds=condition.for_seconds):
            state.condition_state, state.pending_since = "PENDING", since
            return Decision("no_change", state, [], wake_at=since + timedelta(seconds=condition.for_seconds),
                            summary=summary)
        state.condition_state, state.pending_since, state.last_notified_at = "FIRING", None, now
        return Decision("triggered", state, [firing], wake_at=_next_repeat(condition, now), summary=summary)
    state.pending_since = None
    if prior.condition_state == "FIRING":
        state.condition_state, state.firing_incident_id = "OK", None
        resolved = Notice("resolved", f"resolved: {described} no longer holds", columns, rows_json.all(),
                          detail=f"Condition no longer met: {described}.")
        return Decision("resolved", state, [resolved], resolve_incident=True, summary=summary)
    state.condition_state = "OK"
    if not prior.initialized:
        report = Notice("initial_report", f"initial report, {_plural(len(rows_json), 'row')}, {described}: not met",
                        columns, rows_json.all())
        return Decision("no_change", state, [report], summary=summary)
    return Decision("no_change", state, [], summary=summary)


def _next_repeat(condition: Condition, since: datetime | None) -> datetime | None:
    if not condition.repeat_seconds or since is None:
        return None
    return since + timedelta(seconds=condition.repeat_seconds)


def decide_error(*, prior: AlertState | None, error: str, error_notify_after: int) -> Decision:
    """A failed evaluation: count it, and after `error_notify_after` in a row say once that the alert is failing."""
    prior = prior or AlertState()
    state = AlertState(**{**prior.__dict__})
    state.consecutive_errors = prior.consecutive_errors + 1
    notices = []
    if state.consecutive_errors >= error_notify_after and not prior.error_notified:
        state.error_notified = True
        notices.append(Notice("failing", f"alert is failing ({_plural(state.consecutive_errors, 'error')} in a row)",
                              [], [], detail=error))
    return Decision("error", state, notices)


def result_unchanged(*, stable_reason: str | None, clean_since: float | None, events_error: str | None,
                     tables: Sequence[str], listener_up_since: float | None,
                     last_changes: Sequence[float | None]) -> bool:
    """Whether a scheduled run would only find the result the last evaluation stored, so it can be skipped: the
    query depends on its watched tables alone (`stable_reason` is None), the last evaluation succeeded and its
    queries began at `clean_since`, and no watched table has changed since. A change is known to be absent only
    when every table has a trigger and the listener has been connected without a break since before that
    evaluation began (times are one monotonic clock; `last_changes` is when a notification last named each table)."""
    if stable_reason is not None or clean_since is None:
        return False
    if not tables:
        return True
    if events_error is not None or listener_up_since is None or listener_up_since > clean_since:
        return False
    return all(changed is None or changed < clean_since for changed in last_changes)
