"""The decide and join agents in processes of their own (STREAMAGENT_WORKER_ROLE), and a
deployment that moves from one all-in-one worker to them mid-stream: the join worker restores
the decisions still waiting for their window from the join-state changelog and continues from
the offsets the all-in-one worker committed, so every decision ends with exactly one reward,
none re-sent."""
from __future__ import annotations

import orjson
import pytest

from streamagent.units import HOUR_MS
from tests.conftest import topic_env
from tests.integration.helpers import TopicReader, WorkerProcess, event, produce, read_json

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

T0 = 1_767_225_600_000


def _round(kafka, env, users, r, ts, reader) -> list[dict]:
    produce(kafka, env["STREAMAGENT_TOPIC_USER_EVENTS"],
            [event(f"{u}-{r}", u, "session_start", ts) for u in users])
    got = reader.read(len(users), timeout=90)
    # a third of the users buy half an hour after the session
    produce(kafka, env["STREAMAGENT_TOPIC_CONVERSIONS"], [
        (u.encode(), orjson.dumps({"order_id": f"o-{u}-{r}", "user_id": u,
                                   "ts": ts + HOUR_MS // 2, "amount": 50.0}))
        for u in users if int(u.split("-")[1]) % 3 == 0])
    return got


def test_all_in_one_worker_then_decide_and_join_workers(kafka, tmp_path, run_id):
    env = topic_env("j" + run_id, kafka, tmp_path, STREAMAGENT_ATTRIBUTION_WINDOW_HOURS="2",
                    STREAMAGENT_ALLOWED_LATENESS_MINUTES="1", STREAMAGENT_CAP_MIN_GAP_HOURS="0",
                    STREAMAGENT_CAP_MAX_COUPONS="1000", STREAMAGENT_BUDGET_PER_PERIOD="1000000",
                    STREAMAGENT_COMMIT_INTERVAL_S="1")
    users = [f"j-{i}" for i in range(30)]
    reader = TopicReader(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"])
    rewards_reader = TopicReader(kafka, env["STREAMAGENT_TOPIC_REWARDS"])
    log: list[dict] = []
    try:
        w = WorkerProcess(env, tmp_path / "all.log").start()
        for r in (0, 1):  # round 1's decisions close round 0's windows (3 h later)
            log += _round(kafka, env, users, r, T0 + r * 3 * HOUR_MS, reader)
        early = rewards_reader.read(len(users), timeout=90)  # round 0's
        assert w.stop() == 0, w.tail()
        assert {x["decision_id"] for x in early} == {
            d["decision_id"] for d in log if d["trigger_event_id"].endswith("-0")}

        # the join worker on an empty disk: its state can only come from the changelog
        decide = WorkerProcess({**env, "STREAMAGENT_WORKER_ROLE": "decide"},
                               tmp_path / "decide.log").start()
        join = WorkerProcess({**env, "STREAMAGENT_WORKER_ROLE": "join",
                              "STREAMAGENT_DATA_DIR": str(tmp_path / "join-disk")},
                             tmp_path / "join.log").start()
        for r in (2, 3):
            log += _round(kafka, env, users, r, T0 + r * 3 * HOUR_MS, reader)
        # the last round's events move the decisions' event time on; heartbeats the orders'
        last = T0 + 100 * HOUR_MS
        produce(kafka, env["STREAMAGENT_TOPIC_USER_EVENTS"],
                [event(f"{u}-end", u, "session_start", last) for u in users])
        log += reader.read(len(users), timeout=90)
        produce(kafka, env["STREAMAGENT_TOPIC_CONVERSIONS"], [
            (u.encode(), orjson.dumps({"order_id": f"hb-{u}", "user_id": u, "ts": last,
                                       "amount": 0.0, "heartbeat": True})) for u in users])
        rewards = early + rewards_reader.read(3 * len(users), timeout=120)
        extra = rewards_reader.read(1, timeout=5)  # nothing more: no reward re-sent
        assert decide.stop() == 0, decide.tail()
        assert join.stop() == 0, join.tail()
    finally:
        reader.close()
        rewards_reader.close()

    assert not extra, f"a reward re-sent or unexpected: {extra[:3]}"
    decisions = {d["decision_id"]: d for d in log}
    assert len(decisions) == len(log) == 5 * len(users), "a decision lost or repeated"
    closed = {i for i, d in decisions.items() if not d["trigger_event_id"].endswith("-end")}
    ids = [x["decision_id"] for x in rewards]
    assert len(ids) == len(set(ids)), "two reward records for one decision"
    assert set(ids) == closed, (f"{len(closed - set(ids))} decisions without a reward, "
                                f"{len(set(ids) - closed)} unexpected")
    for x in rewards:
        buyer = int(x["user_id"].split("-")[1]) % 3 == 0
        assert x["orders"] == (1 if buyer else 0), x
    # round 1's windows were open at the split: the join worker closed them from the
    # state it restored (the orders joined before the split included)
    round1 = {i for i, d in decisions.items() if d["trigger_event_id"].endswith("-1")}
    assert round1 <= set(ids)
    assert b"starts where group" in (tmp_path / "join.log").read_bytes(), join.tail()


def test_offsets_are_copied_once_to_an_empty_group(kafka, run_id):
    from confluent_kafka import TopicPartition

    from streamagent.ops.kafka import make_consumer, seed_group_offsets
    from tests.integration.helpers import client

    from confluent_kafka.admin import NewTopic

    from streamagent.ops.kafka import make_admin

    topic = f"seed-{run_id}"
    admin = make_admin(client(kafka))
    for f in admin.create_topics([NewTopic(topic, num_partitions=1,
                                           replication_factor=1)]).values():
        f.result(30)
    produce(kafka, topic, [event(f"e{i}", "u", "page_view", T0 + i) for i in range(5)])
    src, dst = f"src-{run_id}", f"dst-{run_id}"
    c = make_consumer(client(kafka), group=src)
    c.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
    c.close()
    k = client(kafka)
    assert seed_group_offsets(k, src, dst, [topic]) == {(topic, 0): 3}
    # the group has its own offsets now: a second copy changes nothing
    c = make_consumer(k, group=src)
    c.commit(offsets=[TopicPartition(topic, 0, 5)], asynchronous=False)
    c.close()
    assert seed_group_offsets(k, src, dst, [topic]) == {}
    d = make_consumer(k, group=dst)
    try:
        [tp] = d.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        d.close()
    assert tp.offset == 3
    assert seed_group_offsets(k, f"none-{run_id}", f"dst2-{run_id}", [topic]) == {}
