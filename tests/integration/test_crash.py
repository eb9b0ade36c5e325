"""A worker killed with SIGKILL mid-stream and restarted loses no decision and no reward, and
double-counts none: every decision ends with exactly one distinct reward record (a record may
be re-sent after the crash, identical, with the same decision_id; consumers dedupe by it)."""
from __future__ import annotations

import signal
import time

import orjson
import pytest

from streamagent.units import HOUR_MS
from tests.conftest import topic_env
from tests.integration.helpers import TopicReader, WorkerProcess, event, produce, read_json

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

T0 = 1_767_225_600_000


def test_sigkill_mid_stream_loses_and_double_counts_nothing(kafka, tmp_path, run_id):
    env = topic_env("k" + run_id, kafka, tmp_path, STREAMAGENT_ATTRIBUTION_WINDOW_HOURS="2",
                    STREAMAGENT_ALLOWED_LATENESS_MINUTES="1", STREAMAGENT_CAP_MIN_GAP_HOURS="0",
                    STREAMAGENT_CAP_MAX_COUPONS="1000", STREAMAGENT_BUDGET_PER_PERIOD="1000000",
                    STREAMAGENT_COMMIT_INTERVAL_S="5", STREAMAGENT_LOG_LEVEL="info")
    users = [f"k-{i}" for i in range(150)]
    rounds, kill_round = 10, 5
    n_triggers = len(users) * (rounds + 1)
    w = WorkerProcess(env, tmp_path / "worker.log").start()
    reader = TopicReader(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"])
    try:
        for r in range(rounds + 1):
            ts = T0 + r * 3 * HOUR_MS if r < rounds else T0 + 100 * HOUR_MS  # the last closes all
            items = []
            for u in users:
                items.append(event(f"{u}-{r}", u, "session_start", ts))
                items.append(event(f"{u}-{r}-v", u, "page_view", ts + 1000, category="books"))
            produce(kafka, env["STREAMAGENT_TOPIC_USER_EVENTS"], items)
            if r == kill_round:
                # kill it while it is busy with this round, after some decisions
                got = reader.read(30)
                assert len(got) == 30
                w.proc.send_signal(signal.SIGKILL)
                w.proc.wait()
                w = WorkerProcess(env, tmp_path / "worker.log").start()
                # The restarted worker gets its partitions only once the broker has given up on
                # the killed member (its session timeout, up to a minute), and it re-sends the
                # decisions of the uncommitted batch (duplicates by design): read until the
                # round's triggers are in, past that.
                deadline = time.monotonic() + 180
                while (len({d["trigger_event_id"] for d in got}) < len(users)
                       and time.monotonic() < deadline):
                    got += reader.read(len(users), timeout=10)
            else:
                got = reader.read(len(users))
            assert len({d["trigger_event_id"] for d in got}) >= len(users) - 30, w.tail()
            if r == rounds:  # no orders any more: heartbeats move the conversions' event time on
                produce(kafka, env["STREAMAGENT_TOPIC_CONVERSIONS"], [
                    (u.encode(), orjson.dumps({"order_id": f"hb-{u}", "user_id": u, "ts": ts,
                                              "amount": 0.0, "heartbeat": True})) for u in users])
            if r < rounds:  # a third of the users buy half an hour after every session
                produce(kafka, env["STREAMAGENT_TOPIC_CONVERSIONS"], [
                    (u.encode(), orjson.dumps({"order_id": f"o-{u}-{r}", "user_id": u,
                                              "ts": ts + HOUR_MS // 2, "amount": 50.0}))
                    for u in users if int(u.split("-")[1]) % 3 == 0])
        log = read_json(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"], n_triggers, max_wait=120)
        rewards = read_json(kafka, env["STREAMAGENT_TOPIC_REWARDS"], len(users) * rounds,
                            max_wait=120)
    finally:
        reader.close()
        w.stop()

    by_trigger: dict[str, set] = {}
    docs: dict[str, dict] = {}
    for d in log:
        d.pop("_key")
        by_trigger.setdefault(d["trigger_event_id"], set()).add(d["decision_id"])
        assert docs.setdefault(d["decision_id"], d) == d, "a decision re-sent with other content"
    assert len(by_trigger) == n_triggers, "decisions lost"
    assert all(len(ids) == 1 for ids in by_trigger.values())
    closed = {d["decision_id"] for d in docs.values()
              if not d["trigger_event_id"].endswith(f"-{rounds}")}  # the last round stays open
    distinct: dict[str, dict] = {}
    for r in rewards:
        r.pop("_key")
        assert distinct.setdefault(r["decision_id"], r) == r, "two different rewards for one decision"
    missing = sorted(docs[d]["trigger_event_id"] for d in closed - set(distinct))
    assert not missing, f"{len(missing)} decisions without reward, e.g. {missing[:10]}"
    assert set(distinct) == closed
    for did, r in distinct.items():
        buyer = int(r["user_id"].split("-")[1]) % 3 == 0
        assert r["orders"] == (1 if buyer else 0), r
    print(f"{len(log) - n_triggers} decisions and {len(rewards) - len(distinct)} rewards were re-sent")
