"""High availability: three instances of main.py on one service database share the data sources out; when the owner
of a busy source is killed, frozen past its lease or stopped, another instance takes the source over within 5 s
and every (row, alert) pair committed meanwhile is emailed exactly once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from uuid import UUID

import psycopg2
import pytest

from cluster import preferred_owner
from tests.conftest import (TEST_SECRET_KEY, _new_database, drop_database, dsn_with, eventually, fetch, free_port,
                            wait_for_health)
from tests.servers import ReceivedMail, SmtpServer

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "ha-test-key-0123456789abcdef"
# Short, so that a frozen owner loses its sources within a couple of seconds and the test stays quick.
LEASE_SECONDS = 2
TAKEOVER_LIMIT_SECONDS = 5.0
SOURCES = 3
COMMITS_PER_SECOND = 20
# Each source has an alert on every row and one on even rows, so a pair names its alert and not only its row.
ALERT_QUERIES = {"all": "SELECT id FROM events", "even": "SELECT id FROM events WHERE id % 2 = 0"}
TEMPLATE = "{% for r in new_rows %}ROW {{ alert.name }} {{ r.id }}\n{% endfor %}"
ROW_LINE = re.compile(r"^ROW (\S+) (\d+)$", re.MULTILINE)
MESSAGE_ID = re.compile(r"^<notification-[0-9a-f-]+@[^>]+>$")


class Instance:
    """One `python main.py` process of the cluster, with its own port and log."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name, self.port, self.log = name, free_port(), log
        with open(log, "wb") as out:
            # Its own session, so the render processes it starts can be killed with it in the end.
            self.process = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            env={**env, "API_PORT": str(self.port)}, start_new_session=True)

    def health(self, timeout: float = 1.0) -> dict | None:
        """GET /health with the API key; None when it does not answer in time (dead, frozen, starting)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/health", headers={"X-API-Key": API_KEY})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.load(response)
        except (OSError, ValueError):
            return None

    def cluster(self) -> dict | None:
        """The `cluster` part of /health, or None."""
        body = self.health()
        return body.get("cluster") if body else None

    def owns(self) -> set[str] | None:
        """The data sources this instance says it owns, or None when it does not answer."""
        shown = self.cluster()
        return None if shown is None else set(shown["owns"])

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """A JSON API call; fails the test on any status but 2xx."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                         headers={"X-API-Key": API_KEY, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path} on {self.name}: {exc.code} {exc.read()[:500]!r}") from None

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return f"--- {self.name} (exit {self.process.poll()}):\n" + "\n".join(text[-lines:])

    def kill_group(self) -> None:
        """SIGKILL the process and everything it started (a stopped process is killed too)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Stream:
    """Single-row commits into every source's events table at a steady rate, in one thread per source."""

    dsns: list[str]
    rate: float
    committed: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write, args=(k, dsn), name=f"stream-{k}", daemon=True)
                         for k, dsn in enumerate(self.dsns)]

    def start(self) -> "Stream":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _write(self, k: int, dsn: str) -> None:
        try:
            conn = psycopg2.connect(dsn)
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    began, n = time.monotonic(), 0
                    while not self._stop.is_set():
                        n += 1
                        cur.execute("INSERT INTO events (id) VALUES (%s)", (n,))
                        self.committed[k].append(n)  # only once COMMIT returned: that row must be reported
                        self._stop.wait(max(0.0, began + n / self.rate - time.monotonic()))
            finally:
                conn.close()
        except psycopg2.Error as exc:
            self.errors.append(f"source {k}: {exc}")


@pytest.fixture
def source_dsns(pg_admin_dsn: str) -> Iterator[list[str]]:
    """Three more databases on the test server, each an empty data source with an events table."""
    names = [_new_database(pg_admin_dsn) for _ in range(SOURCES)]
    dsns = [dsn_with(pg_admin_dsn, dbname=name) for name in names]
    for dsn in dsns:
        conn = psycopg2.connect(dsn)
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE events (id bigint PRIMARY KEY, note text)")
        conn.close()
    yield dsns
    for name in names:
        drop_database(pg_admin_dsn, name)


def instance_env(db_dsn: str, smtp: SmtpServer, data_dir: Path) -> dict[str, str]:
    """The environment every instance shares: one service database, the loopback SMTP server, a short lease."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "TWILIO_", "DB_", "API_"))}
    env.update(
        DB_CONNECTION=db_dsn, API_HOST="127.0.0.1", API_KEY=API_KEY, SECRET_KEY=TEST_SECRET_KEY, LOG_FILE="",
        DATA_DIR=str(data_dir), ALLOW_PRIVILEGED_DATA_SOURCES="true", INSTANCE_LEASE_SECONDS=str(LEASE_SECONDS),
        SMTP_HOST="127.0.0.1", SMTP_PORT=str(smtp.port), SMTP_USERNAME=smtp.username, SMTP_PASSWORD=smtp.password,
        SMTP_FROM="alerts@example.com", SMTP_SECURITY="starttls", SMTP_CA_FILE=str(smtp.ca_file),
        SMTP_TIMEOUT_SECONDS="5", SMTP_MAX_PER_SECOND="0", RETRY_DELAY_MINUTES="0.005", QUERY_TIMEOUT_SECONDS="5",
    )
    return env


def pairs_by_message_id(mails: list[ReceivedMail]) -> dict[str, list[tuple[str, int]]]:
    """The (alert, row) pairs each distinct Message-ID carries, as often as it shows them, counted as a receiver
    that drops repeated Message-IDs would; fails when two copies of one Message-ID differ (dropping one would then
    lose something)."""
    carried: dict[str, list[tuple[str, int]]] = {}
    for mail in mails:
        message_id = mail.message["Message-ID"]
        assert message_id and MESSAGE_ID.match(message_id), f"not a notification's Message-ID: {message_id!r}"
        body = mail.message.get_body(("plain",))
        pairs = sorted((alert, int(row)) for alert, row in ROW_LINE.findall(body.get_content() if body else ""))
        assert carried.setdefault(message_id, pairs) == pairs, f"two different emails share {message_id}"
    return carried


def expected_pairs(committed: dict[int, list[int]]) -> set[tuple[str, int]]:
    """Every (alert, row) pair the committed rows call for."""
    return {(f"s{k}-{kind}", row) for k, rows in committed.items() for row in rows
            for kind in ALERT_QUERIES if kind == "all" or row % 2 == 0}


def ownership(instances: list[Instance]) -> dict[Instance, tuple[str, set[str]]] | None:
    """Each instance's id and the data sources it owns, when every one answers /health with a cluster part."""
    owned = {}
    for instance in instances:
        shown = instance.cluster()
        if shown is None:
            return None
        owned[instance] = (shown["instance"], set(shown["owns"]))
    return owned


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP", "SIGTERM"])
def test_when_the_owner_of_a_busy_source_dies_another_takes_over_within_5_s_and_every_row_is_emailed_once(
        how, db_dsn, source_dsns, empty_dsn, smtp_server, tmp_path):
    spare_dsn = empty_dsn
    env = instance_env(db_dsn, smtp_server, tmp_path / "data")
    instances = [Instance(f"instance-{i}", env, tmp_path / f"instance-{i}.log") for i in range(3)]
    stream: Stream | None = None
    try:
        for instance in instances:
            wait_for_health(instance.port, instance.name, timeout=45)
        eventually(lambda: all(len((i.cluster() or {}).get("peers", [])) == 2 for i in instances), timeout=15,
                   interval=0.2, message="every instance to see the two others as peers")

        # Sources and alerts are created through different instances: every one serves the whole API.
        sources = [instances[k % 3].call("POST", "/data-sources/", {
            "name": f"source-{k}", "dsn": dsn, "allow_privileged_role": True})["id"] for k, dsn in
            enumerate(source_dsns)]
        alerts = [instances[(k + j) % 3].call("POST", "/alert-configs/", {
            "name": f"s{k}-{kind}", "query": query, "data_source_id": sources[k], "trigger_condition": "New row added",
            "schedule": "interval:1h", "message_template": TEMPLATE,
            "notification_channels": {"email": ["ops@example.com"]}})["id"]
            for k in range(SOURCES) for j, (kind, query) in enumerate(ALERT_QUERIES.items())]
        smtp_server.wait_for(len(alerts), timeout=20)  # the initial reports: every alert ran once

        # Sources are placed by rendezvous hashing, which puts three sources on three instances one each only about
        # a time in five: idle sources (on a spare database, without alerts) are added until each instance is the
        # place of one, so that the spread can be checked every time.
        instance_ids = [UUID(i.cluster()["instance"]) for i in instances]
        everything = [source["id"] for source in instances[0].call("GET", "/data-sources/")]
        while {preferred_owner(UUID(s), instance_ids) for s in everything} != set(instance_ids):
            everything.append(instances[0].call("POST", "/data-sources/", {
                "name": f"idle-{len(everything)}", "dsn": spare_dsn, "allow_privileged_role": True})["id"])

        def spread() -> dict[Instance, tuple[str, set[str]]] | None:
            owned = ownership(instances)
            if owned is None:
                return None
            live = [UUID(instance) for instance, _ in owned.values()]
            holders = {s: [UUID(instance) for instance, owns in owned.values() if s in owns] for s in everything}
            return owned if all(holders[s] == [preferred_owner(UUID(s), live)] for s in everything) else None

        # Work is spread: every source has one owner, the one the placement names, and each instance owns some.
        owned = eventually(spread, timeout=15, interval=0.2, message="the sources to be spread over the instances")
        assert all(owns for _, owns in owned.values())
        busy = sources[0]
        victim, (victim_id, _) = next((i, shown) for i, shown in owned.items() if busy in shown[1])
        survivors = [i for i in instances if i is not victim]

        stream = Stream(source_dsns, COMMITS_PER_SECOND).start()
        time.sleep(1.5)
        signalled = time.monotonic()
        victim.process.send_signal(getattr(signal, how))

        def taken_over() -> bool:
            return any(busy in (s.owns() or set()) for s in survivors)

        committed_at_signal = len(stream.committed[0])
        eventually(taken_over, timeout=15, interval=0.05, message=f"a survivor to own {busy} after {how}")
        takeover = time.monotonic() - signalled
        committed_at_takeover = len(stream.committed[0])
        assert takeover <= TAKEOVER_LIMIT_SECONDS, f"takeover after {how} took {takeover:.2f} s"

        if how == "SIGSTOP":
            # Frozen well past its lease (and past the takeover), then woken while the stream still runs: whatever
            # it was doing when frozen must now be refused, and it comes back as a new instance.
            time.sleep(max(0.0, 2 * LEASE_SECONDS + 1 - (time.monotonic() - signalled)))
            victim.process.send_signal(signal.SIGCONT)
            eventually(lambda: (victim.cluster() or {}).get("instance") not in (None, victim_id), timeout=15,
                       interval=0.1, message="the woken instance to rejoin with a new id")
        elif how == "SIGTERM":
            victim.process.wait(15)
            assert victim.process.returncode in (0, -signal.SIGTERM), victim.log_tail()
        else:
            victim.process.wait(5)
        time.sleep(1.5)  # more commits after the takeover, on the new owner
        stream.stop()
        assert not stream.errors, stream.errors

        # Rows were committed to the busy source before the signal, during the takeover and after it.
        assert 0 < committed_at_signal < committed_at_takeover < len(stream.committed[0])
        wanted = expected_pairs(stream.committed)

        def all_reported() -> bool:
            found = set().union(*pairs_by_message_id(smtp_server.messages).values())
            return wanted <= found

        eventually(all_reported, timeout=30, interval=0.2, message="every (alert, row) pair to be emailed")
        # Outbox empty everywhere, then a moment for a late repeat to arrive.
        eventually(lambda: fetch(db_dsn, "SELECT count(*) FROM alert_service.notification WHERE status IN "
                                 "('PENDING', 'RETRY')")[0][0] == 0, timeout=20, message="the outbox to drain")
        time.sleep(1.0)

        # Counted over distinct Message-IDs, and as often as each shows a pair: a pair in two updates of one
        # coalesced email was reported twice as well.
        times = Counter(pair for pairs in pairs_by_message_id(smtp_server.messages).values() for pair in pairs)
        repeated = {pair: n for pair, n in times.items() if n > 1}
        assert not repeated, f"{len(repeated)} pairs reported twice or more: {sorted(repeated.items())[:10]}"
        assert set(times) == wanted, (f"missing {sorted(wanted - set(times))[:10]}, "
                                      f"unexpected {sorted(set(times) - wanted)[:10]}")
        # A stale decision would also show as a pair held by two incidents.
        held = fetch(db_dsn, "SELECT a.name, (r->>'id')::bigint, count(*) FROM alert_service.incident i "
                             "JOIN alert_service.alert_config a ON a.id = i.alert_config_id "
                             "CROSS JOIN LATERAL jsonb_array_elements(i.incident_data->'new_rows') r GROUP BY 1, 2")
        assert {(name, row) for name, row, _ in held} == wanted
        assert [(name, row) for name, row, n in held if n > 1] == []
    except BaseException:
        print("\n".join(i.log_tail() for i in instances))
        raise
    finally:
        if stream is not None:
            stream.stop()
        for instance in instances:
            if instance.running:
                instance.process.send_signal(signal.SIGCONT)
                instance.process.terminate()
        for instance in instances:
            try:
                instance.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
            instance.kill_group()
