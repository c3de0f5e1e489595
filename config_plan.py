"""Alerts as code: read a configuration file, and plan what applying it changes. Pure: no database, no network;
the plan is the difference between the desired and the current configuration, matched by name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

import yaml

FORMAT_VERSION = 1
# Created and changed in this order (a user needs its team, an alert its data source and creator); deleted in the
# reverse order.
KINDS = ("data_sources", "teams", "users", "alerts")
# What an entry is matched by: a user's name need not be unique, an email address is.
KEYS = {"data_sources": "name", "teams": "name", "users": "email", "alerts": "name"}
SINGULAR = {"data_sources": "data source", "teams": "team", "users": "user", "alerts": "alert"}
# A file may name secrets it does not hold, as ${NAME}, resolved from the environment of whoever applies it; only
# names with this prefix, so a file sent to the API cannot read the service's own settings (SECRET_KEY, tokens)
# into a connection string to a server of its choosing.
SECRET_PREFIX = "ALERT_SECRET_"
_REFERENCE = re.compile(r"\$\{([^}]*)\}")
# More than a service's whole configuration could need; bounds the work a file sent to the API can cause.
MAX_VALUES = 1_000_000


@dataclass(frozen=True)
class FileError:
    """One problem with a configuration file, where it is: a path such as ("alerts", 2, "schedule"), and a line."""

    loc: tuple
    message: str
    line: int | None = None

    def as_dict(self) -> dict:
        """In the shape of the API's other 422s, with the line added."""
        return {"loc": list(self.loc), "msg": self.message, "type": "value_error", "line": self.line}

    def __str__(self) -> str:
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in self.loc).lstrip(".")
        return f"{f'line {self.line}: ' if self.line is not None else ''}{path}: {self.message}"


class FileRefused(Exception):
    """The file is refused whole; every problem found is listed."""

    def __init__(self, errors: list[FileError]) -> None:
        super().__init__(f"{len(errors)} problem(s) in the configuration file")
        self.errors = errors


@dataclass
class Document:
    """A parsed file: the entries of each kind in file order, and the line of each entry and field."""

    entries: dict[str, list[dict]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    lines: dict[tuple, int] = field(default_factory=dict)
    sections: set[str] = field(default_factory=set)  # the kinds the file names, even with no entry

    def line(self, kind: str, index: int, name: str | int | None = None) -> int | None:
        """The line of an entry, or of one of its fields when known (else the entry's)."""
        if name is not None and (kind, index, name) in self.lines:
            return self.lines[(kind, index, name)]
        return self.lines.get((kind, index))

    def error(self, kind: str, index: int, loc: list, message: str) -> FileError:
        """A FileError at an entry's field, given as a model's error location."""
        first = next((part for part in loc if isinstance(part, str)), None)
        return FileError((kind, index, *loc), message, self.line(kind, index, first))


def load(text: str) -> tuple[Document, list[FileError]]:
    """Parse a file's YAML and check its shape (a mapping of lists of mappings); the entries are not validated."""
    document = Document()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None and _expanded_size(root) > MAX_VALUES:
            return document, [FileError(("file",), f"the file holds more than {MAX_VALUES} values once its aliases "
                                                   "are expanded", 1)]
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        return document, [FileError(("file",), f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
                                    mark.line + 1 if mark is not None else None)]
    except RecursionError:
        return document, [FileError(("file",), "the file nests too deeply", 1)]
    if data is None:
        return document, []
    if not isinstance(data, dict):
        return document, [FileError(("file",), "the file must be a mapping with data_sources, teams, users and alerts",
                                    1)]
    errors = []
    nodes = {key.value: value for key, value in root.value} if isinstance(root, yaml.MappingNode) else {}
    for key, value in data.items():
        line = nodes[key].start_mark.line + 1 if key in nodes else None
        if key == "version":
            if value != FORMAT_VERSION:
                errors.append(FileError(("version",), f"only version {FORMAT_VERSION} is understood", line))
        elif key not in KINDS:
            errors.append(FileError((str(key),), f"unknown section; use {', '.join(KINDS)}", line))
        elif value is None:
            document.sections.add(key)
        elif not isinstance(value, list):
            errors.append(FileError((key,), "must be a list of entries", line))
        else:
            document.sections.add(key)
            items = nodes[key].value if isinstance(nodes.get(key), yaml.SequenceNode) else []
            for index, entry in enumerate(value):
                node = items[index] if index < len(items) else None
                if node is not None:
                    document.lines[(key, index)] = node.start_mark.line + 1
                    if isinstance(node, yaml.MappingNode):
                        for field_key, _ in node.value:
                            document.lines[(key, index, field_key.value)] = field_key.start_mark.line + 1
                if not isinstance(entry, dict):
                    errors.append(FileError((key, index), "must be a mapping of fields",
                                            document.line(key, index)))
                    entry = {}
                document.entries[key].append(entry)
    return document, errors


def _expanded_size(root: yaml.Node) -> int:
    """How many values a document holds with every alias expanded, counted up to just past MAX_VALUES (a few
    aliases of aliases make billions: the "billion laughs")."""
    count, stack = 0, [root]
    while stack and count <= MAX_VALUES:
        node = stack.pop()
        count += 1
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend((key, value))
    return count


def resolve_secret(value: Any, environ: Mapping[str, str]) -> str:
    """A string with its ${NAME} references replaced from the environment; KeyError names what is missing."""
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if not name.startswith(SECRET_PREFIX) or name not in environ:
            raise KeyError(name)
        return environ[name]

    return _REFERENCE.sub(replace, value)


def secret_reference_problem(name: str) -> str:
    """Why a ${NAME} reference cannot be resolved."""
    if not name.startswith(SECRET_PREFIX):
        return f"${{{name}}}: only environment variables whose names begin with {SECRET_PREFIX} can be referenced"
    return f"${{{name}}} is not set in the environment of whoever applies the file"


@dataclass(frozen=True)
class Change:
    """One entry to create, update or delete; for an update, the fields that differ."""

    action: str
    kind: str
    key: str
    fields: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"action": self.action, "kind": SINGULAR[self.kind], "name": self.key, "fields": list(self.fields)}

    def __str__(self) -> str:
        sign = {"create": "+", "update": "~", "delete": "-"}[self.action]
        changed = f" ({', '.join(self.fields)})" if self.fields else ""
        return f"{sign} {self.action} {SINGULAR[self.kind]} {self.key}{changed}"


@dataclass(frozen=True)
class Plan:
    """What applying a file changes, in the order it is applied."""

    changes: tuple[Change, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.changes

    def of(self, action: str, kind: str) -> list[Change]:
        return [c for c in self.changes if c.action == action and c.kind == kind]

    def as_dict(self) -> dict:
        return {"changes": [c.as_dict() for c in self.changes],
                "summary": {action: sum(1 for c in self.changes if c.action == action)
                            for action in ("create", "update", "delete")}}

    def __str__(self) -> str:
        if self.empty:
            return "nothing to change"
        counts = self.as_dict()["summary"]
        return "\n".join([*map(str, self.changes),
                          f"{counts['create']} to create, {counts['update']} to update, {counts['delete']} to delete"])


Entries = Mapping[str, Mapping[str, Mapping[str, Any]]]  # kind -> key -> canonical entry


def plan(desired: Entries, current: Entries, *, prune: Collection[str] = ()) -> Plan:
    """The changes that make `current` what `desired` describes; of the kinds in `prune`, what `desired` does not
    have is deleted."""
    changes: list[Change] = []
    for kind in KINDS:
        want, have = desired.get(kind, {}), current.get(kind, {})
        for key, entry in want.items():
            if key not in have:
                changes.append(Change("create", kind, key))
                continue
            differing = tuple(name for name in dict.fromkeys([*entry, *have[key]])
                              if entry.get(name) != have[key].get(name))
            if differing:
                changes.append(Change("update", kind, key, differing))
    for kind in reversed(KINDS):
        if kind in prune:
            want, have = desired.get(kind, {}), current.get(kind, {})
            changes.extend(Change("delete", kind, key) for key in have if key not in want)
    return Plan(tuple(changes))


# Which field of an entry names an entry of which kind.
REFERENCES = {("users", "team"): "teams", ("alerts", "data_source"): "data_sources", ("alerts", "created_by"): "users"}


@dataclass(frozen=True)
class Reference:
    """An entry's field that names another entry: where it is, and the name."""

    kind: str
    index: int
    field: str
    value: str


def reference_errors(references: list[Reference], desired: Entries, current: Entries, *, prune: Collection[str],
                     document: Document, broken: Mapping[str, set]) -> list[FileError]:
    """References to a team, data source or user that will not exist after the apply (prune: the kinds pruned;
    broken: per kind, the names of entries already refused, not reported again). Entries refused for another
    reason have their references checked too, so that one answer lists everything."""
    errors = []
    for ref in references:
        target = REFERENCES[(ref.kind, ref.field)]
        if ref.value in desired.get(target, {}) or ref.value in broken.get(target, ()):
            continue
        if ref.value in current.get(target, {}):
            if target not in prune:
                continue
            problem = f"{SINGULAR[target]} {ref.value!r} is not in the file, so prune would delete it"
        else:
            problem = f"no {SINGULAR[target]} {ref.value!r} in the file or the service"
        errors.append(document.error(ref.kind, ref.index, [ref.field], problem))
    return errors


def duplicate_errors(keys: list[tuple[str, int, str]], document: Document) -> list[FileError]:
    """An error at every entry whose key an earlier entry of its kind already has ((kind, index, key) in order)."""
    seen: dict[tuple[str, str], int] = {}
    errors = []
    for kind, index, key in keys:
        if (kind, key) in seen:
            first = seen[(kind, key)]
            errors.append(document.error(kind, index, [KEYS[kind]], f"{key!r} is also {kind}[{first}] (line "
                                                                    f"{document.line(kind, first)}): entries are "
                                                                    f"matched by {KEYS[kind]}, so it must be unique"))
        else:
            seen[(kind, key)] = index
    return errors


class _Dumper(yaml.SafeDumper):
    """Multi-line text (queries, templates) as literal blocks, which read as they were written."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _text)


def dump(entries: Entries) -> str:
    """A file holding the entries, each kind sorted by key, without fields that are null."""
    document: dict[str, Any] = {"version": FORMAT_VERSION}
    for kind in KINDS:
        document[kind] = [{name: value for name, value in entry.items() if value is not None}
                          for _, entry in sorted(entries.get(kind, {}).items())]
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
