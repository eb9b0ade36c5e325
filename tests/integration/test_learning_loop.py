"""Decisions + conversions -> rewards -> transitions -> learner -> new model -> deciders use it."""
from __future__ import annotations

import time
from collections import Counter

import orjson
import pytest

from streamagent.core.contracts import validator
from streamagent.units import HOUR_MS
from tests.conftest import topic_env
from tests.integration.helpers import WorkerProcess, event, produce, read_json

pytestmark = pytest.mark.kafka

T0 = 1_767_225_600_000

LOOP_SETTINGS = dict(
    STREAMAGENT_ATTRIBUTION_WINDOW_HOURS="2", STREAMAGENT_ALLOWED_LATENESS_MINUTES="1",
    STREAMAGENT_TRANSITION_HORIZON_DAYS="1", STREAMAGENT_LEARNING_STARTS="16",
    STREAMAGENT_BATCH_SIZE="16", STREAMAGENT_SNAPSHOT_EVERY_UPDATES="10",
    STREAMAGENT_SNAPSHOT_INTERVAL_S="1", STREAMAGENT_CAP_MIN_GAP_HOURS="0",
    STREAMAGENT_CAP_MAX_COUPONS="100", STREAMAGENT_BUDGET_PER_PERIOD="1000000",
    STREAMAGENT_LOG_LEVEL="info",
)


def test_rewards_transitions_and_hot_swapped_models_flow_through_kafka(kafka, tmp_path, run_id):
    env = topic_env("l" + run_id, kafka, tmp_path, **LOOP_SETTINGS)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    learner = WorkerProcess(env, tmp_path / "learner.log", command="learner",
                            ready_marker=b"learner: model v").start()
    users = [f"l-{i}" for i in range(30)]
    try:
        seen_new_version = False
        rounds = 0
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not seen_new_version:
            ts = T0 + rounds * 3 * HOUR_MS
            produce(kafka, env["STREAMAGENT_TOPIC_USER_EVENTS"],
                    [event(f"{u}-r{rounds}", u, "session_start", ts) for u in users])
            log = read_json(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"], len(users) * (rounds + 1))
            mine = [d for d in log if d["trigger_event_id"].endswith(f"-r{rounds}")]
            # half of the users buy 30 minutes after each decision, naming it
            convs = []
            for d in mine:
                if int(d["user_id"].split("-")[1]) % 2 == 0:
                    convs.append((d["user_id"].encode(), orjson.dumps({
                        "order_id": f"o-{d['decision_id']}", "user_id": d["user_id"],
                        "ts": d["ts"] + HOUR_MS // 2, "amount": 80.0, "decision_id": d["decision_id"]})))
            produce(kafka, env["STREAMAGENT_TOPIC_CONVERSIONS"], convs)
            seen_new_version = any(d["policy_version"] >= 1 for d in log)
            rounds += 1
        assert seen_new_version, f"no decision used a learned model\n{learner.tail()}\n{worker.tail()}"
    finally:
        learner.stop()
        worker.stop()

    decisions = read_json(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"], 1)
    rewards = read_json(kafka, env["STREAMAGENT_TOPIC_REWARDS"], 1)
    transitions = read_json(kafka, env["STREAMAGENT_TOPIC_TRANSITIONS"], 1)
    for name, docs in (("reward", rewards), ("transition", transitions)):
        check = validator(name)
        for d in docs:
            d.pop("_key")
            check(d)
    per_decision = Counter(r["decision_id"] for r in rewards)
    assert per_decision and max(per_decision.values()) == 1, "a decision got two rewards"
    assert set(per_decision) <= {d["decision_id"] for d in decisions}
    by_id = {d["decision_id"]: d for d in decisions}
    for r in rewards:  # even users bought 80 after every decision: profit = 0.3*80 - discount
        buyer = int(r["user_id"].split("-")[1]) % 2 == 0
        assert r["converted"] == buyer
        if buyer:
            assert r["reward"] == pytest.approx(24.0 - r["discount"])
            assert r["action_index"] == by_id[r["decision_id"]]["action_index"]
        else:
            assert r["reward"] == 0.0 and r["outcome"] == "default"
    linked = [t for t in transitions if not t["done"]]
    assert linked and all(t["dt_ms"] == 3 * HOUR_MS for t in linked)
    versions = [d["policy_version"] for d in sorted(decisions, key=lambda d: d["ts"])]
    assert versions == sorted(versions) or max(versions) >= 1
