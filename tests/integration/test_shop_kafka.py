"""The simulated shop through Kafka: its sessions are decided by a real worker, its users get
exactly the coupons of coupon-actions, their orders come back as rewards, a learner publishes
models that the worker uses; and `streamagent demo` runs the whole loop end to end."""
from __future__ import annotations

import pytest

from streamagent.core.catalog import load_catalog
from streamagent.sim.shop import Shop, scenario
from streamagent.ops.kafka import plaintext
from streamagent.sim.kafka_shop import KafkaShop, partition_keys
from tests.conftest import topic_env
from tests.integration.helpers import WorkerProcess, read_json

pytestmark = pytest.mark.kafka

SHOP_SETTINGS = dict(
    STREAMAGENT_ATTRIBUTION_WINDOW_HOURS="24", STREAMAGENT_ALLOWED_LATENESS_MINUTES="1",
    STREAMAGENT_TRANSITION_HORIZON_DAYS="3", STREAMAGENT_LEARNING_STARTS="32",
    STREAMAGENT_BATCH_SIZE="32", STREAMAGENT_SNAPSHOT_EVERY_UPDATES="20",
    STREAMAGENT_SNAPSHOT_INTERVAL_S="1", STREAMAGENT_CAP_MIN_GAP_HOURS="0",
    STREAMAGENT_CAP_MAX_COUPONS="100", STREAMAGENT_BUDGET_PER_PERIOD="1000000",
    STREAMAGENT_EPSILON_START="0.5",
)


def test_partition_keys_cover_every_partition():
    from aiokafka.partitioner import murmur2

    keys = partition_keys(6)
    assert [(murmur2(k.encode()) & 0x7FFFFFFF) % 6 for k in keys] == list(range(6))


def test_the_shop_plays_through_kafka(kafka, tmp_path, run_id):
    env = topic_env("s" + run_id, kafka, tmp_path, **SHOP_SETTINGS)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    learner = WorkerProcess(env, tmp_path / "learner.log", command="learner",
                            ready_marker=b"learner: model v").start()
    users, n_days = 40, 8
    shop = Shop(scenario("fatigue"), load_catalog(), users, seed=3)
    topics = {"user_events": env["STREAMAGENT_TOPIC_USER_EVENTS"],
              "conversions": env["STREAMAGENT_TOPIC_CONVERSIONS"],
              "coupon_actions": env["STREAMAGENT_TOPIC_COUPON_ACTIONS"],
              "decision_log": env["STREAMAGENT_TOPIC_DECISION_LOG"]}
    ks = KafkaShop(shop, plaintext(kafka), topics, n_partitions=2, decision_timeout_s=90)
    try:
        days = [ks.day(d) for d in range(n_days)]
        # the learner's first model needs the first days' rewards, and the shop plays days
        # faster than the learner trains (a fast machine played six more in 4 s, all before
        # the model arrived): wait for the worker to swap to a model, playing on a day at a
        # time (at most six more) to feed the learner, until the worker decides with one
        while max(max(d.policy_versions) for d in days) < 1 and len(days) < n_days + 6:
            worker.wait_for(b"now deciding with model v", timeout=20)
            days.append(ks.day(len(days)))
        n_days = len(days)
        # a decision's reward comes when the event-time watermark passes its 24 h window:
        # all decisions but those of the last two days are closed by now
        rewards = read_json(kafka, env["STREAMAGENT_TOPIC_REWARDS"], users * (n_days - 2),
                            max_wait=60)
        coupons = read_json(kafka, env["STREAMAGENT_TOPIC_COUPON_ACTIONS"],
                            sum(d.coupons for d in days), max_wait=30)
    finally:
        ks.close()
        worker.stop()
        learner.stop()
    assert all(d.events == 2 * users for d in days)
    # the shop applied exactly the coupons the agent sent (exploration at 0.5 sends many)
    assert len({c["decision_id"] for c in coupons}) == sum(d.coupons for d in days) > 0
    by_id = {r["decision_id"]: r for r in rewards}
    assert len(by_id) >= users * (n_days - 2)
    converted = [r for r in by_id.values() if r["converted"]]
    assert 0 < len(converted) <= sum(d.orders for d in days)
    # the reward of a converted decision is the order's profit: margin * amount - discount
    for r in converted:
        assert r["reward"] == pytest.approx(0.3 * r["amount"] - r["discount"], abs=1e-6)
    # the learner's models reached the worker while the shop ran
    assert max(max(d.policy_versions) for d in days) >= 1, learner.tail()
    # a clean stop gives the learner lock up (no "lost", no alarm), and the log ends clean
    # (no triton "nanobind: leaked" lines at exit)
    log_text = learner.log_path.read_text(errors="replace")
    assert "released the learner lock" in log_text and "lost the learner lock" not in log_text
    assert "nanobind" not in log_text


@pytest.mark.slow
def test_demo_runs_the_whole_loop_and_writes_its_report(tmp_path):
    from streamagent.cli import main

    out = tmp_path / "report"
    assert main(["demo", "--days", "6", "--users", "60", "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| optimal (MDP, exact) |" in md and "Dead-lettered 6 of 6" in md
    assert (out / "learning-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
