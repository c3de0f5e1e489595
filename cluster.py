"""Several instances on one service database: each instance's lease, which instance owns each data source (with a
fencing epoch), and the messages instances send each other through the database. PostgreSQL is the only
coordinator: no instance trusts another's word, only rows and their locks."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import select
import socket
import threading
import time
import uuid
from typing import Callable
from uuid import UUID

import psycopg2
import psycopg2.extras

import database
from config import Settings

logger = logging.getLogger(__name__)

# A lease is renewed four times per INSTANCE_LEASE_SECONDS, and ownership looked at as often: a missed renewal or
# two (a slow round trip) costs nothing, and a dead owner's sources are taken within a quarter lease of its expiry.
RENEWALS_PER_LEASE = 4
# A releasing instance waits this long at most for the evaluations it has running on the source it gives away;
# the new epoch fences whatever is still running after that.
RELEASE_WAIT_SECONDS = 2.0
# Besides the messages instances send each other, every instance compares its alerts with the stored ones this
# often (a message lost while its listener reconnected, or a change written by the `apply` command).
RESYNC_SECONDS = 30.0


# PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more; a message naming many ids goes as several.
MESSAGE_MAX_BYTES = 7900


def messages(kind: str, sender: str, ids: list) -> list[str]:
    """The NOTIFY payloads that tell the other instances `kind` about `ids`, each short enough to be sent."""
    payloads, current = [], [kind, sender]
    for item in map(str, ids):
        if len(current) > 2 and len(" ".join([*current, item]).encode()) > MESSAGE_MAX_BYTES:
            payloads.append(" ".join(current))
            current = [kind, sender]
        current.append(item)
    return [*payloads, " ".join(current)]


def preferred_owner(source_id: UUID, instances: list[UUID]) -> UUID | None:
    """The live instance a data source belongs to: rendezvous hashing, so an instance that joins or leaves moves
    only its own share of the sources, and every instance computes the same answer from the same list."""
    if not instances:
        return None
    return max(instances, key=lambda i: hashlib.blake2b(f"{i}/{source_id}".encode(), digest_size=8).digest())


def plan_ownership(*, me: UUID, instances: list[UUID], sources: dict[UUID, tuple[UUID | None, int]],
                   owned: set[UUID]) -> tuple[list[UUID], list[UUID]]:
    """The data sources to take (they belong here, and no live instance holds them) and those to give up (they
    belong elsewhere now, another instance holds them, they were deleted, or the database still names this
    instance for one it gave up)."""
    live = set(instances)
    take, give = [], []
    for source_id, (owner, _) in sorted(sources.items(), key=lambda item: str(item[0])):
        preferred = preferred_owner(source_id, instances)
        if source_id in owned:
            if owner != me or preferred != me:
                give.append(source_id)
        elif preferred == me and (owner is None or owner == me or owner not in live):
            take.append(source_id)
        elif owner == me:
            # Named here but not held (its release failed): the instance it belongs to waits for a live owner.
            give.append(source_id)
    give += sorted((owned - set(sources)), key=str)
    return take, give


class Lease:
    """This instance's membership: an id, and a lease in the service database renewed on a connection of its own
    (a busy pool must not make a live instance look dead). When a renewal finds the lease already ran out (the
    process was frozen, or cut off from the database), everything held under it is given up and the instance
    joins again under a new id."""

    def __init__(self, dsn: str, settings: Settings) -> None:
        self.dsn = dsn
        self.seconds = settings.instance_lease_seconds
        self.name = settings.instance_name or f"{socket.gethostname()}:{os.getpid()}"
        self.instance_id = uuid.uuid4()
        self._valid_until = 0.0  # monotonic: the lease certainly lasts until then
        self._conn = None
        self._lost_handlers: list[Callable[[UUID], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def on_lost(self, handler: Callable[[UUID], None]) -> None:
        """Call `handler(old_id)` when the lease ran out before it was renewed."""
        self._lost_handlers.append(handler)

    def valid(self) -> bool:
        """True while the lease certainly lasts (checked against this process's clock, which runs on while the
        process is frozen: a process that wakes after its lease ran out knows it at once)."""
        return time.monotonic() < self._valid_until

    def start(self) -> None:
        """Join the cluster and keep renewing the lease in a background thread."""
        self._join()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self._thread.start()

    def leave(self) -> None:
        """Stop renewing; give up every data source and end the lease, so others take over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._valid_until = 0.0
        try:
            with self._lock:
                conn = self._connection()
                with conn.cursor() as cur:
                    database.leave_cluster(cur, instance_id=self.instance_id)
        except (database.DatabaseError, psycopg2.Error) as exc:
            logger.warning("could not leave the cluster (the others take over when the lease runs out): %s", exc)
        finally:
            self._close()

    def hand_over(self) -> None:
        """Give up every data source now, while the lease lasts on for the sends being finished (stopping)."""
        try:
            with self._lock:
                conn = self._connection()
                with database.deadline(conn, self.seconds, what="the service database"), conn.cursor() as cur:
                    database.hand_over_sources(cur, instance_id=self.instance_id)
        except (database.DatabaseError, psycopg2.Error) as exc:
            logger.warning("could not hand the data sources over (the others take them when this instance "
                           "leaves): %s", exc)

    def _connection(self):
        if self._conn is None or self._conn.closed:
            self._conn = database.connect(self.dsn, application_name="alert-service-lease")
            self._conn.autocommit = True
            self._conn.cursor_factory = psycopg2.extras.RealDictCursor
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg2.Error:
                pass
            self._conn = None

    def _join(self) -> None:
        started = time.monotonic()
        with self._lock:
            conn = self._connection()
            with database.deadline(conn, self.seconds, what="the service database"), conn.cursor() as cur:
                database.join_cluster(cur, instance_id=self.instance_id, name=self.name, lease_seconds=self.seconds)
                database.publish(cur, message=f"joined {self.instance_id}")
        self._valid_until = started + self.seconds
        logger.info("instance %s (%s) joined; lease %.1f s", self.instance_id, self.name, self.seconds)

    def renew(self) -> None:
        """Renew the lease once (rejoining under a new id if it had run out)."""
        started = time.monotonic()
        with self._lock:
            conn = self._connection()
            try:
                with database.deadline(conn, self.seconds / 2, what="the service database"), conn.cursor() as cur:
                    renewed = database.renew_lease(cur, instance_id=self.instance_id, lease_seconds=self.seconds)
            except BaseException:
                self._close()
                raise
        if renewed:
            self._valid_until = started + self.seconds
            return
        old, self._valid_until = self.instance_id, 0.0
        logger.error("instance %s lost its lease (frozen or cut off for longer than %.1f s): giving up its work "
                     "and joining again", old, self.seconds)
        for handler in self._lost_handlers:
            try:
                handler(old)
            except Exception:
                logger.exception("a lost-lease handler failed")
        self.instance_id = uuid.uuid4()
        self._join()

    def _run(self) -> None:
        while not self._stop.wait(self.seconds / RENEWALS_PER_LEASE):
            try:
                self.renew()
            except (database.DatabaseError, psycopg2.Error, OSError) as exc:
                logger.warning("could not renew instance %s's lease (%.1f s left): %s", self.instance_id,
                               max(self._valid_until - time.monotonic(), 0.0), exc)
            except Exception:
                logger.exception("lease renewal failed")


class Membership:
    """Which data sources this instance owns. A background thread looks at the live instances and the owners a
    quarter lease apart (at once when another instance joins, leaves or releases a source), takes the sources that
    belong here and nobody live holds, and gives up those that belong elsewhere. It also hands on the messages
    instances send each other (an alert changed, a data source changed, run an alert now)."""

    def __init__(self, pool: database.Pool, lease: Lease, *,
                 on_acquire: Callable[[UUID, int, bool], None], on_release: Callable[[UUID, float], None],
                 on_message: Callable[[str, list[str]], None]) -> None:
        self.pool = pool
        self.lease = lease
        self._on_acquire, self._on_release, self._on_message = on_acquire, on_release, on_message
        self._owned: dict[UUID, int] = {}
        self._owned_lock = threading.Lock()
        self._take_lock = threading.Lock()
        self._view: dict = {"instances": [], "sources": {}}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._messages: queue.SimpleQueue = queue.SimpleQueue()
        self._dropped = threading.Event()  # the lease was lost: drop every source before anything else
        self._leaving: set[UUID] = set()  # instances that handed their sources over and are stopping
        lease.on_lost(self._lease_lost)

    @property
    def instance_id(self) -> UUID:
        """This instance's current id."""
        return self.lease.instance_id

    def holds(self, source_id: UUID) -> int | None:
        """The epoch this instance holds a data source under, or None (not owned, or the lease is in doubt)."""
        if not self.lease.valid():
            return None
        with self._owned_lock:
            return self._owned.get(source_id)

    def owned(self) -> dict[UUID, int]:
        """Every data source held now, with its epoch."""
        if not self.lease.valid():
            return {}
        with self._owned_lock:
            return dict(self._owned)

    def start(self) -> None:
        """Take this instance's share of the data sources now (their work starts before this returns), then keep
        the share right in the background."""
        self._rebalance(starting=True)
        for target, name in ((self._run, "membership"), (self._listen, "cluster-listen"),
                             (self._apply_messages, "cluster-apply")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop looking (the caller then leaves through the lease, which releases every source in one statement)."""
        self._stop.set()
        self._wake.set()
        self._messages.put(None)
        for thread in self._threads:
            thread.join(5)
        with self._owned_lock:
            self._owned.clear()

    def publish(self, kind: str, ids: list) -> None:
        """Tell the other instances (at once; they also find out at their next resync): `alerts`, `source`, `run`."""
        try:
            with self.pool.transaction() as cur:
                for message in messages(kind, str(self.instance_id), ids):
                    database.publish(cur, message=message)
        except database.DatabaseError as exc:
            logger.warning("could not tell the other instances about %s %s: %s", kind, ids, exc)

    def status(self) -> dict:
        """This instance, what it owns, and the other live instances with what they own (for /health)."""
        view = self._view
        me = self.instance_id
        owners: dict[UUID, list[str]] = {}
        for source_id, (owner, _) in view["sources"].items():
            if owner is not None:
                owners.setdefault(owner, []).append(str(source_id))
        return {
            "instance": str(me), "name": self.lease.name, "lease_valid": self.lease.valid(),
            "owns": sorted(str(s) for s in self.owned()),
            "peers": [{"instance": str(row["id"]), "name": row["name"], "started_at": row["started_at"].isoformat(),
                       "owns": sorted(owners.get(row["id"], []))}
                      for row in view["instances"] if row["id"] != me],
        }

    # --- the background threads ------------------------------------------------------------------------------

    def _lease_lost(self, old_id: UUID) -> None:
        with self._owned_lock:
            lost = list(self._owned)
            self._owned.clear()
        for source_id in lost:
            self._release_work(source_id, wait=0.0)
        self._wake.set()

    def _run(self) -> None:
        interval = self.lease.seconds / RENEWALS_PER_LEASE
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._rebalance()
            except (database.DatabaseError, psycopg2.Error) as exc:
                logger.warning("could not look at the data sources' owners: %s", exc)
            except Exception:
                logger.exception("ownership check failed")

    def _rebalance(self, starting: bool = False) -> None:
        if not self.lease.valid():
            return
        me = self.instance_id
        with self.pool.transaction() as cur:
            view = database.cluster_view(cur)
        self._view = view
        instances = self._sharing(view)
        if me not in instances:
            return  # the lease ran out after the check above: the lease thread rejoins
        with self._owned_lock:
            owned = set(self._owned)
        take, give = plan_ownership(me=me, instances=instances, sources=view["sources"], owned=owned)
        for source_id in give:
            self._give(source_id, me)
        for source_id in take:
            if self._stop.is_set() or not self.lease.valid():
                return
            self._take(source_id, me, starting)

    def _sharing(self, view: dict) -> list[UUID]:
        """The live instances the data sources are shared out over: not those stopping."""
        live = [row["id"] for row in view["instances"]]
        with self._owned_lock:  # the listener thread adds to it
            self._leaving &= set(live)
            return [i for i in live if i not in self._leaving]

    def claim(self, source_id: UUID) -> bool:
        """Take a data source now if it belongs here and no live instance holds it, with its work started before
        this returns (a new data source's first alert gets its trigger before the API answers); True when this
        instance holds it."""
        if self.holds(source_id) is not None:
            return True
        if not self.lease.valid():
            return False
        me = self.instance_id
        with self.pool.transaction() as cur:
            view = database.cluster_view(cur)
        if source_id not in view["sources"]:
            return False
        take, _ = plan_ownership(me=me, instances=self._sharing(view),
                                 sources={source_id: view["sources"][source_id]}, owned=set())
        return bool(take) and self._take(source_id, me, True)

    def _take(self, source_id: UUID, me: UUID, starting: bool) -> bool:
        with self._take_lock:  # the background look and claim() must not both start the same source's work
            if source_id in self._owned:
                return True
            with self.pool.transaction() as cur:
                epoch = database.take_source(cur, data_source_id=source_id, instance_id=me)
            if epoch is None:
                return False
            with self._owned_lock:
                self._owned[source_id] = epoch
        logger.info("instance %s now owns data source %s (epoch %d)", me, source_id, epoch)
        try:
            self._on_acquire(source_id, epoch, starting)
        except Exception:
            logger.exception("starting the work of data source %s failed", source_id)
        return True

    def _give(self, source_id: UUID, me: UUID) -> None:
        with self._owned_lock:
            self._owned.pop(source_id, None)
        self._release_work(source_id, wait=RELEASE_WAIT_SECONDS)
        try:
            with self.pool.transaction() as cur:
                database.release_source(cur, data_source_id=source_id, instance_id=me)
        except database.DatabaseError as exc:
            # Not released: the others take it when this lease runs out; nothing of ours is stored meanwhile.
            logger.warning("could not release data source %s: %s", source_id, exc)
        logger.info("instance %s gave up data source %s", me, source_id)

    def _release_work(self, source_id: UUID, *, wait: float) -> None:
        try:
            self._on_release(source_id, wait)
        except Exception:
            logger.exception("stopping the work of data source %s failed", source_id)

    def _listen(self) -> None:
        """Messages from the other instances; after a reconnect (messages may have been missed), a resync."""
        backoff, first = 0.2, True
        while not self._stop.is_set():
            conn = None
            try:
                conn = database.open_listener(self.lease.dsn, database.CLUSTER_CHANNEL,
                                              application_name="alert-service-cluster")
                backoff = 0.2
                if not first:
                    self._messages.put(("resync", []))
                first = False
                last = time.monotonic()
                while not self._stop.is_set():
                    if select.select([conn], [], [], 0.5)[0]:
                        conn.poll()
                    elif time.monotonic() - last > RESYNC_SECONDS:
                        database.listener_ping(conn)
                        self._messages.put(("resync", []))
                        last = time.monotonic()
                    for note in conn.notifies:
                        self._dispatch(note.payload)
                    conn.notifies.clear()
            except (psycopg2.Error, database.DatabaseError, OSError) as exc:
                logger.warning("cluster listener lost: %s; retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except psycopg2.Error:
                        pass

    def _dispatch(self, payload: str) -> None:
        kind, _, rest = payload.partition(" ")
        if kind == "leaving":
            try:
                leaving = UUID(rest)
            except ValueError:
                return
            with self._owned_lock:
                self._leaving.add(leaving)
        if kind in ("joined", "left", "released", "leaving"):
            self._wake.set()
            return
        sender, _, ids = rest.partition(" ")
        if sender != str(self.instance_id):
            self._messages.put((kind, ids.split()))

    def _apply_messages(self) -> None:
        """Messages are applied one at a time, in order, off the listener's thread (applying one can take a while:
        a trigger to install on a slow data source)."""
        while True:
            message = self._messages.get()
            if message is None:
                return
            try:
                self._on_message(*message)
            except Exception:
                logger.exception("applying the cluster message %s failed", message[0])
