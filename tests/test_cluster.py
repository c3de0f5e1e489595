"""Several instances on one service database, in one process: who owns which data source, the fence on a store,
the outbox's idempotency keys, Message-IDs, and a WhatsApp send interrupted by a crash. (The same with real
processes killed, frozen and stopped: test_high_availability.py.)"""

from __future__ import annotations

import threading
import time
import uuid

import psycopg2
import psycopg2.extras
import pytest

import database
from cluster import Lease, plan_ownership, preferred_owner
from evaluation import Evaluator
from notification import Dispatcher, WhatsAppChannel, body_digest, group_claimed, outbox_rows
from tests.conftest import (Service, _new_database, create_orders_table, data_source_parts, drop_database, dsn_with,
                            eventually, insert_orders, placeholder_alert)


def test_every_instance_computes_the_same_owner_and_a_joining_instance_takes_only_its_share():
    sources = [uuid.uuid4() for _ in range(300)]
    two = [uuid.uuid4(), uuid.uuid4()]
    three = [*two, uuid.uuid4()]
    before = {s: preferred_owner(s, two) for s in sources}
    after = {s: preferred_owner(s, list(reversed(three))) for s in sources}
    moved = [s for s in sources if before[s] != after[s]]
    assert all(after[s] == three[2] for s in moved), "a source moved between two instances that both stayed"
    assert 60 <= len(moved) <= 140, len(moved)  # about a third
    assert {after[s] for s in sources} == set(three)
    assert preferred_owner(sources[0], []) is None


def test_ownership_is_taken_only_from_no_one_or_the_dead_and_given_up_when_it_belongs_elsewhere():
    me, other, dead = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    mine = next(s for s in iter(uuid.uuid4, None) if preferred_owner(s, [me, other]) == me)
    theirs = next(s for s in iter(uuid.uuid4, None) if preferred_owner(s, [me, other]) == other)
    instances = [me, other]
    assert plan_ownership(me=me, instances=instances, sources={mine: (None, 0)}, owned=set()) == ([mine], [])
    assert plan_ownership(me=me, instances=instances, sources={mine: (dead, 4)}, owned=set()) == ([mine], [])
    # A live instance holds it (it is giving it up): wait for it.
    assert plan_ownership(me=me, instances=instances, sources={mine: (other, 4)}, owned=set()) == ([], [])
    assert plan_ownership(me=me, instances=instances, sources={theirs: (None, 0)}, owned=set()) == ([], [])
    assert plan_ownership(me=me, instances=instances, sources={theirs: (me, 2)}, owned={theirs}) == ([], [theirs])
    # Someone else holds what this instance thinks it owns (its lease ran out meanwhile): give it up.
    assert plan_ownership(me=me, instances=instances, sources={mine: (other, 5)}, owned={mine}) == ([], [mine])
    gone = uuid.uuid4()
    assert plan_ownership(me=me, instances=instances, sources={}, owned={gone}) == ([], [gone])


@pytest.fixture
def source_dsns(pg_admin_dsn):
    names = [_new_database(pg_admin_dsn) for _ in range(4)]
    yield [dsn_with(pg_admin_dsn, dbname=name) for name in names]
    for name in names:
        drop_database(pg_admin_dsn, name)


def owners(service: Service) -> dict[str, str]:
    rows = service.sql("SELECT data_source_id, owner FROM source_owner WHERE owner IS NOT NULL")
    return {str(r["data_source_id"]): str(r["owner"]) for r in rows}


def test_two_instances_share_the_data_sources_and_the_survivor_takes_over_when_one_stops(
        settings, smtp_server, source_dsns):
    first = Service(settings.model_copy(update={"instance_name": "first"})).start()
    second = None
    try:
        sources = []
        for number, dsn in enumerate(source_dsns):
            create_orders_table(dsn)
            created = first.client.post("/data-sources/", json={"name": f"shop{number}", "allow_privileged_role": True,
                                                                  **data_source_parts(dsn)})
            assert created.status_code == 201, created.text
            sources.append(created.json()["id"])
        second = Service(settings.model_copy(update={"instance_name": "second"})).start()
        members = [first.services.membership.instance_id, second.services.membership.instance_id]
        every = [r["id"] for r in first.sql("SELECT id FROM data_source")]
        while len({preferred_owner(s, members) for s in every}) < 2:
            # Placement is by hashing: idle data sources are added until it gives each instance one.
            padding = first.client.post("/data-sources/", json={
                "name": f"idle{len(every)}", "allow_privileged_role": True, **data_source_parts(source_dsns[0])})
            assert padding.status_code == 201, padding.text
            every.append(uuid.UUID(padding.json()["id"]))
        for number, source_id in enumerate(sources):
            # Created on either instance: the owner installs the trigger and evaluates.
            (first if number % 2 else second).create_alert(
                name=f"orders {number}", data_source_id=source_id, notification_channels={"email": ["ops@example.com"]})
        ids = {str(first.services.membership.instance_id), str(second.services.membership.instance_id)}
        eventually(lambda: set(sources) <= set(owners(first)) and set(owners(first).values()) == ids, timeout=10,
                   message="the data sources spread over both instances")
        def health_agrees():
            health = first.client.get("/health").json()["cluster"]
            return ([p["name"] for p in health["peers"]] == ["second"]
                    and sorted(health["owns"] + health["peers"][0]["owns"]) == sorted(owners(first)) and health)
        health = eventually(health_agrees, timeout=5, message="/health to show both instances and what they own")
        assert health["name"] == "first" and health["owns"] and health["peers"][0]["owns"]

        smtp_server.wait_for(4, timeout=20)  # each alert's initial report
        for number, dsn in enumerate(source_dsns):
            insert_orders(dsn, [f"ORD-{number}-A"])
        mails = smtp_server.wait_for(8, timeout=20)

        leaving = str(first.services.membership.instance_id)
        handed = [s for s, o in owners(first).items() if o == leaving]
        stopped_at = time.monotonic()
        first.stop()
        first = None
        survivor = str(second.services.membership.instance_id)
        eventually(lambda: all(owners(second).get(s) == survivor for s in map(str, every)), timeout=5,
                   message="the survivor to own every data source")
        taken_in = time.monotonic() - stopped_at
        assert taken_in < 5, taken_in
        for number, dsn in enumerate(source_dsns):
            insert_orders(dsn, [f"ORD-{number}-B"])
        mails = smtp_server.wait_for(12, timeout=20)
        time.sleep(1)
        texts = [m.message.get_body(("plain",)).get_content() for m in smtp_server.messages]
        for number in range(len(source_dsns)):
            for suffix in "AB":
                assert sum(f"ORD-{number}-{suffix}" in text for text in texts) == 1, (number, suffix, texts)
        assert len(smtp_server.messages) == 12, [m.message["Subject"] for m in mails]
        assert handed, "the stopped instance owned nothing: the hand-over was not exercised"
    finally:
        for service in (first, second):
            if service is not None:
                service.stop()


def test_an_instance_that_lost_its_data_source_cannot_store_an_evaluation(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(notification_channels={"email": ["ops@example.com"]})
    smtp_server.wait_for(1)
    service.wait_idle()
    membership = service.services.membership
    source_id = uuid.UUID(alert["data_source_id"])
    stale = (membership.instance_id, {source_id: membership.holds(source_id)})
    # Another instance takes the source over, as it would from an instance frozen past its lease.
    other = uuid.uuid4()
    service.sql("INSERT INTO service_instance (id, name, expires_at) VALUES (%s, 'other', now() + interval '1 hour')",
                (str(other),))
    service.sql("UPDATE source_owner SET owner = %s, epoch = epoch + 1 WHERE data_source_id = %s",
                (str(other), str(source_id)))
    before = service.sql("SELECT evaluated_at FROM alert_state")[0]["evaluated_at"]
    insert_orders(db_dsn, ["ORD-STALE"])
    services = service.services
    evaluator = Evaluator(services.pool, services.settings, sources=services.sources, fence=lambda: stale)
    outcomes = evaluator.evaluate([(uuid.UUID(alert["id"]), "manual")])
    assert outcomes[uuid.UUID(alert["id"])].outcome is None
    assert service.sql("SELECT evaluated_at FROM alert_state")[0]["evaluated_at"] == before
    assert service.sql("SELECT count(*) AS n FROM notification")[0]["n"] == 1
    assert service.sql("SELECT count(*) AS n FROM incident")[0]["n"] == 0
    # Under the epoch it holds, the same evaluation is stored.
    owner = service.sql("SELECT epoch FROM source_owner WHERE data_source_id = %s", (str(source_id),))[0]["epoch"]
    current = Evaluator(services.pool, services.settings, sources=services.sources,
                        fence=lambda: (other, {source_id: owner}))
    assert current.evaluate([(uuid.UUID(alert["id"]), "manual")])[uuid.UUID(alert["id"])].outcome == "triggered"


def test_the_same_decision_queued_twice_is_in_the_outbox_once(service, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(notification_channels={"email": ["a@example.com", "b@example.com"]}, schedule="interval:1h")
    service.wait_idle()
    from notification import Rendered, Text

    rendered = Rendered(subject="s", text="t", html="<p>t</p>",
                        texts={"email": Text(subject="s", body="t", html="<p>t</p>")})
    rows = outbox_rows(rendered=rendered, channels={"email": ["a@example.com", "b@example.com"]},
                       alert_id=alert["id"], incident_id=None, kind="incident", decision_key="decision-1")
    assert len({r["idempotency_key"] for r in rows}) == 2
    with service.services.pool.transaction() as cur:
        before = service.sql("SELECT count(*) AS n FROM notification")[0]["n"]
        assert database.insert_notifications(cur, notifications=rows) == 2
        assert database.insert_notifications(cur, notifications=rows) == 0
    assert service.sql("SELECT count(*) AS n FROM notification")[0]["n"] == before + 2


def test_an_email_carries_a_message_id_derived_from_the_notification_it_carries(service, smtp_server, db_dsn):
    create_orders_table(db_dsn)
    service.create_alert(notification_channels={"email": ["ops@example.com"]})
    mail = smtp_server.wait_for(1)[0]
    row = eventually(lambda: service.sql("SELECT id FROM notification WHERE status = 'SUCCESS'"))[0]
    assert mail.message["Message-ID"] == f"<notification-{row['id']}@example.com>"
    assert row["id"] and service.sql("SELECT idempotency_key FROM notification")[0]["idempotency_key"]


def queue_interrupted_whatsapp(pool, body: str) -> uuid.UUID:
    """A WhatsApp outbox row whose send began under an instance that then died (its claim lapsed)."""
    alert_id = placeholder_alert(pool)
    with pool.transaction() as cur:
        cur.execute("INSERT INTO notification (alert_config_id, kind, channel, recipient, body, attempts, "
                    "claimed_by, claimed_until, send_started_at, send_digest) "
                    "VALUES (%s, 'incident', 'whatsapp', '+14155550123', %s, 1, %s, now() - interval '1 second', "
                    "now() - interval '5 seconds', %s) RETURNING id",
                    (alert_id, body, str(uuid.uuid4()), body_digest(body)))
        return cur.fetchone()["id"]


def test_a_whatsapp_message_twilio_accepted_before_its_sender_died_is_not_sent_again(
        settings, db_dsn, twilio_server):
    pool = database.service_pool(db_dsn, size=4)
    body = "*[HIGH] Order Monitor: 1 new row*"
    sid = WhatsAppChannel(settings).send(recipient="+14155550123", subject=None, body=body, html_body=None)
    notification_id = queue_interrupted_whatsapp(pool, body)
    dispatcher = Dispatcher(pool, settings)
    dispatcher.start()
    try:
        row = eventually(lambda: [r for r in _rows(pool) if r["status"] == "SUCCESS"], timeout=10)[0]
        assert row["id"] == notification_id and row["provider_message_id"] == sid
        assert len(twilio_server.delivered) == 1 and twilio_server.lists >= 1
    finally:
        dispatcher.stop()
        pool.close()


def test_a_whatsapp_message_twilio_never_received_is_sent_once_after_its_sender_died(settings, db_dsn, twilio_server):
    pool = database.service_pool(db_dsn, size=4)
    queue_interrupted_whatsapp(pool, "*[HIGH] Order Monitor: 2 new rows*")
    dispatcher = Dispatcher(pool, settings)
    dispatcher.start()
    try:
        eventually(lambda: [r for r in _rows(pool) if r["status"] == "SUCCESS"], timeout=10)
        time.sleep(0.5)
        assert [r.body for r in twilio_server.delivered] == ["*[HIGH] Order Monitor: 2 new rows*"]
        assert twilio_server.lists == 1
    finally:
        dispatcher.stop()
        pool.close()


def test_claims_of_an_instance_whose_lease_ran_out_are_taken_at_once(settings, db_dsn, smtp_server):
    pool = database.service_pool(db_dsn, size=4)
    frozen = uuid.uuid4()
    alert_id = placeholder_alert(pool)
    with pool.transaction() as cur:
        cur.execute("INSERT INTO service_instance (id, name, expires_at) VALUES (%s, 'frozen', "
                    "clock_timestamp() - interval '1 second')", (str(frozen),))
        # Claimed for another 10 minutes, by an instance that stopped renewing its lease.
        cur.execute("INSERT INTO notification (alert_config_id, kind, channel, recipient, subject, body, attempts, "
                    "claimed_by, claimed_until) VALUES (%s, 'incident', 'email', 'ops@example.com', 'held', 'b', 1, "
                    "%s, now() + interval '10 minutes')", (alert_id, str(frozen)))
    dispatcher = Dispatcher(pool, settings)
    dispatcher.start()
    try:
        assert smtp_server.wait_for(1, timeout=10)[0].message["Subject"] == "held"
    finally:
        dispatcher.stop()
        pool.close()


def _rows(pool) -> list[dict]:
    with pool.transaction() as cur:
        cur.execute("SELECT * FROM notification ORDER BY created_at, seq")
        return cur.fetchall()


def test_rows_of_an_interrupted_email_go_again_alone_so_one_message_id_never_carries_other_rows(
        settings, db_dsn, smtp_server):
    pool = database.service_pool(db_dsn, size=4)
    alert_id = placeholder_alert(pool)
    with pool.transaction() as cur:
        # A sender claimed this row and began its send, then died: the email may have reached the server.
        cur.execute("INSERT INTO notification (alert_config_id, kind, channel, recipient, subject, body, attempts, "
                    "claimed_by, claimed_until, send_started_at) VALUES (%s, 'incident', 'email', 'ops@example.com', "
                    "'first', 'row one', 1, %s, now() - interval '1 second', now() - interval '5 seconds') "
                    "RETURNING id", (alert_id, str(uuid.uuid4())))
        interrupted = cur.fetchone()["id"]
    with pool.transaction() as cur:  # queued after it, for the same alert and recipient
        cur.execute("INSERT INTO notification (alert_config_id, kind, channel, recipient, subject, body) "
                    "VALUES (%s, 'incident', 'email', 'ops@example.com', 'second', 'row two') RETURNING id",
                    (alert_id,))
        newer = cur.fetchone()["id"]
    dispatcher = Dispatcher(pool, settings)
    dispatcher.start()
    try:
        mails = smtp_server.wait_for(2, timeout=10)
        time.sleep(0.3)
        assert [(m.message["Message-ID"], m.message["Subject"]) for m in smtp_server.messages] == [
            (f"<notification-{interrupted}@example.com>", "first"), (f"<notification-{newer}@example.com>", "second")]
        assert "row two" not in mails[0].message.get_body(("plain",)).get_content()
    finally:
        dispatcher.stop()
        pool.close()


# Bug: a store that froze inside its transaction (SIGSTOP after the fence's FOR SHARE) kept the owner row locked,
# so the instance taking the data source over waited on that lock for as long as the freeze lasted.
def test_an_owner_frozen_inside_its_store_does_not_hold_up_the_takeover(service, settings, db_dsn):
    create_orders_table(db_dsn)
    alert = service.create_alert(notification_channels={"email": ["ops@example.com"]})
    service.wait_idle()
    source_id = alert["data_source_id"]
    frozen = uuid.uuid4()
    service.sql("INSERT INTO service_instance (id, name, expires_at) VALUES (%s, 'frozen', "
                "clock_timestamp() + make_interval(secs => %s))", (str(frozen), settings.instance_lease_seconds))
    epoch = service.sql("UPDATE source_owner SET owner = %s, epoch = epoch + 1 WHERE data_source_id = %s "
                        "RETURNING epoch", (str(frozen), source_id))[0]["epoch"]
    # The frozen instance's store: the fence passed, then the process stopped before its commit.
    store = database.connect(database.service_dsn(db_dsn))
    try:
        with store.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            assert database.held_sources(cur, instance_id=frozen, epochs={uuid.UUID(source_id): epoch})
        frozen_at = time.monotonic()
        survivor = str(service.services.membership.instance_id)
        eventually(lambda: owners(service).get(source_id) == survivor, timeout=settings.instance_lease_seconds + 2,
                   message="the live instance to take the data source over")
        assert time.monotonic() - frozen_at < 5
        with pytest.raises(psycopg2.Error):  # the frozen store wakes too late to commit
            store.commit()
    finally:
        store.close()


# Bug: a sender checked only that its lease was valid, not that it was still the lease it claimed under, so a
# process that froze between a claim and its send, then rejoined under a new id, sent an email another instance
# had already taken over and sent.
def test_a_sender_that_rejoined_after_a_freeze_does_not_send_what_it_claimed_before(settings, db_dsn, smtp_server):
    pool = database.service_pool(db_dsn, size=4)
    lease = Lease(pool.dsn, settings)
    stale = Dispatcher(pool, settings, lease=lease)
    other = Dispatcher(pool, settings)
    try:
        lease.start()
        alert_id = placeholder_alert(pool)
        with pool.transaction() as cur:
            cur.execute("INSERT INTO notification (alert_config_id, kind, channel, recipient, subject, body) "
                        "VALUES (%s, 'incident', 'email', 'ops@example.com', 'once', 'b')", (alert_id,))
        claimed_as = lease.instance_id
        with pool.transaction() as cur:
            [group] = group_claimed(database.claim_due_notifications(
                cur, channel="email", limit=1, lease_seconds=stale.lease_seconds("email"), claimant=claimed_as))
        # The process froze here, past its lease: the database sees the lease run out ...
        pool_sql(pool, "UPDATE service_instance SET expires_at = clock_timestamp() - interval '1 second' "
                       "WHERE id = %s", (str(claimed_as),))
        other.start()  # ... another instance takes the claim over and sends it,
        assert smtp_server.wait_for(1, timeout=10)[0].message["Subject"] == "once"
        eventually(lambda: [r for r in _rows(pool) if r["status"] == "SUCCESS"], timeout=5)
        # ... and the frozen process wakes: its lease thread rejoins first, then its sender goes on with its claim.
        eventually(lambda: lease.instance_id != claimed_as and lease.valid(), timeout=5,
                   message="the woken instance to rejoin under a new id")
        stale._deliver(group, claimed_as)
        time.sleep(0.5)
        assert len(smtp_server.messages) == 1, [m.message["Subject"] for m in smtp_server.messages]
    finally:
        other.stop()
        lease.leave()
        pool.close()


def pool_sql(pool, statement: str, args=None) -> None:
    with pool.transaction() as cur:
        cur.execute(statement, args)


# Bug: an instance that gave a data source up but whose release did not reach the database (a connection lost at
# that moment) still owned it there without knowing it; the instance it belonged to waited on a live owner, and
# nobody evaluated the source again.
def test_a_data_source_whose_release_did_not_reach_the_database_is_released_again(settings, source_dsns):
    first = Service(settings.model_copy(update={"instance_name": "first"})).start()
    second = None
    try:
        sources = []
        for number, dsn in enumerate(source_dsns):
            created = first.client.post("/data-sources/", json={"name": f"shop{number}", "allow_privileged_role": True,
                                                                  **data_source_parts(dsn)})
            assert created.status_code == 201, created.text
            sources.append(created.json()["id"])
        second = Service(settings.model_copy(update={"instance_name": "second"})).start()
        here = str(second.services.membership.instance_id)
        members = [first.services.membership.instance_id, second.services.membership.instance_id]
        while not any(preferred_owner(uuid.UUID(s), members) == members[1] for s in sources):
            # Placement is by hashing: data sources are added until one belongs to the second instance.
            extra = first.client.post("/data-sources/", json={
                "name": f"extra{len(sources)}", "allow_privileged_role": True, **data_source_parts(source_dsns[0])})
            assert extra.status_code == 201, extra.text
            sources.append(extra.json()["id"])
        mine = eventually(lambda: [s for s, o in owners(first).items() if o == here and s in sources], timeout=10,
                          message="the second instance to take its share")
        # The row names the first instance, which does not hold it: the state a release that failed leaves.
        stale = str(first.services.membership.instance_id)
        first.sql("UPDATE source_owner SET owner = %s, epoch = epoch + 1 WHERE data_source_id = %s",
                  (stale, mine[0]))
        eventually(lambda: owners(first).get(mine[0]) == here, timeout=5,
                   message="the data source to go back to the instance it belongs to")
    finally:
        for service in (first, second):
            if service is not None:
                service.stop()


# Bug: the message telling the other instances which alerts changed named them all in one NOTIFY, whose payload
# PostgreSQL caps at 8,000 bytes: importing a few hundred alerts failed with a 500 after committing them, and not
# even the instance that imported them applied them.
def test_importing_hundreds_of_alerts_is_applied_at_once_and_told_to_the_other_instances(service, settings):
    other = Service(settings.model_copy(update={"instance_name": "other"})).start()
    try:
        text = "alerts:\n" + "".join(
            f"  - name: Count {n}\n    query: SELECT {n} AS n\n    schedule: interval:1h\n"
            "    notification_channels: {email: [ops@example.com]}\n" for n in range(300))
        response = service.client.post("/alert-configs/import", content=text.encode())
        assert response.status_code == 200, response.text
        assert service.services.scheduler.status()["active_alerts"] == 300
        # Told, not found at the next look for unannounced changes (30 s later).
        eventually(lambda: other.services.scheduler.status()["active_alerts"] == 300, timeout=5,
                   message="the other instance to apply the imported alerts")
    finally:
        other.stop()


# Bug: the look-up of an interrupted WhatsApp send took any message of the same text to the same number from the
# last minute for it, also one sent and recorded for an earlier notification: the interrupted one was recorded as
# sent and never reached anyone.
def test_an_interrupted_whatsapp_send_is_not_mistaken_for_an_earlier_message_of_the_same_text(
        settings, db_dsn, twilio_server):
    pool = database.service_pool(db_dsn, size=4)
    body = "*[HIGH] Disk almost full: FIRING*"
    earlier = WhatsAppChannel(settings).send(recipient="+14155550123", subject=None, body=body, html_body=None)
    interrupted = queue_interrupted_whatsapp(pool, body)
    pool_sql(pool, "INSERT INTO notification (alert_config_id, kind, channel, recipient, body, status, "
                   "provider_message_id, sent_at) SELECT alert_config_id, 'incident', 'whatsapp', recipient, body, "
                   "'SUCCESS', %s, now() - interval '20 seconds' FROM notification WHERE id = %s",
             (earlier, interrupted))
    dispatcher = Dispatcher(pool, settings)
    dispatcher.start()
    try:
        row = eventually(lambda: [r for r in _rows(pool) if r["id"] == interrupted and r["status"] == "SUCCESS"],
                         timeout=10)[0]
        assert row["provider_message_id"] != earlier
        assert [r.body for r in twilio_server.delivered] == [body, body]
    finally:
        dispatcher.stop()
        pool.close()


# Bug: a stopping instance released its data sources only after its sends had finished or timed out, so a hung SMTP
# server (or Twilio) held up the takeover of everything it evaluated by up to the stop's timeouts.
def test_a_stopping_instance_hands_its_data_sources_over_before_waiting_for_its_sends(
        settings, smtp_server, source_dsns):
    # Sends hang for up to 10 s: longer than the stop waits for them.
    services = [Service(settings.model_copy(update={"instance_name": name, "smtp_timeout_seconds": 10})).start()
                for name in ("first", "second")]
    stopped = []
    try:
        smtp_server.hold()
        sources = []
        for number, dsn in enumerate(source_dsns):
            create_orders_table(dsn)
            created = services[0].client.post("/data-sources/", json={
                "name": f"shop{number}", "allow_privileged_role": True, **data_source_parts(dsn)})
            assert created.status_code == 201, created.text
            sources.append(created.json()["id"])
            services[0].create_alert(name=f"orders {number}", data_source_id=sources[-1], notification_channels={
                "email": [f"ops{n}@example.com" for n in range(3)]})
        ids = {str(s.services.membership.instance_id): s for s in services}
        eventually(lambda: set(sources) <= set(owners(services[0])), timeout=10, message="every data source owned")

        def sending() -> set[str]:
            return {str(r["claimed_by"]) for r in services[0].sql(
                "SELECT claimed_by FROM notification WHERE claimed_until > now() AND status IN ('PENDING', 'RETRY')")}
        eventually(lambda: sending() == set(ids), timeout=10, message="both instances to be sending (and hung)")
        leaving_id = next(i for i in ids if i in owners(services[0]).values())
        leaving = ids[leaving_id]
        survivor = next(s for s in services if s is not leaving)
        handed = [s for s, o in owners(survivor).items() if o == leaving_id]
        started = time.monotonic()
        stopper = threading.Thread(target=leaving.stop)
        stopper.start()
        here = str(survivor.services.membership.instance_id)
        eventually(lambda: all(owners(survivor).get(s) == here for s in handed), timeout=10,
                   message="the survivor to own what the stopping instance owned")
        taken_in = time.monotonic() - started
        smtp_server.release()
        stopper.join()
        stopped.append(leaving)
        assert taken_in < 2.0, taken_in
    finally:
        smtp_server.release()
        for service in services:
            if service not in stopped:
                service.stop()


# Bug: an evaluation asked for with POST /run that was still queued when its data source changed hands was dropped
# without telling the request waiting for it, which then hung until its timeout.
def test_a_run_queued_when_its_data_source_changes_hands_does_not_hang(settings, db_dsn):
    create_orders_table(db_dsn)
    service = Service(settings.model_copy(update={"workers_per_data_source": 1})).start()
    try:
        slow = service.create_alert(name="slow", query="SELECT pg_sleep(1.5)::text AS slept",
                                    notification_channels={"email": ["ops@example.com"]})
        queued = service.create_alert(name="queued", notification_channels={"email": ["ops@example.com"]})
        service.wait_idle()
        answered: dict[str, float] = {}

        def run(alert: dict) -> None:
            started = time.monotonic()
            assert service.client.post(f"/alert-configs/{alert['id']}/run").status_code == 200
            answered[alert["name"]] = time.monotonic() - started

        runs = [threading.Thread(target=run, args=(slow,))]
        runs[0].start()
        time.sleep(0.3)  # the slow run holds the data source's one worker; the next one waits behind it
        runs.append(threading.Thread(target=run, args=(queued,)))
        runs[1].start()
        time.sleep(0.1)
        # Another instance takes the data source over meanwhile.
        other = uuid.uuid4()
        service.sql("INSERT INTO service_instance (id, name, expires_at) VALUES (%s, 'other', "
                    "now() + interval '1 hour')", (str(other),))
        service.sql("UPDATE source_owner SET owner = %s, epoch = epoch + 1 WHERE data_source_id = %s",
                    (str(other), queued["data_source_id"]))
        for thread in runs:
            thread.join(20)
        assert answered.get("queued", 99) < 5, answered
    finally:
        service.stop()
