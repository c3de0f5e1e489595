"""The incident page that a message's signed link opens without an API key: what it shows, and the one-tap actions
it offers (acknowledge, resolve, mute), read from its form. Pure: plain values in, HTML out."""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any, Mapping, Sequence

from notification import PRIORITY_COLOURS, display_value, format_time, is_number

# The page's own rules: no script, nothing from elsewhere, forms post only back here, never framed (a framed page
# could trick a click on "Resolve"), and the link's token never goes to another site in a Referer header
# ("same-origin": with "no-referrer" a browser would send its forms with Origin "null", which is refused).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex, nofollow",
}
MUTE_HOURS = (1, 8, 24)
NAME_MAX_CHARS = 200
COMMENT_MAX_CHARS = 2000
# The page shows this many of the rows the incident kept (it keeps up to 1,000).
PAGE_MAX_ROWS = 500
PAGE_MAX_VALUE_CHARS = 1000
DONE = {"acknowledged": "Acknowledged. Everyone who opens this page sees who is on it.",
        "resolved": "Resolved.", "muted": "Muted: no messages for this alert until the time shown above."}
_FONT = "-apple-system,BlinkMacSystemFont,'Segoe UI',Roboto,Helvetica,Arial,sans-serif"


class BadAction(ValueError):
    """A form the page did not send, or a field too long: the message says what to change."""


@dataclass(frozen=True)
class Action:
    """One tap on the page: acknowledge (with an optional name and comment), resolve, or mute for `hours`."""

    kind: str
    name: str | None = None
    comment: str | None = None
    hours: int | None = None


def parse_action(form: Mapping[str, str]) -> Action:
    """The action a page form asks for, or BadAction with a message a person can act on."""
    kind = form.get("action", "")
    name = " ".join(form.get("name", "").split()) or None
    comment = form.get("comment", "").strip() or None
    if name is not None and len(name) > NAME_MAX_CHARS:
        raise BadAction(f"The name is longer than {NAME_MAX_CHARS} characters; shorten it and try again.")
    if comment is not None and len(comment) > COMMENT_MAX_CHARS:
        raise BadAction(f"The comment is longer than {COMMENT_MAX_CHARS:,} characters; shorten it and try again.")
    if kind in ("acknowledge", "resolve"):
        return Action(kind, name=name, comment=comment)
    if kind == "mute":
        hours = form.get("hours", "")
        if not hours.isdigit() or int(hours) not in MUTE_HOURS:
            raise BadAction(f"Mute for 1, 8 or 24 hours: {hours[:20]!r} is not one of them.")
        return Action(kind, name=name, comment=comment, hours=int(hours))
    raise BadAction("Unknown action: use the Acknowledge, Resolve or Mute buttons on the page.")


def _value(value: Any, zone: tzinfo) -> str:
    """A kept value as the page shows it (timestamps, kept as text, in `zone`)."""
    return display_value(str(value) if isinstance(value, (dict, list)) else value, zone, PAGE_MAX_VALUE_CHARS)


def incident_rows(data: Mapping[str, Any]) -> tuple[list[str], list[list[Any]], int]:
    """The columns, the kept rows and how many rows the result had, from an incident's stored data."""
    columns = list(data.get("columns") or [])
    if "rows" in data:
        rows = [list(row) for row in data.get("rows") or []]
        return columns, rows, int(data.get("row_count") or len(rows))
    kept = data.get("new_rows") or []
    columns = columns or (list(kept[0]) if kept else [])
    return columns, [[row.get(c) for c in columns] for row in kept], int(data.get("new_row_count") or len(kept))


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], zone: tzinfo) -> str:
    cell = "padding:6px 10px;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:top;"
    head = "".join(f'<th style="{cell}background:#f9fafb;white-space:nowrap;">{html.escape(c)}</th>' for c in columns)
    body = "".join("<tr>" + "".join(
        f'<td class="{"num" if is_number(v) else "text"}" style="{cell}'
        f'{"text-align:right;font-variant-numeric:tabular-nums;" if is_number(v) else "overflow-wrap:anywhere;"}">'
        f"{html.escape(_value(v, zone))}</td>" for v in row) + "</tr>" for row in rows)
    return (f'<div style="overflow-x:auto;"><table id="rows" style="border-collapse:collapse;width:100%;'
            f'font-size:14px;"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')


def _button(label: str, *, colour: str, name: str = "action", value: str, extra: str = "") -> str:
    return (f'<button type="submit" name="{name}" value="{value}" {extra}style="background:{colour};color:#ffffff;'
            f'border:0;border-radius:4px;padding:10px 16px;font-size:15px;font-weight:600;margin:4px 8px 4px 0;'
            f'cursor:pointer;">{html.escape(label)}</button>')


def _actions(incident: Mapping[str, Any], alert: Mapping[str, Any] | None) -> str:
    """The forms: each POSTs back to this page's own URL (its token is the credential), never a GET."""
    field = ("display:block;width:100%;max-width:420px;box-sizing:border-box;padding:8px;margin:4px 0 10px 0;"
             "border:1px solid #9ca3af;border-radius:4px;font-size:15px;")
    parts = []
    if incident["status"] != "RESOLVED":
        parts.append(
            '<form method="post" id="acknowledge-form"><h2 style="font-size:17px;margin:0 0 8px 0;">'
            + ("Acknowledge or resolve" if incident["status"] == "ACTIVE" else "Resolve") + "</h2>"
            f'<label for="name">Your name (optional)</label><input id="name" name="name" maxlength="{NAME_MAX_CHARS}" '
            f'autocomplete="name" style="{field}"><label for="comment">Comment (optional)</label>'
            f'<textarea id="comment" name="comment" rows="2" maxlength="{COMMENT_MAX_CHARS}" style="{field}"></textarea>'
            + (_button("Acknowledge", colour="#1d4ed8", value="acknowledge", extra='id="acknowledge" ')
               if incident["status"] == "ACTIVE" else "")
            + _button("Resolve", colour="#15803d", value="resolve", extra='id="resolve" ') + "</form>")
    if alert is not None:
        mute = "".join(_button(f"Mute {hours} h", colour="#4b5563", name="hours", value=str(hours),
                               extra=f'id="mute-{hours}" ') for hours in MUTE_HOURS)
        parts.append('<form method="post" id="mute-form" style="margin-top:16px;">'
                     '<h2 style="font-size:17px;margin:0 0 8px 0;">Mute the alert</h2>'
                     '<input type="hidden" name="action" value="mute"><p style="margin:0 0 8px 0;color:#4b5563;">'
                     "Incidents are still recorded; no messages are sent until the mute ends.</p>"
                     f"{mute}</form>")
    return "".join(parts)


def _timeline(activities: Sequence[Mapping[str, Any]], zone: tzinfo) -> str:
    items = []
    for activity in activities:
        details = dict(activity.get("details") or {})
        via = " via link" if details.pop("via", None) == "link" else ""
        who = f" by {activity['actor']}" if activity.get("actor") else ""
        comment = details.pop("comment", None)
        if "muted_until" in details:
            details["muted_until"] = _value(details["muted_until"], zone)
        extra = ", ".join(f"{k}: {v}" for k, v in details.items())
        items.append(
            f'<li style="margin:0 0 8px 0;"><span style="color:#4b5563;font-variant-numeric:tabular-nums;">'
            f"{html.escape(format_time(activity['created_at'], zone))}</span> "
            f"<b>{html.escape(activity['action'].replace('_', ' '))}</b>{html.escape(who + via)}"
            + (f' <span style="color:#4b5563;">({html.escape(extra)})</span>' if extra else "")
            + (f'<div style="margin-top:2px;">“{html.escape(comment)}”</div>' if comment else "") + "</li>")
    return f'<ol id="timeline" style="padding-left:20px;margin:0;">{"".join(items)}</ol>'


def _evaluation(evaluation: Mapping[str, Any] | None, summary: Mapping[str, Any], zone: tzinfo) -> str:
    facts: list[tuple[str, str]] = []
    if evaluation is not None:
        facts += [("Ran", format_time(evaluation["started_at"], zone)), ("Cause", str(evaluation["cause"])),
                  ("Took", f"{evaluation['duration_ms']:.1f} ms"), ("Outcome", str(evaluation["outcome"]))]
        if evaluation.get("row_count") is not None:
            facts.append(("Rows returned", f"{evaluation['row_count']:,}" + (" (cut)" if evaluation.get("truncated")
                                                                              else "")))
        if evaluation.get("new_row_count") is not None:
            facts.append(("Rows that triggered", f"{evaluation['new_row_count']:,}"))
        if evaluation.get("error"):
            facts.append(("Error", str(evaluation["error"])))
    facts += [(str(key).replace("_", " ").capitalize(), str(value)) for key, value in summary.items()]
    if not facts:
        return "<p>No evaluation is recorded for it (its history may have passed EVALUATION_RETENTION_DAYS).</p>"
    rows = "".join(f'<tr><th style="text-align:left;padding:4px 12px 4px 0;color:#4b5563;font-weight:600;'
                   f'vertical-align:top;white-space:nowrap;">{html.escape(k)}</th><td style="padding:4px 0;'
                   f'overflow-wrap:anywhere;">{html.escape(v)}</td></tr>' for k, v in facts)
    return f'<table id="evaluation" style="border-collapse:collapse;font-size:14px;">{rows}</table>'


def _document(title: str, body: str, colour: str = "#374151") -> str:
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="referrer" content="same-origin">'
            f"<title>{html.escape(title)}</title></head>"
            f'<body style="margin:0;padding:16px 8px;background:#f3f4f6;font-family:{_FONT};color:#111827;">'
            f'<main style="max-width:880px;margin:0 auto;background:#ffffff;border-top:6px solid {colour};'
            f'border-radius:4px;padding:20px 24px;line-height:1.45;">{body}</main></body></html>')


def render_page(*, incident: Mapping[str, Any], alert: Mapping[str, Any] | None,
                activities: Sequence[Mapping[str, Any]], evaluation: Mapping[str, Any] | None, zone: tzinfo,
                now: datetime, done: str | None = None) -> str:
    """The incident page: the alert, the status, the rows, the evaluation that caused it, the activity timeline and
    the actions (none once resolved, but mute)."""
    priority = incident["priority"]
    colour = PRIORITY_COLOURS.get(priority, "#374151")
    data = incident.get("incident_data") or {}
    columns, rows, total = incident_rows(data)
    status = incident["status"]
    if status == "ACKNOWLEDGED" and incident.get("acknowledged_by"):
        status_text = f"ACKNOWLEDGED by {incident['acknowledged_by']}"
    elif status == "RESOLVED" and incident.get("resolved_by"):
        status_text = f"RESOLVED by {incident['resolved_by']}"
    else:
        status_text = status
    muted_until = alert.get("muted_until") if alert else None
    muted = (f'<p id="muted" style="margin:8px 0 0 0;color:#4b5563;">The alert is muted until '
             f"{html.escape(format_time(muted_until, zone))}.</p>") if muted_until and muted_until > now else ""
    banner = (f'<p id="done" role="status" style="background:#ecfdf5;border:1px solid #15803d;color:#14532d;'
              f'padding:10px 12px;border-radius:4px;margin:0 0 16px 0;">{html.escape(DONE[done])}</p>'
              if done in DONE else "")
    description = alert.get("description") if alert else None
    # The title is the message's subject; the badge and the heading above already say its priority and alert.
    headline = incident["title"].removeprefix(f"[{priority}] {incident['alert_name']}: ")
    shown = rows[:PAGE_MAX_ROWS]
    more = total - len(shown)
    body = [
        banner,
        f'<p style="margin:0;"><span id="priority" style="display:inline-block;background:{colour};color:#ffffff;'
        f'font-weight:700;font-size:12px;letter-spacing:1px;padding:3px 8px;border-radius:3px;">'
        f'{html.escape(priority)}</span> <span id="status" style="font-weight:600;padding-left:6px;">'
        f"{html.escape(status_text)}</span></p>",
        f'<h1 style="font-size:24px;margin:10px 0 2px 0;">{html.escape(incident["alert_name"])}</h1>',
        f'<p id="headline" style="font-size:17px;margin:0;color:{colour};font-weight:600;">'
        f"{html.escape(headline)}</p>",
        f'<p style="margin:4px 0 0 0;color:#4b5563;">Opened {html.escape(format_time(incident["created_at"], zone))}'
        + (f", resolved {html.escape(format_time(incident['resolved_at'], zone))}" if incident.get("resolved_at")
           else "") + "</p>",
        muted,
        f'<p style="margin:12px 0 0 0;">{html.escape(description)}</p>' if description else "",
        f'<section style="margin-top:20px;">{_actions(incident, alert)}</section>',
        f'<h2 style="font-size:18px;margin:24px 0 8px 0;">Rows ({total:,})</h2>',
        _table(columns, shown, zone) if columns and shown else "<p>No rows.</p>",
        f'<p style="color:#4b5563;">… and {more:,} more rows not kept with the incident'
        + (f" ({html.escape(data['cut'])})" if data.get("cut") else "") + ".</p>" if more > 0 else "",
        '<h2 style="font-size:18px;margin:24px 0 8px 0;">The evaluation that caused it</h2>',
        _evaluation(evaluation, data.get("summary") or {}, zone),
        '<h2 style="font-size:18px;margin:24px 0 8px 0;">Activity</h2>',
        _timeline(activities, zone),
    ]
    return _document(incident["title"], "".join(body), colour)


def refusal_page(message: str) -> str:
    """The plain page of a link that is refused (altered, expired, or links not enabled)."""
    return _document("Link refused", f'<h1 style="font-size:22px;margin:0 0 8px 0;">{html.escape(message)}</h1>'
                     "<p>Open the incident from the latest message about it, or ask whoever runs the alert service "
                     "(its API lists incidents with an API key).</p>")


def problem_page(title: str, message: str) -> str:
    """A plain page for a request the page cannot act on, saying what to do."""
    return _document(title, f'<h1 style="font-size:22px;margin:0 0 8px 0;">{html.escape(title)}</h1>'
                     f"<p>{html.escape(message)}</p>")
