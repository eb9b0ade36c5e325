"""Learning through the whole loop on a real broker: two kinds of users, a different coupon
is clearly best for each; after a bounded number of rounds the deciders' greedy choice (the
argmax of the Q-values they log) is right for both. This asserts learning, not speed."""
from __future__ import annotations


import numpy as np
import orjson
import pytest

from streamagent.core.catalog import load_catalog
from streamagent.units import HOUR_MS
from tests.conftest import topic_env
from tests.integration.helpers import TopicReader, WorkerProcess, event, produce

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

T0 = 1_767_225_600_000
CAT = load_catalog()
BEST = {"mobile": "amt5_min30", "desktop": "freeship"}  # each kind buys only with its coupon


def test_greedy_choice_becomes_right_for_both_kinds_of_user(kafka, tmp_path, run_id):
    env = topic_env("g" + run_id, kafka, tmp_path,
                    STREAMAGENT_GAMMA="0", STREAMAGENT_EPSILON_START="0.6",
                    STREAMAGENT_EPSILON_END="0.6", STREAMAGENT_ATTRIBUTION_WINDOW_HOURS="1",
                    STREAMAGENT_ALLOWED_LATENESS_MINUTES="1", STREAMAGENT_LEARNING_STARTS="64",
                    STREAMAGENT_BATCH_SIZE="32", STREAMAGENT_LEARNING_RATE="0.003",
                    STREAMAGENT_TRAIN_EVERY="1", STREAMAGENT_SNAPSHOT_EVERY_UPDATES="50",
                    STREAMAGENT_SNAPSHOT_INTERVAL_S="2", STREAMAGENT_CAP_MIN_GAP_HOURS="0",
                    STREAMAGENT_CAP_MAX_COUPONS="1000", STREAMAGENT_BUDGET_PER_PERIOD="1000000",
                    STREAMAGENT_TRANSITION_HORIZON_DAYS="1")
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    learner = WorkerProcess(env, tmp_path / "learner.log", command="learner",
                            ready_marker=b"learner: model v").start()
    reader = TopicReader(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"])
    users = {f"g-{i}": ("mobile" if i % 2 else "desktop") for i in range(40)}
    good = {}
    try:
        for rnd in range(60):
            ts = T0 + rnd * 2 * HOUR_MS
            produce(kafka, env["STREAMAGENT_TOPIC_USER_EVENTS"],
                    [event(f"{u}-{rnd}", u, "session_start", ts, device=d) for u, d in users.items()])
            decisions = reader.read(len(users))
            assert len(decisions) == len(users), worker.tail()
            convs = []
            for d in decisions:
                if d["action"] == BEST[users[d["user_id"]]]:
                    convs.append((d["user_id"].encode(), orjson.dumps({
                        "order_id": f"o-{d['decision_id']}", "user_id": d["user_id"],
                        "ts": d["ts"] + 600_000, "amount": 100.0,
                        "decision_id": d["decision_id"]})))
            produce(kafka, env["STREAMAGENT_TOPIC_CONVERSIONS"], convs)
            # the greedy action is the argmax of the logged Q-values (all actions are allowed)
            for kind in BEST:
                mine = [d for d in decisions if users[d["user_id"]] == kind]
                right = sum(CAT.actions[int(np.argmax(d["q_values"]))] == BEST[kind] for d in mine)
                good[kind] = right / len(mine)
            version = max(d["policy_version"] for d in decisions)
            print(f"round {rnd}: model v{version}, greedy right {good}")
            if version >= 1 and all(v >= 0.9 for v in good.values()):
                break
        else:
            pytest.fail(f"not learned after 60 rounds: {good}\n{learner.tail(20)}")
    finally:
        reader.close()
        learner.stop()
        worker.stop()
    assert all(v >= 0.9 for v in good.values()), good
